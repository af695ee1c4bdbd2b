"""``inflens benchmark NAME``: linear datamodeling scores of inflens's methods on offline data.

Logistic-regression benchmarks: a 10-class softmax regression without bias in float64,
``l2 = 0.01`` on the mean cross-entropy, trained to ``||grad|| <= 1e-12``:

- ``lds-digits``: scikit-learn's digits (ships with scikit-learn), the demo's split, 1,347 train
  / 450 test, ``p = 640``.
- ``lds-mnist-lr``: MNIST read from ``--data-dir`` (``../shared/data/mnist``) by
  :mod:`inflens.datasets`, dattri's sizes: the first 5,000 training and the first 500 test
  images, pixels / 255, ``p = 7,840``. Skipped with a message when the files are absent.

Their ground truth: ``m`` random subsets of 50% of the training points; on each, an exact refit
of ``(1/|S|) sum_{i in S} CE_i + (l2/2)||W||^2`` and its test losses. Digits: chord-Newton with
the full-data exact Hessian, one subset at a time (:class:`~inflens.evaluation.ObjectiveRetrain`,
to ``||grad|| <= 1e-10``); MNIST: all subsets of a group of 50 at once (:class:`SoftmaxRefit`:
batched Newton-CG preconditioned by the full-data Hessian's Cholesky factor, to
``||grad|| <= 1e-8``). Methods: ``I_up,loss`` from ``Influence(..., solver=S)`` for S in exact,
cg, lissa, arnoldi, kfac, ekfac (settings in :data:`SOLVERS`), and a gradient dot product
``-g_test . g_train`` (no Hessian; TracIn with one checkpoint) as the baseline.

``lds-mnist-mlp``: dattri's MNIST MLP (784-128-64-10, ReLU, dropout 0.1; SGD lr 0.01 momentum
0.9, batch 64, 50 epochs; pixels normalised as torchvision's ``Normalize(0.1307, 0.3081)``) on
the same 5,000/500 images. The attributed model is trained with seed 0 on all points; the
ground truth trains :data:`MLP_SEEDS` models per subset (stacked parameters, all models of a
group of 50 in one SGD, :func:`train_mlps`) and averages their test losses. Methods: CG, LiSSA,
Arnoldi, K-FAC, EK-FAC on the Gauss-Newton matrix with damping :data:`MLP_DAMPING`, TRAK over
:data:`TRAK_MODELS` independently trained models, TracIn over the attributed model's
checkpoints, and the gradient dot product; CG and LiSSA cost a solve per test point, so they
score the first :data:`MLP_SOLVER_TEST` test points only (the table gives every method's LDS on
those too).

Every retraining is written one file per model into ``OUT/ground_truth/``, keyed by
fingerprints of the model, the data and the trainer, so a second run only re-scores. The table
(``OUT/lds_table.md``, ``OUT/lds.json``) gives the LDS mean with a 95% bootstrap interval over
test points and the time to fit and score each method. ``OUT/model.safetensors`` and
``OUT/ground_truth.safetensors`` (masks, outputs) are what ``benchmarks/peers/lds_peers.py``
scores the peer libraries against.
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
from ..curvature import auto_chunk_size
from ..errors import InputError
from ..evaluation import (
    LDSConfig,
    LDSResult,
    ObjectiveRetrain,
    lds_ground_truth,
    lds_ground_truth_batched,
)
from ..memory import peak_resident_mib, reset_peak_resident
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
    "lds-mnist-mlp": "LDS on an MNIST-10 MLP 784-128-64-10 in dattri's setting (5,000/500)",
}


#: methods of the MLP benchmark (:mod:`inflens.experiments.lds_mlp`)
MLP_METHODS = ("cg", "lissa", "arnoldi", "kfac", "ekfac", "trak", "tracin", "grad-dot")


def _ground_truth_info(gt: Any, lds_cfg: Any) -> dict[str, Any]:
    """What a benchmark's summary records of its retrained ground truth."""
    return {
        "retrained": gt.retrained,
        "reused": gt.reused,
        "seconds": gt.seconds,
        "workers": lds_cfg.workers,
    }


def methods_of(name: str) -> tuple[str, ...]:
    """The methods a benchmark scores by default (and accepts)."""
    return MLP_METHODS if name == "lds-mnist-mlp" else METHODS


class DataMissing(Exception):
    """The benchmark's data set is not on this machine."""


