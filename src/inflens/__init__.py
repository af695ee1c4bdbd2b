"""inflens: explain a model's predictions through its training data with influence functions.

>>> import inflens
>>> obj = inflens.Objective(model, loss="cross_entropy", l2=0.01)
>>> inf = inflens.Influence(obj, train=(X_train, y_train), solver="exact").fit()
>>> scores = inf.loss_influence((X_test, y_test))     # [n_test, n_train], negative = helpful
"""

from __future__ import annotations

from . import losses, models, solvers, train, validate
from ._version import __version__
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
from .index import GradientIndex
from .influence import Influence
from .objective import Objective
from .sklearn_bridge import from_sklearn

__all__ = [
    "CurvatureError",
    "GradientIndex",
    "Influence",
    "InflensError",
    "InflensWarning",
    "InputError",
    "MemoryBudgetError",
    "NotFittedError",
    "Objective",
    "SolverDivergedError",
    "VmapError",
    "__version__",
    "attack",
    "from_sklearn",
    "losses",
    "models",
    "solvers",
    "train",
    "validate",
]
