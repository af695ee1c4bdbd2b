"""Trainers used by validation, the applications and the experiments.

All trainers work on the flat parameter vector of an :class:`inflens.Objective` and minimise
the *weighted regularised mean risk*

    ``R_w(theta) = (1/n) sum_i w_i loss(z_i, theta) + (l2 / 2) ||theta||^2``

over the ``n`` examples they are given (``w = 1`` by default; ``l2`` defaults to the
objective's). To refit without point ``i`` *with l2 relative to the mean over the remaining
n - 1 points* (the paper's leave-one-out protocol, ``C = 1/((n-1) l2)``) use
``w_j = n / (n - 1)`` for ``j != i`` and ``w_i = 0`` (see :func:`loo_weights`).

- :func:`fit_lbfgs`: full-batch L-BFGS (strong Wolfe line search) until the gradient norm is at
  most ``tol``; each closure is one chunked pass over the data (bounded memory); its settings
  are an :class:`LBFGSConfig`.
- :func:`fit_adam`: mini-batch Adam with an optional learning-rate schedule, deterministic
  under a seed, resumable from (and returning) the optimiser state (an :class:`AdamStart`).
  :func:`fit_adam_resumable` runs it in fixed chunks checkpointed to safetensors (a
  :class:`CheckpointConfig`), so a killed run resumes and ends with the same numbers.
- :func:`fit_linear_svm`: an exact hinge-loss linear SVM without bias (liblinear dual
  coordinate descent, then an active-set polish with a duality-gap certificate).
- :func:`newton_minimize`: the one damped Newton iteration (chord steps with a fixed
  preconditioner, Newton steps with an Armijo line search), on any smooth strongly convex
  function given by its gradient; batched over independent problems. :func:`fit_newton` runs
  it on an :class:`~inflens.Objective` (Newton directions from the dense Hessian or a caller's
  ``solve``, e.g. the attack's); the experiments' logistic fits and the MNIST leave-one-out
  refits call it with their own closed forms.

Every trainer returns a :class:`Fit` (theta, what happened, and for Adam the optimiser state).
Trainers never modify the model or the objective unless ``load=True`` (the Adam trainers
never do: ``objective.load_into_model(fit.theta)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import grad
from tqdm.auto import tqdm

from .data import Data, DataLike
from .errors import InflensWarning, InputError, SolverDivergedError
from .objective import Objective

__all__ = [
    "AdamConfig",
    "AdamStart",
    "CheckpointConfig",
    "Fit",
    "FitInfo",
    "LBFGSConfig",
    "batch_sequence",
    "fit_adam",
    "fit_adam_resumable",
    "fit_lbfgs",
    "fit_linear_svm",
    "fit_newton",
    "loo_weights",
    "newton_minimize",
    "piecewise_constant",
]

L2Like = float | torch.Tensor | None


@dataclass
class FitInfo:
    """What a trainer did: iterations, final gradient norm / objective, convergence, time."""

    method: str
    iterations: int
    converged: bool
    grad_norm: float = float("nan")
    objective: float = float("nan")
    function_evals: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Fit:
    """What every trainer returns: the parameters, how the fit went, and the optimiser state.

    Attributes:
        theta: the flat ``[p]`` parameters (``[K, p]`` for a batched :func:`newton_minimize`).
        info: iterations, final gradient norm / objective, convergence, time.
        state: the optimiser state to resume from (:func:`fit_adam`: ``m``, ``v``, ``step``,
            ``losses``); ``None`` for the other trainers.

    Unpacks as ``theta, info = fit``.
    """

    theta: torch.Tensor
    info: FitInfo
    state: dict[str, Any] | None = None

    def __iter__(self):
        return iter((self.theta, self.info))


def loo_weights(n: int, remove: int | torch.Tensor, dtype: torch.dtype = torch.float64):
    """Weights ``w`` such that ``(1/n) sum_i w_i loss_i`` is the mean over the kept points.

    ``remove`` is one index or a boolean / index tensor of points to drop; kept points get
    ``n / n_kept``, removed points 0.
    """
    w = torch.ones(n, dtype=dtype)
    w[torch.as_tensor(remove)] = 0.0
    kept = int((w > 0).sum())
    if kept == 0:
        raise InputError("cannot remove every training point")
    return w * (n / kept)


def _resolve_l2(objective: Objective, l2: L2Like) -> float | torch.Tensor:
    if l2 is None:
        return objective.l2_given
    if isinstance(l2, torch.Tensor):
        if l2.shape != (objective.p,):
            raise InputError(
                f"a per-parameter l2 must have shape [{objective.p}] (one weight per entry of "
                f"theta), got {tuple(l2.shape)}"
            )
        return l2.to(objective.theta)
    if not float(l2) >= 0:
        raise InputError(f"l2 must be non-negative, got {l2}")
    return float(l2)


def _reg(theta: torch.Tensor, l2: float | torch.Tensor) -> torch.Tensor:
    """``(1/2) sum_j l2_j theta_j^2`` (scalar or per-parameter ``l2``)."""
    return 0.5 * (l2 * theta * theta).sum()


def _check_weights(weights: torch.Tensor | None, n: int, obj: Objective) -> torch.Tensor | None:
    if weights is None:
        return None
    w = torch.as_tensor(weights).to(device=obj.device, dtype=obj.dtype).reshape(-1)
    if w.numel() != n:
        raise InputError(f"weights must have one entry per training point ({n}), got {w.numel()}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise InputError("weights must be finite and non-negative")
    return w


def _held_eval(objective: Objective) -> contextlib.AbstractContextManager:
    """Hold the model in eval mode for a whole training loop (saves a per-call toggle)."""
    held = getattr(objective, "evaluating", None)
    return held() if held is not None else contextlib.nullcontext()


def _finish(objective: Objective, theta: torch.Tensor, load: bool) -> None:
    if load:
        objective.load_into_model(theta)


# ---------------------------------------------------------------------------------- L-BFGS
@dataclass(frozen=True)
class LBFGSConfig:
    """The settings of one :func:`fit_lbfgs` run (validated on creation).

    Attributes:
        tol: gradient-norm tolerance, ``||grad R_w||_2 <= tol``.
        max_iter: maximum L-BFGS iterations (each may take several function evaluations).
        batch_size: examples per chunk of a pass (default: all up to 8,192 at once).
        history_size: L-BFGS memory.
        on_fail: ``"warn"`` (InflensWarning), ``"raise"`` (SolverDivergedError) or ``"ignore"``
            when the tolerance is not reached.
        progress: show a progress bar over iterations.
    """

    tol: float = 1e-10
    max_iter: int = 1000
    batch_size: int | None = None
    history_size: int = 50
    on_fail: str = "warn"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.on_fail not in ("warn", "raise", "ignore"):
            raise InputError(f"on_fail must be 'warn', 'raise' or 'ignore', got {self.on_fail!r}")
        if not self.tol > 0 or int(self.max_iter) < 1:
            raise InputError(
                f"need tol > 0 and max_iter >= 1, got tol={self.tol}, max_iter={self.max_iter}"
            )
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise InputError(f"batch_size must be None or >= 1, got {self.batch_size}")
        if int(self.history_size) < 1:
            raise InputError(f"history_size must be >= 1, got {self.history_size}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return dict(self.__dict__)


def fit_lbfgs(
    objective: Objective,
    train: DataLike,
    theta0: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    l2: L2Like = None,
    *,
    config: LBFGSConfig | None = None,
    load: bool = False,
    **settings: Any,
) -> Fit:
    """Full-batch L-BFGS on ``R_w(theta) = (1/n) sum_i w_i loss_i + (l2/2)||theta||^2``.

    Runs ``torch.optim.LBFGS`` (strong Wolfe line search) on the flat theta until
    ``||grad R_w||_2 <= tol`` or ``max_iter`` iterations. Each objective evaluation is one pass
    over the data in chunks of ``batch_size`` examples (losses and gradients summed), so
    memory stays bounded for large data. Use float64 for tight tolerances.

    Args:
        objective: model, loss and default l2; its current theta is the default start.
        train: ``(X, y)`` tensors, a Dataset or a non-shuffling DataLoader (all ``n`` points).
        theta0: start (warm start); default ``objective.theta``.
        weights: ``[n]`` non-negative example weights (see :func:`loo_weights`).
        l2: override of the objective's l2 (a float, or a ``[p]`` tensor of per-parameter
            coefficients, e.g. zero for biases).
        config: tolerance, iterations, chunking, memory, failure policy
            (:class:`LBFGSConfig`; default ``LBFGSConfig()``).
        load: copy the result into the model and set ``objective.theta`` to it.
        **settings: fields of :class:`LBFGSConfig` by name, a shorthand
            (``fit_lbfgs(obj, data, tol=1e-8)`` is ``config=LBFGSConfig(tol=1e-8)``); with
            ``config`` they replace its fields.

    Returns:
        A :class:`Fit`: the flat ``[p]`` theta (detached) and a :class:`FitInfo` (iterations,
        gradient norm, objective).
    """
    if config is not None and not isinstance(config, LBFGSConfig):
        raise InputError(f"config must be an LBFGSConfig, got {type(config).__name__}")
    unknown = set(settings) - set(LBFGSConfig.__dataclass_fields__)
    if unknown:
        raise InputError(
            f"fit_lbfgs got unknown settings {sorted(unknown)}; the settings are the fields of "
            f"LBFGSConfig: {sorted(LBFGSConfig.__dataclass_fields__)}"
        )
    cfg = dataclasses.replace(config or LBFGSConfig(), **settings)
    tol, max_iter, on_fail = cfg.tol, int(cfg.max_iter), cfg.on_fail
    t_start = time.perf_counter()
    obj = objective
    data = train if isinstance(train, Data) else Data(train, "training data")
    n = len(data)
    lam = _resolve_l2(obj, l2)
    w = _check_weights(weights, n, obj)
    size = int(cfg.batch_size or min(n, 8192))
    # The data are held as prepared chunks (views for tensor data), checked once.
    chunks = []
    for start, x, y in data.chunks(size):
        x, y = obj.prepare(x, y, "training data", start)
        wc = None if w is None else w[start : start + x.shape[0]]
        if wc is not None and not bool((wc > 0).any()):
            continue  # a chunk of zero weight contributes nothing
        chunks.append((x, y, wc))

    theta = (obj.theta if theta0 is None else theta0).detach().to(obj.theta).clone()
    if theta.shape != (obj.p,):
        raise InputError(f"theta0 must have shape [{obj.p}], got {tuple(theta.shape)}")
    theta.requires_grad_(True)

    def value_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros((), dtype=obj.dtype, device=obj.device)
        g = torch.zeros_like(theta)
        for x, y, wc in chunks:
            with torch.enable_grad():
                th = theta.detach().requires_grad_(True)
                vals = obj.losses(th, x, y)
                if wc is not None:
                    vals = vals * wc
                part = vals.sum() / n
                (gp,) = torch.autograd.grad(part, th)
            total += part.detach()
            g += gp
        reg = _reg(theta.detach(), lam)
        total += reg
        g += lam * theta.detach()
        return total, g

    evals = 0

    def closure() -> torch.Tensor:
        nonlocal evals
        evals += 1
        val, g = value_and_grad()
        theta.grad = g
        return val

    # LBFGS stops internally on max|g| <= tolerance_grad; we want ||g||_2 <= tol, so it runs in
    # rounds of a few iterations and the 2-norm is checked between rounds (its history
    # persists across rounds). tolerance_change=0: never stop just because the objective is flat.
    round_iters = 25
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=round_iters,
        max_eval=round_iters * 5,
        tolerance_grad=tol / math.sqrt(obj.p),
        tolerance_change=0.0,
        history_size=cfg.history_size,
        line_search_fn="strong_wolfe",
    )
    bar = tqdm(total=max_iter, desc="L-BFGS", disable=not cfg.progress, leave=False)
    iters = 0
    passes = 1
    val, g = value_and_grad()
    gnorm = float(g.norm())
    best_theta, best_gnorm, best_val = theta.detach().clone(), gnorm, float(val)
    phase = "wolfe"
    stalled = 0
    with _held_eval(obj):
        while best_gnorm > tol and iters < max_iter:
            before = opt.state[theta].get("n_iter", 0)
            opt.step(closure)
            done = opt.state[theta].get("n_iter", 0) - before
            iters += done
            bar.update(done)
            prev = float(val)
            val, g = value_and_grad()
            passes += 1
            gnorm = float(g.norm())
            if not math.isfinite(gnorm):
                raise SolverDivergedError(
                    "L-BFGS produced a non-finite objective/gradient; check the data and the loss "
                    "(e.g. scale the inputs) or start from a better theta0"
                )
            improved = gnorm < best_gnorm
            if improved:
                best_theta, best_gnorm, best_val = theta.detach().clone(), gnorm, float(val)
            bar.set_postfix(grad_norm=f"{best_gnorm:.2e}")
            if phase == "wolfe":
                # Near the optimum the objective stops decreasing in floating point (the remaining
                # decrease ~ ||g||^2 / (2 lambda) is below eps * |R|) and the Wolfe line search
                # fails. From there on, take unit quasi-Newton steps with the same L-BFGS memory,
                # judged by the gradient norm alone (gradients keep their precision).
                if done == 0 or float(val) >= prev:
                    phase = "unit"
                    group = opt.param_groups[0]
                    group["line_search_fn"] = None
                    group["max_iter"] = 5
                    group["max_eval"] = 10
            else:
                stalled = 0 if (done > 0 and improved) else stalled + 1
                if stalled >= 3 or gnorm > 100 * best_gnorm:
                    break
    bar.close()
    theta, gnorm, val = best_theta, best_gnorm, best_val
    info = FitInfo(
        method="lbfgs",
        iterations=iters,
        converged=gnorm <= tol,
        grad_norm=gnorm,
        objective=float(val),
        function_evals=evals + passes,
        seconds=time.perf_counter() - t_start,
        extra={"tol": tol, "phase": phase},
    )
    if not info.converged:
        msg = (
            f"L-BFGS stopped after {iters} iterations with gradient norm {gnorm:.3e} > tol={tol:g}; "
            "raise max_iter, loosen tol, or use float64 (model.double()) if it stalls at "
            "machine precision"
        )
        if on_fail == "raise":
            raise SolverDivergedError(msg)
        if on_fail == "warn":
            warnings.warn(msg, InflensWarning, stacklevel=2)
    _finish(obj, theta, load)
    return Fit(theta, info)


# ---------------------------------------------------------------------------------- Adam
def piecewise_constant(boundaries: list[int], factors: list[float]) -> Callable[[int], float]:
    """A schedule ``step -> factor``: ``factors[j]`` for ``boundaries[j-1] <= step < boundaries[j]``.

    The paper's CNN (PROTOCOL 4.3): ``piecewise_constant([110_000, 220_000], [1, 0.1, 0.01])``
    multiplies lr 1e-4 by 1, 0.1, 0.01.
    """
    if len(factors) != len(boundaries) + 1:
        raise InputError("piecewise_constant needs len(factors) == len(boundaries) + 1")
    if list(boundaries) != sorted(boundaries):
        raise InputError("boundaries must be increasing")
    bs = list(boundaries)
    fs = [float(f) for f in factors]

    def schedule(step: int) -> float:
        j = 0
        while j < len(bs) and step >= bs[j]:
            j += 1
        return fs[j]

    return schedule


class _Batches:
    """TensorFlow-style ``next_batch``: sequential passes over a permutation reshuffled every
    epoch; a batch that crosses an epoch end takes the rest of the old epoch and the start of
    the new one (as the paper's data loader)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.b, self.g = n, batch_size, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.b <= self.n:
            out = self.perm[self.pos : self.pos + self.b]
            self.pos += self.b
            if self.pos == self.n:
                self.perm = torch.randperm(self.n, generator=self.g)
                self.pos = 0
            return out
        rest = self.perm[self.pos :]
        self.perm = torch.randperm(self.n, generator=self.g)
        self.pos = self.b - rest.numel()
        return torch.cat([rest, self.perm[: self.pos]])


def batch_sequence(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The index batches :func:`fit_adam` draws from ``n`` points (``subset=None``) under
    ``seed``: ``steps`` tensors of ``min(batch_size, n)`` indices."""
    batches = _Batches(n, min(int(batch_size), n), torch.Generator().manual_seed(int(seed)))
    return [batches.next() for _ in range(int(steps))]


@dataclass(frozen=True)
class AdamConfig:
    """The schedule of one :func:`fit_adam` run (validated on creation).

    Attributes:
        steps: number of Adam steps to run.
        batch_size: examples per step.
        lr: base learning rate; the rate at global step ``k`` is ``lr * schedule(k)``.
        schedule: ``global_step -> factor`` (see :func:`piecewise_constant`); ``None``: 1.
        seed: seed of the mini-batch order.
        betas, eps: Adam constants (TensorFlow and PyTorch defaults).
        log_every: record the mean mini-batch risk over every ``log_every`` steps in
            ``state["losses"]`` (0: never).
        progress: progress bar.
    """

    steps: int
    batch_size: int
    lr: float
    schedule: Callable[[int], float] | None = None
    seed: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    log_every: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if int(self.steps) < 0 or int(self.batch_size) < 1 or not self.lr > 0:
            raise InputError(
                f"need steps >= 0, batch_size >= 1 and lr > 0, got {self.steps}, "
                f"{self.batch_size}, {self.lr}"
            )
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1) or not self.eps > 0:
            raise InputError(f"need betas in [0, 1) and eps > 0, got {self.betas}, {self.eps}")
        if int(self.log_every) < 0:
            raise InputError(f"log_every must be >= 0, got {self.log_every}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (the schedule by name)."""
        d = {k: v for k, v in self.__dict__.items() if k != "schedule"}
        d["schedule"] = None if self.schedule is None else getattr(self.schedule, "__name__", "fn")
        return d


@dataclass(frozen=True, eq=False)
class AdamStart:
    """Where an Adam run starts: the parameters and, to continue a run, its optimiser state.

    Attributes:
        theta: the flat ``[p]`` start.
        state: the Adam state of an earlier run, as in :attr:`Fit.state`: the moments ``m`` and
            ``v`` (theta's shape) and the global ``step`` already taken (it sets the bias
            correction and the schedule's position); ``None``: zero moments at step 0.

    Continuing from a run's theta and state on the next batches is the same arithmetic as one
    longer run. It is not modified by the trainers.
    """

    theta: torch.Tensor
    state: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.theta, torch.Tensor) or self.theta.ndim != 1:
            raise InputError(
                "AdamStart.theta must be a flat [p] tensor (e.g. objective.theta or fit.theta), "
                f"got {type(self.theta).__name__} of shape {tuple(getattr(self.theta, 'shape', ()))}"
            )
        if self.state is None:
            return
        missing = {"m", "v", "step"} - set(self.state)
        if missing:
            raise InputError(
                f"AdamStart.state needs 'm', 'v' and 'step' (the state of a fit_adam Fit); "
                f"missing {sorted(missing)}"
            )
        for key in ("m", "v"):
            t = self.state[key]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(self.theta.shape):
                raise InputError(
                    f"AdamStart.state[{key!r}] must be a tensor of theta's shape "
                    f"{tuple(self.theta.shape)}, got {tuple(getattr(t, 'shape', ()))}"
                )
        if int(self.state["step"]) < 0:
            raise InputError(f"AdamStart.state['step'] must be >= 0, got {self.state['step']}")

    @classmethod
    def from_fit(cls, fit: Fit) -> AdamStart:
        """Continue an earlier :func:`fit_adam` run: its theta and its optimiser state."""
        return cls(fit.theta, fit.state)


def fit_adam(
    objective: Objective,
    train: DataLike,
    config: AdamConfig,
    *,
    start: AdamStart | None = None,
    subset: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    l2: L2Like = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> Fit:
    """Mini-batch Adam on the (weighted) batch mean of the losses plus ``(l2/2)||theta||^2``.

    Deterministic under ``config.seed``: batches are consecutive slices of a ``torch.randperm``
    permutation of the (subset of the) training set, reshuffled at every epoch end, drawn from
    a generator seeded with the seed (a batch that crosses an epoch end takes the rest of the
    old epoch and the start of the new one, as the paper's loader). The update is PyTorch's
    Adam (bias-corrected moments, ``eps`` added to ``sqrt(v_hat)``); the learning rate at
    global step ``k`` is ``lr * schedule(k)``.

    Args:
        objective: model, loss and default l2; its theta is the default start.
        train: the training data (``(X, y)`` tensors, Dataset or non-shuffling DataLoader).
        config: steps, batch size, learning rate and schedule, seed (:class:`AdamConfig`).
        start: the start theta and, to resume or warm-start, the optimiser state of an earlier
            run (:class:`AdamStart`; e.g. ``AdamStart.from_fit(original)``, so that a
            leave-one-out retrain continues with the same moments and decayed learning rate);
            default ``objective.theta`` with zero moments at step 0.
        subset: train only on these training indices (the batches are drawn from them).
        weights: ``[n]`` non-negative example weights; the batch risk is
            ``sum_b w_i loss_i / sum_b w_i``. Batches are drawn from all ``n`` points whatever
            the weights, so runs that differ only in weights see the same batches (a removed
            point is weight 0: paired leave-one-out retraining).
        l2: override of the objective's l2 (float or ``[p]`` per-parameter tensor).
        callback: ``(steps_done, theta) -> None`` after every step (e.g. to measure snapshots).

    Returns:
        A :class:`Fit` with theta ``[p]`` and ``state`` (``m``, ``v``, ``step``, ``losses``).
        The model and the objective are not modified (``objective.load_into_model(fit.theta)``
        to use the result).
    """
    if not isinstance(config, AdamConfig):
        raise InputError(f"config must be an AdamConfig, got {type(config).__name__}")
    if start is not None and not isinstance(start, AdamStart):
        raise InputError(
            f"start must be an AdamStart (theta and optionally the Adam state), got "
            f"{type(start).__name__}"
        )
    if subset is not None and weights is not None:
        raise InputError("give subset or weights, not both")
    t_start = time.perf_counter()
    obj = objective
    cfg = config
    data = train if isinstance(train, Data) else Data(train, "training data")
    lam = _resolve_l2(obj, l2)
    if subset is None:
        index = torch.arange(len(data))
    else:
        index = torch.as_tensor(subset)
        index = index.nonzero()[:, 0] if index.dtype == torch.bool else index.long().reshape(-1)
    m_points = int(index.numel())
    if m_points == 0:
        raise InputError("fit_adam: the training subset is empty")
    w_all = _check_weights(weights, len(data), obj)
    b = min(int(cfg.batch_size), m_points)
    if data.x is not None:
        x_all, y_all = obj.prepare(data.x, data.y, "training data")
    else:
        x_all, y_all = obj.prepare(*data.get(torch.arange(len(data))), "training data")

    theta = (obj.theta if start is None else start.theta).detach().to(obj.theta).clone()
    if theta.shape != (obj.p,):
        raise InputError(f"start.theta must have shape [{obj.p}], got {tuple(theta.shape)}")
    state = None if start is None else start.state
    if state is not None:
        m = state["m"].detach().to(theta).clone()
        v = state["v"].detach().to(theta).clone()
        k0 = int(state["step"])
    else:
        m, v, k0 = torch.zeros_like(theta), torch.zeros_like(theta), 0

    def risk(th: torch.Tensor, x: torch.Tensor, y: torch.Tensor, wb: torch.Tensor | None):
        vals = obj.losses(th, x, y)
        if wb is None:
            return vals.mean() + _reg(th, lam)
        return (vals * wb).sum() / wb.sum().clamp_min(1e-300) + _reg(th, lam)

    grad_fn = grad(risk)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    batches = _Batches(m_points, b, gen)
    b1, b2 = cfg.betas
    losses: list[float] = []
    acc, acc_n = 0.0, 0
    steps = int(cfg.steps)
    bar = tqdm(range(steps), desc="Adam", disable=not cfg.progress, leave=False)
    with _held_eval(obj):
        for j in bar:
            k = k0 + j + 1  # 1-based Adam step (bias correction)
            idx = index[batches.next()].to(x_all.device)
            x, y = x_all[idx], y_all[idx]
            wb = None if w_all is None else w_all[idx]
            if cfg.log_every:
                with torch.no_grad():
                    acc += float(risk(theta, x, y, wb))
                acc_n += 1
                if acc_n == cfg.log_every:
                    losses.append(acc / acc_n)
                    acc, acc_n = 0.0, 0
            g = grad_fn(theta, x, y, wb)
            rate = cfg.lr * (cfg.schedule(k - 1) if cfg.schedule is not None else 1.0)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = m / (1 - b1**k)
            v_hat = v / (1 - b2**k)
            theta = theta - rate * m_hat / (v_hat.sqrt() + cfg.eps)
            if callback is not None:
                callback(j + 1, theta)
    if not torch.isfinite(theta).all():
        raise SolverDivergedError(
            "Adam produced non-finite parameters; lower the learning rate or check the data"
        )
    info = FitInfo(
        method="adam",
        iterations=steps,
        converged=True,
        seconds=time.perf_counter() - t_start,
        extra={"config": cfg.to_dict(), "global_step": k0 + steps},
    )
    return Fit(theta, info, {"m": m, "v": v, "step": k0 + steps, "losses": losses})


def _whole_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often :func:`fit_adam_resumable` saves its progress (validated on creation).

    Attributes:
        path: the safetensors checkpoint, written atomically (temporary file + rename).
        chunk_steps: Adam steps between checkpoints. It is part of the result (every chunk
            draws its batches under its own seed), so keep it fixed across runs to be compared.
        tag: names the run; a checkpoint at ``path`` with another tag is ignored (and replaced
            at the end of the first chunk). Put everything the result depends on in it.
        snapshots: steps of this run (1-based) after which ``measure(theta)`` is recorded.
    """

    path: Path
    chunk_steps: int
    tag: str = ""
    snapshots: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.path, str | Path):
            raise InputError(f"path must be a str or Path, got {type(self.path).__name__}")
        object.__setattr__(self, "path", Path(self.path))
        if self.path.is_dir():
            raise InputError(f"the checkpoint path {self.path} is a folder; name a file in it")
        if not _whole_number(self.chunk_steps) or self.chunk_steps < 1:
            raise InputError(f"chunk_steps must be an integer >= 1, got {self.chunk_steps!r}")
        if not isinstance(self.tag, str):
            raise InputError(f"tag must be a str, got {type(self.tag).__name__}")
        snaps = tuple(self.snapshots)
        if not all(_whole_number(s) and s >= 1 for s in snaps):
            raise InputError(f"snapshots must be steps >= 1 (integers), got {snaps}")
        object.__setattr__(self, "snapshots", tuple(sorted({int(s) for s in snaps})))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return {**self.__dict__, "path": str(self.path), "snapshots": list(self.snapshots)}


def fit_adam_resumable(
    objective: Objective,
    train: DataLike,
    config: AdamConfig,
    checkpoint: CheckpointConfig,
    *,
    start: AdamStart | None = None,
    weights: torch.Tensor | None = None,
    l2: L2Like = None,
    measure: Callable[[torch.Tensor], float] | None = None,
) -> Fit:
    """``config.steps`` steps of :func:`fit_adam` in fixed chunks, each chunk's end saved to
    ``checkpoint.path``; a later call with the same tag resumes from the last saved chunk.

    Chunk ``c`` (steps ``c * chunk_steps + 1`` to ``(c + 1) * chunk_steps``) is one
    :func:`fit_adam` call with batch seed ``config.seed + 1_000_003 * c`` (a fresh permutation
    per chunk) that continues from the previous chunk's theta and Adam state (moments, global
    step: the schedule and the bias correction run on). So the result depends on
    ``chunk_steps`` but not on where a run was interrupted: a resumed run does the same
    arithmetic as an uninterrupted one and ends with the same bits.

    The checkpoint holds the tensors ``theta``, ``m``, ``v`` and the metadata ``tag``,
    ``done`` (steps of this run finished), ``step`` (global Adam step) and ``snapshots``
    (JSON); no pickle. A finished run's checkpoint is returned without taking a step.

    Args:
        objective, train, config, weights, l2: as for :func:`fit_adam`.
        checkpoint: path, chunk size, tag and snapshot steps (:class:`CheckpointConfig`).
        start: theta and optionally the Adam state to start from (:class:`AdamStart`;
            default ``objective.theta``, zero moments); ignored when the checkpoint is resumed.
        measure: ``theta -> float`` recorded after each of ``checkpoint.snapshots`` steps.

    Returns:
        A :class:`Fit`: theta, the Adam state (``m``, ``v``, ``step``; ``losses`` of the last
        chunk run in this call) and in ``info.extra`` the ``snapshots``
        (``{str(step): measure(theta)}``) and ``resumed_at`` (steps loaded from the checkpoint).
    """
    from safetensors import safe_open

    from .artifacts import _save_tensors

    if not isinstance(checkpoint, CheckpointConfig):
        raise InputError(f"checkpoint must be a CheckpointConfig, got {type(checkpoint).__name__}")
    if not isinstance(config, AdamConfig):
        raise InputError(f"config must be an AdamConfig, got {type(config).__name__}")
    total, chunk, path = int(config.steps), int(checkpoint.chunk_steps), checkpoint.path
    late = [s for s in checkpoint.snapshots if s > total]
    if late:
        raise InputError(f"snapshots {late} lie beyond the run's {total} steps")
    if checkpoint.snapshots and measure is None:
        raise InputError("snapshots need a measure (theta -> float) to record")
    t_start = time.perf_counter()
    done = 0
    theta = objective.theta if start is None else start.theta
    st = None if start is None else start.state
    snaps: dict[str, float] = {}
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("tag") == checkpoint.tag:
                saved = {k: f.get_tensor(k) for k in f.keys()}
                done = int(meta["done"])
                theta = saved["theta"]
                st = {"m": saved["m"], "v": saved["v"], "step": int(meta["step"]), "losses": []}
                snaps = json.loads(meta.get("snapshots", "{}"))
    if done > total:
        raise InputError(
            f"the checkpoint {path} (tag {checkpoint.tag!r}) has {done} steps done, more than "
            f"the {total} asked for; give this run another tag or path"
        )
    resumed_at = done
    while done < total:
        c = done // chunk
        steps = min(chunk, total - done)
        first = done

        def callback(j: int, th: torch.Tensor, first: int = first) -> None:
            if measure is not None and first + j in checkpoint.snapshots:
                snaps[str(first + j)] = float(measure(th))

        fit = fit_adam(
            objective,
            train,
            dataclasses.replace(config, steps=steps, seed=config.seed + 1_000_003 * c),
            start=AdamStart(theta, st),
            weights=weights,
            l2=l2,
            callback=callback,
        )
        theta, st, done = fit.theta, fit.state, done + steps
        meta = {"tag": checkpoint.tag, "done": str(done), "step": str(int(st["step"]))}
        meta["snapshots"] = json.dumps(snaps)
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_tensors(path, {"theta": theta, "m": st["m"], "v": st["v"]}, meta)
    if st is None:  # zero steps from a fresh start
        st = {"m": torch.zeros_like(theta), "v": torch.zeros_like(theta), "step": 0, "losses": []}
    info = FitInfo(
        method="adam",
        iterations=total - resumed_at,
        converged=True,
        seconds=time.perf_counter() - t_start,
        extra={
            "config": config.to_dict(),
            "checkpoint": checkpoint.to_dict(),
            "global_step": int(st["step"]),
            "resumed_at": resumed_at,
            "snapshots": snaps,
        },
    )
    return Fit(theta, info, st)


# ---------------------------------------------------------------------------------- SVM
def _svm_primal(w: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float) -> float:
    return float(np.maximum(0.0, 1.0 - y * (x @ w)).mean() + 0.5 * l2 * w @ w)


def _svm_dual(alpha: np.ndarray, w_alpha: np.ndarray, l2: float) -> float:
    # D(alpha) = (1/n) sum alpha - (l2/2) ||w(alpha)||^2,  w(alpha) = (1/(l2 n)) sum alpha y x
    return float(alpha.mean() - 0.5 * l2 * w_alpha @ w_alpha)


def _svm_polish(
    w: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float, band: float
) -> tuple[np.ndarray, np.ndarray]:
    """Active-set solve: alpha = 1 inside the margin, 0 outside, exact on the margin.

    With M = {i : |y_i w.x_i - 1| <= band} the KKT conditions give the linear system
    ``(y_i x_i) . (sum_L y x + sum_M alpha_j y_j x_j) = l2 n`` for i in M; alpha_M is clipped to
    [0, 1] so that (alpha, w(alpha)) is always dual-feasible.
    """
    n = len(y)
    margin = y * (x @ w)
    inside = margin < 1 - band
    on = np.abs(margin - 1) <= band
    alpha = inside.astype(np.float64)
    yx_on = y[on, None] * x[on]  # [|M|, p]
    base = (y[inside, None] * x[inside]).sum(0)  # sum_L y x
    if on.any():
        rhs = l2 * n - yx_on @ base
        sol, *_ = np.linalg.lstsq(yx_on @ yx_on.T, rhs, rcond=None)
        alpha[on] = np.clip(sol, 0.0, 1.0)
    w_alpha = (alpha * y) @ x / (l2 * n)
    return alpha, w_alpha


def fit_linear_svm(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    l2: float,
    tol: float = 1e-8,
    max_iter: int = 100_000,
    *,
    polish: bool = True,
    weights_mask: torch.Tensor | np.ndarray | None = None,
    random_state: int = 24,
) -> Fit:
    """Exact linear SVM without bias: ``min_w (1/n) sum_i max(0, 1 - y_i w.x_i) + (l2/2)||w||^2``.

    Solved by scikit-learn's ``LinearSVC(loss="hinge", C=1/(n l2), fit_intercept=False)``
    (liblinear dual coordinate descent, the paper's solver), then polished by an active-set
    solve of the KKT system (see ``_svm_polish``). The returned ``w`` comes with a duality-gap
    certificate ``gap = P(w) - D(alpha) >= P(w) - P(w*)``; strong convexity then bounds
    ``||w - w*|| <= sqrt(2 gap / l2)`` (``info.extra["w_error_bound"]``), and since the hinge is
    1-Lipschitz in the margin, any test hinge loss is off by at most ``||x_test||`` times that.

    Args:
        x: ``[n, d]`` inputs; y: labels in {0, 1} or {-1, +1}.
        l2: the L2 weight on the mean hinge loss (``C = 1/(n l2)``).
        tol, max_iter: liblinear's stopping tolerance and iteration cap.
        polish: run the active-set polish (keeps whichever of the two has the smaller gap).
        weights_mask: ``[n]`` booleans (or 0/1) of points to keep; the mean is over the kept
            points (``C = 1/(n_kept l2)``, the paper's leave-one-out refit).
        random_state: liblinear's seed (the paper used 24).

    Returns:
        A :class:`Fit`: ``w`` as a float64 ``[d]`` tensor and a :class:`FitInfo` with the
        duality gap and the error bound.
    """
    from sklearn.svm import LinearSVC

    t0 = time.perf_counter()
    xn = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    yn = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    xn = np.asarray(xn, dtype=np.float64).reshape(len(xn), -1)
    yn = np.where(np.asarray(yn) > 0, 1.0, -1.0)
    if weights_mask is not None:
        keep = np.asarray(
            weights_mask.cpu() if isinstance(weights_mask, torch.Tensor) else weights_mask
        ).astype(bool)
        xn, yn = xn[keep], yn[keep]
    n = len(yn)
    if len(np.unique(yn)) < 2:
        raise InputError("fit_linear_svm needs both classes in the training data")
    if not l2 > 0:
        raise InputError(f"fit_linear_svm needs l2 > 0, got {l2}")
    clf = LinearSVC(
        loss="hinge",
        C=1.0 / (n * l2),
        tol=tol,
        max_iter=int(max_iter),
        fit_intercept=False,
        random_state=random_state,
        dual=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf.fit(xn, yn)
    hit_cap = any("converge" in str(c.message).lower() for c in caught)
    w = clf.coef_.reshape(-1).astype(np.float64)
    p_svc = _svm_primal(w, xn, yn, l2)
    best_w, best_gap, best_band = w, float("inf"), None
    for band in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8):
        alpha, w_alpha = _svm_polish(w, xn, yn, l2, band)
        d = _svm_dual(alpha, w_alpha, l2)
        gap_svc = p_svc - d  # valid certificate for the liblinear w too
        if gap_svc < best_gap:
            best_w, best_gap, best_band = w, gap_svc, None
        if polish:
            gap_pol = _svm_primal(w_alpha, xn, yn, l2) - d
            if gap_pol < best_gap:
                best_w, best_gap, best_band = w_alpha, gap_pol, band
    best_gap = max(best_gap, 0.0)
    info = FitInfo(
        method="linear_svm",
        iterations=int(np.max(clf.n_iter_)),
        converged=not hit_cap,
        objective=_svm_primal(best_w, xn, yn, l2),
        seconds=time.perf_counter() - t0,
        extra={
            "duality_gap": best_gap,
            "w_error_bound": math.sqrt(2 * best_gap / l2),
            "polished": best_band is not None,
            "polish_band": best_band,
            "liblinear_hit_max_iter": hit_cap,
            "tol": tol,
        },
    )
    return Fit(torch.from_numpy(best_w.copy()), info)


# ---------------------------------------------------------------------------------- Newton
def _batched(fn: Callable | None, single: bool, kind: str) -> Callable | None:
    """Adapt a caller's closure on one ``[p]`` problem to the batched ``(rows)`` form."""
    if fn is None or not single:
        return fn
    if kind == "grad":
        return lambda th, rows: fn(th[0])[None]
    if kind == "value":
        return lambda th, rows: torch.as_tensor(fn(th[0])).reshape(1)
    if kind == "solve":
        return lambda th, g, rows: fn(th[0], g[0])[None]
    return lambda g, rows: fn(g[0])[None]  # chord


def newton_minimize(
    grad: Callable[..., torch.Tensor],
    theta0: torch.Tensor,
    *,
    solve: Callable[..., torch.Tensor] | None = None,
    chord: Callable[..., torch.Tensor] | None = None,
    value: Callable[..., torch.Tensor] | None = None,
    tol: float = 1e-10,
    max_iter: int = 100,
    chord_rate: float = 0.5,
) -> Fit:
    """Minimise a smooth strongly convex function by damped Newton steps, to ``||grad|| <= tol``.

    Each iteration, for every problem not yet converged:

    1. with ``chord`` (a fixed preconditioner ``P ~ H^-1``, e.g. the inverse Hessian at a
       nearby point): the chord step ``theta - P g`` is taken if it shrinks the gradient norm
       by the factor ``chord_rate`` (one gradient evaluation, no solve);
    2. otherwise the Newton direction ``d = solve(theta, g) ~ H(theta)^-1 g`` (or ``P g``
       without ``solve``): the full step is taken if it halves the gradient norm (near the
       optimum the function value cannot resolve the decrease in floating point), else a
       backtracking line search halves ``t`` until the Armijo condition
       ``f(theta - t d) <= f(theta) - 1e-4 t g.d`` holds (with ``value``) or the gradient
       norm decreases (without). A problem whose step falls below ``1e-12`` is at its optimum
       to round-off and is left there (``info.extra["stalled"]``).

    Batched: with ``theta0 [K, p]`` the ``K`` problems run together and every closure gets the
    rows it is asked about, ``grad(theta [a, p], rows [a]) -> [a, p]``,
    ``value(theta, rows) -> [a]``, ``solve(theta, g, rows) -> [a, p]``,
    ``chord(g, rows) -> [a, p]``; with ``theta0 [p]`` they take and return single vectors
    (``grad(theta)``, ``value(theta)``, ``solve(theta, g)``, ``chord(g)``).

    Returns:
        A :class:`Fit` (theta of ``theta0``'s shape); ``info.converged`` when every problem
        reached ``tol``; ``info.extra`` has per-problem ``iterations``, ``grad_norms`` and
        ``converged``, and the numbers of chord and Newton steps.
    """
    if solve is None and chord is None:
        raise InputError("newton_minimize needs solve (Newton steps), chord (chord steps) or both")
    if not tol > 0 or int(max_iter) < 0:
        raise InputError(f"need tol > 0 and max_iter >= 0, got tol={tol}, max_iter={max_iter}")
    t_start = time.perf_counter()
    single = theta0.ndim == 1
    gr = _batched(grad, single, "grad")
    val = _batched(value, single, "value")
    sol = _batched(solve, single, "solve")
    cho = _batched(chord, single, "chord")
    th = theta0.detach().reshape(-1, theta0.shape[-1]).clone()
    k = th.shape[0]
    g = gr(th, torch.arange(k))
    gn = g.norm(dim=1)
    done = gn <= tol
    stalled = torch.zeros(k, dtype=torch.bool)
    iters = torch.zeros(k, dtype=torch.long)
    n_chord = n_newton = 0
    for _ in range(int(max_iter)):
        act = (~done).nonzero()[:, 0]
        if act.numel() == 0:
            break
        ta, ga, gna = th[act], g[act], gn[act]
        new_t, new_g = ta.clone(), ga.clone()
        ok = torch.zeros(act.numel(), dtype=torch.bool)
        if cho is not None:
            dc = cho(ga, act)
            g1 = gr(ta - dc, act)
            ok = g1.norm(dim=1) < chord_rate * gna
            new_t[ok], new_g[ok] = ta[ok] - dc[ok], g1[ok]
            n_chord += int(ok.sum())
        bad = (~ok).nonzero()[:, 0]
        if bad.numel():
            rb, tb, gb, gnb = act[bad], ta[bad], ga[bad], gna[bad]
            if sol is not None:
                d = sol(tb, gb, rb)
                g_full = gr(tb - d, rb)
            else:
                d, g_full = dc[bad], g1[bad]
            accepted = g_full.norm(dim=1) <= 0.5 * gnb
            t = torch.ones(bad.numel(), dtype=th.dtype)
            slope = (gb * d).sum(1)
            f0 = val(tb, rb) if val is not None else None
            if f0 is None:  # the full step was evaluated: any decrease of ||grad|| will do
                accepted |= g_full.norm(dim=1) < gnb
            first = True
            while True:
                pend = (~accepted & (t >= 1e-12)).nonzero()[:, 0]
                if pend.numel() == 0:
                    break
                if f0 is None or not first:
                    t[pend] *= 0.5
                first = False
                c = tb[pend] - t[pend, None] * d[pend]
                if f0 is not None:
                    good = val(c, rb[pend]) <= f0[pend] - 1e-4 * t[pend] * slope[pend]
                else:
                    good = gr(c, rb[pend]).norm(dim=1) < gnb[pend]
                accepted[pend[good & (t[pend] >= 1e-12)]] = True
            full = g_full.norm(dim=1) <= 0.5 * gnb
            searched = (accepted & ~full).nonzero()[:, 0]
            step_t = tb - t[:, None] * d
            g_new_b = g_full.clone()
            if searched.numel():
                g_new_b[searched] = gr(step_t[searched], rb[searched])
            moved = accepted.nonzero()[:, 0]
            new_t[bad[moved]], new_g[bad[moved]] = step_t[moved], g_new_b[moved]
            n_newton += int(moved.numel())
            stalled[rb[~accepted]] = True
        th[act], g[act] = new_t, new_g
        gn[act] = new_g.norm(dim=1)
        iters[act] += 1
        done = (gn <= tol) | stalled
    conv = gn <= tol
    info = FitInfo(
        method="newton",
        iterations=int(iters.max()) if k else 0,
        converged=bool(conv.all()),
        grad_norm=float(gn.max()) if k else 0.0,
        seconds=time.perf_counter() - t_start,
        extra={
            "tol": tol,
            "chord_steps": n_chord,
            "newton_steps": n_newton,
            "stalled": int(stalled.sum()),
            "iterations": iters.tolist(),
            "grad_norms": gn.tolist(),
            "converged": conv.tolist(),
        },
    )
    return Fit(th[0] if single else th, info)


def fit_newton(
    objective: Objective,
    train: DataLike,
    precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
    theta0: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    tol: float = 1e-12,
    max_iter: int = 100,
    *,
    solve: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Fit:
    """Minimise ``R_w(theta) = (1/n) sum_i w_i loss_i + (l2/2)||theta||^2`` by Newton steps.

    :func:`newton_minimize` on the objective. With ``precondition`` (a fixed ``[k, p] -> [k, p]``
    map ``P ~ H^-1``, typically the inverse Hessian at theta-hat, e.g.
    ``Influence(..., solver="exact").solver.solve``) it takes chord steps
    ``theta <- theta - P grad R_w(theta)``: near a leave-one-out optimum ``P H`` is close to
    ``I`` and the iteration converges linearly with a tiny rate, one gradient pass per step.
    Without, it takes Newton steps ``d = H(theta)^-1 g`` with an Armijo line search (quadratic
    convergence for a strongly convex smooth risk, e.g. logistic regression with ``l2 > 0``),
    ``d`` from ``solve(theta, g)`` (e.g. an :class:`~inflens.Influence` solver fitted at
    ``theta``) or, by default, the exact ``[p, p]`` Hessian of ``R_w`` (small ``p`` only).
    With both ``precondition`` and ``solve``, a chord step is kept where it halves the gradient
    norm and a Newton step is taken elsewhere. Either way the result satisfies
    ``||grad R_w|| <= tol`` when ``info.converged``.

    Raises:
        SolverDivergedError: the Hessian is singular or not positive definite (no
            ``precondition``).
    """
    obj = objective
    data = train if isinstance(train, Data) else Data(train, "training data")
    n = len(data)
    w = _check_weights(weights, n, obj)
    chunks = []
    for start, x, y in data.chunks(min(n, 8192)):
        x, y = obj.prepare(x, y, "training data", start)
        chunks.append((x, y, None if w is None else w[start : start + x.shape[0]]))

    def risk(theta: torch.Tensor) -> torch.Tensor:
        total = obj.regularizer(theta)
        for x, y, wc in chunks:
            vals = obj.losses(theta, x, y)
            total = total + (vals if wc is None else vals * wc).sum() / n
        return total

    def gradient(theta: torch.Tensor) -> torch.Tensor:
        th = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(risk(th), th)
        return g

    def newton_direction(theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        h = torch.func.hessian(risk)(theta.detach())
        chol, bad = torch.linalg.cholesky_ex(h)
        if int(bad) != 0:
            raise SolverDivergedError(
                "Newton fit: the Hessian is not positive definite at the current weights (the "
                "risk is not strongly convex here); use l2 > 0, fit_lbfgs, or a precondition"
            )
        return torch.cholesky_solve(g[:, None], chol)[:, 0]

    theta = (obj.theta if theta0 is None else theta0).detach().to(obj.theta).clone()
    chord = None if precondition is None else (lambda g: precondition(g.unsqueeze(0))[0])
    with _held_eval(obj), torch.no_grad():
        if solve is None and chord is not None:
            return newton_minimize(
                gradient, theta, chord=chord, tol=tol, max_iter=max_iter, chord_rate=1.0
            )
        return newton_minimize(
            gradient,
            theta,
            solve=newton_direction if solve is None else solve,
            chord=chord,
            value=risk,
            tol=tol,
            max_iter=max_iter,
        )
