"""Training-set attacks with influence functions (Koh & Liang 2017, Sec. 5.2; PROTOCOL 4.6).

A few training *inputs* are changed imperceptibly so that, after retraining, chosen target
test points are mispredicted. The direction is the input influence (eq. 5),
``I_pert,loss(z_i, z_T) = -grad_theta L(z_T)^T H^-1 grad_x grad_theta L(z_i)``: moving ``x_i``
by ``delta`` changes the target loss by about ``I_pert,loss . delta / n``. The attack is one
loop over three parts (docs/usecases/attack.md), for ``K`` independent attacks at once (each
attack is a problem of :class:`~inflens.edited_problems.EditedProblems`: the training set
with its poisoned rows replaced, at its own theta):

- the **influence query**: ``s_test = H^-1 grad_theta mean_{j in T} L(z_j)`` at each attack's
  theta and data (batched CG preconditioned by the exact inverse Hessian at the clean
  optimum, to relative residual 1e-10; or an :class:`~inflens.Influence` per attack with the
  caller's solver), then ``g_i = grad_x (s_test . grad_theta loss(z_i)) = -I_pert,loss``;
- the **box**: ``x_i <- Proj_i(x_i - step * sign(g_i))`` onto a :class:`PixelBox`;
- the **refit strategy**: theta refitted exactly, warm-started (``"newton"``: chord and Newton
  steps of all attacks together, ``"lbfgs"`` or a callable, one attack at a time).

Training points are ranked by ``||I_pert,loss(z_i, z_T)||_1`` (the first-order increase of
the target loss under a unit L-infinity step). For an :class:`inflens.features.FeatureModel`
whose ``top`` holds theta, features are cached and queries and refits run on them in float64.

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

from ..edited_problems import EditedProblems
from ..errors import InputError
from ..features import FeatureModel, extract_features, pull_back
from ..influence import Influence
from ..objective import Objective
from ..solvers import Exact, Solver
from ..train import LBFGSConfig, fit_lbfgs
from .attack_types import AttackConfig, AttackResult, Pair, PixelBox, eight_bit_level, target_states

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
        if cfg.refit_start:
            theta = self._refit(self._clean(1), theta[None], torch.zeros(1).long(), self._f)[0]
        self.theta0 = theta

    # ------------------------------------------------------------ query and refit
    def _influence(
        self, theta: torch.Tensor, f: torch.Tensor, solver: str | Solver, damping: float
    ) -> Influence:
        """An :class:`Influence` on ``(f, y)`` fitted at ``theta``."""
        self._obj.load_into_model(theta)
        self.stats["influence_fits"] += 1
        inf = Influence(self._obj, (f, self.y), solver=solver, damping=damping, progress=False)
        return inf.fit()

    def _clean(self, m: int) -> EditedProblems:
        """``m`` copies of the clean problem (row 0 "replaced" by itself)."""
        return EditedProblems(self._obj, (self.f, self.y), torch.zeros(m, 1, dtype=torch.long))

    def _query(
        self,
        problems: EditedProblems,
        thetas: torch.Tensor,
        which: torch.Tensor,
        targets: list[Pair],
        poisoned,
        x0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``s_t = (H_t + damping I)^-1 grad_theta mean_{j in T_t} L(z_j; theta_t)`` ``[a, p]``
        for every problem ``which[t]`` at its theta and poisoned data (the influence query)."""
        cfg = self.config
        if cfg.solver is not None:  # the caller's solver: one Influence (and solver) each
            return torch.cat(
                [
                    self._influence(
                        th, poisoned(int(t)), copy.deepcopy(cfg.solver), cfg.damping
                    ).s_test(targets[int(t)], mean=True)
                    for th, t in zip(thetas, which)
                ]
            )
        g = problems.target_gradients(thetas, [targets[int(t)] for t in which])
        return problems.solve(g, thetas, which, float(cfg.damping), self._pre, _CG_TOL, x0)

    def _refit(
        self, problems: EditedProblems, thetas: torch.Tensor, which: torch.Tensor, poisoned=None
    ) -> torch.Tensor:
        """Every problem ``which[t]`` refitted exactly, warm-started at ``thetas[t]``."""
        self.stats["refits"] += len(which)
        obj, y, tol = self._obj, self.y, float(self.config.tol)
        if self.retrain != "newton":
            out = []
            for th, t in zip(thetas, which):
                f = poisoned(int(t))
                if callable(self.retrain):
                    obj.load_into_model(th)
                    out.append(self.retrain(obj, (f, y), th.clone()).detach().to(obj.dtype))
                else:
                    out.append(fit_lbfgs(obj, (f, y), th, config=LBFGSConfig(tol, 1000)).theta)
            return torch.stack(out)
        fit = problems.refit(thetas, which, tol, self._pre, _CG_TOL)
        self.stats["chord_steps"] += fit.info.extra["chord_steps"]
        self.stats["newton_steps"] += fit.info.extra["newton_steps"]
        return fit.theta.detach()

    # ------------------------------------------------------------------ helpers
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return extract_features(self.extractor, x, self.config.chunk_size).double()

    def _f(self, t: int) -> torch.Tensor:  # the clean training inputs of any problem
        return self.f

    def _target_inputs(self, targets: Pair) -> Pair:
        x_t = targets[0].to(self.x.dtype)
        return (self._features(x_t) if self.fast else x_t), targets[1]

    def _pixel_grads(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[m, B, *x]``: ``J(x_b)^T u[t, b]`` through the frozen extractor (``u`` without)."""
        return pull_back(self.extractor, x, u, self.config.chunk_size) if self.fast else u

    def describe(self) -> dict[str, Any]:
        """How the attack computes (solver, refit, feature cache) and what it did so far."""
        s = self.config.solver
        pre = "cg over all attacks at once, preconditioned by the clean exact inverse"
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
        tgt = [self._target_inputs(targets)]
        s = self._query(self._clean(1), th[None], torch.zeros(1).long(), tgt, self._f)[0]
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
        th, (ft, yt) = self.theta0, self._target_inputs(targets)
        tgt = [(ft[j : j + 1], yt[j : j + 1]) for j in range(m)]  # one problem per target
        s_all = self._query(self._clean(m), th.expand(m, -1), torch.arange(m), tgt, self._f)
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
        t_start = time.perf_counter()
        problems = EditedProblems(self._obj, (self.f, self.y), P)  # checks the indices
        alpha = self.step if step is None else float(step)
        box = self.box if box is None else box
        (K, k), shape = P.shape, self.x.shape[1:]
        sizes = [int(t[1].shape[0]) for t in targets]  # the targets' features in one batch
        xt, yt = self._target_inputs(
            (torch.cat([t[0] for t in targets]), torch.cat([t[1] for t in targets]))
        )
        tgt = list(zip(xt.split(sizes), yt.split(sizes)))
        x0, fp = self.x[P.reshape(-1)].reshape(K, k, *shape).clone(), self.f[P].clone()
        th0 = self.theta0.detach()
        start = target_states(self._obj, self._loss_name, th0.expand(K, -1), tgt)
        res = [AttackResult.start(P[t], x0[t], th0, start[t]) for t in range(K)]
        thetas, s_prev = th0.expand(K, -1).clone(), torch.zeros(K, th0.shape[0], dtype=th0.dtype)

        def poisoned(t: int) -> torch.Tensor:  # the training inputs of attack t (a copy)
            return self.f.index_put((P[t],), fp[t])

        bar = tqdm(range(iterations), desc="Attack", disable=not self.progress, leave=False)
        for _ in bar:
            live = torch.tensor([t for t in range(K) if not (early_stop and res[t].success)])
            if live.numel() == 0:
                break
            # 1-2. the influence query at each attack's retrained theta and poisoned data
            th = thetas[live]  # the query warm-starts from the previous step's s_test
            s_prev[live] = self._query(problems, th, live, tgt, poisoned, s_prev[live])
            s = s_prev[live].repeat_interleave(k, 0)
            yp = self.y[P[live]].reshape(-1, *self.y.shape[1:])
            with self._obj.evaluating():
                u = problems.backend.input_grads_at(
                    s,
                    th.repeat_interleave(k, 0),
                    fp[live].reshape(len(live) * k, *fp.shape[2:]),
                    yp,
                )
            xl = torch.stack([res[t].x_poisoned for t in live.tolist()])
            g = self._pixel_grads(u[None], xl.reshape(-1, *shape))[0]
            # 3. signed steps along sign(I_pert,loss) = -sign(g), all attacks in one batch
            xa = box.project(xl - alpha * torch.sign(g).reshape(xl.shape), x0[live])
            # 4. the poisoned inputs' features
            xs = xa.reshape(-1, *shape)
            fp[live] = self._features(xs).reshape(len(live), k, -1) if self.fast else xa
            problems.replace(live, fp[live])
            # 5. exact refits, warm-started, all attacks together
            thetas[live] = self._refit(problems, th, live, poisoned)
            states = target_states(
                self._obj, self._loss_name, thetas[live], [tgt[t] for t in live.tolist()]
            )
            for j, t in enumerate(live.tolist()):
                res[t].record(xa[j], thetas[t].clone(), states[j])
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
