"""Figure 2, right: influence on a small non-convex CNN (damping 0.01) vs warm-started retraining.

PROTOCOL 4.3. The all-convolutional tanh CNN (:class:`inflens.models.PaperCNN`) on the 10%
MNIST subset (n = 5,500, permutation seed 0), cross-entropy + ``(l2/2)||w||^2`` with
``l2 = 0.001`` on the weights, trained with Adam (batch 500, step-decayed learning rate) to a
point theta-tilde that is not a minimum. For MNIST test image 6558 the predicted change of its
test loss when training point ``i`` is removed is

    ``pred_i = grad L(z_test)^T (H + damping I)^-1 (grad L(z_i) + l2 w) / n``

with ``H`` the Hessian of the training objective at theta-tilde and damping 0.01 (Sec. 4.2),
solved by CG. Where ``H + damping I`` is not positive definite (CG meets negative curvature),
the Gauss-Newton matrix takes the place of ``H``; the reduced protocols use it from the start,
since at their theta-tilde the Hessian + 0.01 I is indefinite and CG on it stagnates. The 100 points with the largest ``|pred_i|`` are each removed and the network is
retrained from theta-tilde *including its Adam state* (moments, step count, hence the decayed
learning rate) for a fixed number of steps.

Choices (documented in docs/reproduction/fig2-cnn.md):

- **Weight-only L2, biases frozen.** The paper regularises weights but not biases, while
  :class:`inflens.Objective` applies one ``l2`` to all of theta. theta is therefore the 2,556
  weights; the 60 biases stay at their initial value 0 in training, retraining and influence,
  so the Hessian used for influence is exactly that of the objective that was trained.
- **Paired retraining.** Every retrain and a full-data continuation replay the same mini-batch
  sequence (a seed-17 TensorFlow-style ``next_batch`` over all n indices); the removed point
  simply gets weight 0 in the batches it falls into. ``actual`` is measured against
  theta-tilde (as the paper) and against the continuation (drift removed); with paired batches
  the two differ by the continuation's drift, a constant. The test-loss difference between two
  continuations with different seeds (``unpaired_noise``) shows the batch-order noise an
  unpaired protocol would add.

Protocols (``run(..., protocol=...)``, on the command line ``--protocol``):
``"full"`` is the paper's (500k training steps, 30k retraining steps; days on a CPU core),
``"reduced"`` (4k training steps, 120 retraining steps) and ``"reduced-240"`` (240 retraining
steps) are shortened schedules (see :data:`PROTOCOLS`), ``"quick"`` is the CI smoke test.

The paper's protocol without the frozen-bias simplification is :func:`paper_run` (one
resumable run, :class:`PaperConfig`) and :func:`paper_trend` (shortened rungs):
``python -m inflens.experiments.fig2_cnn --out DIR [--steps T --retrain-steps R]
[--trend T:R,...]``. theta is all 2,616 parameters, the l2 ``0.001`` is per parameter (weights
only, biases learned and unregularised), influence uses the Hessian + ``diag(l2)`` + 0.01 I
(dense float64 with :class:`inflens.solvers.Exact`, or CG on the same operator), and every Adam
run is checkpointed in fixed chunks (safetensors, written atomically). The 101 retrains run one
after another: on one CPU core, stacking them (``vmap`` over the weights, or one grouped
convolution) was measured 2-3x *slower* per retrain than running them in turn.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import grad

from .. import Influence, Objective
from ..datasets import load_mnist, mnist_paper_split, small_subset
from ..errors import CurvatureError
from ..fingerprint import json_fingerprint
from ..models import PaperCNN
from ..plots import ScatterStyle, new_figure, save_figure, scatter_predicted_actual
from ..solvers import CG, Solver
from ..train import (
    AdamConfig,
    AdamStart,
    CheckpointConfig,
    batch_sequence,
    fit_adam,
    fit_adam_resumable,
    piecewise_constant,
)
from ..validate import LOOConfig, correlations, leave_one_out

NAME = "fig2-cnn"
DESCRIPTION = (
    "Fig 2 right: CNN on 10% MNIST, damping 0.01, test image 6558, CG influence of the top 100 "
    "vs warm-started Adam retraining (protocol: reduced by default)"
)

L2 = 0.001
DAMPING = 0.01
TEST_INDEX = 6558


@dataclass(frozen=True)
class Protocol:
    """One schedule of the experiment. Step counts are Adam steps of ``batch_size`` examples."""

    name: str
    train_steps: int
    lr: float
    boundaries: tuple[int, ...]  # learning rate = lr * factors[j] between boundaries
    factors: tuple[float, ...]
    retrain_steps: int  # continue from theta-tilde (and its Adam state) for this many steps
    report_steps: tuple[int, ...] = ()  # also report R after these (fewer) retraining steps
    batch_size: int = 500
    k: int = 100
    n_train: int | None = None  # None: the 5,500-point subset; else its first n_train points
    damping: float = DAMPING
    curvature: str = "hessian"  # or "ggn" (positive semi-definite), see the module docstring
    cg_tol: float = 1e-4  # relative residual; the predictions need far less than R's precision
    cg_max_iter: int = 1000
    init_seed: int = 0
    train_seed: int = 0
    retrain_seed: int = 17
    note: str = ""


PROTOCOLS: dict[str, Protocol] = {
    "full": Protocol(
        name="full",
        train_steps=500_000,
        lr=1e-4,
        boundaries=(110_000, 220_000),
        factors=(1.0, 0.1, 0.01),
        retrain_steps=30_000,
        cg_tol=1e-6,
        note="PROTOCOL 4.3 as published: 500k Adam steps (lr 1e-4, x0.1 at 110k, x0.01 at "
        "220k), retraining 30k steps at the decayed lr 1e-6",
    ),
    "reduced": Protocol(
        name="reduced",
        train_steps=4_000,
        lr=1e-3,
        boundaries=(3_000,),
        factors=(1.0, 0.1),
        retrain_steps=120,
        report_steps=(30, 60),
        curvature="ggn",
        note="125x fewer training steps: lr 1e-3 (10x the paper's) for 3,000 steps, then "
        "1e-4; retraining 120 steps at that decayed lr (lr x steps = 0.012, paper 0.03), R "
        "also after 30 and 60 steps; about 16k Adam steps in all, ~25 min here. "
        "Influence with the Gauss-Newton matrix + damping 0.01: at this theta-tilde the "
        "Hessian + 0.01 I is not positive definite (Lanczos finds a Ritz value below l2 + "
        "damping; CG stagnates)",
    ),
    "reduced-240": Protocol(
        name="reduced-240",
        train_steps=4_000,
        lr=1e-3,
        boundaries=(3_000,),
        factors=(1.0, 0.1),
        retrain_steps=240,
        report_steps=(30, 60, 120),
        curvature="ggn",
        note="the reduced protocol with twice the retraining (240 steps, lr x steps = 0.024); "
        "its first 120 steps are the reduced protocol's (same batches), so one run reports R "
        "after 30, 60, 120 and 240 steps; about 29k Adam steps in all",
    ),
    "quick": Protocol(
        name="quick",
        train_steps=150,
        lr=3e-3,
        boundaries=(100,),
        factors=(1.0, 0.1),
        retrain_steps=10,
        report_steps=(5,),
        batch_size=50,
        k=4,
        n_train=300,
        cg_tol=1e-2,
        cg_max_iter=40,
        note="CI smoke test on 300 training points",
    ),
}


class PairedAdam:
    """Warm-started Adam continuation on the training points of a ``keep`` mask.

    :func:`inflens.train.fit_adam` with example weights ``keep``: the mini-batch sequence (a
    TensorFlow-style ``next_batch`` over a seeded permutation of all ``n`` indices, reshuffled
    each epoch) is the same whatever the mask, so every retrain and the full-data continuation
    see the same batches; removed points get weight 0 in the batch mean. Resumed from
    ``state`` (moments, step count, hence the decayed learning rate).

    Called as ``retrain(keep [n] bool, theta0 [p]) -> (theta, info)`` by
    :func:`inflens.validate.leave_one_out`. With ``snapshots`` (step counts) and ``measure``
    (``theta -> float``), ``info["snapshots"]`` holds the measurement after each of those steps,
    so that one run gives the result of several retraining lengths.
    """

    __name__ = "paired_adam"

    def __init__(
        self,
        objective: Objective,
        train: tuple[torch.Tensor, torch.Tensor],
        state: dict[str, Any],
        config: AdamConfig,
        snapshots: tuple[int, ...] = (),
        measure: Any = None,
    ) -> None:
        self.obj, self.train, self.state, self.config = objective, train, state, config
        self.snapshots = {int(s_) for s_ in snapshots}
        self.measure = measure

    def batches(self) -> list[torch.Tensor]:
        """The index batches of one continuation (identical for every call)."""
        cfg = self.config
        return batch_sequence(int(self.train[1].shape[0]), cfg.batch_size, cfg.steps, cfg.seed)

    def __call__(self, keep: torch.Tensor, theta0: torch.Tensor) -> tuple[torch.Tensor, dict]:
        snaps: dict[str, float] = {}

        def snapshot(step: int, theta: torch.Tensor) -> None:
            if step in self.snapshots and self.measure is not None:
                snaps[str(step)] = float(self.measure(theta))

        fit = fit_adam(
            self.obj,
            self.train,
            self.config,
            start=AdamStart(theta0, self.state),
            weights=keep.to(theta0.dtype),
            callback=snapshot,
        )
        info: dict[str, Any] = {"steps": self.config.steps, "seconds": fit.info.seconds}
        if snaps:
            info["snapshots"] = snaps
        return fit.theta, info


def _fingerprint(cfg: Protocol) -> str:
    keys = (
        "train_steps",
        "lr",
        "boundaries",
        "factors",
        "batch_size",
        "n_train",
        "init_seed",
        "train_seed",
    )
    return json_fingerprint({k: asdict(cfg)[k] for k in keys})


def _save_trained(path: Path, cfg: Protocol, theta: torch.Tensor, state: dict) -> None:
    """theta-tilde and the Adam state (safetensors, no pickle), tagged with the schedule."""
    from safetensors.torch import save_file

    tensors = {"theta": theta, "m": state["m"], "v": state["v"]}
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    tensors["losses"] = torch.tensor(state.get("losses", []), dtype=torch.float64)
    meta = {"protocol": _fingerprint(cfg), "step": str(int(state["step"]))}
    save_file(tensors, str(path), metadata=meta)


def _load_trained(path: Path, cfg: Protocol, p: int) -> tuple[torch.Tensor, dict] | None:
    """The cached theta-tilde and Adam state if ``path`` holds one for this schedule."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("protocol") != _fingerprint(cfg):
            return None
        t = {k: f.get_tensor(k) for k in f.keys()}
    if t["theta"].shape != (p,):
        return None
    state = {"m": t["m"], "v": t["v"], "step": int(meta["step"]), "losses": t["losses"].tolist()}
    return t["theta"], state