@dataclass(frozen=True)
class BenchmarkConfig:
    """Settings of :func:`run_benchmark`.

    Attributes:
        name: a key of :data:`BENCHMARKS`.
        n_subsets: subsets ``m`` (retrained models).
        fraction: share of the training set per subset.
        workers: retraining processes (default ``min(2, CPUs)`` for digits, 1 for the MNIST
            benchmarks, whose trainers batch all subsets into wide matrix products).
        methods: methods to score (default and choices: :func:`methods_of`).
        seed: seed of the subsets.
        progress: progress bars.
        seeds_per_subset: models per subset, their test losses averaged (default: 1 for the
            deterministic convex refits, :data:`MLP_SEEDS` for the MLP).
    """

    name: str
    n_subsets: int = 100
    fraction: float = 0.5
    workers: int | None = None
    methods: tuple[str, ...] | None = None
    seed: int = 0
    progress: bool = True
    seeds_per_subset: int | None = None

    def __post_init__(self) -> None:
        if self.name not in BENCHMARKS:
            raise InputError(f"unknown benchmark {self.name!r}; available: {', '.join(BENCHMARKS)}")
        allowed = methods_of(self.name)
        if self.methods is not None:
            bad = [m for m in self.methods if m not in allowed]
            if bad or not self.methods:
                raise InputError(
                    f"unknown methods {bad} for {self.name}; choose from {', '.join(allowed)}"
                )
        if self.seeds_per_subset is not None and int(self.seeds_per_subset) < 1:
            raise InputError(f"seeds_per_subset must be at least 1, got {self.seeds_per_subset}")


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


@dataclass(frozen=True)
class RefitStats:
    """What the last :class:`SoftmaxRefit` call did: Newton steps and CG iterations per model,
    the final gradient norms."""

    newton_iterations: list[int]
    cg_iterations: int
    grad_norms: list[float]
    seconds: float


