"""Direct solve with the explicit Hessian (small models)."""

from __future__ import annotations

import math

import torch

from ..curvature import Curvature, krylov
from ..errors import CurvatureError, InputError, MemoryBudgetError
from .base import Solver


def _round_up(x: float, digits: int = 3) -> float:
    """``x > 0`` rounded *up* to ``digits`` significant digits (a suggested damping printed
    with ``.3g`` must not round below the threshold it is meant to exceed)."""
    e = math.floor(math.log10(x)) - (digits - 1)
    return math.ceil(x / 10.0**e) * 10.0**e


class Exact(Solver):
    """Forms ``A = H + damping I`` explicitly and solves it directly.

    Two factorisations, both exact to round-off:

    - ``"eigh"``: the eigendecomposition both solves and diagnoses, with the exact extreme
      eigenvalues;
    - ``"cholesky"``: ``A = L L^T``, about 20x cheaper than ``eigh`` at ``p`` in the thousands
      (3 s against 64 s at ``p = 7,840``, docs/solvers.md). The extreme eigenvalues are then
      Lanczos estimates: 30 steps on ``A`` for the largest and on ``A^-1`` (through ``L``) for
      the smallest, each step a ``p^2`` product.

    ``"auto"`` (default) uses ``eigh`` up to ``p = 2,000`` and ``cholesky`` above. An indefinite
    ``A`` (the Cholesky factorisation fails) is refused with its most negative eigenvalue and
    a damping that would fix it; a singular one likewise. Memory is ``O(p^2)``: a model whose
    Hessian would exceed ``max_memory_gb`` is refused with a clear message.

    Args:
        max_memory_gb: upper bound on the memory the explicit Hessian and its factors take.
        method: ``"auto"``, ``"eigh"`` or ``"cholesky"``.
    """

    name = "exact"
    direct = True
    #: above this p, "auto" factorises by Cholesky
    EIGH_MAX_P = 2000

    def __init__(self, max_memory_gb: float = 4.0, method: str = "auto") -> None:
        super().__init__()
        if method not in ("auto", "eigh", "cholesky"):
            raise InputError(f"method must be 'auto', 'eigh' or 'cholesky', got {method!r}")
        self.max_memory_gb = float(max_memory_gb)
        self.method = method

    def fit(self, curvature: Curvature) -> Exact:
        p = curvature.p
        itemsize = torch.finfo(curvature.dtype).bits // 8
        need = 3 * p * p * itemsize / 2**30
        limit = min(self.max_memory_gb, getattr(curvature, "budget_bytes", 2**62) / 2**30)
        if need > limit:
            raise MemoryBudgetError(
                f"the exact solver needs about {need:.1f} GiB for a {p}x{p} Hessian, more than "
                f"its limit of {limit:.2f} GiB (Exact(max_memory_gb={self.max_memory_gb}), "
                "Influence(max_memory_gb=...)); use solver='cg', 'arnoldi' or 'ekfac' "
                "(matrix-free or factored), or raise the limit"
            )
        # only a successful fit marks the solver as fitted (a refused Hessian must not leave a
        # half-fitted solver whose solve() fails with an AttributeError)
        self.curvature_ = None
        self.evals_ = self.evecs_ = self.chol_ = None
        a = curvature.dense()
        method = self.method
        if method == "auto":
            method = "eigh" if p <= self.EIGH_MAX_P else "cholesky"
        chol = None
        if method == "cholesky":
            chol, bad = torch.linalg.cholesky_ex(a)
            if int(bad) != 0:
                chol, method = None, "eigh"  # not positive definite: eigh says by how much
        if method == "eigh":
            evals, evecs = torch.linalg.eigh(a)
            lam_min, lam_max = float(evals[0]), float(evals[-1])
            estimated = False
        else:
            lam_max = _lanczos_top(lambda v: a @ v, p, a.dtype, a.device)
            lam_min = 1.0 / _lanczos_top(
                lambda v: torch.cholesky_solve(v[:, None], chol)[:, 0], p, a.dtype, a.device
            )
            estimated = True
        tol = 100 * torch.finfo(curvature.dtype).eps * max(abs(lam_max), 1e-30) * p**0.5
        self.info_ = {
            "min_eigenvalue": lam_min,
            "max_eigenvalue": lam_max,
            "condition_number": lam_max / lam_min if lam_min > 0 else float("inf"),
            "matvecs": p,
            "factorisation": method,
            "eigenvalues_estimated": estimated,
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
        if chol is not None:
            self.chol_ = chol
        else:
            self.evals_, self.evecs_ = evals, evecs
        super().fit(curvature)
        return self

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        chol = getattr(self, "chol_", None)  # absent in artifacts written before Cholesky
        if chol is not None:
            return torch.cholesky_solve(rhs.to(chol.dtype).T, chol).T
        q = self.evecs_
        return ((rhs.to(q.dtype) @ q) / self.evals_) @ q.T

    def dense_inverse(self) -> torch.Tensor:
        """The explicit ``[p, p]`` inverse ``A^-1``."""
        self._check_fitted()
        chol = getattr(self, "chol_", None)
        if chol is not None:
            return torch.cholesky_inverse(chol)
        q = self.evecs_
        return (q / self.evals_) @ q.T


def _lanczos_top(matvec, p: int, dtype: torch.dtype, device, iters: int = 30) -> float:
    """Largest eigenvalue of a symmetric positive definite operator by Lanczos (the extreme
    Ritz value; converges first, from below)."""
    return float(krylov(matvec, p, iters, dtype, device).values[-1])
