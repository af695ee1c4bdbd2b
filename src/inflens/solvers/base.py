"""The common interface of inverse-Hessian-vector-product solvers.

The contract every solver keeps (and :mod:`inflens.artifacts` relies on, without reading
private attributes):

- ``fit(curvature)`` prepares whatever is reused across right-hand sides and returns ``self``;
- ``solve(rhs [k, p]) -> [k, p]`` applies ``(H + damping I)^-1`` to each row;
- ``direct`` is true when a solve is cheap (a factorisation is applied, no pass over the data),
  so per-training-point queries such as self-influence may call it for every point;
- ``inner(g, h) -> [k]`` returns ``g_j^T A^-1 h_j`` row by row (a default from ``solve``);
- ``state_dict()`` / ``load_state_dict()`` give the fitted state as tensors and JSON values,
  with :attr:`STATE_VERSION`, so a fitted solver is saved and restored without pickle;
- ``diagnostics()`` reports what the solver measured about itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..curvature import Curvature
from ..errors import InputError, NotFittedError
from ..layout import canonical


def _canonical_value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return canonical(v)
    if isinstance(v, list) and v and all(isinstance(e, torch.Tensor) for e in v):
        return [canonical(e) for e in v]
    if isinstance(v, dict) and v and all(isinstance(e, torch.Tensor) for e in v.values()):
        return {k: canonical(e) for k, e in v.items()}
    return v


#: the solvers whose math holds for a per-parameter l2 (``A = H + diag(l2) + damping I``)
PER_PARAMETER_L2_SOLVERS = "Exact, CG, LiSSA and Arnoldi (residual='mean' or 'none')"


def require_scalar_l2(curvature: Curvature, what: str) -> None:
    """Refuse (InputError, at ``fit``) an objective with a per-parameter l2 for a solver whose
    math needs ``A = (loss curvature) + scalar * I``."""
    if not curvature.scalar_shift:
        raise InputError(
            f"{what} needs one scalar l2 (its inverse treats l2 + damping as a multiple of "
            "the identity), but this objective has a per-parameter l2; use "
            f"{PER_PARAMETER_L2_SOLVERS}, or a scalar l2"
        )


class Solver(ABC):
    """Computes ``(H + damping I)^-1 v`` for the rows ``v`` of a ``[k, p]`` matrix.

    ``fit(curvature)`` prepares whatever can be reused across right-hand sides (a
    factorisation, an eigensystem, a scale); ``solve`` is then called any number of times.
    """

    name = "solver"
    #: a solve is cheap enough to call once per training point (see the module docstring)
    direct = False
    #: version of the layout :meth:`state_dict` returns; bump it when attributes change meaning
    STATE_VERSION = 1

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

    def inner(self, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``[k]``: ``g_j^T (H + damping I)^-1 h_j`` for the rows of ``g, h [k, p]``."""
        return (g * self.solve(h)).sum(1)

    def diagnostics(self) -> dict[str, Any]:
        """What the solver measured about itself (iterations, residuals, eigenvalues...)."""
        return dict(self.info_)

    # ------------------------------------------------------------------ fitted state
    def state_dict(self) -> dict[str, Any]:
        """The fitted state: every attribute but the curvature operator (tensors, lists or
        str-keyed dicts of tensors, nested solvers, JSON values), plus ``"state_version"``."""
        state = {k: v for k, v in vars(self).items() if k != "curvature_"}
        state["state_version"] = self.STATE_VERSION
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (tensors put in :func:`~inflens.layout.canonical`
        layout, so solves run the same arithmetic as in the fitted object)."""
        state = dict(state)
        version = state.pop("state_version", 1)
        if version > self.STATE_VERSION:
            raise NotFittedError(
                f"this {type(self).__name__} state has version {version}, newer than this "
                f"inflens understands ({self.STATE_VERSION}); upgrade inflens to load it"
            )
        self.__dict__.setdefault("curvature_", None)
        self.__dict__.setdefault("info_", {})
        for key, v in state.items():
            setattr(self, key, _canonical_value(v))

    def canonicalize(self) -> Solver:
        """Put every fitted tensor in :func:`~inflens.layout.canonical` layout (after
        :meth:`fit`: an eigensystem comes back column-major, a reloaded one row-major)."""
        for key, v in list(vars(self).items()):
            if isinstance(v, Solver):
                v.canonicalize()
            elif key != "curvature_":
                setattr(self, key, _canonical_value(v))
        return self
