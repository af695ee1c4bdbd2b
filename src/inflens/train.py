"""Trainers used by validation, the applications and the experiments.

All trainers work on the flat parameter vector of an :class:`inflens.Objective` and minimise
the *weighted regularised mean risk*

    ``R_w(theta) = (1/n) sum_i w_i loss(z_i, theta) + (l2 / 2) ||theta||^2``

over the ``n`` examples they are given (``w = 1`` by default; ``l2`` defaults to the
objective's). To refit without point ``i`` *with l2 relative to the mean over the remaining
n - 1 points* (the paper's leave-one-out protocol, ``C = 1/((n-1) l2)``) use
``w_j = n / (n - 1)`` for ``j != i`` and ``w_i = 0`` (see :func:`loo_weights`).

- :func:`fit_lbfgs`: full-batch L-BFGS (strong Wolfe line search) until the gradient norm is at
  most ``tol``; each closure is one chunked pass over the data (bounded memory).
- :func:`fit_adam`: mini-batch Adam with an optional learning-rate schedule, deterministic
  under a seed, resumable from (and returning) the optimiser state.
- :func:`fit_linear_svm`: an exact hinge-loss linear SVM without bias (liblinear dual
  coordinate descent, then an active-set polish with a duality-gap certificate).

Trainers never modify the model or the objective unless ``load=True``.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.func import grad
from tqdm.auto import tqdm

from .data import Data, DataLike
from .errors import InflensWarning, InputError, SolverDivergedError
from .objective import Objective

__all__ = [
    "FitInfo",
    "fit_adam",
    "fit_lbfgs",
    "fit_linear_svm",
    "fit_newton",
    "loo_weights",
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
        return objective.l2
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
        objective.theta = theta.detach().clone()


# ---------------------------------------------------------------------------------- L-BFGS
def fit_lbfgs(
    objective: Objective,
    train: DataLike,
    theta0: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    l2: L2Like = None,
    tol: float = 1e-10,
    max_iter: int = 1000,
    progress: bool = False,
    *,
    batch_size: int | None = None,
    history_size: int = 50,
    on_fail: str = "warn",
    load: bool = False,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, FitInfo]:
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
        tol: gradient-norm tolerance.
        max_iter: maximum L-BFGS iterations (each may take several function evaluations).
        progress: show a progress bar over iterations.
        batch_size: examples per chunk of a pass (default: all up to 8,192 at once).
        history_size: L-BFGS memory.
        on_fail: ``"warn"`` (InflensWarning), ``"raise"`` (SolverDivergedError) or ``"ignore"``
            when the tolerance is not reached.
        load: copy the result into the model and set ``objective.theta`` to it.
        return_info: also return a :class:`FitInfo` (iterations, gradient norm, objective).

    Returns:
        The flat ``[p]`` theta (detached), and the info when ``return_info``.
    """
    if on_fail not in ("warn", "raise", "ignore"):
        raise InputError(f"on_fail must be 'warn', 'raise' or 'ignore', got {on_fail!r}")
    if not tol > 0 or int(max_iter) < 1:
        raise InputError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    t_start = time.perf_counter()
    obj = objective
    data = train if isinstance(train, Data) else Data(train, "training data")
    n = len(data)
    lam = _resolve_l2(obj, l2)
    w = _check_weights(weights, n, obj)
    size = int(batch_size or min(n, 8192))
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
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )
    bar = tqdm(total=int(max_iter), desc="L-BFGS", disable=not progress, leave=False)
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
    return (theta, info) if return_info else theta


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


