"""``inflens benchmark NAME``: linear datamodeling scores of inflens's methods on offline data.

Each benchmark is a 10-class logistic regression without bias in float64, ``l2 = 0.01`` on the
mean cross-entropy, trained to ``||grad|| <= 1e-12``:

- ``lds-digits``: scikit-learn's digits (ships with scikit-learn), the demo's split, 1,347 train
  / 450 test, ``p = 640``.
- ``lds-mnist-lr``: MNIST read from ``--data-dir`` (``../shared/data/mnist``) by
  :mod:`inflens.datasets`, dattri's sizes: the first 5,000 training and the first 500 test
  images, pixels / 255, ``p = 7,840``. Skipped with a message when the files are absent.

Ground truth (:func:`inflens.evaluation.lds_ground_truth`): ``m`` random subsets of 50% of the
training points; on each, an exact refit of ``(1/|S|) sum_{i in S} CE_i + (l2/2)||W||^2``
(chord-Newton with the full-data exact Hessian, to ``||grad|| <= 1e-10``) and its 500 (450)
test losses. The refits are written one file per subset into ``OUT/ground_truth/``, keyed by
fingerprints of the model, the data and the trainer, so a second run only re-scores.

Methods: ``I_up,loss`` from ``Influence(..., solver=S)`` for S in exact, cg, lissa, arnoldi,
kfac, ekfac (settings in :data:`SOLVERS`), and a gradient dot product ``-g_test . g_train``
(per-example loss gradients at theta-hat, no Hessian; TracIn with one checkpoint) as the
baseline. The table (``OUT/lds_table.md``, ``OUT/lds.json``) gives the LDS mean with a 95%
bootstrap interval over test points and the time to fit and score each method.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import Influence, Objective
from ..artifacts import data_fingerprint, model_fingerprint
from ..errors import InputError
from ..evaluation import LDSConfig, LDSResult, ObjectiveRetrain, lds_ground_truth
from ..solvers import CG, EKFAC, KFAC, Arnoldi, Exact, LiSSA
from ..train import fit_lbfgs, fit_newton

L2 = 0.01
MNIST_TRAIN, MNIST_TEST = 5000, 500

#: solver settings used by the benchmark (LiSSA: the paper's recursion depth is far more than
#: these small problems need; one repeat over mini-batches of 100 keeps it in seconds)
SOLVERS: dict[str, Callable[[], Any]] = {
    "exact": lambda: Exact(),
    "cg": lambda: CG(tol=1e-8),
    "lissa": lambda: LiSSA(depth=1000, repeats=1, batch_size=100, seed=0),
    "arnoldi": lambda: Arnoldi(rank=50),
    "kfac": lambda: KFAC(),
    "ekfac": lambda: EKFAC(),
}
SETTINGS = {
    "exact": "explicit Hessian",
    "cg": "tol 1e-8",
    "lissa": "depth 1000, 1 repeat, batch 100",
    "arnoldi": "rank 50",
    "kfac": "GGN factors",
    "ekfac": "GGN factors, eigen-corrected",
    "grad-dot": "no Hessian (-g_test . g_train)",
}
METHODS = (*SOLVERS, "grad-dot")
BENCHMARKS = {
    "lds-digits": "LDS on scikit-learn digits, 10-class logistic regression (1,347/450)",
    "lds-mnist-lr": "LDS on MNIST-10 logistic regression in dattri's setting (5,000/500)",
}


class DataMissing(Exception):
    """The benchmark's data set is not on this machine."""


