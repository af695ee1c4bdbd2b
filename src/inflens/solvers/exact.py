"""Direct solve with the explicit Hessian (small models)."""

from __future__ import annotations

import math

import torch

from ..curvature import Curvature
from ..errors import CurvatureError, MemoryBudgetError
from .base import Solver


def _round_up(x: float, digits: int = 3) -> float:
    """``x > 0`` rounded *up* to ``digits`` significant digits (a suggested damping printed
    with ``.3g`` must not round below the threshold it is meant to exceed)."""
    e = math.floor(math.log10(x)) - (digits - 1)
    return math.ceil(x / 10.0**e) * 10.0**e


class Exact(Solver):
    """Forms ``A = H + damping I`` explicitly and solves through its eigendecomposition.

    The eigendecomposition (``eigh``) both solves and diagnoses: an indefinite ``A`` is refused
    with its most negative eigenvalue and a damping that would fix it. Memory is ``O(p^2)``:
    a model whose Hessian would exceed ``max_memory_gb`` is refused with a clear message.

    Args:
        max_memory_gb: upper bound on the memory the explicit Hessian and its eigenvectors take.
    """

    name = "exact"

    def __init__(self, max_memory_gb: float = 4.0) -> None:
        super().__init__()
        self.max_memory_gb = float(max_memory_gb)

    def fit(self, curvature: Curvature) -> Exact:
        p = curvature.p
        itemsize = torch.finfo(curvature.dtype).bits // 8
        need = 3 * p * p * itemsize / 2**30
        if need > self.max_memory_gb:
            raise MemoryBudgetError(
                f"the exact solver needs about {need:.1f} GiB for a {p}x{p} Hessian, more than "
                f"max_memory_gb={self.max_memory_gb}; use solver='cg' or 'lissa' (matrix-free), "
                "or raise Exact(max_memory_gb=...)"
            )
        # only a successful fit marks the solver as fitted (a refused Hessian must not leave a
        # half-fitted solver whose solve() fails with an AttributeError)
        self.curvature_ = None
        a = curvature.dense()
        evals, evecs = torch.linalg.eigh(a)
        lam_min, lam_max = float(evals[0]), float(evals[-1])
        tol = 100 * torch.finfo(curvature.dtype).eps * max(abs(lam_max), 1e-30) * p**0.5
        self.info_ = {
            "min_eigenvalue": lam_min,
            "max_eigenvalue": lam_max,
            "condition_number": lam_max / lam_min if lam_min > 0 else float("inf"),
            "matvecs": p,
        }
        if lam_min < -tol:
            # rounded up: with a large damping, 10.002 printed as "10" would not be enough
            suggest = _round_up(2 * abs(lam_min) + curvature.damping)
            raise CurvatureError(
                f"the Hessian plus damping is indefinite: most negative eigenvalue {lam_min:.4g} "
                f"(largest {lam_max:.4g}); the model is not at a minimum of a convex objective. "
                f"Pass a damping larger than {abs(lam_min) + curvature.damping:.3g}, e.g. "
                f"damping={suggest:.3g} (Sec. 4.2), or use l2 regularisation"
            )
        if lam_min <= tol:
            raise CurvatureError(
                f"the Hessian plus damping is singular: smallest eigenvalue {lam_min:.3g}, largest "
                f"{lam_max:.4g}; H^-1 does not exist. Pass damping > 0 (e.g. "
                f"damping={max(1e-3 * lam_max, 1e-8):.3g}) or train with l2 > 0"
            )
        self.evals_, self.evecs_ = evals, evecs
        super().fit(curvature)
        return self

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        q = self.evecs_
        return ((rhs.to(q.dtype) @ q) / self.evals_) @ q.T

    def dense_inverse(self) -> torch.Tensor:
        """The explicit ``[p, p]`` inverse ``A^-1``."""
        self._check_fitted()
        q = self.evecs_
        return (q / self.evals_) @ q.T
