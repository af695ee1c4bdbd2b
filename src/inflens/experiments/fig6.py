"""Figure 6 / Section 5.4: fixing mislabeled training data (Enron1 spam).

PROTOCOL 4.8. Enron1 (5,172 emails), shuffled with seed 0 and split 4,137 / 1,035. Bag of words:
``CountVectorizer(min_df=5)`` fitted on the training documents only (raw counts). Tokenisation
differs from the paper (no spaCy model here): :func:`inflens.datasets.spam.preprocess` keeps the
lower-cased alphabetic tokens that are not scikit-learn English stop words, without
lemmatisation (its docstring, copied into ``metrics.json``, is the exact rule), then
CountVectorizer's default token pattern. Binary logistic regression without bias,
``l2 = 1e-4`` on the mean loss.

Protocol: 10% of the training labels flipped (``int(n/20) * 2 = 412`` points, seed
``120 + 2 r`` for repeat ``r``, as flip level k = 1 of the original); each method ranks the
training points once on the model trained on the flipped labels; the top ``int(n/20) * m``
(m = 1..6, i.e. 5%..30%) are checked, flipped labels found there are restored, the model is refit
and evaluated on the (never flipped) test set. Methods: self-influence in the correct sigma^2 form
(``-I_up,loss(z_i, z_i)``), the 2017 code's sigma^1 form, the training loss, and a random order
(seed ``120 + 2 r + 1``). Error bars are standard errors over the repeats (as the notebook).

Computation: self-influence in closed form (:func:`inflens.apps.mislabel.logistic_leverage`,
Woodbury form since n < p, with the Gram matrix computed once); refits by exact Newton-CG on the
sparse count matrix to ``||grad R|| <= 1e-9``, warm-started (see ``_logistic``: plain L-BFGS
needed minutes per refit here).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .. import Objective
from ..apps.mislabel import (
    LabelFixingConfig,
    LabelFixingResult,
    logistic_gram,
    logistic_leverage,
    logistic_residual_weight,
    simulate_label_fixing,
)
from ..datasets import bag_of_words, load_enron1, preprocess, spam_split
from ..models import LogisticRegression
from ._logistic import LogisticProblem

NAME = "fig6"
DESCRIPTION = "Fig 6: fixing mislabeled Enron1 spam, self-influence vs train loss vs random"

L2 = 1e-4
TOL = 1e-9
FLIP_LEVEL = 1  # the figure's flip level k: int(n/20) * (k + 1) flipped labels = 10%
REPEATS = 40
QUICK_TRAIN = 1000
QUICK_REPEATS = 2
METHOD_LABELS = {
    "influence": "Influence (sigma^2, correct)",
    "influence_sigma1": "Influence (sigma^1, 2017 code)",
    "loss": "Loss",
    "random": "Random",
}
#: values read off the release figure (PROTOCOL 4.8), +-0.002 accuracy, +-0.02 fraction fixed
PAPER = {
    "fraction_checked": [0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30],
    "accuracy": {
        "influence": [0.888, 0.939, 0.955, 0.963, 0.967, 0.970, 0.972],
        "loss": [0.888, 0.911, 0.933, 0.942, 0.950, 0.955, 0.960],
        "random": [0.888, 0.894, 0.898, 0.902, 0.907, 0.911, 0.916],
    },
    "fraction_fixed": {
        "influence": [0, 0.42, 0.62, 0.73, 0.79, 0.83, 0.86],
        "loss": [0, 0.35, 0.52, 0.62, 0.70, 0.76, 0.80],
        "random": [0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30],
    },
    "clean_accuracy": 0.976,
    "n_train": 4137,
    "n_test": 1035,
    "repeats": 40,
    "note": "the paper's 'Influence' curve was most likely made with the sigma^1 form",
}


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


class _Fitter:
    """``(objective, (x, y), theta0) -> theta`` by exact Newton on the sparse count matrix."""

    def __init__(self, x_sparse: sp.csr_matrix) -> None:
        self.problem = LogisticProblem(x_sparse, L2, explicit_hessian=False)
        self.grad_norms: list[float] = []
        self.newton_steps: list[int] = []

    def __call__(self, obj: Objective, train: tuple[torch.Tensor, torch.Tensor], theta0):
        theta, info = self.problem.fit(train[1].numpy(), theta0=theta0.numpy(), tol=TOL)
        self.grad_norms.append(info.grad_norm)
        self.newton_steps.append(info.iterations)
        return torch.from_numpy(theta)


class _SelfInfluence:
    """Closed-form self-influence (sigma^2 and sigma^1 share one ``x^T H^-1 x`` per model)."""

    def __init__(self, x_sparse: sp.csr_matrix, gram: torch.Tensor) -> None:
        self.x, self.gram = x_sparse, gram
        self._key: tuple[int, int] | None = None
        self._quad: torch.Tensor | None = None
        self.seconds = 0.0

    def _leverage(self, theta: torch.Tensor) -> torch.Tensor:
        key = (id(theta), theta.data_ptr())
        if key != self._key:
            t = time.perf_counter()
            self._quad = logistic_leverage(self.x, theta, L2, gram=self.gram)
            self.seconds += time.perf_counter() - t
            self._key = key
        return self._quad

    def scorer(self, power: int):
        def score(obj: Objective, train: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            weight = logistic_residual_weight(self.x, train[1].numpy(), obj.theta)
            return self._leverage(obj.theta) * weight**power

        return score


def _load(data_dir: Path | None, quick: bool) -> dict[str, Any]:
    split = spam_split(load_enron1(data_dir))
    docs_tr, y_tr = split["docs_train"], split["y_train"]
    if quick:
        docs_tr, y_tr = docs_tr[:QUICK_TRAIN], y_tr[:QUICK_TRAIN]
    x_tr, x_te, vocab = bag_of_words(docs_tr, split["docs_test"], min_df=5)
    return {
        "x_train": x_tr,
        "y_train": y_tr,
        "x_test": x_te,
        "y_test": split["y_test"],
        "vocabulary": vocab,
    }


def _check_primal_dual(x_sparse: sp.csr_matrix, theta: torch.Tensor, gram: torch.Tensor) -> float:
    """Largest relative difference between the two exact forms of ``x^T H^-1 x``."""
    dual = logistic_leverage(x_sparse, theta, L2, method="dual", gram=gram)
    primal = logistic_leverage(x_sparse, theta, L2, method="primal")
    return float(((dual - primal).abs() / primal.abs()).max())


def _table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for j, f in enumerate(summary["fraction_checked"]):
        row: dict[str, Any] = {"fraction_checked": f}
        for m, st in summary["methods"].items():
            row[f"{m}_accuracy"] = st["accuracy"][j]
            row[f"{m}_accuracy_se"] = st["accuracy_se"][j]
            row[f"{m}_fixed"] = st["fraction_fixed"][j]
            row[f"{m}_fixed_se"] = st["fraction_fixed_se"][j]
        if j < len(PAPER["fraction_checked"]):
            for m in ("influence", "loss", "random"):
                row[f"paper_{m}_accuracy"] = PAPER["accuracy"][m][j]
                row[f"paper_{m}_fixed"] = PAPER["fraction_fixed"][m][j]
        rows.append(row)
    return rows


def _ordering(summary: dict[str, Any], influence: str) -> dict[str, bool]:
    """Influence > loss > random at every checked fraction (means), on both panels."""
    st = summary["methods"]
    out = {}
    for key in ("accuracy", "fraction_fixed"):
        a, b, c = (np.array(st[m][key][1:]) for m in (influence, "loss", "random"))
        out[f"{key}_influence_gt_loss"] = bool((a > b).all())
        out[f"{key}_loss_gt_random"] = bool((b > c).all())
    return out


def run(
    data_dir: Path | None,
    out: Path,
    quick: bool = False,
    progress: bool = True,
    repeats: int | None = None,
    time_budget_s: float | None = None,
    first_repeat: int = 0,
) -> dict:
    """Reproduce Fig. 6; writes ``fig6.png`` and ``metrics.json`` into ``out``.

    ``quick``: the first 1,000 training documents (vocabulary refitted on them), 2 repeats.
    ``repeats`` / ``time_budget_s`` override the number of repeats (40) and stop starting new
    ones after the budget (the metrics then say how many were run). ``first_repeat`` starts
    at a later repeat (its seeds), to split the 40 repeats over processes; see :func:`merge`.
    """
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = _load(data_dir, quick)
    x_np, y_np = data["x_train"], np.asarray(data["y_train"], dtype=np.int64)
    n, p = x_np.shape
    x_sparse = sp.csr_matrix(x_np)
    x = torch.from_numpy(x_np)
    y = torch.from_numpy(y_np)
    xt = torch.from_numpy(data["x_test"])
    yt = torch.from_numpy(np.asarray(data["y_test"], dtype=np.int64))
    _log(progress, f"[{NAME}] n_train={n}, n_test={len(yt)}, vocabulary p={p}")
    step = n // 20
    counts = [step * (m + 1) for m in range(6)]
    n_flipped = step * (FLIP_LEVEL + 1)
    reps = repeats if repeats is not None else (QUICK_REPEATS if quick else REPEATS)

    gram = logistic_gram(x_sparse)
    fitter = _Fitter(x_sparse)
    selfinf = _SelfInfluence(x_sparse, gram)
    obj = Objective(LogisticRegression(p, 1, dtype=torch.float64), "binary_logistic", l2=L2)
    result: LabelFixingResult = simulate_label_fixing(
        obj,
        (x, y),
        (xt, yt),
        LabelFixingConfig(
            n_flipped=n_flipped,
            check_counts=counts,
            methods={
                "influence": selfinf.scorer(2),
                "influence_sigma1": selfinf.scorer(1),
                "loss": "loss",
                "random": "random",
            },
            repeats=reps,
            seed=120 * FLIP_LEVEL + 2 * first_repeat,
            fit=fitter,
            progress=progress,
            time_budget_s=time_budget_s,
        ),
    )
    summary = result.summary()
    # independent check of the closed form at the first flipped model: primal vs dual
    rng = np.random.RandomState(result.seeds[0])
    flipped = rng.choice(n, size=n_flipped, replace=False)
    y_f = y_np.copy()
    y_f[flipped] = 1 - y_f[flipped]
    theta_f, _ = fitter.problem.fit(y_f, tol=TOL)
    primal_dual = _check_primal_dual(x_sparse, torch.from_numpy(theta_f), gram)

    result.plot(
        out / "fig6.png",
        title=f"Enron1, {n_flipped} of {n} labels flipped, {result.repeats} repeats (mean +- SE)",
        labels=METHOD_LABELS,
    )
    metrics: dict[str, Any] = {
        "experiment": NAME,
        "quick": quick,
        "n_train": n,
        "n_test": int(len(yt)),
        "vocabulary_size": p,
        "tokenisation": " ".join((preprocess.__doc__ or "").split()),
        "l2": L2,
        "n_flipped": n_flipped,
        "check_counts": counts,
        "repeats": result.repeats,
        "repeats_requested": reps,
        "first_repeat": first_repeat,
        "seeds": result.seeds,
        "stopped_early": bool(result.info.get("stopped_early", False)),
        "clean_accuracy": result.clean_accuracy,
        "flipped_accuracy_mean": float(result.flipped_accuracy.mean()),
        "table": _table(summary),
        "ordering_sigma2": _ordering(summary, "influence"),
        "ordering_sigma1": _ordering(summary, "influence_sigma1"),
        "refits": result.refits,
        "clean_test_loss": result.clean_test_loss,
        "max_refit_grad_norm": float(max(fitter.grad_norms)),
        "mean_newton_steps": float(np.mean(fitter.newton_steps)),
        "self_influence_seconds": selfinf.seconds,
        "primal_vs_dual_max_rel_diff": primal_dual,
        "summary": summary,
        "raw": result.to_dict()["raw"],
        "figures": ["fig6.png"],
        "paper": PAPER,
        "seconds": time.perf_counter() - t0,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    _log(
        progress,
        f"[{NAME}] {result.repeats} repeats, {result.refits} refits, {metrics['seconds']:.0f} s",
    )
    return metrics


def merge(parts: list[Path], out: Path) -> dict:
    """Combine full runs made with different ``first_repeat`` into one ``metrics.json``/figure.

    Repeats are identified by their flip seed (``120 + 2 r``); a seed present in several parts
    is taken once (from the first part that has it).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ms = [json.loads((Path(p) / "metrics.json").read_text()) for p in parts]
    base = ms[0]
    for m in ms[1:]:
        for key in ("n_train", "n_flipped", "check_counts", "vocabulary_size", "clean_accuracy"):
            if m[key] != base[key]:
                raise ValueError(f"the runs differ in {key}: {base[key]} vs {m[key]}")
    methods = list(base["raw"].keys() - {"flipped_accuracy", "flipped_test_loss"})
    methods = [m for m in METHOD_LABELS if m in methods]
    rows: dict[int, tuple[dict[str, Any], int]] = {}
    for m in ms:
        seeds = m.get("seeds") or [120 * FLIP_LEVEL + 2 * r for r in range(m["repeats"])]
        for j, seed in enumerate(seeds):
            rows.setdefault(int(seed), (m["raw"], j))
    order = sorted(rows)

    def stack(key: str, method: str | None = None) -> np.ndarray:
        return np.array(
            [(raw[method][key] if method else raw[key])[j] for raw, j in (rows[s] for s in order)]
        )

    result = LabelFixingResult(
        n_train=base["n_train"],
        n_flipped=base["n_flipped"],
        check_counts=base["check_counts"],
        methods=methods,
        accuracy={m: stack("accuracy", m) for m in methods},
        test_loss={m: stack("test_loss", m) for m in methods},
        fixed={m: stack("fixed", m).astype(np.int64) for m in methods},
        flipped_accuracy=stack("flipped_accuracy"),
        flipped_test_loss=stack("flipped_test_loss"),
        clean_accuracy=base["clean_accuracy"],
        clean_test_loss=float(base.get("clean_test_loss", float("nan"))),
        seeds=order,
        refits=sum(m["refits"] for m in ms),
    )
    summary = result.summary()
    result.plot(
        out / "fig6.png",
        title=f"Enron1, {result.n_flipped} of {result.n_train} labels flipped, "
        f"{result.repeats} repeats (mean +- SE)",
        labels=METHOD_LABELS,
    )
    metrics = {
        **{k: v for k, v in base.items() if k not in ("raw", "summary", "table", "seeds")},
        "repeats": result.repeats,
        "seeds": order,
        "parts": [str(p) for p in parts],
        "part_repeats": [m["repeats"] for m in ms],
        "refits": result.refits,
        "max_refit_grad_norm": max(m["max_refit_grad_norm"] for m in ms),
        "primal_vs_dual_max_rel_diff": max(m["primal_vs_dual_max_rel_diff"] for m in ms),
        "seconds": sum(m["seconds"] for m in ms),
        "flipped_accuracy_mean": float(result.flipped_accuracy.mean()),
        "table": _table(summary),
        "ordering_sigma2": _ordering(summary, "influence"),
        "ordering_sigma1": _ordering(summary, "influence_sigma1"),
        "summary": summary,
        "raw": result.to_dict()["raw"],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    return metrics
