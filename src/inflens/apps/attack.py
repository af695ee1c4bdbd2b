"""Training-set attacks with influence functions (Koh & Liang 2017, Sec. 5.2; PROTOCOL 4.6).

An attacker changes a few training *inputs* imperceptibly so that, after the model is retrained,
chosen target test points are mispredicted. The direction comes from the input influence
(eq. 5)

    ``I_pert,loss(z_i, z_T) = -grad_theta L(z_T)^T H^-1 grad_x grad_theta L(z_i)``,

the gradient of the target loss with respect to training input ``x_i`` (through retraining):
moving ``x_i`` by ``delta`` changes the target loss by about ``I_pert,loss . delta / n``.
The attack is one loop over three parts (PROTOCOL 4.6 steps 1-6):

- the **influence query**: ``s_test = H^-1 grad_theta mean_{j in T} L(z_j)`` from an
  :class:`~inflens.Influence` fitted at the current (retrained) theta on the current
  (poisoned) training set, and ``g_i = grad_x (s_test . grad_theta loss(z_i)) = -I_pert,loss``
  for every poisoned ``i`` (the gradient flows through the frozen part of the network);
- the **box**: ``x_i <- Proj_i(x_i - step * sign(g_i))``, a signed step that raises the target
  loss, projected onto a :class:`PixelBox` around the original input (by default every pixel
  stays within half an 8-bit level of its original value and inside the valid range);
- the **refit strategy**: theta is refitted exactly on the modified training set, warm
  started (``"newton"``: :func:`inflens.train.newton_minimize`; ``"lbfgs"``; or a callable);

then the poisoned inputs' features are recomputed, and the loop stops early once every
target's prediction has flipped. Training points to poison are ranked by
``||I_pert,loss(z_i, z_T)||_1`` (the first-order increase of the target loss under a unit
L-infinity step), as in the paper's code.

When the objective's model is an :class:`inflens.features.FeatureModel` and theta lies in its
``top``, the features are cached and the influence queries and refits run on features in
float64 (only the poisoned images pass through the extractor). Any other model works too;
then every query and refit runs on the full model. Solves default to conjugate gradients
preconditioned by the exact inverse Hessian at the clean optimum, to a relative residual of
1e-10: the exact solution to round-off, for a few products with the training data per step.

Example:
    >>> model = FeatureModel(extractor, LogisticRegression(64))            # fitted top layer
    >>> obj = Objective(model, "binary_logistic", l2=1e-3, params="top.")
    >>> atk = TrainingSetAttack(obj, (x_train, y_train))
    >>> order, l1 = atk.rank((x_test[:1], y_test[:1]))                      # whom to poison
    >>> res = atk.run((x_test[:1], y_test[:1]), order[:2], iterations=100)
    >>> res.success, res.iterations, res.delta_linf_levels()
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import InputError, SolverDivergedError
from ..features import FeatureModel, extract_features
from ..influence import Influence
from ..objective import Objective
from ..solvers import CG, Exact, Solver, make_solver
from ..train import fit_lbfgs, newton_minimize
from .labels import as_classes, outputs_to_labels, probability_of_label

__all__ = [
    "PAPER_SCHEDULE",
    "AttackConfig",
    "AttackResult",
    "PixelBox",
    "TrainingSetAttack",
    "eight_bit_level",
]

Retrain = Callable[[Objective, tuple[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor]
Pair = tuple[torch.Tensor, torch.Tensor]

#: The paper's attempts for one target (PROTOCOL 4.6): the top-ranked image alone, the
#: second-ranked image alone, then the top 2, 3, 5 and 10 together.
PAPER_SCHEDULE: tuple[tuple[int, ...], ...] = (
    (0,),
    (1,),
    (0, 1),
    (0, 1, 2),
    (0, 1, 2, 3, 4),
    tuple(range(10)),
)

#: relative residual of the conjugate-gradient solves (s_test and Newton directions)
_CG_TOL = 1e-10
#: largest theta for which the exact inverse Hessian preconditions the solves
_PRECONDITION_MAX_P = 4096


def eight_bit_level(value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Size of one 8-bit level in model units: ``(high - low) / 255`` (``2/255`` for [-1, 1])."""
    return (float(value_range[1]) - float(value_range[0])) / 255.0


