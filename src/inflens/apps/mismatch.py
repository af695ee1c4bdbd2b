"""Debug wrong predictions: which training points, and which of their features, caused them.

Section 5.3 of the paper: a model that errs on a group of test points (there, children) is
explained by the training points with the largest influence on those test losses and, through
the input influence ``I_pert,loss``, by the features of those points that matter most.

:func:`explain_errors` takes a fitted :class:`inflens.Influence` and a set of wrongly predicted
test points (by default every misclassified one) and returns a :class:`ErrorReport`: a ranked
table of training points with the predicted effect of removing each, and per point the features
whose change would move the test loss most. ``str(report)`` is a plain-text table.

Sign conventions (those of :meth:`Influence.predicted_loss_change`): the *effect* of training
point ``i`` is ``-I_up,loss(z_i, Z) / n``, the predicted change of the **mean** test loss over the
chosen test points ``Z`` if ``z_i`` is removed and the model refit. **Negative = harmful**
(removing the point would lower the loss of these wrong predictions); positive = helpful.
The feature column is ``I_pert,loss(z_i, Z)_j / n``: the predicted change of that mean test loss
per unit increase of feature ``j`` of training point ``i`` (eq. 5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data import Data, DataLike
from ..errors import InputError
from ..influence import Influence
from ..objective import Objective
from .labels import as_classes, outputs_to_labels


def predictions(
    objective: Objective,
    data: DataLike,
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels at ``objective.theta``: ``(pred [m], truth [m])``.

    :func:`inflens.apps.labels.outputs_to_labels` (one logit: ``1`` when positive, truth as
    0/1 so labels in {-1, +1} work too; several outputs: the argmax); regression losses need
    ``predict``.
    """
    d = Data(data, "test data")
    preds, truths = [], []
    with torch.no_grad():
        for start, x, y in d.chunks(batch_size):
            x, y = objective.prepare(x, y, d.name, start)
            out = objective.outputs(objective.theta, x)
            if predict is not None:
                preds.append(torch.as_tensor(predict(out)).reshape(-1))
                truths.append(y.reshape(-1))
            else:
                loss = objective.loss_name if objective.builtin_loss else None
                preds.append(outputs_to_labels(out, loss))
                truths.append(as_classes(y))
    return torch.cat(preds), torch.cat(truths)


