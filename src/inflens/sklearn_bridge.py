"""Influence for fitted scikit-learn linear models: :func:`from_sklearn`.

``inflens.from_sklearn(estimator, X_train, y_train)`` rebuilds a fitted estimator as an
:class:`inflens.Objective` in float64, with scikit-learn's conventions mapped exactly, and
returns a fitted :class:`SklearnInfluence` (an :class:`inflens.Influence`) whose queries take
numpy arrays (or tensors) and labels as the estimator knows them (strings, ``{3, 7}``, ...).

Mapping (``n`` training points, per-example weights ``s_i = sample_weight_i * class_weight[y_i]``,
``l_i`` the per-example loss, ``theta = (coef_, intercept_)``, ``a = intercept_scaling``): every
estimator below minimises, up to a constant factor, the *mean* risk
``R = mean_i s_i l_i + (1/2) sum_j l2_j theta_j^2``:

- ``LogisticRegression`` (lbfgs, newton-cg, newton-cholesky, sag, saga with ``l1_ratio=0``):
  ``C sum_i s_i l_i + ||w||^2 / 2`` with ``l_i = log(1 + exp(-y_i s_i))`` (binary) or the
  softmax cross-entropy (3 or more classes): ``l2 = 1/(C n)`` on ``coef_``, 0 on ``intercept_``.
- ``LogisticRegression(solver="liblinear")``: the same, but liblinear appends a constant
  feature ``a`` and penalises its weight, so ``l2 = 1/(C n a^2)`` on the intercept.
- ``LinearSVC`` (binary, liblinear): ``C sum_i s_i l_i + ||(w, b/a)||^2 / 2`` with
  ``l_i = max(0, 1 - y_i s_i)^2`` (``loss="squared_hinge"``) or the smooth hinge
  (``loss="hinge"``): ``l2 = 1/(C n)`` on ``coef_``, ``1/(C n a^2)`` on the intercept.
- ``SGDClassifier(loss="hinge", penalty="l2")`` (binary): ``mean_i s_i l_i + alpha ||w||^2 / 2``
  with the smooth hinge: ``l2 = alpha`` on ``coef_``, 0 on the intercept.
- ``Ridge``: ``sum_i s_i (y_i - s_i)^2 + alpha ||w||^2`` with ``l_i = (y_i - s_i)^2`` (no 1/2):
  ``l2 = 2 alpha / n`` on ``coef_``, 0 on the intercept. ``LinearRegression``: ``l2 = 0``.

The Hessian is that of ``R``: ``H = mean_i s_i Hess l_i + diag(l2)`` (``+ damping I``). Hinge
losses are replaced by the paper's smooth hinge ``t log(1 + exp((1 - y s) / t))`` (Sec. 4.3,
temperature ``t``): the influence is then that of the smoothed surrogate, evaluated at the
hinge-trained weights, as in the paper.

What a leave-one-out refit keeps fixed decides the training-side gradient (``loo`` option):

- ``loo="estimator"`` (default): the scores predict refitting *the same estimator* (the same
  ``C`` / ``alpha``) without ``z_i``. For the sum-form objectives (``C sum l_i + ||w||^2/2``,
  Ridge) the penalty does not shrink with the data, so removing ``z_i`` removes ``s_i l_i`` only
  and the training-side gradient is ``g_i = s_i grad l_i`` (no ``l2 theta`` term); for
  SGDClassifier, whose objective is already a mean, it is ``s_i grad l_i + l2 theta``.
- ``loo="mean_risk"``: the paper's convention, ``g_i = s_i grad l_i + l2 theta``: the refit
  keeps ``l2`` fixed relative to the mean loss over the ``n - 1`` remaining points (for
  LogisticRegression / LinearSVC a refit with ``C n / (n - 1)``, for Ridge with
  ``alpha (n - 1) / n``).

How: the model outputs its scores plus one column that carries the weight penalty
``(1/2) sum_j l2_j (theta_j - a_j)^2`` and each example's loss is ``s_i l_i`` plus that column,
with ``Objective(l2=0)``. Its Hessian is ``diag(l2)`` wherever the anchor ``a`` is, so ``H`` is
exact and the intercept unpenalised; the anchor ``a = theta-hat`` (``loo="estimator"`` on a
sum-form objective) makes the penalty's gradient vanish, ``a = 0`` gives ``l2 theta``. The
test side is the unweighted loss ``l(z_test)`` without penalty (an Objective ``measurement``).
A multinomial model with an intercept is invariant to adding a constant to every intercept, so
``H`` is singular along ``u = (0, 1_K)``; every training and test gradient is orthogonal to
``u``, so adding ``(1/2)(u . (theta - theta-hat))^2 / K`` to the loss changes no score and makes
``H`` invertible.

Signs and scale are inflens's: ``I_up,loss(z_i, z_test) = -grad l(z_test)^T H^-1 g_i``,
negative = helpful; ``predicted_loss_change = -I_up,loss / n`` is the change of the test loss
when ``z_i`` is removed and the estimator refit.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import Data, DataLike
from .errors import InflensWarning, InputError
from .influence import Indices, Influence
from .losses import SmoothHinge, binary_logistic, cross_entropy
from .objective import Objective
from .solvers import Solver, make_solver

SUPPORTED = (
    "LogisticRegression (binary or multinomial, L2 penalty: l1_ratio=0, finite C)",
    "LinearSVC (binary, penalty='l2', loss='squared_hinge' or 'hinge')",
    "SGDClassifier (binary, loss='hinge', penalty='l2')",
    "Ridge (one target, positive=False)",
    "LinearRegression (one target, positive=False)",
)

#: solvers that use the exact Hessian (K-FAC / EK-FAC approximate the Gauss-Newton matrix,
#: which would drop the penalty carried by the model's output)
_SOLVERS = ("exact", "cg", "lissa", "arnoldi")
_LOO = ("estimator", "mean_risk")
#: relative gradient norm of the mapped risk above which the estimator is reported unconverged
_OPTIMUM_RTOL = 1e-2


def _supported() -> str:
    return "supported fitted estimators: " + "; ".join(SUPPORTED)


@dataclass(frozen=True)
class SklearnConfig:
    """Options of :func:`from_sklearn` (passed as keyword arguments).

    Args:
        solver: ``"exact"`` (default), ``"cg"``, ``"lissa"``, ``"arnoldi"`` or such a solver
            object; K-FAC-type solvers are refused (they approximate the Gauss-Newton matrix).
        damping: ``delta >= 0`` added to ``H`` (needed for a singular LinearRegression).
        t: smooth-hinge temperature (> 0) for estimators trained with the hinge loss.
        loo: ``"estimator"`` (refit the same estimator without ``z_i``) or ``"mean_risk"``
            (the paper's convention; see the module docstring).
        batch_size: examples per vectorised chunk (``None``: automatic).
        progress: progress bars on passes over the training set.
        check_optimum: warn when the estimator is far from the optimum of its objective.
    """

    solver: str | Solver = "exact"
    damping: float = 0.0
    t: float = 0.001
    loo: str = "estimator"
    batch_size: int | None = None
    progress: bool = False
    check_optimum: bool = True

    def __post_init__(self) -> None:
        name = self.solver.name if isinstance(self.solver, Solver) else str(self.solver).lower()
        if name not in _SOLVERS:
            raise InputError(
                f"solver {self.solver!r} is not supported by the scikit-learn bridge; use one of "
                f"{', '.join(_SOLVERS)} (K-FAC-type solvers approximate the Gauss-Newton matrix)"
            )
        if not (float(self.damping) >= 0.0):
            raise InputError(f"damping must be a non-negative number, got {self.damping}")
        if not (float(self.t) > 0.0 and math.isfinite(float(self.t))):
            raise InputError(
                f"the smooth-hinge temperature t must be a positive number, got {self.t} "
                "(t = 0 is the hinge itself, whose Hessian is zero)"
            )
        if self.loo not in _LOO:
            raise InputError(f"loo must be one of {', '.join(_LOO)}, got {self.loo!r}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise InputError(f"batch_size must be a positive integer, got {self.batch_size}")


@dataclass(frozen=True)
class SklearnMapping:
    """How an estimator was mapped (``SklearnInfluence.mapping``).

    ``loss``: ``"logistic"``, ``"cross_entropy"``, ``"smooth_hinge"``, ``"squared_hinge"`` or
    ``"squared_error"``; ``l2_coef`` / ``l2_intercept``: the penalty weights of the mean risk;
    ``sum_form``: scikit-learn's objective is ``C sum_i loss_i + penalty`` (True) or a mean;
    ``penalty_in_train_gradient``: whether ``g_i`` contains ``l2 theta`` (see ``loo``);
    ``classes``: the estimator's ``classes_`` (None for regression); ``t``: the smooth-hinge
    temperature where one is used.
    """

    estimator: str
    loss: str
    n: int
    l2_coef: float
    l2_intercept: float
    fit_intercept: bool
    sum_form: bool
    loo: str
    penalty_in_train_gradient: bool
    classes: tuple | None
    t: float | None


# ---------------------------------------------------------------------------- model and loss
class _PenalisedLinear(nn.Module):
    """``[B, K + 1]``: the scores ``x W^T + b`` and, as the last column, the penalty
    ``(1/2) l2_w ||W - A_W||^2 + (1/2) l2_b ||b - a_b||^2 (+ the multinomial null term)``."""

    def __init__(
        self,
        coef: torch.Tensor,
        intercept: torch.Tensor | None,
        l2: tuple[float, float],
        anchor: tuple[torch.Tensor, torch.Tensor | None],
        null_weight: float,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(coef.clone())
        self.bias = nn.Parameter(intercept.clone()) if intercept is not None else None
        self.l2_coef, self.l2_intercept = float(l2[0]), float(l2[1])
        self.null_weight = float(null_weight)
        self.register_buffer("anchor_weight", anchor[0].clone())
        if intercept is not None:
            self.register_buffer("anchor_bias", anchor[1].clone())
            self.register_buffer("fitted_bias", intercept.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x @ self.weight.T
        pen = 0.5 * self.l2_coef * ((self.weight - self.anchor_weight) ** 2).sum()
        if self.bias is not None:
            scores = scores + self.bias
            pen = pen + 0.5 * self.l2_intercept * ((self.bias - self.anchor_bias) ** 2).sum()
            if self.null_weight:
                pen = pen + 0.5 * self.null_weight * (self.bias - self.fitted_bias).sum() ** 2
        return torch.cat([scores, pen.expand(scores.shape[0], 1)], 1)


@dataclass(frozen=True)
class _Loss:
    """Per-example loss on ``[B, K + 1]`` outputs and ``[B, 2]`` targets (label code or
    regression target, weight): ``weight * l(scores, label) + penalty`` when ``weighted``,
    else ``l(scores, label)`` alone (the test-side measurement)."""

    kind: str
    k: int
    weighted: bool
    t: float = 0.001

    def value(self, scores: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.kind == "cross_entropy":
            return cross_entropy(scores, label.long())
        s = scores[:, 0]
        if self.kind == "logistic":
            return binary_logistic(s, label)
        if self.kind == "smooth_hinge":
            return SmoothHinge(self.t)(s, label)
        if self.kind == "squared_hinge":
            return torch.clamp(1 - (2 * label - 1) * s, min=0) ** 2
        return (s - label) ** 2  # squared_error

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        vals = self.value(outputs[:, : self.k], targets[:, 0])
        if not self.weighted:
            return vals
        return targets[:, 1] * vals + outputs[:, self.k]


# ---------------------------------------------------------------------------- estimator specs
@dataclass
class _Spec:
    """What :func:`_read_estimator` extracts: parameters, loss, penalty, weights."""

    name: str
    coef: np.ndarray  # [K, d]
    intercept: np.ndarray | None  # [K]
    loss: str
    l2_coef: float
    l2_intercept: float
    sum_form: bool
    classes: np.ndarray | None
    class_weight: np.ndarray | None  # [n_classes]
    sample_weight: np.ndarray  # [n]


def _as_matrix(x: Any, what: str, d: int | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if hasattr(x, "toarray") and not isinstance(x, np.ndarray):  # scipy.sparse
        x = x.toarray()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be a numeric array of shape [n, features]: {exc}") from exc
    if arr.ndim != 2:
        raise InputError(f"{what} must be 2-D [n, features], got shape {arr.shape}")
    if d is not None and arr.shape[1] != d:
        raise InputError(f"{what} has {arr.shape[1]} features but the estimator was fitted on {d}")
    if arr.shape[0] == 0:
        raise InputError(f"{what} is empty: at least one example is needed")
    if not np.isfinite(arr).all():
        raise InputError(f"{what} contains NaN/inf values; clean or drop those rows")
    return arr


def _as_labels(y: Any, what: str) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise InputError(
            f"{what} must be 1-D (one label or target per example), got shape {arr.shape}; "
            f"multi-output models are not supported. {_supported()}"
        )
    return arr


def _codes(classes: np.ndarray, y: np.ndarray, what: str) -> np.ndarray:
    """Index of each label in ``classes`` (InputError on a label the estimator never saw)."""
    table = {c: i for i, c in enumerate(classes.tolist())}
    out = np.empty(len(y), dtype=np.int64)
    for j, v in enumerate(y.tolist()):
        i = table.get(v)
        if i is None:
            raise InputError(
                f"{what} label {v!r} (example {j}) is not one of the estimator's classes "
                f"{classes.tolist()}"
            )
        out[j] = i
    return out


def _penalty_kind(est: Any) -> str | None:
    """LogisticRegression's effective penalty ('l2', 'l1', 'elasticnet' or None), read as its
    ``fit`` reads it (``penalty`` deprecated in favour of ``l1_ratio`` and ``C``)."""
    penalty = getattr(est, "penalty", "deprecated")
    if penalty != "deprecated":
        return None if penalty is None or not np.isfinite(est.C) else penalty
    l1 = getattr(est, "l1_ratio", 0.0)
    if not np.isfinite(est.C):
        return None
    if l1 is None or l1 == 0:
        return "l2"
    return "l1" if l1 == 1 else "elasticnet"


def _class_weights(est: Any, classes: np.ndarray, y: np.ndarray, sw: np.ndarray | None) -> Any:
    from sklearn.utils.class_weight import compute_class_weight

    cw = getattr(est, "class_weight", None)
    if cw is None:
        return None
    try:
        return np.asarray(
            compute_class_weight(cw, classes=classes, y=y, sample_weight=sw), dtype=np.float64
        )
    except (ValueError, TypeError) as exc:
        raise InputError(f"class_weight={cw!r} does not fit y_train: {exc}") from exc


def _read_estimator(est: Any, y: np.ndarray, sw_user: np.ndarray | None, n: int) -> _Spec:
    from sklearn.linear_model import (
        LinearRegression,
        LogisticRegression,
        Ridge,
        SGDClassifier,
    )
    from sklearn.svm import LinearSVC

    name = type(est).__name__
    kinds = (LogisticRegression, LinearSVC, SGDClassifier, Ridge, LinearRegression)
    if type(est) not in kinds:
        raise InputError(f"cannot map a {name} to an influence objective; {_supported()}")
    if not hasattr(est, "coef_"):
        raise InputError(f"the {name} is not fitted: call .fit(X_train, y_train) first")
    sw = np.ones(n) if sw_user is None else sw_user
    coef = np.asarray(est.coef_, dtype=np.float64)
    fit_intercept = bool(getattr(est, "fit_intercept", True))

    if isinstance(est, (Ridge, LinearRegression)):
        if coef.ndim == 2 and coef.shape[0] != 1:
            raise InputError(
                f"the {name} was fitted on {coef.shape[0]} targets; multi-output regression is "
                f"not supported (fit one estimator per target). {_supported()}"
            )
        if getattr(est, "positive", False):
            raise InputError(f"{name}(positive=True) is a constrained fit; {_supported()}")
        if not np.issubdtype(y.dtype, np.number):
            raise InputError(f"{name} needs numeric targets, got dtype {y.dtype}")
        coef = coef.reshape(1, -1)
        intercept = np.asarray(est.intercept_, dtype=np.float64).reshape(1)
        if isinstance(est, Ridge):
            alpha = np.asarray(est.alpha, dtype=np.float64).reshape(-1)
            if alpha.size != 1:
                raise InputError(f"Ridge alpha must be one number, got {alpha.size} values")
            l2 = 2.0 * float(alpha[0]) / n
        else:
            l2 = 0.0
        return _Spec(
            name,
            coef,
            intercept if fit_intercept else None,
            "squared_error",
            l2,
            0.0,
            True,
            None,
            None,
            sw,
        )

    classes = np.asarray(est.classes_)
    k = len(classes)
    if isinstance(est, LogisticRegression):
        penalty = _penalty_kind(est)
        if penalty != "l2":
            raise InputError(
                f"LogisticRegression with penalty {penalty!r} cannot be mapped (the influence "
                "function needs a twice-differentiable objective with an L2 penalty: use "
                f"l1_ratio=0 and a finite C). {_supported()}"
            )
        cw = _class_weights(est, classes, y, sw_user)
        lam = 1.0 / (float(est.C) * n)
        liblinear = est.solver == "liblinear"
        lam_b = lam / float(est.intercept_scaling) ** 2 if liblinear else 0.0
        loss = "logistic" if k == 2 else "cross_entropy"
        sum_form = True
    elif isinstance(est, LinearSVC):
        if est.penalty != "l2" or k != 2 or est.multi_class != "ovr":
            raise InputError(
                f"LinearSVC(penalty={est.penalty!r}, multi_class={est.multi_class!r}) with "
                f"{k} classes cannot be mapped; only binary LinearSVC with penalty='l2' is. "
                f"{_supported()}"
            )
        cw = _class_weights(est, classes, y, sw_user)
        lam = 1.0 / (float(est.C) * n)
        lam_b = lam / float(est.intercept_scaling) ** 2  # liblinear penalises the intercept
        loss = "squared_hinge" if est.loss == "squared_hinge" else "smooth_hinge"
        sum_form = True
    else:  # SGDClassifier
        if est.loss != "hinge" or est.penalty != "l2" or k != 2:
            raise InputError(
                f"SGDClassifier(loss={est.loss!r}, penalty={est.penalty!r}) with {k} classes "
                "cannot be mapped; only binary loss='hinge', penalty='l2' is. "
                f"{_supported()}"
            )
        cw = _class_weights(est, classes, y, None)  # SGD ignores sample_weight here
        lam, lam_b = float(est.alpha), 0.0
        loss, sum_form = "smooth_hinge", False
    intercept = np.asarray(est.intercept_, dtype=np.float64).reshape(-1)
    return _Spec(
        name,
        coef.reshape(-1, coef.shape[-1]),
        intercept if fit_intercept else None,
        loss,
        lam,
        lam_b,
        sum_form,
        classes,
        cw,
        sw,
    )


# ---------------------------------------------------------------------------- the Influence
class SklearnInfluence(Influence):
    """An :class:`inflens.Influence` for a mapped scikit-learn estimator (see
    :func:`from_sklearn`). Queries take ``(X, y)`` as numpy arrays, tensors or array-likes with
    the estimator's own labels; the test side is the unweighted per-example loss. ``mapping``
    says how the estimator was mapped. (``save``/``load`` of the generic Influence do not keep
    the mapping: call :func:`from_sklearn` again, which is cheap for these models.)"""

    mapping: SklearnMapping

    # --------------------------------------------------------------- data in the model's form
    def encode(self, X: Any, y: Any, weights: np.ndarray | None = None) -> Data:
        """``(X, y)`` with the estimator's labels as an :class:`inflens.data.Data` the model reads:
        float64 inputs and ``[m, 2]`` targets (label index or target value, example weight)."""
        x = _as_matrix(X, "X", self._n_features)
        labels = _as_labels(y, "y")
        if labels.shape[0] != x.shape[0]:
            raise InputError(f"X has {x.shape[0]} rows but y has {labels.shape[0]} labels")
        if self.mapping.classes is None:
            try:
                value = labels.astype(np.float64)
            except (TypeError, ValueError) as exc:
                raise InputError(f"regression targets must be numbers: {exc}") from exc
            if not np.isfinite(value).all():
                raise InputError("y contains NaN/inf values; clean or drop those rows")
        else:
            value = _codes(np.asarray(self.mapping.classes, dtype=object), labels, "y").astype(
                np.float64
            )
        w = np.ones(x.shape[0]) if weights is None else weights
        targets = torch.from_numpy(np.stack([value, w], 1))
        return Data((torch.from_numpy(x), targets), "test data")

    def _test(self, test: DataLike) -> Data:
        if isinstance(test, Data):
            return test
        if isinstance(test, (tuple, list)) and len(test) == 2:
            return self.encode(test[0], test[1])
        raise InputError(
            "test data for a scikit-learn bridge must be a pair (X_test, y_test) of arrays "
            f"(numpy, tensors, lists) with the estimator's labels, got {type(test).__name__}"
        )

    # --------------------------------------------------------------- queries taking test data
    def test_gradients(self, test: DataLike) -> torch.Tensor:
        """``[m, p]`` gradients of the unweighted test loss at each test point."""
        return super().test_gradients(self._test(test))

    def s_test(self, test: DataLike, mean: bool = False) -> torch.Tensor:
        """``H^-1 grad l(z_test)`` per test point ``[m, p]`` (or ``[1, p]`` of the mean)."""
        return super().s_test(self._test(test), mean)

    def loss_influence(self, test: DataLike) -> torch.Tensor:
        """``I_up,loss(z_i, z_test) = -grad l(z_test)^T H^-1 g_i``, ``[n_test, n_train]``;
        negative = helpful."""
        return super().loss_influence(self._test(test))

    def predicted_loss_change(self, test: DataLike, indices: Indices = None) -> torch.Tensor:
        """``-I_up,loss / n``: change of each test loss when ``z_i`` is removed and the estimator
        refit (as ``loo`` defines), ``[n_test, k]``. Positive = the point was helpful."""
        return super().predicted_loss_change(self._test(test), indices)

    def input_influence(self, test: DataLike, indices: Indices) -> torch.Tensor:
        """``I_pert,loss`` (eq. 5) of the mean test loss, ``[k, features]``."""
        return super().input_influence(self._test(test), indices)

    def score_to_folder(
        self, test: DataLike, folder: str | os.PathLike, chunk_size: int = 4096, **kwargs: Any
    ) -> torch.Tensor:
        """:meth:`inflens.Influence.score_to_folder` with the test data encoded."""
        return super().score_to_folder(self._test(test), folder, chunk_size, **kwargs)

    def label_influence(self, test: DataLike, indices: Indices, new_labels: Any) -> torch.Tensor:
        """Influence of relabelling ``z_i`` to ``new_labels`` (the estimator's labels; the new
        example weight is that of the new class), ``[n_test, k]``."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        x, _ = self.train.get(idx)
        new = self.encode(x.numpy(), _as_labels(new_labels, "new_labels"))
        codes = new.y[:, 0].numpy()
        w = self._sample_weight[idx.numpy()]
        if self._class_weight is not None:
            w = w * self._class_weight[codes.astype(np.int64)]
        y_new = torch.stack([new.y[:, 0], torch.from_numpy(np.asarray(w, dtype=np.float64))], 1)
        return super().label_influence(self._test(test), idx, y_new)

    # --------------------------------------------------------------- training-side quantities
    def _penalty_gradient(self) -> torch.Tensor:
        """``[p]``: the gradient of the penalty column at theta-hat (in every ``g_i``)."""
        return self._l2 * (self.objective.theta - self._anchor)

    def self_influence(self, include_l2_gradient: bool = True) -> torch.Tensor:
        """``-grad l(z_i)^T H^-1 g_i`` for every training point, ``[n]`` (test side: the
        unweighted loss). ``include_l2_gradient=False`` drops any ``l2 theta`` from ``g_i``."""
        curv = self._fitted()
        obj = self.objective
        pen = self._penalty_gradient()
        out = []
        with obj.evaluating():
            for _, x, y in curv.chunks(desc="Self-influence"):
                g = obj.per_example_grads(x, y, "loss")
                gt = g if include_l2_gradient else g - pen
                out.append(
                    -(obj.per_example_grads(x, y, "measurement") * self.solver.solve(gt)).sum(1)
                )
        return torch.cat(out)

    def risk_gradient(self) -> torch.Tensor:
        """``[p]``: gradient of the mapped risk ``mean_i s_i l_i + (1/2) sum_j l2_j theta_j^2``
        at theta-hat; about 0 when the estimator converged (not for a smoothed hinge)."""
        curv = self._fitted()
        obj = self.objective
        total = torch.zeros(obj.p, dtype=obj.dtype)
        with obj.evaluating():
            for _, x, y in curv.chunks():
                total += obj.per_example_grads(x, y, "loss").sum(0)
        return total / self.n - self._penalty_gradient() + self._l2 * obj.theta


def _flat_l2(spec: _Spec) -> np.ndarray:
    parts = [np.full(spec.coef.size, spec.l2_coef)]
    if spec.intercept is not None:
        parts.append(np.full(spec.intercept.size, spec.l2_intercept))
    return np.concatenate(parts)


def _check_singular(spec: _Spec, x: np.ndarray, damping: float) -> None:
    """Refuse an unpenalised least-squares fit whose Hessian is singular (no damping)."""
    if spec.loss != "squared_error" or damping > 0:
        return
    xt = x if spec.intercept is None else np.hstack([x, np.ones((x.shape[0], 1))])
    h = (xt * spec.sample_weight[:, None]).T @ xt * (2.0 / x.shape[0])
    h = h + np.diag(_flat_l2(spec))
    ev = np.linalg.eigvalsh(0.5 * (h + h.T))
    top = max(float(ev[-1]), np.finfo(np.float64).tiny)
    if float(ev[0]) <= h.shape[0] * np.finfo(np.float64).eps * top:
        rank = int((ev > h.shape[0] * np.finfo(np.float64).eps * top).sum())
        raise InputError(
            f"the {spec.name}'s Hessian 2/n X^T X is singular (rank {rank} of {h.shape[0]}: "
            "collinear or too few rows), so leave-one-out influence is undefined; pass "
            f"damping=... (e.g. {1e-6 * top:.2g}) or use Ridge"
        )


def from_sklearn(
    estimator: Any,
    X_train: Any,
    y_train: Any,
    sample_weight: Any = None,
    **options: Any,
) -> SklearnInfluence:
    """A fitted :class:`inflens.Influence` for a fitted scikit-learn linear model.

    ``I_up,loss(z_i, z_test) = -grad l(z_test)^T H^-1 g_i`` with ``H`` the Hessian of the mean
    risk the estimator minimised (module docstring: ``C``, ``alpha``, class and sample weights
    and the unpenalised intercept mapped exactly) and ``g_i`` its training-side gradient.
    Negative = helpful; ``predicted_loss_change = -I_up,loss / n`` predicts refitting the
    estimator without ``z_i`` (``loo="estimator"``) or the paper's mean-risk refit.

    Args:
        estimator: a fitted LogisticRegression, LinearSVC, SGDClassifier (hinge), Ridge or
            LinearRegression (:data:`SUPPORTED`); anything else raises :class:`InputError`.
        X_train, y_train: the data it was fitted on (numpy, tensors, scipy.sparse, lists),
            labels as the estimator knows them.
        sample_weight: the ``sample_weight`` passed to ``fit``, if any.
        **options: :class:`SklearnConfig` fields (solver, damping, t, loo, batch_size,
            progress, check_optimum).

    Example:
        >>> inf = inflens.from_sklearn(LogisticRegression(C=0.5).fit(X, y), X, y)
        >>> inf.predicted_loss_change((X_test, y_test))   # numpy in, [n_test, n] tensor out
    """
    names = {f.name for f in fields(SklearnConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise InputError(f"unknown option(s) {unknown}; from_sklearn accepts {sorted(names)}")
    cfg = SklearnConfig(**options)
    d = getattr(estimator, "n_features_in_", None)
    x = _as_matrix(X_train, "X_train", d)
    y = _as_labels(y_train, "y_train")
    n = x.shape[0]
    if y.shape[0] != n:
        raise InputError(f"X_train has {n} rows but y_train has {y.shape[0]} labels")
    sw_user = None
    if sample_weight is not None:
        sw_user = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
        if sw_user.shape[0] != n or not np.isfinite(sw_user).all() or (sw_user < 0).any():
            raise InputError(
                f"sample_weight must hold {n} finite non-negative numbers, one per training row"
            )
    spec = _read_estimator(estimator, y, sw_user, n)
    if d is None and spec.coef.shape[1] != x.shape[1]:
        raise InputError(
            f"X_train has {x.shape[1]} features but the estimator has {spec.coef.shape[1]}"
        )
    base_weights = spec.sample_weight.copy()
    weights = base_weights.copy()
    codes = None
    if spec.classes is not None:
        codes = _codes(spec.classes, y, "y_train")
        if spec.class_weight is not None:
            weights = weights * spec.class_weight[codes]
    spec.sample_weight = weights
    _check_singular(spec, x, cfg.damping)

    penalty_in_g = cfg.loo == "mean_risk" or not spec.sum_form
    coef = torch.from_numpy(spec.coef.copy())
    intercept = None if spec.intercept is None else torch.from_numpy(spec.intercept.copy())
    if penalty_in_g:
        anchor = (
            torch.zeros_like(coef),
            None if intercept is None else torch.zeros_like(intercept),
        )
    else:
        anchor = (coef, intercept)
    k = coef.shape[0]
    null = 1.0 / k if (spec.loss == "cross_entropy" and intercept is not None) else 0.0
    model = _PenalisedLinear(coef, intercept, (spec.l2_coef, spec.l2_intercept), anchor, null)
    t = cfg.t if spec.loss == "smooth_hinge" else None
    obj = Objective(
        model,
        _Loss(spec.loss, k, weighted=True, t=cfg.t),
        l2=0.0,
        measurement=_Loss(spec.loss, k, weighted=False, t=cfg.t),
    )

    value = codes.astype(np.float64) if codes is not None else y.astype(np.float64)
    targets = torch.from_numpy(np.stack([value, weights], 1))
    inf = SklearnInfluence(
        obj,
        (torch.from_numpy(x), targets),
        solver=make_solver(cfg.solver),
        damping=cfg.damping,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
    )
    inf.mapping = SklearnMapping(
        estimator=spec.name,
        loss=spec.loss,
        n=n,
        l2_coef=spec.l2_coef,
        l2_intercept=spec.l2_intercept,
        fit_intercept=intercept is not None,
        sum_form=spec.sum_form,
        loo=cfg.loo,
        penalty_in_train_gradient=penalty_in_g,
        classes=None if spec.classes is None else tuple(spec.classes.tolist()),
        t=t,
    )
    inf._n_features = x.shape[1]
    inf._sample_weight = base_weights
    inf._class_weight = spec.class_weight
    inf._l2 = torch.from_numpy(_flat_l2(spec))
    inf._anchor = torch.cat([a.reshape(-1) for a in anchor if a is not None])
    inf.fit()
    if cfg.check_optimum and spec.loss != "smooth_hinge":
        _warn_unconverged(inf)
    return inf


def _warn_unconverged(inf: SklearnInfluence) -> None:
    """Influence assumes theta-hat minimises the risk (Appendix B): say when it does not."""
    grad = inf.risk_gradient()
    x, y = inf.train.get(torch.arange(min(inf.n, 512)))
    with torch.no_grad():
        g = inf.objective.per_example_grads(x, y, "loss") - inf._penalty_gradient()
    scale = float(g.norm(dim=1).mean()) + float((inf._l2 * inf.objective.theta).norm())
    rel = float(grad.norm()) / max(scale, np.finfo(np.float64).tiny)
    if rel > _OPTIMUM_RTOL:
        warnings.warn(
            f"the {inf.mapping.estimator} is not at the optimum of its objective (relative "
            f"gradient norm {rel:.1e}); influence assumes it is. Refit with a smaller tol and a "
            "larger max_iter (see SklearnInfluence.risk_gradient())",
            InflensWarning,
            stacklevel=3,
        )
