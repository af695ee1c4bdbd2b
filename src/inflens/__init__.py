"""inflens: explain a model's predictions through its training data with influence functions.

>>> import inflens
>>> obj = inflens.Objective(model, loss="cross_entropy", l2=0.01)
>>> inf = inflens.Influence(obj, train=(X_train, y_train), solver="exact").fit()
>>> scores = inf.loss_influence((X_test, y_test))     # [n_test, n_train], negative = helpful
"""

from __future__ import annotations

from . import losses, models, solvers, train, validate
from .apps import attack
from .errors import (
    CurvatureError,
    InflensError,
    InflensWarning,
    InputError,
    MemoryBudgetError,
    NotFittedError,
    SolverDivergedError,
    VmapError,
)
from .influence import Influence
from .objective import Objective

__version__ = "0.1.0"

__all__ = [
    "CurvatureError",
    "Influence",
    "InflensError",
    "InflensWarning",
    "InputError",
    "MemoryBudgetError",
    "NotFittedError",
    "Objective",
    "SolverDivergedError",
    "VmapError",
    "attack",
    "losses",
    "models",
    "solvers",
    "train",
    "validate",
]
