"""LiSSA: the stochastic Neumann-series estimator of ``H^-1 v`` (Agarwal et al.; Sec. 3)."""

from __future__ import annotations

import math
import time
import warnings

import torch
from tqdm.auto import tqdm

from ..curvature import Curvature, power_iteration
from ..errors import InflensWarning, InputError, SolverDivergedError
from .base import Solver


class LiSSA(Solver):
    """Stochastic estimate of ``(H + damping I + scale * d I)^-1 v``.

    Each repeat runs ``h_0 = v``, ``h_j = v + (1 - d) h_{j-1} - A_j h_{j-1} / scale`` for
    ``depth`` steps, where ``A_j`` is the Hessian (with ``l2`` and the Influence damping) on a
    fresh mini-batch of ``batch_size`` uniformly drawn training points; the estimate is
    ``h_T / scale``, averaged over ``repeats``. The fixed point is
    ``(A + scale * d * I)^-1 v``: LiSSA's own ``damping`` d is effectively ``scale * d``.
    Convergence needs the spectrum of ``A / scale`` inside (0, 2).

    Args:
        depth: recursion depth t (paper: 5000).
        repeats: independent repeats r averaged (paper: 10).
        scale: divides the loss so that ``||A|| / scale < 1`` (paper: 25). ``None``: the larger
            of 1.5 times a Lanczos estimate (20 full-data products) of the largest eigenvalue
            of ``A`` and, with mini-batches, the largest eigenvalue of ``A_j`` over
            ``scale_probes`` random mini-batches (power iteration) divided by 1.5: each step
            multiplies ``h`` by ``I - A_j / scale``, which must not expand it, and a single
            example's Hessian can be far larger than the average (on MNIST-LR with batch 1, 1.5
            times the average's top eigenvalue was 3.5 and diverged; the paper used 25).
        damping: LiSSA's own damping d (paper: 0).
        batch_size: training points per Hessian sample (paper: 1; ``None``: the full data, a
            deterministic Neumann iteration, run once whatever ``repeats`` says).
        seed: seed of the sampling generator.
        estimate_spectrum: also when ``scale`` is given, estimate the extreme eigenvalues at
            ``fit`` (20 full-data products) to report the contraction per step and warn when
            ``depth`` is too small to converge.
        scale_probes: at most this many mini-batches are probed for the automatic scale
            (``scale=None``): ``min(scale_probes, max(8, 1024 // batch_size))``.

    Speed: a step is one Hessian-vector product on ``batch_size`` points. The samples of 256
    steps are drawn and gathered at once, the model stays in eval mode for the whole solve,
    and a single right-hand side uses reverse-over-reverse autograd (no vmap), so batch-1
    steps cost about two small backward passes.
    """

    name = "lissa"

    def __init__(
        self,
        depth: int = 5000,
        repeats: int = 10,
        scale: float | None = None,
        damping: float = 0.0,
        batch_size: int | None = 1,
        seed: int = 0,
        estimate_spectrum: bool = True,
        scale_probes: int = 128,
    ) -> None:
        super().__init__()
        if depth < 1 or repeats < 1:
            raise InputError(f"depth and repeats must be >= 1, got {depth}, {repeats}")
        if scale is not None and not scale > 0:
            raise InputError(f"scale must be positive, got {scale}")
        if not 0 <= damping < 1:
            raise InputError(f"LiSSA damping d must lie in [0, 1), got {damping}")
        self.depth, self.repeats = int(depth), int(repeats)
        self.scale, self.damping = scale, float(damping)
        self.batch_size, self.seed = batch_size, int(seed)
        self.estimate_spectrum = bool(estimate_spectrum)
        if not (isinstance(scale_probes, int) and scale_probes >= 0):
            raise InputError(f"scale_probes must be a non-negative integer, got {scale_probes!r}")
        self.scale_probes = scale_probes

    @classmethod
    def paper(cls, seed: int = 17) -> LiSSA:
        """The values of the paper's Fig. 2: depth 5000, repeats 10, scale 25, batch 1."""
        return cls(depth=5000, repeats=10, scale=25.0, damping=0.0, batch_size=1, seed=seed)

    def fit(self, curvature: Curvature) -> LiSSA:
        super().fit(curvature)
        self.info_ = {}
        ext: dict[str, float] = {}
        if self.scale is None or self.estimate_spectrum:
            # 20 Lanczos steps: the largest eigenvalue to a few digits (for the scale) and an
            # upper estimate of the smallest (for the convergence check)
            ext = curvature.extreme_eigenvalues(iters=20, seed=self.seed)
            self.info_["estimated_max_eigenvalue"] = ext["max_eigenvalue"]
            self.info_["estimated_min_eigenvalue"] = ext["min_eigenvalue"]
        if self.scale is None:
            self.scale_ = 1.5 * ext["max_eigenvalue"]
            batch_max = self._batch_top_eigenvalue(curvature)
            if batch_max is not None:
                self.info_["estimated_max_batch_eigenvalue"] = batch_max
                self.scale_ = max(self.scale_, batch_max / 1.5)
        else:
            self.scale_ = float(self.scale)
        self.info_["scale"] = self.scale_
        self.info_["effective_damping"] = self.scale_ * self.damping
        if ext:
            # the deterministic part of the error after t steps shrinks like rho^t
            rho = max(
                abs(1 - self.damping - ext["min_eigenvalue"] / self.scale_),
                abs(1 - self.damping - ext["max_eigenvalue"] / self.scale_),
            )
            self.info_["contraction"] = rho
            self.info_["bias_factor"] = rho**self.depth if rho < 1 else None
        return self

    def _batch_top_eigenvalue(
        self, curv: Curvature, iters: int = 15, probes: int | None = None
    ) -> float | None:
        """Largest eigenvalue of the mini-batch operator ``A_j`` over ``scale_probes`` random
        mini-batches of ``batch_size`` (power iteration, ``iters`` products each), or None
        for full-batch LiSSA."""
        n = curv.n
        probes = self.scale_probes if probes is None else probes
        if self.batch_size is None or int(self.batch_size) >= n or probes == 0:
            return None
        bs = int(self.batch_size)
        g = torch.Generator(device="cpu").manual_seed(self.seed + 1)
        # larger mini-batches concentrate around A: fewer probes (about 1,024 examples in all,
        # at least 8 batches), so the probe stays a small fraction of the solve
        probes = min(probes, max(8, 1024 // bs), max(1, n // bs))
        idx = torch.randperm(n, generator=g)[: probes * bs].reshape(probes, bs)
        top = 0.0
        with curv.objective.evaluating():
            for rows in idx:
                x, y = curv.data.get(rows)
                x, y = x.to(curv.device), y.to(curv.device)
                v = torch.randn(curv.p, generator=g, dtype=curv.dtype).to(curv.device)
                lam = power_iteration(
                    lambda u, x=x, y=y: curv.batch_matvec(u[None], x, y)[0], v, iters
                )
                top = max(top, abs(lam))
        return top

    def _diverged(self, curv: Curvature, step: int, norm: float) -> SolverDivergedError:
        lam = self.info_.get("estimated_max_eigenvalue")
        if lam is None:
            lam = curv.top_eigenvalue()
        batch = self.info_.get("estimated_max_batch_eigenvalue")
        if batch is None:  # probe the mini-batches now, for a scale that covers them
            batch = self._batch_top_eigenvalue(curv, probes=max(self.scale_probes, 32))
        suggest = max(1.5 * lam, 2 * self.scale_, (batch or 0.0) / 1.5)
        seen = f" (mini-batch Hessians up to about {batch:.4g} in a sample)" if batch else ""
        hint = (
            "the automatic choice missed mini-batches with larger curvature"
            if self.scale is None
            else "or scale=None to choose it automatically"
        )
        return SolverDivergedError(
            f"LiSSA diverged at step {step} (||h|| = {norm:.3g}): the scale {self.scale_:.4g} "
            f"is too small for a Hessian whose largest eigenvalue is about {lam:.4g}{seen}; "
            f"try scale >= {suggest:.3g} ({hint}), or a larger batch_size"
        )

    def _warn_convergence(self) -> None:
        bias = self.info_.get("bias_factor")
        if "contraction" not in self.info_ or (bias is not None and bias <= 0.05):
            return
        rho = self.info_["contraction"]
        if bias is None:
            # rho >= 1: the iteration cannot converge even if ||h|| has not yet grown past the
            # blow-up check (short depth); without this, 100 * None below raised a TypeError
            lam = self.info_["estimated_max_eigenvalue"]
            raise SolverDivergedError(
                f"LiSSA cannot converge: with scale {self.scale_:.4g} the error is multiplied by "
                f"about {rho:.3g} >= 1 per step (estimated eigenvalues of the Hessian from "
                f"{self.info_['estimated_min_eigenvalue']:.3g} to {lam:.4g}); try scale >= "
                f"{max(1.5 * lam, 2 * self.scale_):.3g} (or scale=None), or add damping if the "
                "smallest eigenvalue is not positive"
            )
        need = math.ceil(math.log(0.01) / math.log(rho)) if 0 < rho < 1 else None
        lam_min = self.info_["estimated_min_eigenvalue"]
        fix = f"raise depth to about {need}" if need else "raise scale"
        warnings.warn(
            f"LiSSA is far from converged: after depth={self.depth} steps the Neumann series "
            f"still misses about {100 * bias:.0f}% of the component along the smallest "
            f"eigenvalue (~{lam_min:.3g}) of the Hessian (contraction {rho:.6f} per step with "
            f"scale {self.scale_:.4g}); {fix}, add damping, or use solver='cg' / 'arnoldi'",
            InflensWarning,
            stacklevel=3,
        )

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        curv = self._check_fitted()
        obj = curv.objective
        v = rhs.to(curv.dtype)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        n = curv.n
        bs = n if self.batch_size is None else min(int(self.batch_size), n)
        full = bs == n  # deterministic Neumann iteration with the full-data product
        repeats = 1 if full else self.repeats  # identical repeats would only cost time
        total = torch.zeros_like(v)
        vnorm = float(v.norm())
        check_every = max(1, self.depth // 50)
        block = 256  # steps whose samples are drawn and gathered at once
        bar = tqdm(total=repeats * self.depth, desc="LiSSA", disable=not curv.progress, leave=False)
        data = curv.data
        if not full and data.x is not None:  # tensors: move once, then index directly
            xs, ys = data.x.to(curv.device), data.y.to(curv.device)
        damp, scale = 1 - self.damping, self.scale_
        t0 = time.perf_counter()
        with obj.evaluating():
            for _ in range(repeats):
                h = v.clone()
                last_norm = vnorm
                for j0 in range(0, self.depth, block):
                    nb = min(block, self.depth - j0)
                    if not full:
                        idx = torch.randint(n, (nb, bs), generator=g)
                        if data.x is not None:
                            xb, yb = xs[idx.to(xs.device)], ys[idx.to(ys.device)]
                        else:
                            xb, yb = data.get(idx.reshape(-1))
                            xb = xb.to(curv.device).reshape(nb, bs, *xb.shape[1:])
                            yb = yb.to(curv.device).reshape(nb, bs, *yb.shape[1:])
                    for jj in range(nb):
                        if full:
                            ah = curv.matvec(h)
                        else:
                            ah = curv.batch_matvec(h, xb[jj], yb[jj])
                        h = v + damp * h - ah / scale
                        j = j0 + jj + 1
                        if j % check_every == 0 or j == self.depth:
                            norm = float(h.norm())
                            bar.update(check_every if j % check_every == 0 else j % check_every)
                            # a convergent series grows at most linearly; geometric growth
                            # is divergence
                            if not math.isfinite(norm) or (
                                norm > 1e6 * max(vnorm, 1e-30) and norm > 4 * last_norm
                            ):
                                bar.close()
                                raise self._diverged(curv, j, norm)
                            last_norm = norm
                total += h / scale
        bar.close()
        steps = repeats * self.depth
        self.info_["seconds_per_step"] = (time.perf_counter() - t0) / steps
        self._warn_convergence()
        return total / repeats
