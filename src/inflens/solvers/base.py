"""The common interface of inverse-Hessian-vector-product solvers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..curvature import Curvature
from ..errors import NotFittedError


class Solver(ABC):
    """Computes ``(H + damping I)^-1 v`` for the rows ``v`` of a ``[k, p]`` matrix.

    ``fit(curvature)`` prepares whatever can be reused across right-hand sides (a
    factorisation, an eigensystem, a scale); ``solve`` is then called any number of times.
    """

    name = "solver"

    def __init__(self) -> None:
        self.curvature_: Curvature | None = None
        self.info_: dict[str, Any] = {}

    def fit(self, curvature: Curvature) -> Solver:
        """Prepare the solver for ``curvature``; returns ``self``."""
        self.curvature_ = curvature
        return self

    def _check_fitted(self) -> Curvature:
        if self.curvature_ is None:
            raise NotFittedError(f"{type(self).__name__}.solve() was called before fit()")
        return self.curvature_

    @abstractmethod
    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``[k, p] -> [k, p]``: ``(H + damping I)^-1`` applied to each row."""

    def diagnostics(self) -> dict[str, Any]:
        """What the solver measured about itself (iterations, residuals, eigenvalues...)."""
        return dict(self.info_)
