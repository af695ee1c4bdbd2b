"""Training-set attacks with influence functions (Koh & Liang 2017, Sec. 5.2; PROTOCOL 4.6).

A few training *inputs* are changed imperceptibly so that, after retraining, chosen target
test points are mispredicted. The direction is the input influence (eq. 5),
``I_pert,loss(z_i, z_T) = -grad_theta L(z_T)^T H^-1 grad_x grad_theta L(z_i)``: moving ``x_i``
by ``delta`` changes the target loss by about ``I_pert,loss . delta / n``. The attack is one
loop over three parts (docs/usecases/attack.md):

- the **influence query**: ``s_test = H^-1 grad_theta mean_{j in T} L(z_j)`` from an
  :class:`~inflens.Influence` fitted at the current theta on the current (poisoned) data, and
  ``g_i = grad_x (s_test . grad_theta loss(z_i)) = -I_pert,loss`` for every poisoned ``i``;
- the **box**: ``x_i <- Proj_i(x_i - step * sign(g_i))`` onto a :class:`PixelBox`;
- the **refit strategy**: theta refitted exactly, warm-started (``"newton"``:
  :func:`inflens.train.fit_newton`, ``"lbfgs"`` or a callable).

Training points are ranked by ``||I_pert,loss(z_i, z_T)||_1`` (the first-order increase of
the target loss under a unit L-infinity step). For an :class:`inflens.features.FeatureModel`
whose ``top`` holds theta, features are cached and queries and refits run on them in float64.
Solves default to CG preconditioned by the exact inverse Hessian at the clean optimum, to a
relative residual of 1e-10 (the exact solution to round-off, for a few products per step).

Example:
    >>> atk = TrainingSetAttack(Objective(model, "binary_logistic", params="top."), (x, y))
    >>> order, l1 = atk.rank((x_test[:1], y_test[:1]))                      # whom to poison
    >>> res = atk.run((x_test[:1], y_test[:1]), order[:2], iterations=100)
    >>> res.success, res.iterations, res.delta_linf_levels()
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import InputError, SolverDivergedError
from ..features import FeatureModel, extract_features
from ..influence import Influence
from ..objective import Objective
from ..solvers import CG, Exact, Solver
from ..train import LBFGSConfig, fit_lbfgs, fit_newton
from .attack_types import AttackConfig, AttackResult, Pair, PixelBox, TargetState, eight_bit_level
from .labels import as_classes, outputs_to_labels, probability_of_label

__all__ = [
    "PAPER_SCHEDULE",
    "AttackConfig",
    "AttackResult",
    "PixelBox",
    "TrainingSetAttack",
    "eight_bit_level",
]

#: The paper's attempts for one target (PROTOCOL 4.6): the top-ranked image alone, the
#: second-ranked image alone, then the top 2, 3, 5 and 10 together.
PAPER_SCHEDULE: tuple[tuple[int, ...], ...] = ((0,), (1,), (0, 1), (0, 1, 2), (0, 1, 2, 3, 4))
PAPER_SCHEDULE += (tuple(range(10)),)
_CG_TOL = 1e-10  # relative residual of the CG solves (s_test and Newton directions)
_PRECONDITION_MAX_P = 4096  # largest theta whose exact inverse Hessian preconditions solves


class _FixedInverse(Solver):
    """``rhs @ M`` for a fixed ``M ~ H^-1``: a CG preconditioner that ``fit`` does not refit."""

    name = "fixed_inverse"

    def __init__(self, inverse: torch.Tensor) -> None:
        super().__init__()
        self.inverse = inverse

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        return rhs @ self.inverse.to(rhs.dtype)


class TrainingSetAttack:
    """Poison a few training inputs to flip the predictions on target test points.

    Args:
        objective: the trained model; ``params`` selects the part that is retrained (e.g.
            ``"top."`` of a FeatureModel); input gradients flow through the frozen rest. The
            objective and its model are never changed (the attack works on a copy).
        train: training inputs (floating point) and labels ``(X, y)``.
        config: an :class:`AttackConfig` (default: the paper's step and box, exact solves).
    """

    def __init__(
        self, objective: Objective, train: Pair, config: AttackConfig | None = None
    ) -> None:
        cfg = AttackConfig() if config is None else config
        if not isinstance(objective, Objective) or not isinstance(cfg, AttackConfig):
            raise InputError(
                "need an inflens.Objective and an AttackConfig, got "
                f"{type(objective).__name__} and {type(cfg).__name__}"
            )
        if not (isinstance(train, (tuple, list)) and len(train) == 2):
            raise InputError("train must be a pair (X, y) of tensors")
        x, y = (torch.as_tensor(t) for t in train)
        if not x.is_floating_point():
            raise InputError(
                f"training inputs must be floating point to be perturbed, got {x.dtype}; scale "
                "images to floats first (e.g. inflens.datasets.scale_images)"
            )
        if x.shape[0] != y.shape[0]:
            raise InputError(f"{x.shape[0]} training inputs but {y.shape[0]} labels")
        self.config, self.x, self.y, self.progress = cfg, x.to(objective.dtype), y, cfg.progress
        self.step = 0.02 * eight_bit_level(cfg.value_range) if cfg.step is None else cfg.step
        self.box = cfg.box if cfg.box is not None else PixelBox.eight_bit(cfg.value_range)
        model, names = objective.model, list(objective.names)
        self.fast = isinstance(model, FeatureModel) and all(n.startswith("top.") for n in names)
        # the attack's own objective on a private copy of the trainable part
        if self.fast:
            self.extractor, names = model.features, [n[4:] for n in names]
        part = copy.deepcopy(model.top).double() if self.fast else copy.deepcopy(model)
        self._obj = Objective(
            part, objective.loss_fn, objective.l2, params=names, measurement=objective.measurement
        )
        self._loss_name = objective.loss_name if objective.builtin_loss else None
        self.f = self._features(self.x) if self.fast else self.x
        auto = "newton" if self.fast and self._obj.p <= _PRECONDITION_MAX_P else "lbfgs"
        self.retrain = auto if cfg.retrain == "auto" else cfg.retrain
        self.stats = {"influence_fits": 0, "refits": 0, "chord_steps": 0, "newton_steps": 0}
        theta = objective.theta.detach().to(self._obj.dtype).clone()
        # The exact inverse Hessian at the clean optimum preconditions every solve and is the
        # chord step of the Newton refits: an attack moves theta and a few rows only a little.
        self._pre: torch.Tensor | None = None
        if self._obj.p <= _PRECONDITION_MAX_P and (cfg.solver is None or self.retrain == "newton"):
            exact = self._influence(theta, self.f, Exact(method="cholesky"), 0.0).solver
            self._pre = exact.dense_inverse()
        self.theta0 = self._refit(theta, self.f) if cfg.refit_start else theta

    # ------------------------------------------------------------ query and refit
    def _influence(
        self, theta: torch.Tensor, f: torch.Tensor, solver: str | Solver | None, damping: float
    ) -> Influence:
        """An :class:`Influence` on ``(f, y)`` fitted at ``theta`` (default: CG, ``_pre``)."""
        self._obj.load_into_model(theta)
        self.stats["influence_fits"] += 1
        if solver is None:  # a wrapper per fit: Influence.fit canonicalises what a solver holds
            pre = None if self._pre is None else _FixedInverse(self._pre)
            solver = CG(tol=_CG_TOL, preconditioner=pre)
        inf = Influence(self._obj, (f, self.y), solver=solver, damping=damping, progress=False)
        return inf.fit()

    def _s_test(
        self, theta: torch.Tensor, f: torch.Tensor, targets: Pair, mean: bool = True
    ) -> torch.Tensor:
        # a fresh solver per query: fitting a solver binds it to one curvature
        solver, damping = copy.deepcopy(self.config.solver), float(self.config.damping)
        return self._influence(theta, f, solver, damping).s_test(targets, mean=mean)

    def _refit(self, theta0: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Theta refitted exactly on ``(f, y)``, warm-started at ``theta0``."""
        self.stats["refits"] += 1
        obj, y, tol = self._obj, self.y, float(self.config.tol)
        if callable(self.retrain):
            obj.load_into_model(theta0)
            return self.retrain(obj, (f, y), theta0.clone()).detach().to(obj.dtype)
        if self.retrain == "lbfgs":
            return fit_lbfgs(obj, (f, y), theta0, config=LBFGSConfig(tol, 1000)).theta
        fit = fit_newton(
            obj,
            (f, y),
            None if self._pre is None else (lambda g: g @ self._pre),
            theta0,
            tol=tol,
            solve=lambda th, g: self._influence(th, f, None, 0.0).solver.solve(g[None])[0],
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

    def _target_inputs(self, targets: Pair) -> Pair:
        x_t = targets[0].to(self.x.dtype)
        return (self._features(x_t) if self.fast else x_t), targets[1]

    def _pixel_grads(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[m, B, *x]``: ``J(x_b)^T u[t, b]`` through the frozen extractor for ``u [m, B, d]``
        (``u`` itself without one), one backward pass per ``t`` and chunk of images."""
        if not self.fast:
            return u
        size, parts = self.config.chunk_size, []
        for xc, uc in zip(x.split(size), u.split(size, dim=1)):
            xb = xc.detach().requires_grad_(True)
            with torch.enable_grad():
                fb = self.extractor(xb)
                grads = [
                    torch.autograd.grad(fb, xb, v.to(fb.dtype), retain_graph=True)[0] for v in uc
                ]
            parts.append(torch.stack(grads))
        return torch.cat(parts, 1)

    def _state(self, theta: torch.Tensor, targets: Pair) -> TargetState:
        """``(flipped [m], mean target loss, p(true label) [m])`` at ``theta``."""
        ft, yt = targets
        with torch.no_grad():
            out = self._obj.outputs(theta, ft)
            loss = float(self._obj.measurements(theta, ft, yt).mean())
        pred = outputs_to_labels(out, self._loss_name)
        return pred != as_classes(yt), loss, probability_of_label(out, yt).detach()

    def describe(self) -> dict[str, Any]:
        """How the attack computes (solver, refit, feature cache) and what it did so far."""
        s = self.config.solver
        pre = "cg preconditioned by the clean exact inverse"
        return {
            "query_solver": pre if s is None else getattr(s, "name", str(s)),
            "retrain": self.retrain if isinstance(self.retrain, str) else "callable",
            "feature_cache": self.fast,
            "p": self._obj.p,
            **self.stats,
        }

    # ------------------------------------------------------------------ ranking
    def rank(
        self, targets: Pair, candidates: Sequence[int] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order, l1)``: the candidates (default: all) by decreasing ``||I_pert,loss(z_i,
        T)||_1`` at the original theta (``T``: the targets' mean loss), and those norms."""
        th, everyone = self.theta0, torch.arange(self.x.shape[0])
        cand = torch.as_tensor(everyone if candidates is None else candidates).long().reshape(-1)
        s = self._s_test(th, self.f, self._target_inputs(targets))[0]
        parts = []
        for c in cand.split(self.config.chunk_size):
            # g_i = grad_x (s . grad_theta loss(z_i)) = -I_pert,loss
            u = self._obj.input_grad_of_loss_jvp(s, self.f[c], self.y[c], th)
            parts.append(self._pixel_grads(u[None], self.x[c])[0].reshape(len(c), -1).abs().sum(1))
        l1 = torch.cat(parts)
        order = torch.argsort(l1, descending=True)
        return cand[order], l1[order]

    def rank_each(
        self, targets: Pair, top: int = 10, target_chunk: int = 100, strategy: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`rank` for every target *separately*: ``(indices [m, top], l1 [m, top])``.

        ``strategy="jacobian"`` (FeatureModel only) forms the extractor's Jacobian once per
        training image (``d`` backward passes) and reuses it for every target; same numbers
        as ``"per_target"`` (one :meth:`rank` each) up to rounding. ``"auto"``: Jacobians when
        the targets outnumber half the feature dimension.
        """
        if strategy not in ("auto", "jacobian", "per_target"):
            raise InputError(f"strategy must be 'auto', 'jacobian' or 'per_target': {strategy!r}")
        x_t, y_t = targets
        m, n = x_t.shape[0], self.x.shape[0]
        top, d = min(int(top), n), self.f.shape[1] if self.fast else 0
        if not self.fast or strategy == "per_target" or (strategy == "auto" and m <= d // 2):
            rows = [self.rank((x_t[j : j + 1], y_t[j : j + 1])) for j in range(m)]
            return torch.stack([r[0][:top] for r in rows]), torch.stack([r[1][:top] for r in rows])
        th = self.theta0
        s_all = self._s_test(th, self.f, self._target_inputs(targets), mean=False)
        best_v = torch.full((m, top), -math.inf, dtype=torch.float64)
        best_i = torch.zeros((m, top), dtype=torch.long)
        for ids in tqdm(torch.arange(n).split(16), desc="Ranking", disable=not self.progress):
            eye = torch.eye(d).expand(ids.numel(), d, d).transpose(0, 1)  # [d, B, d]
            jb = self._pixel_grads(eye, self.x[ids]).transpose(0, 1).reshape(ids.numel(), d, -1)
            fb, yb = self.f[ids], self.y[ids]
            l1 = []  # [m, B], in chunks of targets to bound the [k, B, *x] products
            for s_chunk in s_all.split(target_chunk):
                u = torch.stack([self._obj.input_grad_of_loss_jvp(v, fb, yb, th) for v in s_chunk])
                l1.append(torch.einsum("kbd,bdD->kbD", u.to(jb.dtype), jb).abs().sum(-1).double())
            best_v, pos = torch.cat([best_v, torch.cat(l1)], 1).topk(top, dim=1)  # a running top-k
            best_i = torch.cat([best_i, ids.expand(m, -1)], 1).gather(1, pos)
        return best_i, best_v

    # ------------------------------------------------------------------ attacking
    def run(
        self,
        targets: Pair,
        indices: Sequence[int] | torch.Tensor,
        iterations: int = 100,
        early_stop: bool = True,
        step: float | None = None,
        box: PixelBox | None = None,
    ) -> AttackResult:
        """Perturb ``indices`` for up to ``iterations`` steps to raise the *mean* loss of the
        targets ``(X_T, y_T)``, from the original data and theta (attempts are independent).

        ``early_stop``: stop once every initially correct target is mispredicted; ``step``,
        ``box``: override the step size (model units) and the box for this run.
        """
        if targets[0].shape[0] != targets[1].shape[0] or targets[0].shape[0] == 0:
            raise InputError("targets must be a non-empty pair (X_T, y_T) of equal length")
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(1, -1)
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
        """``K`` independent single-target attacks, attack ``t`` poisoning ``indices[t]``
        (``[K, k]``) against target ``t`` exactly as ``run((X_T[t:t+1], y_T[t:t+1]),
        indices[t])`` would; the poisoned images of all pass the extractor as one batch."""
        x_t, y_t = targets
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.ndim != 2 or idx.shape[0] != x_t.shape[0] or x_t.shape[0] != y_t.shape[0]:
            raise InputError(
                f"indices must be [K, k] with one row per target; got {tuple(idx.shape)} for "
                f"{x_t.shape[0]} targets and {y_t.shape[0]} labels"
            )
        if idx.shape[0] == 0:
            raise InputError("run_many needs at least one target")
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
        ``targets[t]``; each :class:`AttackResult` holds its attack's current state."""
        if P.numel() == 0 or P.shape[-1] == 0:
            raise InputError("indices is empty: choose at least one training point to poison")
        if int(P.min()) < 0 or int(P.max()) >= self.x.shape[0]:
            raise InputError(f"indices must lie in [0, {self.x.shape[0] - 1}]")
        if bool((P.sort(-1).values.diff(dim=-1) == 0).any()):
            raise InputError("indices contains repeats (a row of indices must be distinct)")
        t_start = time.perf_counter()
        alpha = self.step if step is None else float(step)
        box = self.box if box is None else box
        (K, k), shape = P.shape, self.x.shape[1:]
        tgt = [self._target_inputs(t) for t in targets]
        x0, fp = self.x[P.reshape(-1)].reshape(K, k, *shape).clone(), self.f[P].clone()
        th0 = self.theta0.detach()
        res = [AttackResult.start(P[t], x0[t], th0, self._state(th0, tgt[t])) for t in range(K)]

        def poisoned(t: int) -> torch.Tensor:  # the training inputs of attack t (a copy)
            return self.f.index_put((P[t],), fp[t])

        bar = tqdm(range(iterations), desc="Attack", disable=not self.progress, leave=False)
        for _ in bar:
            live = [t for t in range(K) if not (early_stop and res[t].success)]
            if not live:
                break
            # 1-2. the influence query at each attack's retrained theta and poisoned data
            u = []
            for t in live:
                st = self._s_test(res[t].theta, poisoned(t), tgt[t])[0]
                u.append(self._obj.input_grad_of_loss_jvp(st, fp[t], self.y[P[t]], res[t].theta))
            xl = torch.stack([res[t].x_poisoned for t in live])
            g = self._pixel_grads(torch.cat(u)[None], xl.reshape(-1, *shape))[0]
            # 3. signed steps along sign(I_pert,loss) = -sign(g), all attacks in one batch
            xa = box.project(xl - alpha * torch.sign(g).reshape(xl.shape), x0[live])
            # 4. the poisoned inputs' features
            xs = xa.reshape(-1, *shape)
            fp[live] = self._features(xs).reshape(len(live), k, -1) if self.fast else xa
            # 5. exact refits, warm-started
            for j, t in enumerate(live):
                theta = self._refit(res[t].theta, poisoned(t)).detach().clone()
                res[t].record(xa[j], theta, self._state(theta, tgt[t]))
        bar.close()
        share = (time.perf_counter() - t_start) / K
        for t, r in enumerate(res):
            r.feature_change = (fp[t] - self.f[P[t]]).norm(dim=1) if self.fast else None
            r.seconds = share
        return res

    def run_schedule(
        self,
        targets: Pair,
        ranked: Sequence[int] | torch.Tensor,
        schedule: Sequence[Sequence[int]] = PAPER_SCHEDULE,
        iterations: int = 100,
    ) -> tuple[int | None, list[AttackResult]]:
        """Try the attempts of ``schedule`` in order, each poisoning ``ranked[j]`` for the
        positions ``j`` of the attempt from the clean data (PROTOCOL 4.6), until one flips
        every target. Returns ``(images of the first success or None, results)``."""
        ranked = torch.as_tensor(ranked, dtype=torch.long).reshape(-1)
        results: list[AttackResult] = []
        for attempt in schedule:
            pos = torch.as_tensor(list(attempt), dtype=torch.long)
            if int(pos.max()) >= ranked.numel():
                break
            results.append(self.run(targets, ranked[pos], iterations=iterations))
            if results[-1].success:
                return len(attempt), results
        return None, results
