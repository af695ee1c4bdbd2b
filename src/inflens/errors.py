"""Exceptions and warnings raised by inflens.

Every error says what is wrong and how to fix it; nothing is silently dropped.
"""

from __future__ import annotations


class InflensError(Exception):
    """Base class of all inflens errors."""


class InputError(InflensError, ValueError):
    """The data, labels, model or arguments do not fit together (shape, dtype, range, NaN)."""


class NotFittedError(InflensError, RuntimeError):
    """A query was made before ``Influence.fit()``."""


class CurvatureError(InflensError, ArithmeticError):
    """The Hessian (plus damping) is not positive definite, so H^-1 is undefined."""


class SolverDivergedError(InflensError, ArithmeticError):
    """An iterative inverse-HVP solver diverged (for LiSSA: the scale is too small)."""


class MemoryBudgetError(InflensError, MemoryError):
    """A requested computation needs more memory than allowed (e.g. the explicit Hessian)."""


class VmapError(InflensError, RuntimeError):
    """``torch.func.vmap`` could not run per-example computations through the model."""


class InflensWarning(UserWarning):
    """A result is usable but less accurate than asked (e.g. CG stopped at max_iter)."""