def figures(metrics: dict[str, Any], out: Path) -> list[str]:
    """Draw ``fig2_cnn.png`` from a run's metrics: predicted vs actual (against theta-tilde, the
    paper's definition, and against the continuation) and R / slope by retraining length."""
    loo = metrics["loo"]
    pred = np.asarray(loo["predicted"])
    steps = metrics["protocol"]["retrain_steps"]
    name = metrics["protocol"]["name"]
    by = metrics.get("by_retrain_steps", {})
    fig, axes = new_figure(3 if len(by) > 1 else 2, 1, (3.8, 3.8))
    for ax, key, what in (
        (axes[0], "actual_vs_theta_tilde", "theta-tilde"),
        (axes[1], "actual_vs_continuation", "continuation"),
    ):
        scatter_predicted_actual(
            np.asarray(loo[key]),
            pred,
            ax=ax,
            style=ScatterStyle(
                title=f"CNN ({name}, {steps} steps)\nactual vs {what}",
                xlabel="Actual diff in test loss",
                ylabel="Predicted diff in test loss",
            ),
        )
    if len(by) > 1:
        h = sorted(by, key=int)
        ax = axes[2]
        ax.plot([int(k) for k in h], [by[k]["pearson"] for k in h], "o-", label="Pearson R")
        ax.plot([int(k) for k in h], [1 / by[k]["slope"] for k in h], "s--", label="1 / slope")
        ax.set_xscale("log")
        ax.set_xticks([int(k) for k in h], [k for k in h])
        ax.minorticks_off()
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("retraining steps from theta-tilde")
        ax.set_title("agreement by retraining length")
        ax.legend(fontsize=8)
    save_figure(fig, out / "fig2_cnn.png", dpi=80)
    return ["fig2_cnn.png"]


