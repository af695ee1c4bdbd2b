"""Inverse-Hessian-vector-product solvers: ``Exact``, ``CG``, ``LiSSA``."""

from __future__ import annotations

from .base import Solver
from .cg import CG
from .exact import Exact
from .lissa import LiSSA

_BY_NAME = {"exact": Exact, "cg": CG, "lissa": LiSSA}


def make_solver(solver: str | Solver) -> Solver:
    """A solver object from a name (``"exact"``, ``"cg"``, ``"lissa"``) or pass one through."""
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


__all__ = ["CG", "Exact", "LiSSA", "Solver", "make_solver", "register_solver"]
