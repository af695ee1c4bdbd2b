"""Leave-one-out validation: remove training points, retrain, compare with the prediction.

For each chosen training point ``z_i`` the model is retrained without it and the change of the
test measurement (the test loss by default, no regulariser) is recorded::

    actual_i    = L(z_test, theta_{-i}) - L(z_test, theta_hat)
    predicted_i = -I_up,loss(z_i, z_test) / n     (Influence.predicted_loss_change)

Positive = removing the point raises the test loss (it was helpful). With several test points
the measurement is their **mean** (and so is the prediction).

Retraining strategies (``retrain=``):

- ``"lbfgs"``: an exact refit for convex objectives. Minimises
  ``(1/(n-1)) sum_{j != i} loss_j + (l2/2)||theta||^2`` (l2 relative to the mean over the
  remaining points, as the paper's ``C = 1/((n-1) l2)``) with full-batch L-BFGS in the
  objective's dtype (use float64), warm-started from theta-hat, to ``||grad|| <= tol``. The
  result records, per refit, a first-order bound on the refit error of the test measurement,
  ``||grad L_test|| * ||grad R|| / l2`` (valid when the risk is ``l2``-strongly convex).
- ``"adam"``: for non-convex models, a fixed number of mini-batch Adam steps on the ``n - 1``
  points from theta-hat (optionally from the original optimiser state, e.g. moments and
  decayed learning rate), with the same seed as a **full-data continuation** run for the same
  number of steps. ``actual`` is measured against theta-hat (as the paper), and
  ``actual_vs_reference`` against the continuation; ``reference_change`` = drift of the
  continuation itself.
- a callable ``retrain(keep, theta0) -> theta`` (or ``-> (theta, info_dict)``), where ``keep``
  is a boolean ``[n]`` mask of the training points to use; e.g. an exact hinge-SVM solver.

For every strategy a reference run on the full data (``keep`` all true) is made too, unless
``reference=False``: for exact refits its change measures how far theta-hat is from the
optimum the refits reach.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Data, DataLike
from .errors import InputError
from .fingerprint import tensors_fingerprint
from .influence import Influence
from .train import AdamConfig, AdamStart, Fit, fit_adam, fit_lbfgs, loo_weights

__all__ = ["LOOConfig", "LOOResult", "correlations", "leave_one_out", "select_indices"]

Retrain = Callable[[torch.Tensor, torch.Tensor], Any]


def correlations(actual: Any, predicted: Any) -> dict[str, float]:
    """Pearson R, Spearman rho and the least-squares slope of predicted on actual."""
    from scipy import stats

    a = np.asarray(actual, dtype=np.float64).reshape(-1)
    p = np.asarray(predicted, dtype=np.float64).reshape(-1)
    if a.size < 3 or np.std(a) == 0 or np.std(p) == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "slope": float("nan")}
    slope = float(np.polyfit(a, p, 1)[0])
    return {
        "pearson": float(stats.pearsonr(a, p)[0]),
        "spearman": float(stats.spearmanr(a, p)[0]),
        "slope": slope,
    }


@dataclass
class LOOResult:
    """Actual and predicted changes of the test measurement for the removed training points.

    Attributes:
        indices: ``[k]`` training indices removed (one at a time).
        predicted: ``[k]`` predicted changes ``-I_up,loss / n``.
        actual: ``[k]`` measured changes relative to theta-hat.
        actual_vs_reference: ``[k]`` measured changes relative to the full-data reference run
            (the continuation for Adam), or ``None`` when no reference was run.
        reference_change: test-measurement change of the full-data reference run vs theta-hat
            (the drift of retraining itself; ~0 for an exact refit from an exact optimum).
        base_value: the test measurement at theta-hat.
        retrain: name of the strategy.
        info: per-refit diagnostics and settings.
    """

    indices: torch.Tensor
    predicted: torch.Tensor
    actual: torch.Tensor
    actual_vs_reference: torch.Tensor | None = None
    reference_change: float | None = None
    base_value: float = float("nan")
    retrain: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pearson(self) -> float:
        """Pearson correlation of predicted and actual (vs theta-hat)."""
        return correlations(self.actual, self.predicted)["pearson"]

    @property
    def spearman(self) -> float:
        """Spearman rank correlation of predicted and actual (vs theta-hat)."""
        return correlations(self.actual, self.predicted)["spearman"]

    @property
    def slope(self) -> float:
        """Least-squares slope of predicted on actual (1 = right scale)."""
        return correlations(self.actual, self.predicted)["slope"]

    def plot(
        self,
        path: str | os.PathLike | None = None,
        title: str | None = None,
        against: str = "theta_hat",
        ax: Any = None,
    ) -> Any:
        """Scatter predicted (y) vs actual (x) with the y = x line; returns the axes.

        ``against="reference"`` plots the actual changes relative to the reference run.
        """
        from .plots import ScatterStyle, scatter_predicted_actual

        if against not in ("theta_hat", "reference"):
            raise InputError("against must be 'theta_hat' or 'reference'")
        actual = self.actual
        if against == "reference":
            if self.actual_vs_reference is None:
                raise InputError("this result has no reference run (reference=False)")
            actual = self.actual_vs_reference
        return scatter_predicted_actual(
            actual, self.predicted, path, ax=ax, style=ScatterStyle(title=title)
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: correlations, values and diagnostics."""
        out: dict[str, Any] = {
            "retrain": self.retrain,
            "k": int(self.indices.numel()),
            "base_value": self.base_value,
            **correlations(self.actual, self.predicted),
            "indices": [int(i) for i in self.indices],
            "predicted": [float(v) for v in self.predicted],
            "actual": [float(v) for v in self.actual],
            "reference_change": self.reference_change,
        }
        if self.actual_vs_reference is not None:
            c = correlations(self.actual_vs_reference, self.predicted)
            out["vs_reference"] = c
            out["actual_vs_reference"] = [float(v) for v in self.actual_vs_reference]
        out["info"] = _jsonable(self.info)
        return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def select_indices(
    predicted_all: torch.Tensor,
    k: int,
    select: str = "top",
    seed: int = 0,
) -> torch.Tensor:
    """Choose ``k`` training indices: ``"top"`` largest ``|predicted|`` or ``"random"``."""
    n = predicted_all.numel()
    k = min(int(k), n)
    if select == "top":
        return torch.argsort(predicted_all.abs(), descending=True, stable=True)[:k]
    if select == "random":
        g = torch.Generator().manual_seed(int(seed))
        return torch.randperm(n, generator=g)[:k]
    raise InputError(f"select must be 'top', 'random' or 'given', got {select!r}")