def _by_horizon(loo: Any, horizons: tuple[int, ...], predicted: np.ndarray) -> dict[str, Any]:
    """Agreement after each recorded number of retraining steps (actual vs the continuation)."""
    ref = (loo.info.get("reference_info") or {}).get("snapshots", {})
    refits = [r.get("snapshots", {}) for r in loo.info["refits"]]
    out: dict[str, Any] = {}
    for h in horizons:
        key = str(h)
        if key not in ref or not all(key in r for r in refits):
            continue  # e.g. refits reloaded from a checkpoint written without snapshots
        a = np.array([r[key] for r in refits]) - ref[key]
        out[key] = {
            **correlations(a, predicted),
            "actual_min": float(a.min()),
            "actual_max": float(a.max()),
        }
    return out


def _train_risk(obj: Objective, x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> float:
    with torch.no_grad():
        total = sum(
            float(obj.losses(theta, x[s : s + 1000], y[s : s + 1000]).sum())
            for s in range(0, len(x), 1000)
        )
    return total / len(x) + float(obj.regularizer(theta))


def _accuracy(obj: Objective, x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> float:
    with torch.no_grad():
        right = sum(
            int((obj.outputs(theta, x[s : s + 1000]).argmax(1) == y[s : s + 1000]).sum())
            for s in range(0, len(x), 1000)
        )
    return right / len(x)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def run(
    data_dir: Path | None,
    out: Path,
    quick: bool = False,
    progress: bool = True,
    protocol: str = "reduced",
) -> dict[str, Any]:
    """Run the Fig. 2 (right) reproduction; writes ``fig2_cnn.png`` and ``metrics.json``.

    Args:
        data_dir: folder with MNIST (see :func:`inflens.datasets.load_mnist`).
        out: output folder (``loo_checkpoint.json`` there makes the retraining resumable).
        quick: the CI smoke test (protocol ``"quick"``).
        progress: print progress.
        protocol: ``"reduced"`` (default), ``"reduced-240"``, ``"full"`` (the paper's 500k +
            100 x 30k steps) or ``"quick"`` (``quick=True`` implies ``"quick"``).
    """
    t_start = time.perf_counter()
    key = "quick" if quick else protocol
    if key not in PROTOCOLS:
        raise ValueError(f"unknown protocol {key!r}; use one of {', '.join(PROTOCOLS)}")
    cfg = PROTOCOLS[key]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    split = mnist_paper_split(load_mnist(data_dir), dtype=np.float32)
    small = small_subset(split, fraction=0.1, seed=0)
    x = torch.from_numpy(small["x_train"])
    y = torch.from_numpy(small["y_train"]).long()
    if cfg.n_train is not None:
        x, y = x[: cfg.n_train].contiguous(), y[: cfg.n_train].contiguous()
    n = int(x.shape[0])
    x_test_all = torch.from_numpy(split["x_test"])
    y_test_all = torch.from_numpy(split["y_test"]).long()
    test = (x_test_all[TEST_INDEX : TEST_INDEX + 1], y_test_all[TEST_INDEX : TEST_INDEX + 1])

    # ---- model and objective: theta = the weights (biases frozen at 0), l2 on theta
    model = PaperCNN(seed=cfg.init_seed, dtype=torch.float32)
    obj = Objective(model, "cross_entropy", l2=L2, params=model.weight_names)
    _log(
        progress,
        f"[{NAME}] protocol {cfg.name}: n={n}, theta = {obj.p} weights "
        f"({sum(p.numel() for p in model.parameters())} parameters incl. frozen biases)",
    )

    # ---- train theta-tilde (or reload it from an earlier run of the same protocol)
    t = time.perf_counter()
    schedule = piecewise_constant(list(cfg.boundaries), list(cfg.factors))
    cache = out / "theta_tilde.safetensors"
    loaded = _load_trained(cache, cfg, obj.p)
    if loaded is not None:
        theta_tilde, state = loaded
        _log(progress, f"  loaded theta-tilde and its Adam state from {cache}")
    else:
        trained = fit_adam(
            obj,
            (x, y),
            AdamConfig(
                cfg.train_steps,
                cfg.batch_size,
                cfg.lr,
                schedule=schedule,
                seed=cfg.train_seed,
                log_every=max(1, cfg.train_steps // 50),
                progress=progress,
            ),
        )
        theta_tilde, state = trained.theta, trained.state
        _save_trained(cache, cfg, theta_tilde, state)
    timings["train"] = time.perf_counter() - t
    obj.load_into_model(theta_tilde)
    obj = Objective(model, "cross_entropy", l2=L2, params=model.weight_names)
    train_risk = _train_risk(obj, x, y, obj.theta)
    test_acc = _accuracy(obj, x_test_all, y_test_all, obj.theta)
    train_acc = _accuracy(obj, x, y, obj.theta)
    with torch.no_grad():
        out_test = obj.outputs(obj.theta, test[0])
        test_loss = float(obj.losses(obj.theta, *test)[0])
    _log(
        progress,
        f"  trained {cfg.train_steps} steps in {timings['train']:.0f} s: train risk "
        f"{train_risk:.4f}, train acc {train_acc:.4f}, test acc {test_acc:.4f}; test image "
        f"{TEST_INDEX}: label {int(test[1][0])}, predicted {int(out_test.argmax())}, "
        f"loss {test_loss:.4f}",
    )

    # ---- influence with damping (CG), scores for every training point
    t = time.perf_counter()
    curvature, indefinite = cfg.curvature, None
    while True:
        inf = Influence(
            obj,
            (x, y),
            solver=CG(tol=cfg.cg_tol, max_iter=cfg.cg_max_iter),
            damping=cfg.damping,
            progress=progress,
            curvature=curvature,
        ).fit()
        try:
            s_test = inf.s_test(test)
            break
        except CurvatureError as exc:
            if curvature == "ggn":
                raise
            # H + damping I is not positive definite at this theta-tilde (the paper reports
            # that it was at its theta-tilde): fall back to the Gauss-Newton matrix, which is
            # positive semi-definite, with the same damping, and say so in the metrics.
            indefinite = str(exc)
            _log(progress, f"  Hessian + damping is indefinite ({exc}); using the GGN instead")
            curvature = "ggn"
    pred_all = (-inf.score(s_test) / n)[0]
    timings["influence"] = time.perf_counter() - t
    diag = inf.diagnostics()
    grad_norm = float(
        grad(lambda th: obj.losses(th, x, y).mean() + obj.regularizer(th))(obj.theta).norm()
    )
    _log(
        progress,
        f"  CG: {max(diag['iterations'])} iterations, residual "
        f"{max(diag['relative_residuals']):.1e}, {timings['influence']:.0f} s; "
        f"||grad R(theta-tilde)|| = {grad_norm:.2e}",
    )

    # ---- leave-one-out by paired warm-started retraining
    t = time.perf_counter()

    def measure(theta: torch.Tensor) -> float:
        with torch.no_grad():
            return float(obj.losses(theta.detach(), *test)[0])

    horizons = tuple(sorted({*cfg.report_steps, cfg.retrain_steps}))
    retrain_cfg = AdamConfig(
        cfg.retrain_steps, cfg.batch_size, cfg.lr, schedule=schedule, seed=cfg.retrain_seed
    )
    retrain = PairedAdam(obj, (x, y), state, retrain_cfg, snapshots=horizons, measure=measure)
    loo = leave_one_out(
        inf,
        test,
        LOOConfig(
            k=cfg.k,
            select="top",
            retrain=retrain,
            seed=cfg.retrain_seed,
            adam=retrain_cfg,
            checkpoint=out / "loo_checkpoint.json",
            progress=progress,
        ),
        predicted=pred_all,
    )
    timings["retrain"] = time.perf_counter() - t
    # batch-order noise of an unpaired protocol: a continuation with another seed
    other = PairedAdam(obj, (x, y), state, replace(retrain_cfg, seed=cfg.retrain_seed + 1))
    theta_other, _ = other(torch.ones(n, dtype=torch.bool), obj.theta)
    with torch.no_grad():
        loss_other = float(obj.losses(theta_other, *test)[0])
    unpaired_noise = loss_other - (loo.base_value + loo.reference_change)

    actual = loo.actual.numpy()
    actual_ref = loo.actual_vs_reference.numpy()
    predicted = loo.predicted.numpy()
    by_horizon = _by_horizon(loo, horizons, predicted)
    c_tilde = correlations(actual, predicted)
    c_ref = correlations(actual_ref, predicted)
    timings["total"] = time.perf_counter() - t_start

    metrics: dict[str, Any] = {
        "experiment": NAME,
        "protocol": asdict(cfg),
        "n_train": n,
        "p_theta": obj.p,
        "p_model": sum(p.numel() for p in model.parameters()),
        "l2": L2,
        "damping": cfg.damping,
        "curvature": curvature,
        "hessian_indefinite": indefinite,
        "test_index": TEST_INDEX,
        "test_label": int(test[1][0]),
        "test_predicted_label": int(out_test.argmax()),
        "test_loss": test_loss,
        "train_risk": train_risk,
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "grad_norm_at_theta_tilde": grad_norm,
        "train_loss_curve": [float(v) for v in state.get("losses", [])],
        "cg": {
            "iterations": max(diag["iterations"]),
            "relative_residual": max(diag["relative_residuals"]),
            "hessian_vector_products": diag.get("hessian_vector_products"),
        },
        "pearson_vs_theta_tilde": c_tilde["pearson"],
        "pearson_vs_continuation": c_ref["pearson"],
        "agreement_vs_theta_tilde": c_tilde,
        "agreement_vs_continuation": c_ref,
        "by_retrain_steps": by_horizon,
        "continuation_drift": loo.reference_change,
        "unpaired_noise": unpaired_noise,
        "min_abs_actual_vs_continuation": float(np.abs(actual_ref).min()),
        "loo": {
            "indices": [int(i) for i in loo.indices],
            "predicted": predicted.tolist(),
            "actual_vs_theta_tilde": actual.tolist(),
            "actual_vs_continuation": actual_ref.tolist(),
        },
        "seconds": timings,
    }
    metrics["figures"] = figures(metrics, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _log(
        progress,
        f"[{NAME}] protocol {cfg.name}: Pearson R {c_tilde['pearson']:.4f} vs theta-tilde, "
        f"{c_ref['pearson']:.4f} vs continuation (slope {c_ref['slope']:.3f}); drift "
        f"{loo.reference_change:+.2e}, unpaired noise {unpaired_noise:+.2e}; "
        f"{timings['total']:.0f} s; R by retraining steps: "
        + ", ".join(f"{h}: {v['pearson']:.3f}" for h, v in by_horizon.items()),
    )
    return metrics


# ============================================================================ paper protocol
#
# ``paper_run`` / ``paper_trend``: PROTOCOL 4.3 with the biases learned and unregularised (a
# per-parameter l2: ``L2`` on the 2,556 weights, 0 on the 60 biases), the paper's learning-rate
# schedule, influence with the Hessian of that objective + 0.01 I, and retraining from
# theta-tilde (with its Adam state) on the paired batch sequence. Every Adam run is split into
# fixed chunks of ``chunk_steps`` steps, each written atomically to safetensors, so a killed run
# resumes at the last chunk and ends with the same numbers as an uninterrupted one
# (:func:`inflens.train.fit_adam_resumable`).


@dataclass(frozen=True)
class PaperConfig:
    """One run of the paper's CNN protocol, or a shortened prefix of it.

    Attributes:
        train_steps: Adam steps to theta-tilde (paper 500,000). A shorter run is the first
            ``train_steps`` steps of the paper's schedule (the boundaries are not rescaled).
        retrain_steps: steps of each warm-started retrain (paper 30,000); the rate is the
            schedule's at ``train_steps + j`` (1e-6 after 220k steps, as in the paper).
        lr, boundaries, factors: base rate and step decay (paper 1e-4, x0.1 at 110k, x0.01 at
            220k).
        batch_size, k: mini-batch (500) and number of removed points (top 100 by ``|pred|``).
        n_train: use the first ``n_train`` points of the 5,500-point subset (None: all).
        damping: ``delta`` in ``H + delta I`` (0.01).
        solver: ``"exact"`` (dense float64 Hessian, :class:`inflens.solvers.Exact`) or ``"cg"``
            (matrix-free CG on the same Hessian, for machines where ``p`` products are slow).
        cg_tol, cg_max_iter: CG stopping rule.
        chunk_steps: Adam steps between checkpoints (fixed, so results do not depend on timing).
        report_steps: also report R after these (fewer) retraining steps.
        init_seed, train_seed, retrain_seed: seeds of the initialisation, training batches and
            (paired) retraining batches.
    """

    train_steps: int = 500_000
    retrain_steps: int = 30_000
    lr: float = 1e-4
    boundaries: tuple[int, ...] = (110_000, 220_000)
    factors: tuple[float, ...] = (1.0, 0.1, 0.01)
    batch_size: int = 500
    k: int = 100
    n_train: int | None = None
    damping: float = DAMPING
    solver: str = "exact"
    cg_tol: float = 1e-6
    cg_max_iter: int = 1000
    chunk_steps: int = 2_000
    report_steps: tuple[int, ...] = ()
    init_seed: int = 0
    train_seed: int = 0
    retrain_seed: int = 17

    def __post_init__(self) -> None:
        from ..errors import InputError

        if self.train_steps < 0 or self.retrain_steps < 1 or self.chunk_steps < 1:
            raise InputError(
                f"need train_steps >= 0, retrain_steps >= 1, chunk_steps >= 1; got "
                f"{self.train_steps}, {self.retrain_steps}, {self.chunk_steps}"
            )
        if self.solver not in ("exact", "cg"):
            raise InputError(f"solver must be 'exact' or 'cg', got {self.solver!r}")
        if self.k < 2:
            raise InputError(f"k must be at least 2 (a correlation needs two points), got {self.k}")


def weight_l2(model: PaperCNN, obj: Objective, value: float = L2) -> torch.Tensor:
    """``[p]``: ``value`` on the entries of theta that are weights, 0 on the biases."""
    vec = torch.zeros(obj.p, dtype=obj.dtype)
    weights = set(model.weight_names)
    for name, (a, b) in obj.offsets().items():
        if name in weights:
            vec[a:b] = value
    return vec


def per_parameter_l2_predictions(
    obj: Objective,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    l2: torch.Tensor,
    damping: float,
    solver: Solver,
    curvature: str = "hessian",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Predicted change of the test loss when each training point is removed, ``[n]``.

    ``pred_i = grad L(z_test)^T (H + diag(l2) + damping I)^-1 (grad L(z_i) + l2 * theta) / n``
    (``= -I_up,loss / n``; positive: removing ``z_i`` raises the test loss, so it was helpful),
    with ``H`` the Hessian (``curvature="ggn"``: the Gauss-Newton matrix) of the mean training
    loss at ``obj.theta``. ``obj`` must have ``l2 = 0``; ``l2`` is the per-parameter weight,
    made part of the objective (:meth:`inflens.Objective.with_l2`), so :class:`inflens.Influence`
    adds it to the curvature and to the training gradients. ``solver`` is fitted here (e.g.
    :class:`inflens.solvers.Exact` or ``CG``; K-FAC refuses a per-parameter l2). Raises
    :class:`inflens.errors.CurvatureError` when ``H + diag(l2) + damping I`` is not positive
    definite.
    """
    from ..errors import InputError

    if obj.l2_diag is not None or obj.l2 != 0.0:
        raise InputError("build the objective with l2=0; the per-parameter l2 is the l2 argument")
    inf = Influence(
        obj.with_l2(l2), train, solver=solver, damping=damping, progress=False, curvature=curvature
    ).fit()
    pred = inf.predicted_loss_change(test)[0]
    info = {"solver": inf.solver.name, "curvature": curvature, **inf.solver.diagnostics()}
    return pred, info


def _paper_solver(cfg: PaperConfig) -> Solver:
    from ..solvers import Exact

    return Exact() if cfg.solver == "exact" else CG(tol=cfg.cg_tol, max_iter=cfg.cg_max_iter)


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(
        json.dumps(d, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
    )


def _paper_data(data_dir: Path | None, n_train: int | None):
    split = mnist_paper_split(load_mnist(data_dir), dtype=np.float32)
    small = small_subset(split, fraction=0.1, seed=0)
    x = torch.from_numpy(small["x_train"])
    y = torch.from_numpy(small["y_train"]).long()
    if n_train is not None:
        x, y = x[:n_train].contiguous(), y[:n_train].contiguous()
    xt = torch.from_numpy(split["x_test"][TEST_INDEX : TEST_INDEX + 1])
    yt = torch.from_numpy(split["y_test"][TEST_INDEX : TEST_INDEX + 1]).long()
    return (x, y), (xt, yt)


def _paper_tag(cfg: PaperConfig, what: str, **extra: Any) -> str:
    keys = ("lr", "boundaries", "factors", "batch_size", "n_train", "init_seed", "chunk_steps")
    return json_fingerprint({"what": what, **{k: asdict(cfg)[k] for k in keys}, **extra})


def _paper_influence(
    cfg: PaperConfig,
    theta: torch.Tensor,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    l2: torch.Tensor,
    progress: bool,
) -> tuple[torch.Tensor, dict[str, Any], str | None]:
    """Predictions at theta-tilde in float64: the Hessian + damping, else (indefinite) the GGN."""
    x, y = train
    m64 = PaperCNN(seed=cfg.init_seed, dtype=torch.float64)
    obj64 = Objective(m64, "cross_entropy", l2=0.0)
    obj64.load_into_model(theta.double())
    l2_64 = l2.double()
    train64, test64 = (x.double(), y), (test[0].double(), test[1])
    indefinite = None
    try:
        pred_all, sinfo = per_parameter_l2_predictions(
            obj64, train64, test64, l2_64, cfg.damping, _paper_solver(cfg)
        )
    except CurvatureError as exc:
        # H + diag(l2) + 0.01 I is not positive definite at this theta-tilde: the quadratic
        # surrogate of Sec. 4.2 has no minimiser; use the Gauss-Newton matrix and say so.
        indefinite = str(exc)
        _log(progress, f"  [paper] Hessian + damping indefinite ({exc}); using the GGN")
        pred_all, sinfo = per_parameter_l2_predictions(
            obj64,
            train64,
            test64,
            l2_64,
            cfg.damping,
            _paper_solver(cfg),
            curvature="ggn",
        )
    return pred_all, sinfo, indefinite


def paper_run(
    cfg: PaperConfig,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    out: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, predict, retrain (all resumable from ``out``) and return the agreement metrics.

    ``actual_i`` = test loss after retraining without ``z_i`` minus the test loss after the same
    retraining on all points (paired batches: drift removed); ``predicted_i`` as in
    :func:`per_parameter_l2_predictions`. The headline is Pearson R of the two over the top
    ``k`` points. Also writes ``out/paper_metrics.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x, y = train
    n = int(y.shape[0])
    t0 = time.perf_counter()
    secs: dict[str, float] = {}
    model = PaperCNN(seed=cfg.init_seed, dtype=torch.float32)
    obj = Objective(model, "cross_entropy", l2=0.0)  # every parameter, biases learned
    l2 = weight_l2(model, obj)
    schedule = piecewise_constant(list(cfg.boundaries), list(cfg.factors))
    adam = AdamConfig(
        cfg.train_steps, cfg.batch_size, cfg.lr, schedule=schedule, seed=cfg.train_seed
    )

    # ---- theta-tilde: the first train_steps steps of the schedule (shared by shorter runs)
    t = time.perf_counter()
    ckpt = out / f"train_{cfg.train_steps}.safetensors"
    if not ckpt.is_file():
        # a shorter rung's theta-tilde ending on a chunk boundary is this run's prefix
        shorter = sorted(
            int(f.stem.split("_")[1])
            for f in out.glob("train_*.safetensors")
            if f.stem.split("_")[1].isdigit()
        )
        shorter = [s for s in shorter if s < cfg.train_steps and s % cfg.chunk_steps == 0]
        if shorter:
            import shutil

            shutil.copyfile(out / f"train_{shorter[-1]}.safetensors", ckpt)
    trained = fit_adam_resumable(
        obj,
        (x, y),
        adam,
        CheckpointConfig(ckpt, cfg.chunk_steps, tag=_paper_tag(cfg, "train", seed=cfg.train_seed)),
        l2=l2,
    )
    theta, state = trained.theta, trained.state
    secs["train"] = time.perf_counter() - t
    _log(progress, f"  [paper] trained {cfg.train_steps} steps ({secs['train']:.0f} s)")

    # ---- influence in float64 with the per-parameter l2 (cached: the dense Hessian is hours)
    t = time.perf_counter()
    itag = _paper_tag(
        cfg,
        "influence",
        train_steps=cfg.train_steps,
        seed=cfg.train_seed,
        solver=cfg.solver,
        damping=cfg.damping,
        cg_tol=cfg.cg_tol,
        cg_max_iter=cfg.cg_max_iter,
    )
    icache = out / f"influence_{cfg.train_steps}.safetensors"
    cached = None
    if icache.is_file():
        from safetensors import safe_open

        with safe_open(str(icache), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("tag") == itag:
                cached = (f.get_tensor("pred"), json.loads(meta["info"]), meta.get("indefinite"))
    if cached is not None:
        pred_all, sinfo, indefinite = cached
        indefinite = indefinite or None
    else:
        pred_all, sinfo, indefinite = _paper_influence(cfg, theta, train, test, l2, progress)
        from ..artifacts import _save_tensors

        meta = {"tag": itag, "info": json.dumps(_json_safe(sinfo)), "indefinite": indefinite or ""}
        _save_tensors(icache, {"pred": pred_all}, meta)
    secs["influence"] = time.perf_counter() - t
    top = torch.argsort(pred_all.abs(), descending=True)[: cfg.k]
    predicted = pred_all[top].numpy()

    # ---- paired retraining from theta-tilde and its Adam state
    t = time.perf_counter()

    def measure(th: torch.Tensor) -> float:
        with torch.no_grad():
            return float(obj.losses(th.detach(), *test)[0])

    horizons = tuple(sorted({*cfg.report_steps, cfg.retrain_steps}))
    radam = replace(adam, steps=cfg.retrain_steps, seed=cfg.retrain_seed)
    rtag = _paper_tag(cfg, "retrain", train_steps=cfg.train_steps, seed=cfg.retrain_seed)
    done_path = out / f"retrain_{cfg.train_steps}_{cfg.retrain_steps}.json"
    done: dict[str, dict[str, float]] = (
        json.loads(done_path.read_text()) if done_path.is_file() else {}
    )
    for i in ["all", *[int(j) for j in top]]:
        key = str(i)
        if key in done:
            continue
        keep = torch.ones(n)
        if i != "all":
            keep[i] = 0.0
        retrained = fit_adam_resumable(
            obj,
            (x, y),
            radam,
            CheckpointConfig(
                out / "retrain_current.safetensors",
                cfg.chunk_steps,
                tag=f"{rtag}-{key}",
                snapshots=horizons,
            ),
            start=AdamStart(theta, state),
            weights=keep,
            l2=l2,
            measure=measure,
        )
        done[key] = retrained.info.extra["snapshots"]
        tmp = done_path.with_name(done_path.name + ".tmp")
        tmp.write_text(json.dumps(done))
        tmp.replace(done_path)
        _log(progress, f"  [paper] retrained without {key} ({len(done)}/{cfg.k + 1})")
    secs["retrain"] = time.perf_counter() - t
    by: dict[str, Any] = {}
    for h in horizons:
        a = np.array([done[str(int(j))][str(h)] - done["all"][str(h)] for j in top])
        by[str(h)] = {
            **correlations(a, predicted),
            "sign_agreement": float(np.mean(np.sign(a) == np.sign(predicted))),
            "actual_min": float(a.min()),
            "actual_max": float(a.max()),
        }
    base_loss = measure(theta)
    with torch.no_grad():
        train_risk = float(
            sum(
                obj.losses(theta, x[s : s + 1000], y[s : s + 1000]).sum() for s in range(0, n, 1000)
            )
            / n
            + 0.5 * (l2 * theta * theta).sum()
        )
    secs["total"] = time.perf_counter() - t0
    final = by[str(cfg.retrain_steps)]
    metrics = {
        "config": asdict(cfg),
        "n_train": n,
        "p": obj.p,
        "l2_on": "weights (2,556 entries); biases learned, unregularised",
        "train_risk": train_risk,
        "test_loss_at_theta_tilde": base_loss,
        "curvature": sinfo["curvature"],
        "hessian_indefinite": indefinite,
        "solver_info": _json_safe(sinfo),
        "pearson": final["pearson"],
        "slope": final["slope"],
        "sign_agreement": final["sign_agreement"],
        "by_retrain_steps": by,
        "adam_steps": cfg.train_steps + (cfg.k + 1) * cfg.retrain_steps,
        "seconds": secs,
        "loo": {
            "indices": [int(j) for j in top],
            "predicted": predicted.tolist(),
            "actual": [
                done[str(int(j))][str(cfg.retrain_steps)] - done["all"][str(cfg.retrain_steps)]
                for j in top
            ],
        },
    }
    (out / f"paper_metrics_{cfg.train_steps}_{cfg.retrain_steps}.json").write_text(
        json.dumps(metrics, indent=1)
    )
    _log(
        progress,
        f"  [paper] T={cfg.train_steps} R={cfg.retrain_steps}: Pearson {final['pearson']:.3f}, "
        f"sign agreement {final['sign_agreement']:.2f}, {secs['total']:.0f} s",
    )
    return metrics


def paper_trend(
    rungs: list[tuple[int, int]],
    out: Path,
    data_dir: Path | None = None,
    base: PaperConfig | None = None,
    progress: bool = True,
    trend_file: Path | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run :func:`paper_run` at each ``(train_steps, retrain_steps)`` and write the trend.

    Rung ``T`` is the first ``T`` steps of the paper's schedule (boundaries not rescaled), so a
    longer rung continues the checkpoint of a shorter one that ends on a chunk boundary. Each
    rung also reports R after a quarter and half of its retraining. After every rung
    ``trend_file`` (default ``out/metrics_paper_protocol_trend.json``) is rewritten with R by
    rung, the measured retraining steps per second, and the time of the full protocol's
    500,000 + 101 x 30,000 Adam steps at the slowest measured rate (the Hessian not included).
    Rungs already in ``trend_file`` with the same base settings are kept, not re-run.
    """
    from .reproduce_all import git_state, machine, versions

    base = base or PaperConfig()
    git = git_state()  # the code this process runs: recorded at the start, not at each write
    train, test = _paper_data(data_dir, base.n_train)
    out = Path(out)
    trend_file = trend_file or out / "metrics_paper_protocol_trend.json"
    results = []
    if trend_file.is_file():
        # rungs of an earlier (interrupted or shorter) call with the same settings are kept
        old = json.loads(trend_file.read_text())
        if old.get("base_config", {}) == json.loads(json.dumps(asdict(base))):
            results = list(old.get("rungs", []))
    for t_steps, r_steps in rungs:
        if any(r["train_steps"] == t_steps and r["retrain_steps"] == r_steps for r in results):
            continue
        cfg = replace(
            base,
            train_steps=t_steps,
            retrain_steps=r_steps,
            report_steps=(r_steps // 4, r_steps // 2) if r_steps >= 4 else (),
        )
        m = paper_run(cfg, train, test, out, progress)
        # speed from the retraining (101 runs of retrain_steps, never shared between rungs)
        retrain_run = (m["config"]["k"] + 1) * r_steps
        adam_secs = m["seconds"]["retrain"]
        results.append(
            {
                "train_steps": t_steps,
                "retrain_steps": r_steps,
                "pearson": m["pearson"],
                "slope": m["slope"],
                "sign_agreement": m["sign_agreement"],
                "by_retrain_steps": {
                    h: {"pearson": v["pearson"], "sign_agreement": v["sign_agreement"]}
                    for h, v in m["by_retrain_steps"].items()
                },
                "curvature": m["curvature"],
                "hessian_indefinite": m["hessian_indefinite"] is not None,
                "solver_info": {
                    k: v
                    for k, v in m["solver_info"].items()
                    if isinstance(v, (int, float, str, bool)) or v is None
                },
                "train_risk": m["train_risk"],
                "test_loss_at_theta_tilde": m["test_loss_at_theta_tilde"],
                "seconds": m["seconds"],
                "retrain_adam_steps": retrain_run,
                "adam_steps_per_second": retrain_run / adam_secs if adam_secs > 0 else None,
            }
        )
        rates = [r["adam_steps_per_second"] for r in results if r["adam_steps_per_second"]]
        full_steps = 500_000 + 101 * 30_000
        trend = {
            "experiment": NAME,
            "what": "paper protocol (PROTOCOL 4.3, biases learned, per-parameter l2, Hessian + "
            "0.01 I) shortened: first train_steps steps of the paper's schedule, retraining "
            "retrain_steps steps at the rate in effect; Pearson over the top-k by |pred|",
            "paper_pearson": 0.86,
            "base_config": asdict(base),
            "rungs": results,
            "full_protocol_adam_steps": full_steps,
            "full_protocol_hours_at_measured_rate": (
                full_steps / min(rates) / 3600 if rates else None
            ),
            "torch_threads": torch.get_num_threads(),
            "git": git,
            "command": command or shlex.join(sys.argv),
            "versions": versions(),
            "machine": machine(),
        }
        trend_file.parent.mkdir(parents=True, exist_ok=True)
        trend_file.write_text(json.dumps(trend, indent=1) + "\n")
    return trend


def main(argv: list[str] | None = None) -> None:
    """``python -m inflens.experiments.fig2_cnn --out DIR [--steps T --retrain-steps R]`` runs
    the paper's protocol (default: 500k / 30k); ``--trend T:R,T:R,...`` runs shortened rungs."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=500_000)
    ap.add_argument("--retrain-steps", type=int, default=30_000)
    ap.add_argument("--solver", default="exact", choices=("exact", "cg"))
    ap.add_argument("--cg-max-iter", type=int, default=1000)
    ap.add_argument("--cg-tol", type=float, default=1e-6)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--chunk-steps", type=int, default=2_000)
    ap.add_argument("--trend", default=None, help="rungs T:R,T:R,... (e.g. 1000:25,2000:50)")
    ap.add_argument("--trend-file", type=Path, default=None)
    a = ap.parse_args(argv)
    base = PaperConfig(
        train_steps=a.steps,
        retrain_steps=a.retrain_steps,
        solver=a.solver,
        k=a.k,
        cg_tol=a.cg_tol,
        cg_max_iter=a.cg_max_iter,
        n_train=a.n_train,
        chunk_steps=a.chunk_steps,
    )
    if a.trend:
        rungs = [tuple(int(v) for v in r.split(":")) for r in a.trend.split(",")]
        command = shlex.join(["python", "-m", "inflens.experiments.fig2_cnn", *sys.argv[1:]])
        paper_trend(rungs, a.out, a.data_dir, base, trend_file=a.trend_file, command=command)  # type: ignore[arg-type]
    else:
        train, test = _paper_data(a.data_dir, a.n_train)
        paper_run(base, train, test, a.out)


if __name__ == "__main__":
    main()