def fit_adam(
    objective: Objective,
    train: DataLike,
    steps: int,
    batch_size: int,
    lr: float,
    schedule: Callable[[int], float] | None = None,
    seed: int = 0,
    theta0: torch.Tensor | None = None,
    state: dict[str, Any] | None = None,
    return_state: bool = False,
    *,
    subset: torch.Tensor | None = None,
    l2: L2Like = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    progress: bool = False,
    log_every: int = 0,
    load: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """Mini-batch Adam on ``mean_{i in batch} loss_i + (l2/2)||theta||^2``.

    Deterministic under ``seed``: batches are consecutive slices of a ``torch.randperm``
    permutation of the (subset of the) training set, reshuffled at every epoch end, drawn from a
    generator seeded with ``seed``. The update is PyTorch's Adam (bias-corrected moments,
    ``eps`` added to ``sqrt(v_hat)``); the learning rate at global step ``k`` is
    ``lr * schedule(k)`` (``schedule=None``: constant).

    Args:
        objective: model, loss and default l2; its theta is the default start.
        train: the training data (``(X, y)`` tensors, Dataset or non-shuffling DataLoader).
        steps: number of Adam steps to run now.
        batch_size: examples per step.
        lr: base learning rate.
        schedule: ``global_step -> factor`` (see :func:`piecewise_constant`).
        seed: seed of the mini-batch order.
        theta0: start; default ``objective.theta``.
        state: optimiser state returned by an earlier call (``m``, ``v``, ``step``) to resume
            or warm-start from (e.g. the final state of the original training, so that a
            leave-one-out retrain continues with the same moments and decayed learning rate).
            The state is not modified.
        return_state: also return the new state (``m``, ``v``, ``step``, ``losses``).
        subset: train only on these training indices (e.g. all but one point). Avoids copying.
        l2: override of the objective's l2 (float or ``[p]`` per-parameter tensor).
        betas, eps: Adam constants (TensorFlow and PyTorch defaults).
        progress: progress bar.
        log_every: record the mean mini-batch risk over every ``log_every`` steps in
            ``state["losses"]`` (0: never).
        load: copy the result into the model and set ``objective.theta``.

    Returns:
        theta ``[p]``, and the state dict when ``return_state``.
    """
    if int(steps) < 0 or int(batch_size) < 1 or not lr > 0:
        raise InputError(
            f"need steps >= 0, batch_size >= 1 and lr > 0, got {steps}, {batch_size}, {lr}"
        )
    obj = objective
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
    b = min(int(batch_size), m_points)
    if data.x is not None:
        x_all, y_all = obj.prepare(data.x, data.y, "training data")
    else:
        x_all, y_all = obj.prepare(*data.get(torch.arange(len(data))), "training data")

    theta = (obj.theta if theta0 is None else theta0).detach().to(obj.theta).clone()
    if theta.shape != (obj.p,):
        raise InputError(f"theta0 must have shape [{obj.p}], got {tuple(theta.shape)}")
    if state is not None:
        m = state["m"].detach().to(theta).clone()
        v = state["v"].detach().to(theta).clone()
        k0 = int(state["step"])
    else:
        m, v, k0 = torch.zeros_like(theta), torch.zeros_like(theta), 0

    def risk(th: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return obj.losses(th, x, y).mean() + _reg(th, lam)

    grad_fn = grad(risk, has_aux=False)
    gen = torch.Generator().manual_seed(int(seed))
    batches = _Batches(m_points, b, gen)
    b1, b2 = betas
    losses: list[float] = []
    acc, acc_n = 0.0, 0
    bar = tqdm(range(int(steps)), desc="Adam", disable=not progress, leave=False)
    with _held_eval(obj):
        for j in bar:
            k = k0 + j + 1  # 1-based Adam step (bias correction)
            idx = index[batches.next()].to(x_all.device)
            x, y = x_all[idx], y_all[idx]
            if log_every:
                with torch.no_grad():
                    acc += float(risk(theta, x, y))
                acc_n += 1
                if acc_n == log_every:
                    losses.append(acc / acc_n)
                    acc, acc_n = 0.0, 0
            g = grad_fn(theta, x, y)
            rate = lr * (schedule(k - 1) if schedule is not None else 1.0)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = m / (1 - b1**k)
            v_hat = v / (1 - b2**k)
            theta = theta - rate * m_hat / (v_hat.sqrt() + eps)
    if not torch.isfinite(theta).all():
        raise SolverDivergedError(
            "Adam produced non-finite parameters; lower the learning rate or check the data"
        )
    _finish(obj, theta, load)
    if return_state:
        return theta, {"m": m, "v": v, "step": k0 + int(steps), "losses": losses}
    return theta


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
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, FitInfo]:
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
        return_info: also return a :class:`FitInfo` with the gap and error bound.

    Returns:
        ``w`` as a float64 ``[d]`` tensor (and the info).
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
    out = torch.from_numpy(best_w.copy())
    return (out, info) if return_info else out


# ---------------------------------------------------------------------------------- chord Newton
def fit_newton(
    objective: Objective,
    train: DataLike,
    precondition: Callable[[torch.Tensor], torch.Tensor],
    theta0: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    tol: float = 1e-12,
    max_iter: int = 100,
) -> tuple[torch.Tensor, FitInfo]:
    """Minimise ``R_w(theta) = (1/n) sum_i w_i loss_i + (l2/2)||theta||^2`` by chord-Newton steps.

    ``theta <- theta - P grad R_w(theta)`` with a fixed preconditioner ``P`` (typically the
    inverse Hessian at theta-hat, e.g. ``Influence(..., solver="exact").solver.solve``). Near a
    leave-one-out optimum ``P H`` is close to ``I`` and the iteration converges linearly with a
    tiny rate, one gradient pass per step; a step that does not reduce ``||grad||`` is halved.
    The preconditioner only changes the path: the result satisfies ``||grad R_w|| <= tol``.
    """
    t_start = time.perf_counter()
    obj = objective
    data = train if isinstance(train, Data) else Data(train, "training data")
    n = len(data)
    w = _check_weights(weights, n, obj)
    chunks = []
    for start, x, y in data.chunks(min(n, 8192)):
        x, y = obj.prepare(x, y, "training data", start)
        chunks.append((x, y, None if w is None else w[start : start + x.shape[0]]))

    def gradient(theta: torch.Tensor) -> torch.Tensor:
        g = obj.l2 * theta
        for x, y, wc in chunks:
            th = theta.detach().requires_grad_(True)
            with torch.enable_grad():
                vals = obj.losses(th, x, y)
                if wc is not None:
                    vals = vals * wc
                (gp,) = torch.autograd.grad(vals.sum() / n, th)
            g = g + gp
        return g

    theta = (obj.theta if theta0 is None else theta0).detach().clone()
    g = gradient(theta)
    gnorm = float(g.norm())
    it = 0
    step = 1.0
    while gnorm > tol and it < max_iter:
        d = precondition(g.unsqueeze(0))[0]
        cand = theta - step * d
        g_c = gradient(cand)
        if float(g_c.norm()) < gnorm:
            theta, g, gnorm = cand, g_c, float(g_c.norm())
            step = min(1.0, 2 * step)
        else:
            step /= 2
            if step < 1e-6:
                break
        it += 1
    info = FitInfo(
        method="chord-newton",
        iterations=it,
        converged=gnorm <= tol,
        grad_norm=gnorm,
        objective=float("nan"),
        function_evals=it + 1,
        seconds=time.perf_counter() - t_start,
        extra={"tol": tol},
    )
    return theta, info
