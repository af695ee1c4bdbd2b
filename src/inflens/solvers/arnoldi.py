"""Low-rank inverse from a few eigenpairs of the curvature (Schioppa et al., AAAI 2022), with a
scaled-identity model of the rest of the spectrum."""

from __future__ import annotations

import warnings

import torch

from ..curvature import Curvature, krylov
from ..errors import CurvatureError, InflensWarning, InputError
from .base import Solver, require_scalar_l2
from .exact import _round_up

RESIDUALS = ("mean", "none", "shift")


class Arnoldi(Solver):
    """``A^-1 v ~ U diag(1 / lambda) U^T v + (I - U U^T) v / sigma`` from the top eigenpairs of
    ``A = H + damping I``.

    ``fit`` runs ``n_iters`` Arnoldi steps (one full-data Hessian-vector product each; on a
    symmetric operator this is Lanczos with full re-orthogonalisation) from a random vector,
    diagonalises the projected matrix and keeps ``rank`` Ritz pairs ``(lambda_j, u_j)`` of the
    largest ``|lambda_j|``. The Krylov basis is built once; each query is then two
    ``[k, p] x [p, rank]`` products, no pass over the data.

    Outside the span of ``U`` the inverse is, by ``residual``:

    - ``"mean"`` (default, Nystrom-style): ``1 / sigma`` with ``sigma`` the mean of the
      eigenvalues left out, ``sigma = (tr(A) - sum_j lambda_j) / (p - rank)``. ``tr(A)`` is the
      trace of the projected matrix (the sum of all Ritz values of the Krylov space) plus the
      trace of ``A`` on the orthogonal complement of the Krylov space: exact from an
      orthonormal basis of that complement when it has at most ``probes`` dimensions,
      otherwise Hutchinson's estimate ``mean_i z_i^T A z_i`` over ``probes`` Rademacher
      vectors projected onto it (one batched pass over the data; the top of the spectrum is
      already removed, so the estimate has a small variance). A modest rank then keeps the
      rest of the spectrum at its average instead of dropping it;
    - ``"none"`` (Schioppa et al.): zero, i.e. gradients are projected onto the top
      eigenspace, ``A^-1 ~ U diag(1/lambda) U^T``;
    - ``"shift"``: ``1 / (l2 + damping)``, exact when ``H - l2 I`` has rank at most ``rank``,
      otherwise it over-weights the discarded directions.

    ``rank=None`` (default) chooses the rank from the spectrum: the smallest ``r`` for which
    the next Ritz value is within ``1 + rank_tol`` times the mean ``sigma_r`` of the eigenvalues
    below the top ``r`` (beyond it, replacing an eigenvalue by ``sigma`` changes its inverse by
    less than a factor ``1 + rank_tol``), among the leading Ritz pairs that have converged
    (relative residual <= 5e-2); all of those when none qualifies. With ``rank = n_iters = p`` every
    residual rule equals the exact solve to round-off.

    Args:
        rank: eigenpairs kept (``None``: from the spectrum, above).
        n_iters: Arnoldi steps (full-data products); default ``min(p, 2 * rank + 20)`` with a
            given rank, ``min(p, 150)`` with ``rank=None``. The extreme eigenpairs converge
            first; raise it if the diagnostics show large Ritz residuals.
        residual: ``"mean"``, ``"none"`` or ``"shift"`` (above).
        rank_tol: tolerance of the automatic rank.
        probes: Rademacher vectors for the trace on the complement of the Krylov space.
        seed: seed of the start vector and of the probes.
    """

    name = "arnoldi"
    #: solve() is cheap (two thin matrix products), so per-point queries such as
    #: self-influence may call it for every training point
    direct = True
    #: Arnoldi steps with rank=None
    AUTO_ITERS = 150
    #: a kept Ritz pair with a larger relative residual makes fit() warn (a given rank)
    CONVERGED = 1e-2
    #: the automatic rank keeps only Ritz pairs with at most this relative residual (their span
    #: is then close to an invariant subspace, and the Galerkin inverse on it accurate)
    AUTO_CONVERGED = 5e-2

    def __init__(
        self,
        rank: int | None = None,
        n_iters: int | None = None,
        residual: str = "mean",
        rank_tol: float = 0.5,
        probes: int = 30,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if rank is not None and int(rank) < 1:
            raise InputError(f"rank must be a positive integer or None, got {rank}")
        if n_iters is not None and int(n_iters) < (1 if rank is None else int(rank)):
            raise InputError(f"n_iters ({n_iters}) must be at least rank ({rank}) and positive")
        if residual not in RESIDUALS:
            raise InputError(f"residual must be one of {', '.join(RESIDUALS)}, got {residual!r}")
        if not rank_tol > 0:
            raise InputError(f"rank_tol must be positive, got {rank_tol}")
        if int(probes) < 1:
            raise InputError(f"probes must be a positive integer, got {probes}")
        self.rank = None if rank is None else int(rank)
        self.n_iters = None if n_iters is None else int(n_iters)
        self.residual = residual
        self.rank_tol = float(rank_tol)
        self.probes = int(probes)
        self.seed = int(seed)

    # ------------------------------------------------------------------ fit
    def fit(self, curvature: Curvature) -> Arnoldi:
        if self.residual == "shift":  # 1 / (l2 + damping) outside the kept eigenspace
            require_scalar_l2(curvature, "Arnoldi(residual='shift')")
        super().fit(curvature)
        p = curvature.p
        if self.rank is not None:
            steps = min(p, self.n_iters if self.n_iters is not None else 2 * self.rank + 20)
        else:
            steps = min(p, self.n_iters if self.n_iters is not None else self.AUTO_ITERS)
        before = curvature.num_matvecs
        with curvature.reusing():  # theta and the data are fixed for the whole fit
            res = krylov(
                lambda v: curvature.matvec(v[None], desc=None)[0],
                p,
                steps,
                curvature.dtype,
                curvature.device,
                seed=self.seed,
                vectors=True,
            )
            need_trace = self.residual == "mean" or self.rank is None
            trace, trace_probes = (
                self._trace(curvature, res.vectors, res.values) if need_trace else (None, 0)
            )
        order = torch.argsort(res.values.abs(), descending=True)
        vals = res.values[order]
        rel_res = res.residuals[order] / vals.abs().clamp_min(torch.finfo(vals.dtype).tiny)
        rank = self._choose_rank(vals, rel_res, trace, p)
        keep = order[:rank]
        lam = res.values[keep]
        self.evals_ = lam
        self.evecs_ = res.vectors[keep].contiguous()  # [rank, p], orthonormal rows
        # a per-parameter l2 has no scalar shift (only residual='shift' would need one)
        self.shift_ = curvature.shift if curvature.scalar_shift else None
        self.complement_ = None
        if trace is not None and rank < p:
            # the mean of the eigenvalues left out; a noisy trace must not put it above them
            sigma = (trace - float(lam.sum())) / (p - rank)
            self.complement_ = min(sigma, float(lam.abs().min()))
        kept_res = rel_res[:rank]
        shift = self.shift_
        self.info_ = {
            "rank": int(rank),
            "n_iters": res.steps,
            "matvecs": curvature.num_matvecs - before,
            "eigenvalues": lam.tolist(),
            "max_eigenvalue": float(res.values[-1]),
            "min_eigenvalue_estimate": float(res.values[0]),
            "min_kept_eigenvalue": float(lam.min()),
            "max_ritz_relative_residual": float(kept_res.max()),
            "residual": self.residual,
            "complement_eigenvalue": self.complement_,
            "trace_estimate": trace,
            "trace_probes": trace_probes,
            "captured_trace_fraction": (
                float((lam - shift).sum()) / (trace - p * shift)
                if shift is not None and trace is not None and trace - p * shift > 0
                else None
            ),
        }
        self._check(curvature, res.values, lam, kept_res, rank)
        return self

    def _trace(self, curv: Curvature, q: torch.Tensor, values: torch.Tensor) -> tuple[float, int]:
        """``(tr(A), probes used)``: the Ritz values' sum (``tr(Q^T A Q)``) plus the trace of
        ``A`` on the orthogonal complement of the Krylov basis ``q [m, p]``, exact when the
        complement has at most ``probes`` dimensions (0 probes reported), else Hutchinson's
        estimate on projected Rademacher vectors."""
        p, m = curv.p, q.shape[0]
        inside = float(values.sum())
        if m >= p:
            return inside, 0
        g = torch.Generator(device="cpu").manual_seed(self.seed + 1)
        exact = p - m <= self.probes
        k = p - m if exact else self.probes
        z = torch.randint(0, 2, (k, p), generator=g).to(curv.dtype).mul_(2).sub_(1)
        z = z.to(curv.device)
        for _ in range(2):  # twice is enough: orthogonal to the basis to round-off
            z -= (z @ q.T) @ q
        if exact:  # an orthonormal basis of the complement: the trace there is exact
            z = torch.linalg.qr(z.T).Q.T
        quad = (z * curv.matvec(z)).sum(1)
        outside = float(quad.sum()) if exact else float(quad.mean())
        return inside + outside, 0 if exact else k

    def _choose_rank(
        self, vals: torch.Tensor, rel_res: torch.Tensor, trace: float | None, p: int
    ) -> int:
        """The given rank, or the automatic one (class docstring) from Ritz values ``vals``
        sorted by decreasing magnitude."""
        m = vals.numel()
        if self.rank is not None:
            return min(self.rank, m)
        assert trace is not None
        ok = rel_res <= self.AUTO_CONVERGED
        # the leading run of converged pairs (the automatic rank never skips one)
        limit = int(ok.long().cumprod(0).sum())
        if limit == 0:  # nothing has converged: the top pair (fit() then warns)
            return 1
        head = torch.cat([vals.new_zeros(1), vals.cumsum(0)])  # sum of the top r values
        for r in range(1, limit):
            sigma_r = (trace - float(head[r])) / (p - r)
            if float(vals[r]) <= (1 + self.rank_tol) * sigma_r:
                return r
        return limit

    def _check(
        self,
        curv: Curvature,
        values: torch.Tensor,
        lam: torch.Tensor,
        kept_res: torch.Tensor,
        rank: int,
    ) -> None:
        p, damping = curv.p, curv.damping
        top = float(values.abs().max())
        # a Ritz value of a symmetric operator is accurate to about eps ||A|| (no sqrt(p)
        # factor as for a dense factorisation: in float32 with p = 10^5 that factor made a
        # well-conditioned GGN plus damping 0.01 look singular)
        tol = 100 * torch.finfo(values.dtype).eps * top
        # with the mean complement every Ritz value counts (the whole spectrum is inverted)
        lowest = float(values.min()) if self.residual == "mean" else float(lam.min())
        if self.complement_ is not None and self.residual == "mean":
            lowest = min(lowest, self.complement_)
        if lowest <= tol:
            what = "negative" if lowest < -tol else "(near) zero"
            suggest = _round_up(2 * max(-lowest, 1e-3 * top) + damping)
            raise CurvatureError(
                f"Arnoldi found a {what} eigenvalue of H + damping ({lowest:.4g}; largest "
                f"{float(values.max()):.4g}): the model is not at a minimum of a convex "
                f"objective. Pass damping > {max(-lowest, 0) + damping:.3g} (e.g. "
                f"damping={suggest:.3g}), or use curvature='ggn' (positive semi-definite)"
            )
        if self.residual == "shift" and rank < p and self.shift_ <= 0:
            raise InputError(
                "residual='shift' needs l2 + damping > 0 (the inverse outside the top "
                "eigenspace is 1 / (l2 + damping)); pass damping > 0 or residual='mean'"
            )
        limit = self.CONVERGED if self.rank is not None else self.AUTO_CONVERGED
        if float(kept_res.max()) > limit:
            warnings.warn(
                f"Arnoldi: the kept eigenpairs have not converged (largest relative Ritz "
                f"residual {float(kept_res.max()):.2e} after {self.info_['n_iters']} steps); "
                f"raise n_iters (now {self.info_['n_iters']}) or lower rank (now {rank})",
                InflensWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ queries
    def _outside(self) -> float | None:
        """``1 / sigma`` applied outside the kept eigenspace, or None (nothing there)."""
        u = self.evecs_
        if u.shape[0] >= u.shape[1]:
            return None
        residual = getattr(self, "residual", "none")
        if residual == "mean":
            sigma = getattr(self, "complement_", None)
            return None if sigma is None else 1.0 / sigma
        if residual == "shift" and self.shift_ > 0:
            return 1.0 / self.shift_
        return None

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``[k, p] -> [k, p]``: the approximate ``A^-1`` (class docstring) applied to each row."""
        self._check_fitted()
        u = self.evecs_
        b = rhs.to(u.dtype)
        c = b @ u.T  # [k, rank] coordinates in the eigenbasis
        out = (c / self.evals_) @ u
        outside = self._outside()
        if outside is not None:
            out += (b - c @ u) * outside
        return out

    def inner(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Row-wise ``a_i^T A^-1 b_i`` ``[k]`` without forming ``A^-1 b``: ``(U a).(U b)/lambda``
        plus ``(a.b - (U a).(U b)) / sigma`` outside the kept eigenspace."""
        self._check_fitted()
        u = self.evecs_
        a, b = a.to(u.dtype), b.to(u.dtype)
        ca, cb = a @ u.T, b @ u.T
        out = (ca * cb / self.evals_).sum(1)
        outside = self._outside()
        if outside is not None:
            out += ((a * b).sum(1) - (ca * cb).sum(1)) * outside
        return out
