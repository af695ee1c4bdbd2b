"""Conjugate gradients on ``(H + damping I) x = v``, matrix-free."""

from __future__ import annotations

import warnings

import torch
from tqdm.auto import tqdm

from ..curvature import Curvature
from ..errors import CurvatureError, InflensWarning, InputError
from ._cg_core import conjugate_gradient
from .base import Solver
from .kfac import EKFAC, KFAC


def _preconditioner_by_name(name: str) -> Solver:
    """``"kfac"`` or ``"ekfac"`` with default settings (the solvers that can precondition)."""
    table = {"kfac": KFAC, "ekfac": EKFAC}
    if name.lower() not in table:
        raise InputError(
            f"preconditioner {name!r} is not known by name; use 'kfac', 'ekfac' or a Solver instance"
        )
    return table[name.lower()]()


class CG(Solver):
    """Batched conjugate gradients: one full-data HVP pass per iteration for all right-hand sides.

    Stops each right-hand side when ``||A x - v|| <= tol * ||v||``. Warns (with the residual)
    when ``max_iter`` is reached first; raises :class:`CurvatureError` when a search direction
    has non-positive curvature (``A`` is not positive definite, add damping).

    With a ``preconditioner`` (any solver whose ``solve`` approximates ``A^-1`` cheaply, e.g.
    :class:`~inflens.solvers.EKFAC`), runs preconditioned CG: the same fixed point ``A x = v``
    and the same stopping rule on the true residual, in far fewer full-data products when the
    approximation captures the spectrum (the preconditioner must be symmetric positive
    definite; the K-FAC family is).

    Args:
        tol: relative residual tolerance.
        max_iter: iteration cap (default ``min(10 p, 1000)``).
        preconditioner: ``None`` (plain CG), a solver instance, or a solver name
            (``"kfac"``, ``"ekfac"``); it is fitted on the same curvature in :meth:`fit`.
    """

    name = "cg"

    def __init__(
        self,
        tol: float = 1e-8,
        max_iter: int | None = None,
        preconditioner: Solver | str | None = None,
    ) -> None:
        super().__init__()
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        self.tol = float(tol)
        self.max_iter = max_iter
        if isinstance(preconditioner, str):
            preconditioner = _preconditioner_by_name(preconditioner)
        if preconditioner is not None and not isinstance(preconditioner, Solver):
            raise InputError(
                "preconditioner must be None, a solver name such as 'ekfac', or a Solver "
                f"instance, got {type(preconditioner).__name__}"
            )
        if isinstance(preconditioner, CG):
            raise InputError("a CG solver cannot precondition CG (it is not a fixed linear map)")
        self.preconditioner = preconditioner

    def fit(self, curvature: Curvature) -> CG:
        super().fit(curvature)
        self.info_ = {"solves": 0, "iterations": [], "relative_residuals": []}
        if self.preconditioner is not None:
            self.preconditioner.fit(curvature)
            self.info_["preconditioner"] = self.preconditioner.name
        return self

    def _precondition(self, r: torch.Tensor) -> torch.Tensor:
        pre = getattr(self, "preconditioner", None)  # absent in artifacts from before it
        if pre is None:
            return r
        return pre.solve(r).to(r.dtype)

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        curv = self._check_fitted()
        b = rhs.to(curv.dtype)
        # p iterations suffice only in exact arithmetic: in floating point an ill-conditioned
        # small problem needs a few times p (a cap of p stopped at residual ~1e-8 for p = 20)
        max_iter = self.max_iter or min(10 * curv.p, 1000)
        bar = tqdm(total=max_iter, desc="CG", disable=not curv.progress, leave=False)
        with curv.reusing():  # theta and data are fixed for the whole solve
            x, iters = self._iterate(curv, b, max_iter, bar)
            # the recursive residual drifts from the true one; report the true one
            bnorm = b.norm(dim=1)
            true_res = (curv.matvec(x) - b).norm(dim=1) / bnorm.clamp_min(torch.finfo(b.dtype).tiny)
        bar.close()
        self.info_["solves"] += b.shape[0]
        self.info_["iterations"] += iters.tolist()
        self.info_["relative_residuals"] += true_res.tolist()
        worst = float(true_res.max())
        if worst > max(10 * self.tol, 1e-6 if b.dtype == torch.float32 else 0):
            warnings.warn(
                f"CG stopped after {int(iters.max())} iterations with relative residual "
                f"{worst:.2e} (tol {self.tol:.0e}); raise max_iter, add damping to improve the "
                "conditioning, or use the Exact solver for small models",
                InflensWarning,
                stacklevel=3,
            )
        return x

    def _iterate(
        self, curv: Curvature, b: torch.Tensor, max_iter: int, bar
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Preconditioned) CG on ``A x = b`` for every row (the one iteration,
        :func:`~inflens.solvers._cg_core.conjugate_gradient`); returns ``x`` and the
        iterations."""

        def matvec(v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            bar.update(1)
            return curv.matvec(v)

        def precondition(r: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return self._precondition(r)

        try:
            res = conjugate_gradient(matvec, b, self.tol, max_iter, precondition)
        except CurvatureError as exc:
            raise CurvatureError(
                f"CG: {exc}. The Hessian plus damping is not positive definite. Add damping "
                "(Sec. 4.2), use l2 regularisation, or curvature='ggn'"
            ) from exc
        return res.x, res.iterations.cpu()


class PCG(CG):
    """:class:`CG` preconditioned by K-FAC unless told otherwise (``solver="pcg"``).

    The same solve of ``(H + damping I) x = v`` to ``tol``; K-FAC (one pass over the data to
    fit) usually cuts the number of full-data products several-fold (docs/solvers.md).
    """

    name = "pcg"

    def __init__(
        self,
        tol: float = 1e-8,
        max_iter: int | None = None,
        preconditioner: Solver | str | None = "kfac",
    ) -> None:
        super().__init__(tol=tol, max_iter=max_iter, preconditioner=preconditioner)