@dataclass(frozen=True)
class PixelBox:
    """Where a poisoned input may lie: within ``radius`` (L-inf) of its original and in [low, high].

    Args:
        radius: L-infinity radius around the original input, in model units (a float or a
            tensor broadcastable to one input).
        low, high: global bounds of valid inputs (``None``: unbounded).

    :meth:`eight_bit` gives the paper's box: half an 8-bit level around every pixel, so the
    poisoned image rounds back to the original 8-bit image.
    """

    radius: float | torch.Tensor
    low: float | None = -1.0
    high: float | None = 1.0

    @classmethod
    def eight_bit(
        cls, value_range: tuple[float, float] = (-1.0, 1.0), levels: float = 0.5
    ) -> PixelBox:
        """``levels`` 8-bit levels around each pixel (0.5 = the paper), inside ``value_range``."""
        return cls(levels * eight_bit_level(value_range), value_range[0], value_range[1])

    def project(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Closest point of the box to ``x`` (coordinate-wise clipping)."""
        r = torch.as_tensor(self.radius, dtype=x.dtype, device=x.device)
        x = torch.maximum(torch.minimum(x, x0 + r), x0 - r)
        if self.low is not None or self.high is not None:
            x = x.clamp(self.low, self.high)
        return x


@dataclass(frozen=True)
class AttackConfig:
    """Settings of a :class:`TrainingSetAttack` (validated on creation).

    Attributes:
        step: size of one signed step in model units (default: 0.02 8-bit levels of
            ``value_range``, the paper's individual attacks).
        box: where poisoned inputs may lie (default ``PixelBox.eight_bit(value_range)``: half
            an 8-bit level around each original pixel).
        value_range: the range 8-bit 0..255 maps to (``(-1, 1)`` for ``x / 127.5 - 1``).
        solver: inverse-HVP solver of the influence queries; ``None`` (default): conjugate
            gradients preconditioned by the exact inverse Hessian at the clean optimum, to a
            relative residual of 1e-10 (plain CG when theta has more than 4,096 entries).
        damping: added to ``H`` in the queries (Sec. 4.2).
        retrain: ``"newton"`` (exact Newton refit, for a smooth strongly convex top layer),
            ``"lbfgs"`` (:func:`inflens.train.fit_lbfgs` to ``tol``), a callable
            ``(objective, (x, y), theta0) -> theta``, or ``"auto"`` (Newton for a
            FeatureModel top layer of at most 4,096 parameters, else L-BFGS).
        tol: gradient-norm tolerance of the refits.
        chunk_size: images per batch through the extractor.
        refit_start: first refit theta exactly on the clean training data, so that "before"
            and "after" are both exact optima (a model trained to a looser tolerance would
            otherwise drift in the first refit and blur the attack's effect).
        progress: progress bars.
    """

    step: float | None = None
    box: PixelBox | None = None
    value_range: tuple[float, float] = (-1.0, 1.0)
    solver: str | Solver | None = None
    damping: float = 0.0
    retrain: str | Retrain = "auto"
    tol: float = 1e-10
    chunk_size: int = 128
    refit_start: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        if self.step is not None and not float(self.step) > 0:
            raise InputError(f"step must be positive, got {self.step}")
        if not float(self.damping) >= 0:
            raise InputError(f"damping must be non-negative, got {self.damping}")
        if not callable(self.retrain) and self.retrain not in ("auto", "newton", "lbfgs"):
            raise InputError(
                f"retrain must be 'auto', 'newton', 'lbfgs' or a callable, got {self.retrain!r}"
            )
        if not float(self.tol) > 0 or int(self.chunk_size) < 1:
            raise InputError(f"need tol > 0 and chunk_size >= 1, got {self.tol}, {self.chunk_size}")
        if not float(self.value_range[1]) > float(self.value_range[0]):
            raise InputError(f"value_range must be (low, high) with low < high: {self.value_range}")


@dataclass
class AttackResult:
    """Outcome of one attack: which inputs were changed, how much, and what it did.

    Attributes:
        indices: the poisoned training indices ``[k]``.
        x_poisoned, x_original: their inputs after and before ``[k, ...]``.
        theta, theta_original: the retrained and the original trainable parameters.
        iterations: iterations run (``<= iterations`` asked for with early stopping).
        flipped: ``[m]`` True where a target's prediction differs from its label at the end
            (targets already misclassified at the start count as flipped).
        initially_correct: ``[m]`` True where the target was correctly predicted at the start.
        target_loss_before, target_loss_after: mean target loss (measurement) before and after.
        prob_true_before, prob_true_after: ``[m]`` probability of the true label (one-logit
            and softmax models; NaN otherwise).
        feature_change: ``[k]`` L2 change of each poisoned input's features (FeatureModel) or
            None.
        history: per iteration ``{"target_loss", "n_flipped"}``.
        seconds: wall time (an attack of :meth:`TrainingSetAttack.run_many`: its share).
    """

    indices: torch.Tensor
    x_poisoned: torch.Tensor
    x_original: torch.Tensor
    theta: torch.Tensor
    theta_original: torch.Tensor
    iterations: int
    flipped: torch.Tensor
    initially_correct: torch.Tensor
    target_loss_before: float
    target_loss_after: float
    prob_true_before: torch.Tensor
    prob_true_after: torch.Tensor
    feature_change: torch.Tensor | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def success(self) -> bool:
        """Every target that was correct at the start is now mispredicted."""
        return bool(self.flipped[self.initially_correct].all()) and bool(
            self.initially_correct.any()
        )

    @property
    def n_flipped(self) -> int:
        """Targets correct at the start and mispredicted at the end."""
        return int((self.flipped & self.initially_correct).sum())

    @property
    def delta(self) -> torch.Tensor:
        """``x_poisoned - x_original``."""
        return self.x_poisoned - self.x_original

    def delta_linf(self) -> float:
        """Largest change of any input coordinate (model units)."""
        return float(self.delta.abs().max()) if self.delta.numel() else 0.0

    def delta_linf_levels(self, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
        """:meth:`delta_linf` in 8-bit levels."""
        return self.delta_linf() / eight_bit_level(value_range)

    def delta_l2(self) -> torch.Tensor:
        """``[k]`` L2 norm of each poisoned input's change (model units)."""
        return self.delta.reshape(self.delta.shape[0], -1).norm(dim=1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {
            "indices": self.indices.tolist(),
            "iterations": self.iterations,
            "success": self.success,
            "n_targets": int(self.flipped.numel()),
            "n_initially_correct": int(self.initially_correct.sum()),
            "n_flipped": self.n_flipped,
            "target_loss_before": self.target_loss_before,
            "target_loss_after": self.target_loss_after,
            "delta_linf": self.delta_linf(),
            "delta_l2": self.delta_l2().tolist(),
            "feature_change_l2": None
            if self.feature_change is None
            else self.feature_change.tolist(),
            "theta_norm_before": float(self.theta_original.norm()),
            "theta_norm_after": float(self.theta.norm()),
            "seconds": self.seconds,
        }


class _Preconditioner(Solver):
    """A fixed symmetric positive definite ``M ~ (H + damping I)^-1`` applied as ``rhs @ M``
    (:class:`~inflens.solvers.CG` would fit a solver preconditioner on every curvature)."""

    name = "fixed_inverse"

    def __init__(self, inverse: torch.Tensor) -> None:
        super().__init__()
        self.inverse = inverse

    def fit(self, curvature: Any) -> _Preconditioner:
        self.curvature_ = curvature
        return self

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        return rhs @ self.inverse.to(rhs.dtype)


class TrainingSetAttack:
    """Poison a few training inputs to flip the predictions on target test points.

    Args:
        objective: the trained model; ``params`` selects the part that is retrained (e.g.
            ``params="top."`` for an :class:`~inflens.features.FeatureModel`); every other
            parameter is frozen, and input gradients flow through it. Neither the objective
            nor its model is changed (the attack works on a copy).
        train: training inputs and labels ``(X, y)`` (tensors; X floating point).
        config: an :class:`AttackConfig` (default: the paper's step and box, exact solves).
    """

    def __init__(
        self, objective: Objective, train: Pair, config: AttackConfig | None = None
    ) -> None:
        if not isinstance(objective, Objective):
            raise InputError(f"objective must be an inflens.Objective, got {type(objective)}")
        if not (isinstance(train, (tuple, list)) and len(train) == 2):
            raise InputError("train must be a pair (X, y) of tensors")
        cfg = AttackConfig() if config is None else config
        if not isinstance(cfg, AttackConfig):
            raise InputError(f"config must be an AttackConfig, got {type(cfg).__name__}")
        x, y = (torch.as_tensor(t) for t in train)
        if not x.is_floating_point():
            raise InputError(
                f"training inputs must be floating point to be perturbed, got {x.dtype}; scale "
                "images to floats first (e.g. inflens.datasets.scale_images)"
            )
        if x.shape[0] != y.shape[0]:
            raise InputError(f"{x.shape[0]} training inputs but {y.shape[0]} labels")
        self.config = cfg
        self.x, self.y = x.to(objective.dtype), y
        self.step = 0.02 * eight_bit_level(cfg.value_range) if cfg.step is None else cfg.step
        self.box = cfg.box if cfg.box is not None else PixelBox.eight_bit(cfg.value_range)
        self.progress = cfg.progress
        model = objective.model
        self.fast = isinstance(model, FeatureModel) and all(
            n.startswith("top.") for n in objective.names
        )
        # the attack's own objective: its theta moves (load_into_model) on a private copy
        if self.fast:
            self.extractor = model.features
            part, names = copy.deepcopy(model.top).double(), [n[4:] for n in objective.names]
        else:
            part, names = copy.deepcopy(model), list(objective.names)
        self._obj = Objective(
            part, objective.loss_fn, objective.l2, params=names, measurement=objective.measurement
        )
        self._loss_name = objective.loss_name if objective.builtin_loss else None
        self.f = self._features(self.x) if self.fast else self.x
        retrain = cfg.retrain
        if retrain == "auto":
            retrain = "newton" if self.fast and self._obj.p <= _PRECONDITION_MAX_P else "lbfgs"
        self.retrain = retrain
        self.stats = {"influence_fits": 0, "refits": 0, "chord_steps": 0, "newton_steps": 0}
        theta = objective.theta.detach().to(self._obj.dtype).clone()
        # the exact inverse Hessian at the clean optimum: the preconditioner of every solve and
        # the chord step of the Newton refits (an attack moves theta and a few rows a little;
        # applied as a matrix product, far cheaper than triangular solves)
        self._pre: torch.Tensor | None = None
        if self._obj.p <= _PRECONDITION_MAX_P and (cfg.solver is None or retrain == "newton"):
            exact = self._influence(theta, self.f, Exact(method="cholesky"), 0.0).solver
            self._pre = exact.dense_inverse()
        self.theta0 = self._refit(theta, self.f) if cfg.refit_start else theta

    # ------------------------------------------------------------------ the three parts
    def _influence(
        self, theta: torch.Tensor, inputs: torch.Tensor, solver: str | Solver, damping: float
    ) -> Influence:
        """An :class:`Influence` fitted at ``theta`` on the training set ``(inputs, y)``."""
        self._obj.load_into_model(theta)
        self.stats["influence_fits"] += 1
        inf = Influence(self._obj, (inputs, self.y), solver=solver, damping=damping, progress=False)
        return inf.fit()

    def _cg(self) -> Solver:
        pre = None if self._pre is None else _Preconditioner(self._pre)
        return CG(tol=_CG_TOL, preconditioner=pre)

    def _query_solver(self) -> Solver:
        solver = self.config.solver
        if solver is None:
            return self._cg()
        # a fresh copy per query: fitting a solver binds it to one curvature
        return copy.deepcopy(solver) if isinstance(solver, Solver) else make_solver(solver)

    def _s_test(self, theta: torch.Tensor, inputs: torch.Tensor, targets: Pair, mean: bool):
        inf = self._influence(theta, inputs, self._query_solver(), float(self.config.damping))
        return inf.s_test(targets, mean=mean)

    def _input_grads(self, s: torch.Tensor, theta: torch.Tensor, inputs, x, y) -> torch.Tensor:
        """``[B, *x]``: ``g_i = grad_x (s . grad_theta loss(z_i)) = -I_pert,loss(z_i)``."""
        u = self._obj.input_grad_of_loss_jvp(s, inputs, y, theta)
        return self._pixel_grads(u, x) if self.fast else u

    def _refit(self, theta0: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Theta refitted exactly on ``(inputs, y)``, warm-started at ``theta0``."""
        self.stats["refits"] += 1
        obj, y, tol = self._obj, self.y, float(self.config.tol)
        if callable(self.retrain):
            obj.load_into_model(theta0)
            return self.retrain(obj, (inputs, y), theta0.clone()).detach().to(obj.dtype)
        if self.retrain == "lbfgs":
            return fit_lbfgs(obj, (inputs, y), theta0=theta0, tol=tol, max_iter=1000).theta
        pre = self._pre

        def gradient(th: torch.Tensor) -> torch.Tensor:
            th = th.detach().requires_grad_(True)
            with torch.enable_grad():
                return torch.autograd.grad(obj.risk(th, inputs, y), th)[0]

        def solve(th: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            return self._influence(th, inputs, self._cg(), 0.0).solver.solve(g[None])[0]

        with torch.no_grad():
            fit = newton_minimize(
                gradient,
                theta0,
                solve=solve,
                chord=None if pre is None else (lambda g: g @ pre),
                value=lambda th: obj.risk(th, inputs, y),
                tol=tol,
                max_iter=100,
            )
        self.stats["chord_steps"] += fit.info.extra["chord_steps"]
        self.stats["newton_steps"] += fit.info.extra["newton_steps"]
        if fit.info.grad_norm > max(tol, 1e-6):
            raise SolverDivergedError(
                f"the Newton refit stopped at gradient norm {fit.info.grad_norm:.2e}; the top "
                "layer may not be strongly convex: use l2 > 0, retrain='lbfgs' or a callable"
            )
        return fit.theta

    # ------------------------------------------------------------------ helpers
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return extract_features(self.extractor, x, self.config.chunk_size).double()

    def _target_inputs(self, x_t: torch.Tensor) -> torch.Tensor:
        x_t = x_t.to(self.x.dtype)
        return self._features(x_t) if self.fast else x_t

    def _pixel_grads(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Chain rule through the frozen extractor: ``J(x_i)^T u_i`` for every row, batched."""
        out, size = [], self.config.chunk_size
        for j in range(0, x.shape[0], size):
            xb = x[j : j + size].detach().requires_grad_(True)
            with torch.enable_grad():
                fb = self.extractor(xb)
                (gx,) = torch.autograd.grad(
                    fb, xb, grad_outputs=u[j : j + xb.shape[0]].to(fb.dtype)
                )
            out.append(gx)
        return torch.cat(out, 0)

    def _poisoned(self, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The training inputs with ``rows`` replaced by ``values`` (a copy)."""
        f = self.f.clone()
        f[rows] = values
        return f

    def _state(self, theta: torch.Tensor, targets: Pair):
        """``(flipped [m], mean target loss, p(true label) [m])`` at ``theta``."""
        ft, yt = targets
        with torch.no_grad():
            out = self._obj.outputs(theta, ft)
            loss = float(self._obj.measurements(theta, ft, yt).mean())
        pred = outputs_to_labels(out, self._loss_name)
        return pred != as_classes(yt), loss, probability_of_label(out, yt).detach()

    def describe(self) -> dict[str, Any]:
        """How the attack computes (solver, refit, feature cache) and what it did so far."""
        solver = self.config.solver
        return {
            "query_solver": "cg preconditioned by the clean exact inverse"
            if solver is None
            else getattr(solver, "name", str(solver)),
            "retrain": self.retrain if isinstance(self.retrain, str) else "callable",
            "feature_cache": self.fast,
            "p": self._obj.p,
            **self.stats,
        }

    # ------------------------------------------------------------------ ranking
    def rank(
        self, targets: Pair, candidates: Sequence[int] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank training points by ``||I_pert,loss(z_i, T)||_1`` at the original theta.

        ``T`` are the targets (their mean loss). Returns ``(order, l1)``: candidate indices
        sorted by decreasing L1 norm of the input influence, and those norms.
        """
        x_t, y_t = targets
        cand = (
            torch.arange(self.x.shape[0])
            if candidates is None
            else torch.as_tensor(candidates, dtype=torch.long).reshape(-1)
        )
        th = self.theta0
        s = self._s_test(th, self.f, (self._target_inputs(x_t), y_t), mean=True)[0]
        size = self.config.chunk_size
        parts = []
        for j in range(0, cand.numel(), size):
            c = cand[j : j + size]
            g = self._input_grads(s, th, self.f[c], self.x[c], self.y[c])
            parts.append(g.reshape(g.shape[0], -1).abs().sum(1))
        l1 = torch.cat(parts)
        order = torch.argsort(l1, descending=True)
        return cand[order], l1[order]

    def rank_each(
        self, targets: Pair, top: int = 10, target_chunk: int = 100, strategy: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`rank` for every target *separately*, keeping the ``top`` best of each.

        For a FeatureModel the extractor's Jacobian ``J_i = d features / d x_i`` is formed once
        per training image (``d`` backward passes) and reused for every target:
        ``g_i = J_i^T u_i`` with ``u_i`` the gradient with respect to the features. Same
        numbers as :meth:`rank` up to rounding. ``strategy``: ``"jacobian"``, ``"per_target"``
        (one :meth:`rank` per target) or ``"auto"`` (Jacobians when the targets outnumber half
        the feature dimension).

        Returns:
            ``(indices [m, top], l1 [m, top])``, best first.
        """
        if strategy not in ("auto", "jacobian", "per_target"):
            raise InputError(f"strategy must be 'auto', 'jacobian' or 'per_target': {strategy!r}")
        x_t, y_t = targets
        m, n = x_t.shape[0], self.x.shape[0]
        top = min(int(top), n)
        d = self.f.shape[1] if self.fast else 0
        # Jacobians cost d backward passes per training image, per-target ranking m
        if not self.fast or strategy == "per_target" or (strategy == "auto" and m <= d // 2):
            rows = [self.rank((x_t[j : j + 1], y_t[j : j + 1])) for j in range(m)]
            return torch.stack([r[0][:top] for r in rows]), torch.stack([r[1][:top] for r in rows])
        th = self.theta0
        s_all = self._s_test(th, self.f, (self._target_inputs(x_t), y_t), mean=False)
        best_v = torch.full((m, top), -math.inf, dtype=torch.float64)
        best_i = torch.zeros((m, top), dtype=torch.long)
        chunk = 16
        for start in tqdm(range(0, n, chunk), desc="Ranking", disable=not self.progress):
            xb = self.x[start : start + chunk].detach().requires_grad_(True)
            with torch.enable_grad():
                fb_out = self.extractor(xb)
                rows = [
                    torch.autograd.grad(fb_out[:, k].sum(), xb, retain_graph=k < d - 1)[0]
                    for k in range(d)
                ]
            jb = torch.stack(rows, 1).reshape(xb.shape[0], d, -1)  # [B, d, D]
            fb, yb = self.f[start : start + chunk], self.y[start : start + chunk]
            ids = torch.arange(start, start + xb.shape[0])
            for t0 in range(0, m, target_chunk):
                sl = slice(t0, t0 + target_chunk)
                u = torch.stack(
                    [self._obj.input_grad_of_loss_jvp(v, fb, yb, th) for v in s_all[sl]]
                )
                l1 = torch.einsum("kbd,bdD->kbD", u.to(jb.dtype), jb).abs().sum(-1).double()
                vals = torch.cat([best_v[sl], l1], 1)
                idx = torch.cat([best_i[sl], ids.expand(l1.shape[0], -1)], 1)
                v, pos = vals.topk(top, dim=1)
                best_v[sl], best_i[sl] = v, idx.gather(1, pos)
        return best_i, best_v

    # ------------------------------------------------------------------ attacking
    def _check_indices(self, idx: torch.Tensor) -> None:
        if idx.numel() == 0 or idx.shape[-1] == 0:
            raise InputError("indices is empty: choose at least one training point to poison")
        if int(idx.min()) < 0 or int(idx.max()) >= self.x.shape[0]:
            raise InputError(f"indices must lie in [0, {self.x.shape[0] - 1}]")
        if bool((idx.sort(-1).values.diff(dim=-1) == 0).any()):
            raise InputError("indices contains repeats (a row of indices must be distinct)")

    def run(
        self,
        targets: Pair,
        indices: Sequence[int] | torch.Tensor,
        iterations: int = 100,
        early_stop: bool = True,
        step: float | None = None,
        box: PixelBox | None = None,
    ) -> AttackResult:
        """Attack: perturb ``indices`` for up to ``iterations`` steps to raise the target loss.

        Starts from the original data and theta every time (attempts are independent).

        Args:
            targets: ``(X_T, y_T)``, one or several test points; their *mean* loss is raised.
            indices: training points to perturb (e.g. ``rank(targets)[0][:k]``).
            iterations: maximum number of steps.
            early_stop: stop once every initially correct target is mispredicted.
            step, box: override the step size (model units) and the box for this run.
        """
        x_t, y_t = targets
        if x_t.shape[0] != y_t.shape[0] or x_t.shape[0] == 0:
            raise InputError("targets must be a non-empty pair (X_T, y_T) of equal length")
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(1, -1)
        self._check_indices(idx)
        return self._attack([targets], idx, iterations, early_stop, step, box)[0]

    def run_many(
        self,
        targets: Pair,
        indices: torch.Tensor,
        iterations: int = 100,
        early_stop: bool = True,
        step: float | None = None,
        box: PixelBox | None = None,
    ) -> list[AttackResult]:
        """``K`` independent single-target attacks: attack ``t`` poisons ``indices[t]`` against
        target ``t``, exactly as ``run((X_T[t:t+1], y_T[t:t+1]), indices[t])`` would.

        The attacks advance together, so the poisoned images of all of them pass through the
        extractor as one batch per step.

        Args:
            targets: ``(X_T [K, ...], y_T [K])``, one target per attack.
            indices: ``[K, k]`` training indices to poison (the same ``k`` for every attack).
        """
        x_t, y_t = targets
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.ndim != 2 or idx.shape[0] != x_t.shape[0] or x_t.shape[0] != y_t.shape[0]:
            raise InputError(
                f"indices must be [K, k] with one row per target; got {tuple(idx.shape)} for "
                f"{x_t.shape[0]} targets and {y_t.shape[0]} labels"
            )
        if idx.shape[0] == 0:
            raise InputError("run_many needs at least one target")
        self._check_indices(idx)
        pairs = [(x_t[t : t + 1], y_t[t : t + 1]) for t in range(idx.shape[0])]
        return self._attack(pairs, idx, iterations, early_stop, step, box)

    def _attack(
        self,
        targets: list[Pair],
        P: torch.Tensor,
        iterations: int,
        early_stop: bool,
        step: float | None,
        box: PixelBox | None,
    ) -> list[AttackResult]:
        """The loop (PROTOCOL 4.6) for ``K`` attacks: attack ``t`` poisons ``P[t]`` against
        ``targets[t]``."""
        t_start = time.perf_counter()
        alpha = self.step if step is None else float(step)
        box = self.box if box is None else box
        K, k = P.shape
        shape = self.x.shape[1:]
        tgt = [(self._target_inputs(x), y) for x, y in targets]
        x0 = self.x[P.reshape(-1)].reshape(K, k, *shape).clone()
        xp = x0.clone()
        fp0 = self.f[P].clone()
        fp = fp0.clone()
        yp = self.y[P]
        theta = self.theta0.expand(K, -1).clone()
        first = [self._state(theta[t], tgt[t]) for t in range(K)]
        flipped = [s[0] for s in first]
        correct0 = [~s[0] for s in first]
        done = [0] * K
        history: list[list[dict[str, float]]] = [[] for _ in range(K)]
        bar = tqdm(range(iterations), desc="Attack", disable=not self.progress, leave=False)
        for _ in bar:
            live = [
                t
                for t in range(K)
                if not (
                    early_stop and bool(correct0[t].any()) and bool(flipped[t][correct0[t]].all())
                )
            ]
            if not live:
                break
            # 1-2. the influence query at each attack's retrained theta and poisoned data
            u = []
            for t in live:
                s = self._s_test(theta[t], self._poisoned(P[t], fp[t]), tgt[t], mean=True)[0]
                u.append(self._obj.input_grad_of_loss_jvp(s, fp[t], yp[t], theta[t]))
            # 3. signed steps along sign(I_pert,loss) = -sign(g), all attacks in one batch
            xa = xp[live].reshape(len(live) * k, *shape)
            g = torch.cat(u)
            if self.fast:
                g = self._pixel_grads(g, xa)
            xa = box.project(xa - alpha * torch.sign(g), x0[live].reshape_as(xa))
            xp[live] = xa.reshape(len(live), k, *shape)
            # 4. the poisoned inputs' features
            fp[live] = self._features(xa).reshape(len(live), k, -1) if self.fast else xp[live]
            # 5. exact refits, warm-started
            for t in live:
                theta[t] = self._refit(theta[t], self._poisoned(P[t], fp[t]))
                flipped[t], loss, _ = self._state(theta[t], tgt[t])
                done[t] += 1
                n_fl = int((flipped[t] & correct0[t]).sum())
                history[t].append({"target_loss": loss, "n_flipped": n_fl})
        bar.close()
        share = (time.perf_counter() - t_start) / K
        out = []
        for t in range(K):
            fl, loss1, p1 = self._state(theta[t], tgt[t])
            out.append(
                AttackResult(
                    indices=P[t].clone(),
                    x_poisoned=xp[t].detach(),
                    x_original=x0[t],
                    theta=theta[t].detach().clone(),
                    theta_original=self.theta0.detach().clone(),
                    iterations=done[t],
                    flipped=fl,
                    initially_correct=correct0[t],
                    target_loss_before=first[t][1],
                    target_loss_after=loss1,
                    prob_true_before=first[t][2],
                    prob_true_after=p1,
                    feature_change=(fp[t] - fp0[t]).norm(dim=1) if self.fast else None,
                    history=history[t],
                    seconds=share,
                )
            )
        return out

    def run_schedule(
        self,
        targets: Pair,
        ranked: Sequence[int] | torch.Tensor,
        schedule: Sequence[Sequence[int]] = PAPER_SCHEDULE,
        iterations: int = 100,
    ) -> tuple[int | None, list[AttackResult]]:
        """Try the attempts of ``schedule`` in order until one flips every target.

        Each attempt poisons ``ranked[j]`` for ``j`` in the attempt (positions in the ranked
        list), starting again from the clean data (PROTOCOL 4.6: top-1, second alone, top 2,
        3, 5, 10). Returns ``(number of poisoned images of the first success or None, results)``.
        """
        ranked = torch.as_tensor(ranked, dtype=torch.long).reshape(-1)
        results: list[AttackResult] = []
        for attempt in schedule:
            pos = torch.as_tensor(list(attempt), dtype=torch.long)
            if int(pos.max()) >= ranked.numel():
                break
            res = self.run(targets, ranked[pos], iterations=iterations, early_stop=True)
            results.append(res)
            if res.success:
                return len(attempt), results
        return None, results