@dataclass(frozen=True)
class BenchmarkConfig:
    """Settings of :func:`run_benchmark`.

    Attributes:
        name: a key of :data:`BENCHMARKS`.
        n_subsets: subsets ``m`` (retrained models).
        fraction: share of the training set per subset.
        workers: retraining processes (default ``min(2, CPUs)``).
        methods: methods to score (a subset of :data:`METHODS`).
        seed: seed of the subsets.
        progress: progress bars.
    """

    name: str
    n_subsets: int = 100
    fraction: float = 0.5
    workers: int | None = None
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.name not in BENCHMARKS:
            raise InputError(f"unknown benchmark {self.name!r}; available: {', '.join(BENCHMARKS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise InputError(f"unknown methods {bad}; choose from {', '.join(METHODS)}")


def _digits() -> tuple[torch.Tensor, ...]:
    from .demo import load_digits_split

    return load_digits_split(0)


def _mnist(data_dir: str | os.PathLike | None) -> tuple[torch.Tensor, ...]:
    from ..datasets import DatasetNotFoundError, load_mnist

    try:
        d = load_mnist(data_dir, download=False)
    except DatasetNotFoundError as exc:
        raise DataMissing(
            f"MNIST is not available ({exc}); put the four IDX files in "
            "DATA_DIR/mnist (e.g. ../shared/data/mnist) and pass --data-dir DATA_DIR"
        ) from exc

    def pixels(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.reshape(len(x), -1).astype(np.float64) / 255.0)

    return (
        pixels(d["x_train"][:MNIST_TRAIN]),
        torch.from_numpy(d["y_train"][:MNIST_TRAIN]).long(),
        pixels(d["x_test"][:MNIST_TEST]),
        torch.from_numpy(d["y_test"][:MNIST_TEST]).long(),
    )


def _fit(xtr: torch.Tensor, ytr: torch.Tensor) -> Objective:
    """theta-hat to ||grad|| <= 1e-12: L-BFGS, then chord-Newton with the exact Hessian."""
    model = nn.Linear(xtr.shape[1], 10, bias=False).double()
    nn.init.zeros_(model.weight)
    obj = Objective(model, "cross_entropy", l2=L2)
    theta, _ = fit_lbfgs(obj, (xtr, ytr), tol=1e-8, max_iter=2000)
    obj.load_into_model(theta)
    pre = Influence(obj, (xtr, ytr), solver="exact", progress=False).fit()
    theta, _ = fit_newton(obj, (xtr, ytr), pre.solver.solve, tol=1e-12)
    obj.load_into_model(theta)
    return Objective(model, "cross_entropy", l2=L2)


def _grad_dot(obj: Objective, train, test) -> torch.Tensor:
    g_test = obj.per_example_grads(*test, which="loss")
    out = torch.empty(len(test[1]), len(train[1]), dtype=obj.dtype)
    for start in range(0, len(train[1]), 2048):
        x, y = train[0][start : start + 2048], train[1][start : start + 2048]
        out[:, start : start + len(y)] = -g_test @ obj.per_example_grads(x, y, which="loss").T
    return out


def _score(method: str, obj: Objective, train, test) -> torch.Tensor:
    if method == "grad-dot":
        return _grad_dot(obj, train, test)
    inf = Influence(obj, train, solver=SOLVERS[method](), progress=False).fit()
    return inf.loss_influence(test)


def _table(rows: Sequence[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = [
        f"{header['name']}: n_train={header['n_train']}, n_test={header['n_test']}, "
        f"p={header['p']}, m={header['n_subsets']} subsets of {header['fraction']:.0%}",
        "",
        "| method | settings | LDS mean | 95% interval | time (fit + score) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {SETTINGS[r['method']]} | {r['lds_mean']:.3f} | "
            f"[{r['lds_low']:.3f}, {r['lds_high']:.3f}] | {r['seconds']:.2f} s |"
        )
    return "\n".join(lines) + "\n"


def run_benchmark(
    config: BenchmarkConfig,
    data_dir: str | os.PathLike | None = None,
    out: str | os.PathLike = "runs/benchmark",
) -> dict[str, Any]:
    """Build (or reload) the ground truth, score every method, write the table.

    Returns the JSON written to ``OUT/lds.json``. Raises :class:`DataMissing` when the data
    set is absent (the CLI prints it and skips).
    """
    out = Path(out)
    t_start = time.perf_counter()
    xtr, ytr, xte, yte = _digits() if config.name == "lds-digits" else _mnist(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = (xtr, ytr), (xte, yte)

    t0 = time.perf_counter()
    obj = _fit(xtr, ytr)
    fit_seconds = time.perf_counter() - t0
    retrain = ObjectiveRetrain(obj, train, test, method="newton", tol=1e-10)
    fingerprint = "|".join(
        [
            model_fingerprint(obj),
            data_fingerprint(train),
            data_fingerprint(test),
            "ObjectiveRetrain(newton, tol=1e-10)",
        ]
    )
    lds_cfg = LDSConfig(
        fraction=config.fraction,
        n_subsets=config.n_subsets,
        seed=config.seed,
        workers=config.workers,
        checkpoint=out / "ground_truth",
        fingerprint=fingerprint,
        progress=config.progress,
    )
    gt = lds_ground_truth(retrain, len(ytr), lds_cfg)

    rows: list[dict[str, Any]] = []
    results: dict[str, LDSResult] = {}
    for method in config.methods:
        t0 = time.perf_counter()
        scores = _score(method, obj, train, test)
        seconds = time.perf_counter() - t0
        res = gt.score(scores)
        results[method] = res
        rows.append(
            {
                "method": method,
                "settings": SETTINGS[method],
                "lds_mean": res.mean,
                "lds_low": res.low,
                "lds_high": res.high,
                "n_undefined": res.n_undefined,
                "seconds": seconds,
            }
        )
        if config.progress:
            print(
                f"  {method:9s} LDS {res.mean:.3f} [{res.low:.3f}, {res.high:.3f}] {seconds:.2f} s"
            )
    header = {
        "name": config.name,
        "n_train": len(ytr),
        "n_test": len(yte),
        "p": obj.p,
        "l2": L2,
        "n_subsets": config.n_subsets,
        "fraction": config.fraction,
    }
    table = _table(rows, header)
    (out / "lds_table.md").write_text(table)
    best = max(results, key=lambda k: results[k].mean)
    results[best].plot(out / "lds_hist.png", title=f"{config.name}: {best}")
    summary = {
        **header,
        "config": asdict(config),
        "fit_seconds": fit_seconds,
        "ground_truth": {
            "retrained": gt.retrained,
            "reused": gt.reused,
            "seconds": gt.seconds,
            "workers": lds_cfg.workers,
        },
        "methods": rows,
        "per_test": {k: v.to_dict()["per_test"] for k, v in results.items()},
        "total_seconds": time.perf_counter() - t_start,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "lds.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