def _measure(influence: Influence, theta: torch.Tensor, test: Data) -> float:
    """Mean test measurement (no regulariser) at ``theta``."""
    obj = influence.objective
    total, count = 0.0, 0
    with torch.no_grad():
        for start, x, y in test.chunks(4096):
            x, y = obj.prepare(x, y, test.name, start)
            total += float(obj.measurements(theta, x, y).sum())
            count += int(x.shape[0])
    return total / count


def _measure_grad_norm(influence: Influence, theta: torch.Tensor, test: Data) -> float:
    obj = influence.objective
    g = torch.zeros_like(theta)
    count = 0
    for start, x, y in test.chunks(4096):
        x, y = obj.prepare(x, y, test.name, start)
        g += obj.mean_grad(x, y, "measurement", theta)
        count += int(x.shape[0])
    return float((g / count).norm())


def _load_checkpoint(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    if not path.exists():
        return {"config": config, "done": {}, "reference": None}
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    if state.get("config") != config:
        raise InputError(
            f"checkpoint {path} was written for a different leave-one-out run "
            f"(config {state.get('config')} != {config}); delete it or use another path"
        )
    return state


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(state), f)
    os.replace(tmp, path)


@dataclass(frozen=True)
class LOOConfig:
    """What :func:`leave_one_out` removes and how it retrains (validated on creation).

    Attributes:
        indices: training indices to remove (implies ``select="given"``).
        k: how many points to choose when ``indices`` is not given.
        select: ``"top"`` (largest ``|predicted|``, the paper's choice), ``"random"`` or
            ``"given"``.
        retrain: ``"lbfgs"`` (exact refit, convex), ``"adam"`` (warm-started fixed-step runs,
            non-convex) or a callable ``(keep_mask [n] bool, theta0 [p]) -> theta`` (or
            ``-> (theta, info)``, or an :class:`inflens.train.Fit`).
        seed: seed of random selection (the Adam mini-batch order is ``adam.seed``).
        tol, max_iter: L-BFGS gradient-norm tolerance and iteration cap.
        adam: steps, batch size, learning rate, schedule and seed of ``retrain="adam"``
            (:class:`inflens.train.AdamConfig`).
        optimizer_state: Adam state to warm-start from (moments and the global step, hence
            the scheduled learning rate).
        reference: also run the full-data reference (refit / continuation).
        checkpoint: JSON file of finished refits; reloaded on restart (same settings only).
        progress: progress bars.
    """

    indices: tuple[int, ...] | None = None
    k: int = 20
    select: str = "top"
    retrain: str | Retrain = "lbfgs"
    seed: int = 0
    tol: float = 1e-10
    max_iter: int = 1000
    adam: AdamConfig = AdamConfig(steps=1000, batch_size=500, lr=1e-4)
    optimizer_state: dict[str, Any] | None = None
    reference: bool = True
    checkpoint: str | os.PathLike | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.indices is not None:
            idx = torch.as_tensor(self.indices, dtype=torch.long).reshape(-1)
            object.__setattr__(self, "indices", tuple(int(i) for i in idx))
            object.__setattr__(self, "select", "given")
        if self.select not in ("top", "random", "given"):
            raise InputError(f"select must be 'top', 'random' or 'given', got {self.select!r}")
        if self.select == "given" and self.indices is None:
            raise InputError("select='given' needs indices=...")
        if not callable(self.retrain) and self.retrain not in ("lbfgs", "adam"):
            raise InputError(f"retrain must be 'lbfgs', 'adam' or a callable, got {self.retrain!r}")
        if int(self.k) < 1 or not float(self.tol) > 0 or int(self.max_iter) < 1:
            raise InputError(
                f"need k >= 1, tol > 0 and max_iter >= 1, got {self.k}, {self.tol}, {self.max_iter}"
            )
        if not isinstance(self.adam, AdamConfig):
            raise InputError(f"adam must be an inflens.train.AdamConfig, got {type(self.adam)}")


