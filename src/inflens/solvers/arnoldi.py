"""Low-rank inverse from a few eigenpairs of the curvature (Schioppa et al., AAAI 2022)."""

from __future__ import annotations

import warnings

import torch

from ..curvature import Curvature, krylov
from ..errors import CurvatureError, InflensWarning, InputError
from .base import Solver


class Arnoldi(Solver):
    """``A^-1 v ~ U diag(1 / (mu + damping)) U^T v`` from the top-``rank`` eigenpairs of ``H``.

    ``fit`` runs ``n_iters`` Arnoldi steps (one full-data Hessian-vector product each; on a
    symmetric operator this is Lanczos with full re-orthogonalisation) from a random vector,
    diagonalises the projected matrix and keeps the ``rank`` Ritz pairs ``(mu_j, u_j)`` of the
    largest ``|mu_j|``, where ``mu`` are eigenvalues of ``H`` (which includes ``l2``). The
    damping is applied in this eigenbasis: ``A = H + damping I`` has the same eigenvectors and
    eigenvalues ``mu + damping``. Each query is then two ``[k, p] x [p, rank]`` products.

    Outside the span of ``U`` the inverse is, by ``residual``:

    - ``"none"`` (Schioppa et al.): zero, i.e. gradients are projected onto the top
      eigenspace, ``A^-1 ~ U diag(1/lambda) U^T``;
    - ``"shift"``: ``1 / (l2 + damping)``, which is exact when ``H - l2 I`` has rank at most
      ``rank`` and otherwise over-weights the discarded directions.

    With ``rank = n_iters = p`` the result equals the exact solve to round-off.

    Args:
        rank: number of eigenpairs kept.
        n_iters: Arnoldi steps (full-data products); default ``min(p, 2 * rank + 20)``. The
            extreme eigenpairs converge first; raise it if the diagnostics show large Ritz
            residuals.
        residual: ``"none"`` or ``"shift"`` (see above).
        seed: seed of the start vector.
    """

    name = "arnoldi"
    #: solve() is cheap (two thin matrix products), so per-point queries such as
    #: self-influence may call it for every training point
    direct = True

    def __init__(
        self,
        rank: int = 50,
        n_iters: int | None = None,
        residual: str = "none",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if int(rank) < 1:
            raise InputError(f"rank must be a positive integer, got {rank}")
        if n_iters is not None and int(n_iters) < int(rank):
            raise InputError(f"n_iters ({n_iters}) must be at least rank ({rank})")
        if residual not in ("none", "shift"):
            raise InputError(f"residual must be 'none' or 'shift', got {residual!r}")
        self.rank = int(rank)
        self.n_iters = None if n_iters is None else int(n_iters)
        self.residual = residual
        self.seed = int(seed)

    def fit(self, curvature: Curvature) -> Arnoldi:
        super().fit(curvature)
        p = curvature.p
        rank = min(self.rank, p)
        steps = min(p, self.n_iters if self.n_iters is not None else 2 * rank + 20)
        damping = curvature.damping
        before = curvature.num_matvecs
        res = krylov(
            lambda v: curvature.matvec(v[None], desc=None)[0],
            p,
            steps,
            curvature.dtype,
            curvature.device,
            seed=self.seed,
            vectors=True,
        )
        mu = res.values - damping  # eigenvalues of H; the damping is re-applied below
        keep = torch.argsort(mu.abs(), descending=True)[:rank]
        keep = keep[torch.argsort(mu[keep], descending=True)]
        lam = mu[keep] + damping
        self.evals_ = lam
        self.evecs_ = res.vectors[keep].contiguous()  # [rank, p], orthonormal rows
        self.shift_ = curvature.shift
        rel_res = res.residuals[keep] / lam.abs().clamp_min(torch.finfo(lam.dtype).tiny)
        self.info_ = {
            "rank": int(lam.numel()),
            "n_iters": res.steps,
            "matvecs": curvature.num_matvecs - before,
            "eigenvalues": lam.tolist(),
            "max_eigenvalue": float(res.values[-1]),
            "min_eigenvalue_estimate": float(res.values[0]),
            "min_kept_eigenvalue": float(lam.min()),
            "max_ritz_relative_residual": float(rel_res.max()),
            "residual": self.residual,
        }
        lam_min = float(lam.min())
        tol = 100 * torch.finfo(lam.dtype).eps * float(lam.abs().max()) * p**0.5
        if lam_min <= tol:
            what = "negative" if lam_min < -tol else "(near) zero"
            raise CurvatureError(
                f"Arnoldi kept a {what} eigenvalue of H + damping ({lam_min:.4g}; largest "
                f"{float(lam.max()):.4g}): the model is not at a minimum of a convex objective. "
                f"Pass damping > {max(-lam_min, 0) + damping:.3g} (e.g. damping="
                f"{2 * max(-lam_min, 1e-3 * float(lam.max())) + damping:.3g}), or use "
                "curvature='ggn' (positive semi-definite)"
            )
        if self.residual == "shift" and rank < p and self.shift_ <= 0:
            raise InputError(
                "residual='shift' needs l2 + damping > 0 (the inverse outside the top "
                "eigenspace is 1 / (l2 + damping)); pass damping > 0 or residual='none'"
            )
        if float(rel_res.max()) > 1e-2:
            warnings.warn(
                f"Arnoldi: the kept eigenpairs have not converged (largest relative Ritz "
                f"residual {float(rel_res.max()):.2e} after {res.steps} steps); raise n_iters "
                f"(now {res.steps}) or lower rank (now {rank})",
                InflensWarning,
                stacklevel=3,
            )
        return self

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        u = self.evecs_
        b = rhs.to(u.dtype)
        c = b @ u.T  # [k, rank] coordinates in the eigenbasis
        out = (c / self.evals_) @ u
        if self.residual == "shift" and self.shift_ > 0 and u.shape[0] < u.shape[1]:
            out += (b - c @ u) / self.shift_
        return out

    def inner(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Row-wise ``a_i^T A^-1 b_i`` ``[k]`` without forming ``A^-1 b``: ``(U a).(U b)/lambda``
        (plus ``(a.b - (U a).(U b)) / (l2 + damping)`` with ``residual="shift"``)."""
        self._check_fitted()
        u = self.evecs_
        a, b = a.to(u.dtype), b.to(u.dtype)
        ca, cb = a @ u.T, b @ u.T
        out = (ca * cb / self.evals_).sum(1)
        if self.residual == "shift" and self.shift_ > 0 and u.shape[0] < u.shape[1]:
            out += ((a * b).sum(1) - (ca * cb).sum(1)) / self.shift_
        return out