class SoftmaxRefit:
    """Exact refits of a bias-free softmax regression on many training subsets at once.

    ``refit(keeps [K, n] bool, seeds [K]) -> [K, n_test]`` (the ``retrain_batch`` of
    :func:`inflens.evaluation.lds_ground_truth_batched`): for every row ``k`` it minimises
    ``R_k(W) = (1/|S_k|) sum_{i in S_k} CE(W x_i, y_i) + (l2/2)||W||^2`` over ``W [C, d]``
    (theta = ``W`` flattened row-major, the layout of ``nn.Linear(d, C, bias=False)``),
    warm-started at theta-hat, to ``||grad R_k|| <= tol``, and returns the test
    cross-entropies. The ``K`` problems run together in :func:`inflens.train.newton_minimize`:
    a gradient or a Hessian-vector product of all of them is two ``[n, d] x [d, K C]`` matrix
    products. Each Newton direction solves ``H_k(W_k) d = g_k`` by
    :func:`inflens.solvers._cg_core.conjugate_gradient` to relative residual ``cg_tol``
    (inexact Newton: the final gradient norm, not the CG residual, is what ``tol`` bounds),
    preconditioned by ``precondition`` (``[a, p] -> [a, p]``, the inverse full-data Hessian at
    theta-hat, e.g. ``Influence(obj, train, solver=Exact(method="cholesky")).fit().solver.solve``,
    shared by every row). Seeds are unused: the refits are deterministic.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        theta_hat: torch.Tensor,
        l2: float,
        precondition: Callable[[torch.Tensor], torch.Tensor],
        tol: float = 1e-8,
    ) -> None:
        self.x, self.y = x.to(torch.float64), y.long()
        self.x_test, self.y_test = x_test.to(torch.float64), y_test.long()
        self.n, self.d = self.x.shape
        self.c = theta_hat.numel() // self.d
        if self.c * self.d != theta_hat.numel():
            raise InputError(f"theta has {theta_hat.numel()} entries, not C * {self.d}")
        self.onehot = torch.nn.functional.one_hot(self.y, self.c).to(torch.float64)
        self.theta_hat = theta_hat.detach().to(torch.float64).reshape(-1)
        self.l2 = float(l2)
        self.precondition = precondition
        self.tol = float(tol)
        self.cg_tol = 1e-3
        self.max_newton = 30
        self.max_cg = 200
        self.last: RefitStats | None = None

    def _logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = theta.shape[0]  # [n, a, C]
        return (x @ theta.reshape(a * self.c, self.d).T).reshape(-1, a, self.c)

    def _contract(self, s: torch.Tensor) -> torch.Tensor:
        """``[n, a, C] -> [a, p]``: sum_i s_i x_i^T per row."""
        a = s.shape[1]
        return (s.reshape(self.n, a * self.c).T @ self.x).reshape(a, self.c * self.d)

    def __call__(self, keeps: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        from ..solvers._cg_core import conjugate_gradient
        from ..train import newton_minimize

        keeps = torch.as_tensor(keeps, dtype=torch.bool)
        if keeps.ndim != 2 or keeps.shape[1] != self.n:
            raise InputError(f"keeps must be [K, {self.n}] booleans, got {tuple(keeps.shape)}")
        k = keeps.shape[0]
        # w[i, k] / n: the weight of point i in problem k's mean over its kept points
        w = (keeps.T.to(torch.float64) / keeps.sum(1).to(torch.float64)).contiguous()
        cg_iters = 0
        t0 = time.perf_counter()

        def value(theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            z = self._logits(theta, self.x)
            ce = torch.logsumexp(z, -1) - (z * self.onehot[:, None]).sum(-1)  # [n, a]
            return (ce * w[:, rows]).sum(0) + 0.5 * self.l2 * (theta * theta).sum(1)

        def grad(theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            pr = torch.softmax(self._logits(theta, self.x), -1)
            return self._contract((pr - self.onehot[:, None]) * w[:, rows, None]) + (
                self.l2 * theta
            )

        def solve(theta: torch.Tensor, g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            nonlocal cg_iters
            pr = torch.softmax(self._logits(theta, self.x), -1)  # [n, a, C]
            wa = w[:, rows, None]

            def hvp(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
                # softmax CE Hessian per example: (diag(p) - p p^T) (x x^T), weighted
                pz = pr[:, r] * self._logits(v, self.x)
                s = (pz - pr[:, r] * pz.sum(-1, keepdim=True)) * wa[:, r]
                return self._contract(s) + self.l2 * v

            res = conjugate_gradient(
                hvp,
                g,
                tol=self.cg_tol,
                max_iter=self.max_cg,
                precondition=lambda r_, _rows: self.precondition(r_),
            )
            cg_iters += int(res.iterations.sum())
            return res.x

        with torch.no_grad():
            fit = newton_minimize(
                grad,
                self.theta_hat.expand(k, -1).clone(),
                solve=solve,
                value=value,
                tol=self.tol,
                max_iter=self.max_newton,
            )
            gn = fit.info.extra["grad_norms"]
            self.last = RefitStats(
                fit.info.extra["iterations"], cg_iters, gn, time.perf_counter() - t0
            )
            if not fit.info.converged:
                from ..errors import SolverDivergedError

                raise SolverDivergedError(
                    f"batched refit: {k - sum(fit.info.extra['converged'])} of {k} problems "
                    f"stopped above ||grad|| = {self.tol:.0e} (largest {max(gn):.2e}); loosen "
                    "tol or raise max_newton"
                )
            z = self._logits(fit.theta, self.x_test)  # [n_test, K, C]
            ce = torch.logsumexp(z, -1) - z.gather(
                -1, self.y_test[:, None, None].expand(-1, k, 1)
            ).squeeze(-1)
            return ce.T.contiguous()


def _grad_dot(obj: Objective, train, test) -> torch.Tensor:
    """``-g_test . g_train`` in blocks whose ``[block, p]`` gradients fit 128 MiB each."""
    itemsize = torch.finfo(obj.dtype).bits // 8
    size = auto_chunk_size(max(len(train[1]), len(test[1])), obj.p, itemsize)
    g_test = torch.cat(
        [
            obj.per_example_grads(test[0][s : s + size], test[1][s : s + size], which="loss")
            for s in range(0, len(test[1]), size)
        ]
    )
    out = torch.empty(len(test[1]), len(train[1]), dtype=obj.dtype)
    for start in range(0, len(train[1]), size):
        x, y = train[0][start : start + size], train[1][start : start + size]
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
        "| method | settings | LDS mean | 95% interval | time (fit + score) | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {SETTINGS[r['method']]} | {r['lds_mean']:.3f} | "
            f"[{r['lds_low']:.3f}, {r['lds_high']:.3f}] | {r['seconds']:.2f} s | "
            f"{r['peak_mb']:.0f} MB |"
        )
    return "\n".join(lines) + "\n"


class _LazySolve:
    """The full-data exact inverse Hessian, factorised on first use (a re-score that reuses
    every cached refit never pays for it)."""

    def __init__(self, obj: Objective, train) -> None:
        self.obj, self.train, self._solve = obj, train, None

    def __call__(self, rhs: torch.Tensor) -> torch.Tensor:
        if self._solve is None:
            inf = Influence(self.obj, self.train, solver=Exact(method="cholesky"), progress=False)
            self._solve = inf.fit().solver.solve
        return self._solve(rhs)


def _save_scores(out: Path, method: str, scores: torch.Tensor) -> None:
    """``OUT/scores_<method>.safetensors``: a method's ``[n_test, n_train]`` scores, so that a
    larger ground truth (more subsets or seeds) can be scored without recomputing them."""
    from ..artifacts import _save_tensors

    _save_tensors(out / f"scores_{method}.safetensors", {"scores": scores.detach()}, {})


def _save_for_peers(out: Path, model: nn.Module, gt: Any, extra: dict[str, torch.Tensor]) -> None:
    """``OUT/model.safetensors`` (the attributed model's state dict) and
    ``OUT/ground_truth.safetensors`` (masks, outputs and the data), for benchmarks/peers."""
    from ..artifacts import _save_tensors

    _save_tensors(
        out / "model.safetensors",
        {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        {},
    )
    _save_tensors(
        out / "ground_truth.safetensors",
        {"masks": gt.masks.to(torch.uint8), "outputs": gt.outputs, **extra},
        {},
    )


def tolerance_check(outputs: torch.Tensor, x_test: torch.Tensor, tol: float) -> dict[str, float]:
    """How far a refit stopped at ``||grad|| <= tol`` can move the ranks LDS is built on.

    The risk is ``l2``-strongly convex, so ``||theta - theta*|| <= tol / l2`` and a test
    cross-entropy moves by at most ``eps_t = sqrt(2) ||x_t|| tol / l2``. Two measured losses of
    one test point can swap ranks only when closer than ``2 eps_t``; one swap of adjacent ranks
    changes that test point's Spearman rho by at most ``12 / (m^2 - 1)``. Returns the largest
    ``eps_t``, the median spread and smallest gap of the measured losses, the number of
    adjacent pairs within ``2 eps_t``, and the resulting bound on the change of the mean LDS.
    """
    m, n_test = outputs.shape
    eps = (2**0.5) * x_test.norm(dim=1).to(outputs) * float(tol) / L2
    srt = outputs.sort(0).values
    gaps = srt[1:] - srt[:-1]
    close = int((gaps < 2 * eps).sum())
    return {
        "tol": float(tol),
        "loss_error_bound": float(eps.max()),
        "median_std_over_subsets": float(outputs.std(0).quantile(0.5)),
        "median_smallest_gap": float(gaps.min(0).values.quantile(0.5)),
        "adjacent_pairs": int(gaps.numel()),
        "pairs_within_bound": close,
        "mean_lds_change_bound": close * 12.0 / (m * m - 1) / n_test,
    }


def _lr_ground_truth(config: BenchmarkConfig, obj: Objective, train, test, out: Path):
    xtr, ytr = train
    if config.name == "lds-digits":
        retrain = ObjectiveRetrain(obj, train, test, method="newton", tol=1e-10)
        trainer = "ObjectiveRetrain(newton, tol=1e-10)"
    else:
        retrain = SoftmaxRefit(*train, *test, obj.theta, L2, _LazySolve(obj, train), tol=1e-8)
        trainer = "SoftmaxRefit(newton-cg, tol=1e-8)"
    fingerprint = "|".join(
        [model_fingerprint(obj), data_fingerprint(train), data_fingerprint(test), trainer]
    )
    batched = config.name != "lds-digits"
    lds_cfg = LDSConfig(
        fraction=config.fraction,
        n_subsets=config.n_subsets,
        seed=config.seed,
        workers=(1 if batched and config.workers is None else config.workers),
        checkpoint=out / "ground_truth",
        fingerprint=fingerprint,
        progress=config.progress,
    )
    if batched:
        return lds_ground_truth_batched(retrain, len(ytr), lds_cfg, batch_size=50), lds_cfg
    return lds_ground_truth(retrain, len(ytr), lds_cfg), lds_cfg


def run_benchmark(
    config: BenchmarkConfig,
    data_dir: str | os.PathLike | None = None,
    out: str | os.PathLike = "runs/benchmark",
) -> dict[str, Any]:
    """Build (or reload) the ground truth, score every method, write the table.

    Returns the JSON written to ``OUT/lds.json``. Raises :class:`DataMissing` when the data
    set is absent (the CLI prints it and skips).
    """
    if config.name == "lds-mnist-mlp":
        return run_mlp_benchmark(config, data_dir, out)
    out = Path(out)
    t_start = time.perf_counter()
    xtr, ytr, xte, yte = _digits() if config.name == "lds-digits" else _mnist(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = (xtr, ytr), (xte, yte)

    t0 = time.perf_counter()
    obj = _fit(xtr, ytr)
    fit_seconds = time.perf_counter() - t0
    gt, lds_cfg = _lr_ground_truth(config, obj, train, test, out)
    _save_for_peers(out, obj.model, gt, {})

    tol = 1e-10 if config.name == "lds-digits" else 1e-8
    checks = {f"{t:.0e}": tolerance_check(gt.outputs, xte, t) for t in (tol, tol / 100)}

    rows: list[dict[str, Any]] = []
    results: dict[str, LDSResult] = {}
    for method in config.methods or METHODS:
        reset_peak_resident()
        t0 = time.perf_counter()
        scores = _score(method, obj, train, test)
        seconds = time.perf_counter() - t0
        peak = peak_resident_mib()
        _save_scores(out, method, scores)
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
                "peak_mb": peak,
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
        "ground_truth": {**_ground_truth_info(gt, lds_cfg), "tolerance_check": checks},
        "methods": rows,
        "per_test": {k: v.to_dict()["per_test"] for k, v in results.items()},
        "total_seconds": time.perf_counter() - t_start,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "lds.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


# ------------------------------------------------------------------------------ MNIST MLP
@dataclass(frozen=True)
class MLPTrainConfig:
    """dattri's MNIST MLP training (``train_mnist_mlp`` of dattri 0.3.0): SGD with momentum on
    the mean cross-entropy of mini-batches, no weight decay, dropout after both hidden layers.

    Attributes:
        epochs: passes over the (kept) training points (dattri: 50).
        lr, momentum: SGD settings (dattri: 0.01, 0.9).
        batch_size: mini-batch size (dattri's benchmark scripts use 64; the last batch of an
            epoch is the remainder).
        dropout: dropout rate after each hidden ReLU during training (dattri: 0.1).
    """

    epochs: int = 50
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if int(self.epochs) < 1 or int(self.batch_size) < 1:
            raise InputError(f"need epochs, batch_size >= 1, got {self.epochs}, {self.batch_size}")
        if not 0 <= float(self.dropout) < 1 or not float(self.lr) > 0:
            raise InputError(f"need 0 <= dropout < 1 and lr > 0, got {self.dropout}, {self.lr}")


class MnistMLP(nn.Module):
    """784-128-64-10 ReLU network (dattri's MNIST MLP); dropout only in training mode."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.fc1(x.reshape(x.shape[0], -1))))
        return self.fc3(self.drop(torch.relu(self.fc2(h))))


_LAYERS = ("fc1", "fc2", "fc3")


def _init_params(seeds: Sequence[int], dropout: float) -> dict[str, torch.Tensor]:
    """Stacked ``[K, ...]`` initial parameters, model ``k`` as ``MnistMLP`` built after
    ``torch.manual_seed(seeds[k])`` (the global generator is restored afterwards)."""
    states = []
    with torch.random.fork_rng(devices=[]):
        for sd in seeds:
            torch.manual_seed(int(sd))
            states.append(MnistMLP(dropout).state_dict())
    return {k: torch.stack([st[k] for st in states]).clone() for k in states[0]}


def _mlp_forward(
    params: dict[str, torch.Tensor], x: torch.Tensor, masks: Sequence[torch.Tensor] = ()
) -> torch.Tensor:
    """Logits ``[K, B, 10]`` of ``K`` stacked MLPs on ``x [K, B, 784]`` (or shared
    ``[B, 784]``); ``masks``: dropout multipliers after the two hidden layers."""
    h = x
    for li, name in enumerate(_LAYERS):
        w, b = params[f"{name}.weight"], params[f"{name}.bias"]
        h = torch.matmul(h, w.transpose(1, 2)) + b[:, None, :]
        if li < 2:
            h = torch.relu(h)
            if masks:
                h = h * masks[li]
    return h


def train_mlps(
    x: torch.Tensor,
    y: torch.Tensor,
    keeps: torch.Tensor,
    seeds: Sequence[int],
    config: MLPTrainConfig = MLPTrainConfig(),
    checkpoint_epochs: Sequence[int] = (),
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Train ``K`` MLPs at once, model ``k`` on the points ``keeps[k]`` with seed ``seeds[k]``.

    The parameters are stacked ``[K, ...]`` and trained by one ``torch.optim.SGD`` (momentum is
    elementwise, so each model's update is exactly its own); the loss summed over models has
    each model's mean mini-batch cross-entropy as its only term in that model's parameters.
    Model ``k``'s initialisation, batch order and dropout masks come from generators seeded by
    ``seeds[k]`` alone, so it trains identically whatever else is in the batch. All rows of
    ``keeps`` must keep the same number of points (one batch schedule).

    Returns:
        The final stacked state dict (keys of :class:`MnistMLP`), and the stacked state dicts
        after each epoch in ``checkpoint_epochs`` (1-based).
    """
    keeps = torch.as_tensor(keeps, dtype=torch.bool)
    counts = keeps.sum(1)
    if keeps.ndim != 2 or keeps.shape[1] != x.shape[0] or bool((counts != counts[0]).any()):
        raise InputError("keeps must be [K, n] booleans keeping the same number of points per row")
    k, n_keep = keeps.shape[0], int(counts[0])
    kept = [keeps[r].nonzero()[:, 0] for r in range(k)]
    order_gens = [torch.Generator().manual_seed(int(sd) * 2 + 1) for sd in seeds]
    drop_gens = [torch.Generator().manual_seed(int(sd) * 2 + 2) for sd in seeds]
    params = _init_params(seeds, config.dropout)
    leaves = [params[name].requires_grad_(True) for name in params]
    opt = torch.optim.SGD(leaves, lr=config.lr, momentum=config.momentum)
    keep_p = 1.0 - float(config.dropout)
    xf = x.reshape(x.shape[0], -1)
    checkpoints = []
    for epoch in range(1, int(config.epochs) + 1):
        perms = [kept[r][torch.randperm(n_keep, generator=order_gens[r])] for r in range(k)]
        order = torch.stack(perms)  # [K, n_keep]
        for start in range(0, n_keep, int(config.batch_size)):
            idx = order[:, start : start + int(config.batch_size)]
            b = idx.shape[1]
            masks = []
            if config.dropout > 0:
                for width in (128, 64):
                    u = torch.stack([torch.rand(b, width, generator=g) for g in drop_gens])
                    masks.append((u < keep_p).to(xf.dtype) / keep_p)
            logits = _mlp_forward(params, xf[idx], masks)
            loss = (
                torch.nn.functional.cross_entropy(
                    logits.reshape(k * b, -1), y[idx].reshape(-1), reduction="sum"
                )
                / b
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch in checkpoint_epochs:
            checkpoints.append({n: t.detach().clone() for n, t in params.items()})
    return {n: t.detach() for n, t in params.items()}, checkpoints


def _unstack(params: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    return {n: t[k].clone() for n, t in params.items()}


class MLPRetrain:
    """``retrain_batch(keeps [K, n], seeds [K]) -> [K, n_test]`` test cross-entropies of MLPs
    trained by :func:`train_mlps` (evaluated without dropout)."""

    def __init__(self, x, y, x_test, y_test, config: MLPTrainConfig = MLPTrainConfig()) -> None:
        self.x, self.y, self.x_test, self.y_test, self.config = x, y, x_test, y_test, config

    def __call__(self, keeps: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        params, _ = train_mlps(self.x, self.y, keeps, [int(s) for s in seeds], self.config)
        with torch.no_grad():
            logits = _mlp_forward(params, self.x_test.reshape(len(self.x_test), -1)[None])
            k = logits.shape[0]
            return torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                self.y_test.repeat(k),
                reduction="none",
            ).reshape(k, -1)


#: MNIST normalisation of dattri's loader (torchvision ``Normalize((0.1307,), (0.3081,))``)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: damping of every curvature-based method on the (non-convex) MLP, Gauss-Newton curvature
MLP_DAMPING = 0.01
#: CG and LiSSA score only the first this many test points (their cost is per test point)
MLP_SOLVER_TEST = 100
#: CG's Hessian-vector products use the first this many training points
MLP_CG_HESSIAN_POINTS = 1000
#: models trained per subset by default (dattri's retraining script: one run per subset)
MLP_SEEDS = 1
TRAK_MODELS, TRACIN_EPOCHS, PROJECTION_DIM = 10, (10, 20, 30, 40, 50), 512
MLP_SETTINGS = {
    "cg": f"GGN + {MLP_DAMPING} I on {MLP_CG_HESSIAN_POINTS} train points, 10 iterations",
    "lissa": f"GGN + {MLP_DAMPING} I, depth 200, batch 64",
    "arnoldi": f"GGN + {MLP_DAMPING} I, rank 50",
    "kfac": f"GGN factors + {MLP_DAMPING} I",
    "ekfac": f"GGN factors + {MLP_DAMPING} I, eigen-corrected",
    "trak": f"{TRAK_MODELS} models, projection {PROJECTION_DIM}",
    "tracin": f"epochs {','.join(map(str, TRACIN_EPOCHS))}, lr 0.01, projection {PROJECTION_DIM}",
    "grad-dot": "no Hessian (-g_test . g_train)",
}


def _reference_models(
    out: Path, x: torch.Tensor, y: torch.Tensor, cfg: MLPTrainConfig, fingerprint: str
) -> dict[str, torch.Tensor]:
    """The attributed model (seed 0, all points; TracIn checkpoints) and TRAK's ensemble
    (seeds 1..T), trained once and cached in ``OUT/models.safetensors``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..artifacts import _save_tensors

    path = out / "models.safetensors"
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") == fingerprint:
                return load_file(str(path))
    keeps = torch.ones(TRAK_MODELS + 1, len(y), dtype=torch.bool)
    final, ckpts = train_mlps(x, y, keeps, list(range(TRAK_MODELS + 1)), cfg, TRACIN_EPOCHS)
    tensors = {f"final.{k}": v for k, v in final.items()}
    for e, ck in zip(TRACIN_EPOCHS, ckpts):
        tensors.update({f"epoch{e}.{k}": v[0] for k, v in ck.items()})
    _save_tensors(path, tensors, {"fingerprint": fingerprint})
    return tensors


def _mlp_score(method: str, obj: Objective, train, test, models, folder: Path) -> torch.Tensor:
    from ..attribution import AttributionSettings, build_attribution_index
    from ..index import IndexConfig

    if method == "grad-dot":
        return _grad_dot(obj, train, test)
    if method in ("trak", "tracin"):
        if method == "trak":
            ckpts = [
                {k[6:]: v[m] for k, v in models.items() if k.startswith("final.")}
                for m in range(TRAK_MODELS + 1)
            ]
            rates = None
        else:
            ckpts = [
                {k[len(f"epoch{e}.") :]: v for k, v in models.items() if k.startswith(f"epoch{e}.")}
                for e in TRACIN_EPOCHS
            ]
            rates = [0.01] * len(ckpts)
        index = build_attribution_index(
            obj,
            train,
            folder / f"index_{method}",
            AttributionSettings(method, rates),
            checkpoints=ckpts[1:] if method == "trak" else ckpts,
            config=IndexConfig(dim=PROJECTION_DIM),
        )
        return index.loss_influence(test)
    if method == "cg":
        sub = (train[0][:MLP_CG_HESSIAN_POINTS], train[1][:MLP_CG_HESSIAN_POINTS])
        inf = Influence(
            obj,
            sub,
            solver=CG(tol=1e-6, max_iter=10),
            damping=MLP_DAMPING,
            curvature="ggn",
            progress=False,
        ).fit()
        vecs = inf.s_test(test)
        # scoring needs only the training gradients: a solver with a free fit
        return Influence(obj, train, solver=CG(), progress=False).fit().score(vecs)
    solver = {
        "lissa": lambda: LiSSA(depth=200, repeats=1, batch_size=64, seed=0),
        "arnoldi": lambda: Arnoldi(rank=50),
        "kfac": lambda: KFAC(),
        "ekfac": lambda: EKFAC(),
    }[method]()
    inf = Influence(
        obj, train, solver=solver, damping=MLP_DAMPING, curvature="ggn", progress=False
    ).fit()
    return inf.loss_influence(test)


def run_mlp_benchmark(
    config: BenchmarkConfig,
    data_dir: str | os.PathLike | None = None,
    out: str | os.PathLike = "runs/benchmark",
) -> dict[str, Any]:
    """``lds-mnist-mlp``: the ground truth of :class:`MLPRetrain` on ``config.n_subsets``
    subsets (``config.seeds_per_subset`` models each, averaged), every method of
    :data:`MLP_METHODS` scored against it; writes ``OUT/lds_table.md`` and ``OUT/lds.json``."""
    import dataclasses

    out = Path(out)
    t_start = time.perf_counter()
    xtr, ytr, xte, yte = _mnist(data_dir)
    xtr = ((xtr - MNIST_MEAN) / MNIST_STD).float()
    xte = ((xte - MNIST_MEAN) / MNIST_STD).float()
    out.mkdir(parents=True, exist_ok=True)
    train, test = (xtr, ytr), (xte, yte)
    tcfg = MLPTrainConfig()
    seeds = MLP_SEEDS if config.seeds_per_subset is None else int(config.seeds_per_subset)
    fp = "|".join([data_fingerprint(train), data_fingerprint(test), json.dumps(asdict(tcfg))])

    t0 = time.perf_counter()
    models = _reference_models(out, xtr, ytr, tcfg, fp + f"|trak{TRAK_MODELS}")
    model = MnistMLP(tcfg.dropout)
    model.load_state_dict({k[6:]: v[0] for k, v in models.items() if k.startswith("final.")})
    model.eval()
    obj = Objective(model, "cross_entropy", l2=0.0)
    fit_seconds = time.perf_counter() - t0

    lds_cfg = LDSConfig(
        fraction=config.fraction,
        n_subsets=config.n_subsets,
        seeds_per_subset=seeds,
        seed=config.seed,
        workers=1 if config.workers is None else config.workers,
        checkpoint=out / "ground_truth",
        fingerprint=fp + "|MLPRetrain",
        progress=config.progress,
    )
    gt = lds_ground_truth_batched(
        MLPRetrain(xtr, ytr, xte, yte, tcfg), len(ytr), lds_cfg, batch_size=50
    )
    _save_for_peers(out, model, gt, {})
    gt_sub = dataclasses.replace(gt, outputs=gt.outputs[:, :MLP_SOLVER_TEST])
    test_sub = (xte[:MLP_SOLVER_TEST], yte[:MLP_SOLVER_TEST])

    rows: list[dict[str, Any]] = []
    per_test: dict[str, Any] = {}
    for method in config.methods or MLP_METHODS:
        reset_peak_resident()
        t0 = time.perf_counter()
        few = method in ("cg", "lissa")
        scores = _mlp_score(method, obj, train, test_sub if few else test, models, out)
        seconds = time.perf_counter() - t0
        peak = peak_resident_mib()
        _save_scores(out, method, scores)
        res_sub = gt_sub.score(scores[:MLP_SOLVER_TEST])
        res = None if few else gt.score(scores)
        per_test[method] = (res_sub if few else res).to_dict()["per_test"]
        rows.append(
            {
                "method": method,
                "settings": MLP_SETTINGS[method],
                "lds_mean": None if res is None else res.mean,
                "lds_low": None if res is None else res.low,
                "lds_high": None if res is None else res.high,
                "sub_mean": res_sub.mean,
                "sub_low": res_sub.low,
                "sub_high": res_sub.high,
                "seconds": seconds,
                "peak_mb": peak,
            }
        )
        if config.progress:
            print(
                f"  {method:9s} LDS {rows[-1]['lds_mean']} first-{MLP_SOLVER_TEST} "
                f"{res_sub.mean:.3f} {seconds:.1f} s",
                flush=True,
            )
    lines = [
        f"lds-mnist-mlp: n_train={len(ytr)}, n_test={len(yte)}, p={obj.p}, m={config.n_subsets} "
        f"subsets of {config.fraction:.0%}, {seeds} model(s) per subset",
        "",
        f"| method | settings | LDS mean ({len(yte)} test) | 95% interval | LDS (first "
        f"{MLP_SOLVER_TEST} test) | 95% interval | time | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        full = (
            "n/a | n/a"
            if r["lds_mean"] is None
            else f"{r['lds_mean']:.3f} | [{r['lds_low']:.3f}, {r['lds_high']:.3f}]"
        )
        lines.append(
            f"| {r['method']} | {r['settings']} | {full} | {r['sub_mean']:.3f} | "
            f"[{r['sub_low']:.3f}, {r['sub_high']:.3f}] | {r['seconds']:.1f} s | "
            f"{r['peak_mb']:.0f} MB |"
        )
    (out / "lds_table.md").write_text("\n".join(lines) + "\n")
    summary = {
        "name": config.name,
        "n_train": len(ytr),
        "n_test": len(yte),
        "p": obj.p,
        "n_subsets": config.n_subsets,
        "fraction": config.fraction,
        "train_config": asdict(tcfg),
        "config": asdict(config),
        "fit_seconds": fit_seconds,
        "ground_truth": _ground_truth_info(gt, lds_cfg),
        "methods": rows,
        "per_test": per_test,
        "total_seconds": time.perf_counter() - t_start,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "lds.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
