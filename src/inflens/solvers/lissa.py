"""LiSSA: the stochastic Neumann-series estimator of ``H^-1 v`` (Agarwal et al.; Sec. 3)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..curvature import Curvature
from ..errors import InputError, SolverDivergedError
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
        scale: divides the loss so that ``||A|| / scale < 1`` (paper: 25). ``None``: 1.5 times a
            power-iteration estimate of the largest eigenvalue of ``A``.
        damping: LiSSA's own damping d (paper: 0).
        batch_size: training points per Hessian sample (paper: 1; ``None``: the full data).
        seed: seed of the sampling generator.
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

    @classmethod
    def paper(cls, seed: int = 17) -> LiSSA:
        """The values of the paper's Fig. 2: depth 5000, repeats 10, scale 25, batch 1."""
        return cls(depth=5000, repeats=10, scale=25.0, damping=0.0, batch_size=1, seed=seed)

    def fit(self, curvature: Curvature) -> LiSSA:
        super().fit(curvature)
        self.info_ = {}
        if self.scale is None:
            lam = curvature.top_eigenvalue()
            self.scale_ = 1.5 * lam
            self.info_["estimated_max_eigenvalue"] = lam
        else:
            self.scale_ = float(self.scale)
        self.info_["scale"] = self.scale_
        self.info_["effective_damping"] = self.scale_ * self.damping
        return self

    def _diverged(self, curv: Curvature, step: int, norm: float) -> SolverDivergedError:
        lam = curv.top_eigenvalue()
        return SolverDivergedError(
            f"LiSSA diverged at step {step} (||h|| = {norm:.3g}): the scale {self.scale_:.4g} "
            f"is too small for a Hessian whose largest eigenvalue is about {lam:.4g}; "
            f"try scale >= {max(1.5 * lam, 2 * self.scale_):.3g} (or scale=None to choose it "
            "automatically), or a larger batch_size"
        )

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        curv = self._check_fitted()
        v = rhs.to(curv.dtype)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        n = curv.n
        bs = n if self.batch_size is None else min(int(self.batch_size), n)
        total = torch.zeros_like(v)
        vnorm = float(v.norm())
        check_every = max(1, self.depth // 50)
        bar = tqdm(
            total=self.repeats * self.depth, desc="LiSSA", disable=not curv.progress, leave=False
        )
        full = None
        data = curv.data
        if bs == n:
            full = [curv.objective.prepare(*data.get(torch.arange(n)))]
        elif data.x is not None:  # tensors: move once, then index directly in the loop
            xs, ys = data.x.to(curv.device), data.y.to(curv.device)
        for _ in range(self.repeats):
            h = v.clone()
            last_norm = vnorm
            for j in range(1, self.depth + 1):
                if full is not None:
                    x, y = full[0]
                else:
                    idx = torch.randint(n, (bs,), generator=g)
                    if data.x is not None:
                        x, y = xs[idx], ys[idx]
                    else:
                        x, y = data.get(idx)
                        x, y = x.to(curv.device), y.to(curv.device)
                h = v + (1 - self.damping) * h - curv.batch_matvec(h, x, y) / self.scale_
                if j % check_every == 0 or j == self.depth:
                    norm = float(h.norm())
                    bar.update(check_every if j % check_every == 0 else j % check_every)
                    # a convergent series grows at most linearly; geometric growth is divergence
                    if not math.isfinite(norm) or (
                        norm > 1e6 * max(vnorm, 1e-30) and norm > 4 * last_norm
                    ):
                        bar.close()
                        raise self._diverged(curv, j, norm)
                    last_norm = norm
            total += h / self.scale_
        bar.close()
        return total / self.repeats