def wrongly_predicted(
    objective: Objective,
    data: DataLike,
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Indices of the examples of ``data`` that the model gets wrong (see :func:`predictions`)."""
    pred, truth = predictions(objective, data, predict)
    return (pred != truth.to(pred.dtype)).nonzero()[:, 0]


@dataclass
class ErrorReport:
    """Training points and features most responsible for a set of wrong predictions.

    Attributes:
        test_indices: the explained test points (rows of the test data).
        n_train: size of the training set.
        points: one dict per ranked training point (largest ``|effect|`` first) with ``rank``,
            ``index``, ``label``, ``effect`` (``-I_up,loss/n`` on the mean test loss; negative =
            harmful), ``role`` and ``features`` (a list of dicts ``feature``, ``value`` (x_ij),
            ``effect_per_unit`` (``I_pert,loss_j / n``)).
        next_effect: the largest ``|effect|`` among the training points *not* listed, a scale
            for "how much more influential" the listed points are.
        feature_totals: ``(feature, sum over listed points of |effect_per_unit|)`` sorted
            descending: the features through which the listed points act.
    """

    test_indices: list[int]
    n_train: int
    points: list[dict[str, Any]]
    next_effect: float
    feature_totals: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return {
            "test_indices": self.test_indices,
            "n_train": self.n_train,
            "points": self.points,
            "next_effect": self.next_effect,
            "feature_totals": [[f, v] for f, v in self.feature_totals],
        }

    def to_frames(self) -> tuple[Any, Any]:
        """``(points, features)`` as pandas DataFrames (needs pandas)."""
        import pandas as pd

        pts = pd.DataFrame([{k: v for k, v in p.items() if k != "features"} for p in self.points])
        feats = pd.DataFrame(
            [
                {"rank": p["rank"], "index": p["index"], **f}
                for p in self.points
                for f in p["features"]
            ]
        )
        return pts, feats

    def table(self, features: bool = True) -> str:
        """A plain-text report: ranked training points, then their top features."""
        n_test = len(self.test_indices)
        shown = ", ".join(map(str, self.test_indices[:10])) + (" ..." if n_test > 10 else "")
        lines = [
            f"Explaining {n_test} wrong prediction(s) (test rows {shown}).",
            "effect = predicted change of their mean test loss if the training point is removed "
            "(negative = harmful).",
            "",
            f"{'rank':>4}  {'train idx':>9}  {'label':>8}  {'effect':>11}  {'vs next':>8}  role",
        ]
        for p in self.points:
            ratio = abs(p["effect"]) / self.next_effect if self.next_effect > 0 else float("inf")
            lines.append(
                f"{p['rank']:>4}  {p['index']:>9}  {str(p['label']):>8}  {p['effect']:>11.4g}  "
                f"{ratio:>7.1f}x  {p['role']}"
            )
        lines.append(
            f"largest |effect| among the other {self.n_train - len(self.points)} training "
            f"points: {self.next_effect:.4g}"
        )
        if features and any(p["features"] for p in self.points):
            lines += [
                "",
                "Features of these training points that move the test loss most",
                "(d loss = change of the mean test loss per unit increase of the feature):",
                "",
            ]
            lines.append(f"{'train idx':>9}  {'feature':<32} {'value':>10}  {'d loss':>11}")
            for p in self.points:
                for f in p["features"]:
                    lines.append(
                        f"{p['index']:>9}  {str(f['feature'])[:32]:<32} {f['value']:>10.4g}  "
                        f"{f['effect_per_unit']:>11.4g}"
                    )
        if self.feature_totals:
            lines += ["", "Features summed over the listed points (sum of |d loss|):"]
            lines += [f"  {name:<32} {val:.4g}" for name, val in self.feature_totals[:10]]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def explain_errors(
    influence: Influence,
    test: DataLike,
    test_indices: Sequence[int] | torch.Tensor | None = None,
    *,
    k_train: int = 10,
    k_features: int = 5,
    feature_names: Sequence[str] | None = None,
    label_names: Sequence[str] | dict[Any, str] | None = None,
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ErrorReport:
    """Rank the training points (and their features) behind a set of wrong predictions.

    The test points are treated together: the measurement is their mean test loss (one
    ``s_test``, one pass over the training set). Training points are ranked by the absolute
    predicted effect of removing them; for the top ``k_train`` the input influence (eq. 5)
    gives each feature's effect, and the ``k_features`` largest in absolute value are listed.

    Args:
        influence: a fitted :class:`inflens.Influence` of the model that makes the errors.
        test: the test data (all of it; ``test_indices`` selects rows).
        test_indices: the wrong predictions to explain; default: every misclassified test point.
        k_train: training points to list.
        k_features: features per training point (0: skip the input influence, e.g. for
            integer inputs).
        feature_names: names of the flattened input features (default ``x[j]``).
        label_names: names of the labels (a sequence indexed by label or a dict).
        predict: ``outputs -> labels`` for losses other than the built-in classifiers.

    Example:
        >>> inf = Influence(obj, (X_train, y_train), solver="exact").fit()
        >>> report = explain_errors(inf, (X_test, y_test), feature_names=names)
        >>> print(report)
    """
    obj = influence.objective
    data = Data(test, "test data")
    if test_indices is None:
        idx = wrongly_predicted(obj, test, predict)
        if idx.numel() == 0:
            raise InputError("the model predicts every test point correctly: nothing to explain")
    else:
        idx = torch.as_tensor(test_indices, dtype=torch.long).reshape(-1)
        if idx.numel() == 0:
            raise InputError("test_indices is empty: give at least one test point")
    subset = data.get(idx)
    n = influence.n
    k = max(0, min(int(k_train), n))
    s = influence.s_test(subset, mean=True)
    effect = (-influence.score(s)[0] / n).detach().cpu()
    order = torch.argsort(effect.abs(), descending=True)
    top = order[:k]
    next_effect = float(effect[order[k]].abs()) if k < n else 0.0
    _, y_top = influence.train.get(top)
    if k_features > 0 and k > 0:
        pert = influence.input_influence(subset, top).detach().cpu().reshape(k, -1) / n
        x_top = influence.train.get(top)[0].detach().cpu().reshape(k, -1)
        d = pert.shape[1]
        names = list(feature_names) if feature_names is not None else [f"x[{j}]" for j in range(d)]
        if len(names) != d:
            raise InputError(f"feature_names has {len(names)} names, the inputs have {d} features")
        kf = min(int(k_features), d)
        totals = pert.abs().sum(0)
        feature_totals = [
            (names[j], float(totals[j])) for j in torch.argsort(totals, descending=True)[:10]
        ]
    else:
        pert, x_top, names, kf, feature_totals = None, None, [], 0, []

    def label_name(v: Any) -> Any:
        if label_names is None:
            return v
        try:
            return label_names[v]
        except (KeyError, IndexError, TypeError):
            return v

    points = []
    for r in range(k):
        e = float(effect[top[r]])
        feats = []
        if pert is not None:
            for j in torch.argsort(pert[r].abs(), descending=True)[:kf].tolist():
                feats.append(
                    {
                        "feature": names[j],
                        "value": float(x_top[r, j]),
                        "effect_per_unit": float(pert[r, j]),
                    }
                )
        yv = y_top[r]
        label = yv.item() if yv.numel() == 1 else yv.tolist()
        points.append(
            {
                "rank": r + 1,
                "index": int(top[r]),
                "label": label_name(label),
                "effect": e,
                "role": "harmful" if e < 0 else "helpful",
                "features": feats,
            }
        )
    return ErrorReport(
        test_indices=[int(i) for i in idx],
        n_train=n,
        points=points,
        next_effect=next_effect,
        feature_totals=feature_totals,
    )


def compare_coefficients(
    weights: torch.Tensor | np.ndarray, feature_names: Sequence[str], feature: str
) -> dict[str, Any]:
    """The baseline the paper compares against: rank of a feature by ``|coefficient|``.

    Returns ``{"feature", "coefficient", "larger": number of features with a larger
    |coefficient|, "top": [(name, coefficient)] of the 10 largest}`` for a linear model.
    """
    w = np.asarray(torch.as_tensor(weights).detach().cpu(), dtype=np.float64).reshape(-1)
    names = list(feature_names)
    if len(names) != w.size:
        raise InputError(f"{len(names)} feature names for {w.size} coefficients")
    if feature not in names:
        raise InputError(f"feature {feature!r} is not among the feature names")
    j = names.index(feature)
    order = np.argsort(-np.abs(w), kind="stable")
    return {
        "feature": feature,
        "coefficient": float(w[j]),
        "larger": int((np.abs(w) > abs(w[j])).sum()),
        "top": [(names[i], float(w[i])) for i in order[:10]],
    }
