"""Inverse-Hessian-vector-product solvers.

Matrix-free on the exact curvature operator: ``Exact`` (explicit matrix), ``CG`` (and
``PCG``, CG preconditioned by K-FAC), ``LiSSA``,
``Arnoldi`` (low-rank eigendecomposition). Structured approximations of the Gauss-Newton
matrix: ``KFAC`` and ``EKFAC`` (Linear and Conv2d layers).
"""

from __future__ import annotations

from .arnoldi import Arnoldi
from .base import Solver
from .cg import CG, PCG
from .exact import Exact
from .kfac import EKFAC, KFAC
from .lissa import LiSSA

_BY_NAME: dict[str, type[Solver]] = {
    "exact": Exact,
    "cg": CG,
    "pcg": PCG,
    "lissa": LiSSA,
    "arnoldi": Arnoldi,
    "kfac": KFAC,
    "ekfac": EKFAC,
}


def make_solver(solver: str | Solver) -> Solver:
    """A solver object from a name (``"exact"``, ``"cg"``, ``"pcg"``, ``"lissa"``,
    ``"arnoldi"``, ``"kfac"``, ``"ekfac"``; default settings) or pass one through."""
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str) and solver.lower() in _BY_NAME:
        return _BY_NAME[solver.lower()]()
    raise ValueError(
        f"unknown solver {solver!r}; use one of {', '.join(_BY_NAME)} or a Solver object "
        "from inflens.solvers"
    )


def register_solver(name: str, cls: type[Solver]) -> None:
    """Make ``Influence(..., solver=name)`` construct ``cls()``."""
    _BY_NAME[name.lower()] = cls


__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "Arnoldi",
    "Exact",
    "LiSSA",
    "PCG",
    "Solver",
    "make_solver",
    "register_solver",
]