def leave_one_out(
    influence: Influence,
    test: DataLike,
    config: LOOConfig | None = None,
    *,
    predicted: torch.Tensor | None = None,
) -> LOOResult:
    """Remove each chosen training point, retrain, and compare with the influence prediction.

    Args:
        influence: a fitted :class:`inflens.Influence`; its objective's theta is theta-hat.
        test: the test point(s) (``(X, y)``, Dataset, DataLoader); several = their mean.
        config: which points and how to retrain (:class:`LOOConfig`; default: the 20 points
            with the largest ``|predicted|``, exact L-BFGS refits).
        predicted: precomputed predictions ``[n]`` for every training point (skips scoring).

    Returns:
        A :class:`LOOResult` (``info["config"]`` records the settings).
    """
    cfg = LOOConfig() if config is None else config
    if not isinstance(cfg, LOOConfig):
        raise InputError(f"config must be a LOOConfig, got {type(cfg).__name__}")
    select, retrain, seed, tol, max_iter = cfg.select, cfg.retrain, cfg.seed, cfg.tol, cfg.max_iter
    progress, checkpoint, reference = cfg.progress, cfg.checkpoint, cfg.reference
    if not isinstance(influence, Influence):
        raise InputError(f"influence must be an inflens.Influence, got {type(influence).__name__}")
    influence._fitted()
    obj = influence.objective
    train: Data = influence.train
    test_data = test if isinstance(test, Data) else Data(test, "test data")
    n = influence.n
    theta_hat = obj.theta.detach().clone()

    # ---- predictions and the points to remove
    if select == "given":
        idx = torch.as_tensor(cfg.indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise InputError(f"indices must lie in [0, {n - 1}]")
        pred_all = None
    else:
        pred_all = predicted
    if pred_all is None and select != "given":
        s = influence.s_test(test_data, mean=True)
        pred_all = (-influence.score(s) / n)[0]
    if select != "given":
        idx = select_indices(pred_all, cfg.k, select, seed)
    if pred_all is not None:
        pred = pred_all.reshape(-1)[idx]
    else:
        s = influence.s_test(test_data, mean=True)
        pred = (-influence.score(s, idx) / n)[0]

    # ---- the retraining strategy
    name: str
    if callable(retrain):
        name = getattr(retrain, "__name__", "callable")

        def refit(keep: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
            out = retrain(keep, theta_hat.clone())
            if isinstance(out, Fit):  # what every inflens.train trainer returns
                out = (out.theta, out.info)
            theta, info = out if isinstance(out, tuple) else (out, {})
            if hasattr(info, "to_dict"):
                info = info.to_dict()
            return torch.as_tensor(theta).to(theta_hat).reshape(-1), dict(info)

    elif retrain == "lbfgs":
        name = "lbfgs"

        def refit(keep: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
            w = None if bool(keep.all()) else loo_weights(n, ~keep, obj.dtype)
            theta, info = fit_lbfgs(
                obj, train, theta0=theta_hat, weights=w, tol=tol, max_iter=max_iter
            )
            d = info.to_dict()
            # the smallest l2 weight is the risk's guaranteed strong convexity
            lam = obj.l2 if obj.l2_diag is None else float(obj.l2_diag.min())
            if lam > 0:
                d["measurement_error_bound"] = (
                    _measure_grad_norm(influence, theta, test_data) * info.grad_norm / lam
                )
            return theta, d

    elif retrain == "adam":
        name = "adam"

        def refit(keep: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
            fit = fit_adam(
                obj,
                train,
                cfg.adam,
                start=AdamStart(theta_hat, cfg.optimizer_state),
                subset=None if bool(keep.all()) else keep.nonzero()[:, 0],
            )
            return fit.theta, {"steps": cfg.adam.steps, "seconds": fit.info.seconds}

    else:
        raise InputError(f"retrain must be 'lbfgs', 'adam' or a callable, got {retrain!r}")

    run_config = {
        # a checkpoint is only reused for the same model and test points
        "theta_hat_sha256": tensors_fingerprint(theta_hat, length=16),
        "test_sha256": tensors_fingerprint(*test_data.get(torch.arange(len(test_data))), length=16),
        "n": n,
        "p": obj.p,
        "retrain": name,
        "indices": [int(i) for i in idx],
        "seed": seed,
        "tol": tol,
        "steps": cfg.adam.steps,
        "batch_size": cfg.adam.batch_size,
        "lr": cfg.adam.lr,
    }
    ck_path = Path(checkpoint) if checkpoint is not None else None
    state = _load_checkpoint(ck_path, run_config) if ck_path else {"done": {}, "reference": None}

    base = _measure(influence, theta_hat, test_data)
    ref_value = None
    if reference:
        if state.get("reference") is None:
            theta_ref, ref_info = refit(torch.ones(n, dtype=torch.bool))
            state["reference"] = {
                "value": _measure(influence, theta_ref, test_data),
                "info": ref_info,
            }
            if ck_path:
                _save_checkpoint(ck_path, state)
        ref_value = float(state["reference"]["value"])

    bar = tqdm(idx.tolist(), desc=f"Leave-one-out ({name})", disable=not progress)
    for i in bar:
        if str(i) in state["done"]:
            continue
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        theta_i, info = refit(keep)
        state["done"][str(i)] = {"value": _measure(influence, theta_i, test_data), "info": info}
        if ck_path:
            _save_checkpoint(ck_path, state)

    values = torch.tensor(
        [state["done"][str(i)]["value"] for i in idx.tolist()], dtype=torch.float64
    )
    infos = [state["done"][str(i)]["info"] for i in idx.tolist()]
    actual = values - base
    vs_ref = values - ref_value if ref_value is not None else None
    summary: dict[str, Any] = {"refits": infos, "config": run_config}
    if reference:
        summary["reference_info"] = state["reference"]["info"]
    bounds = [d.get("measurement_error_bound") for d in infos if "measurement_error_bound" in d]
    if bounds:
        summary["max_measurement_error_bound"] = float(max(bounds))
    summary["min_abs_actual"] = float(actual.abs().min()) if actual.numel() else float("nan")
    return LOOResult(
        indices=idx,
        predicted=pred.detach().to(torch.float64).cpu(),
        actual=actual,
        actual_vs_reference=vs_ref,
        reference_change=None if ref_value is None else ref_value - base,
        base_value=base,
        retrain=name,
        info=summary,
    )


# The field's attribution benchmarks (LDS, brittleness, mislabel detection) live in
# inflens.evaluation; re-exported here so that ``inflens.validate`` holds every check.
from .evaluation import (  # noqa: E402
    LDSConfig,
    LDSResult,
    brittleness,
    lds,
    linear_datamodeling_score,
    mislabel_detection,
)

__all__ += [
    "LDSConfig",
    "LDSResult",
    "brittleness",
    "lds",
    "linear_datamodeling_score",
    "mislabel_detection",
]
