"""Training-set attacks with influence functions (Koh & Liang 2017, Sec. 5.2; PROTOCOL 4.6).

An attacker changes a few training *inputs* imperceptibly so that, after the model is retrained,
chosen target test points are mispredicted. The direction comes from the input influence
(eq. 5)

    ``I_pert,loss(z_i, z_T) = -grad_theta L(z_T)^T H^-1 grad_x grad_theta L(z_i)``,

the gradient of the target loss with respect to training input ``x_i`` (through retraining):
moving ``x_i`` by ``delta`` changes the target loss by about ``I_pert,loss . delta / n``.
Each iteration (PROTOCOL 4.6 steps 1-6):

1. ``s_test = H^-1 grad_theta mean_{j in T} L(z_j)`` at the current (retrained) theta;
2. ``g_i = grad_x (s_test . grad_theta loss(z_i)) = -I_pert,loss`` for every poisoned ``i``
   (the gradient flows through the frozen part of the network);
3. ``x_i <- Proj_i(x_i - step * sign(g_i))``: a signed step that raises the target loss,
   projected onto a box around the original input (by default: every pixel stays within half
   an 8-bit level of its original value, and inside the valid range);
4. the poisoned inputs' features are recomputed (cached features are kept for the others);
5. theta is refitted exactly on the modified training set (warm start);
6. stop early once every target's prediction has flipped.

Training points to poison are ranked by ``||I_pert,loss(z_i, z_T)||_1`` (the first-order
increase of the target loss under a unit L-infinity step), as in the paper's code.

Fast path: when the objective's model is an :class:`inflens.features.FeatureModel` and theta
lies in its ``top``, features are cached, the Hessian and the refits run on features in
float64, and only the poisoned images pass through the extractor. Any other model works too
(theta = whatever ``params`` selects); then every refit runs on the full model.

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
import torch.nn.functional as F
from torch import nn
from torch.func import grad, hessian
from tqdm.auto import tqdm

from ..errors import InputError, SolverDivergedError
from ..features import FeatureModel, extract_features
from ..influence import Influence
from ..objective import Objective
from ..solvers import Exact, Solver

__all__ = [
    "PAPER_SCHEDULE",
    "AttackResult",
    "PixelBox",
    "TrainingSetAttack",
    "eight_bit_level",
    "newton_refit",
    "predicted_labels",
]

Retrain = Callable[[Objective, tuple[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor]

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


def predicted_labels(objective: Objective, outputs: torch.Tensor) -> torch.Tensor:
    """Predicted classes from model outputs: ``logit > 0`` for one-logit losses, else argmax.

    For ``"binary_logistic"``/``"hinge"``/``"smooth_hinge"`` (and one-column outputs) the
    prediction is 1 when the score is positive and 0 otherwise (labels {0, 1}; a target labelled
    -1 counts as class 0).
    """
    if outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1):
        return (outputs.reshape(-1) > 0).long()
    return outputs.argmax(1)


def _as_class(y: torch.Tensor) -> torch.Tensor:
    """Labels as classes for the flip test ({-1, +1} -> {0, 1})."""
    y = y.reshape(-1)
    return (y > 0).long() if y.numel() and bool((y < 0).any()) else y.long()


def newton_refit(
    objective: Objective,
    x: torch.Tensor,
    y: torch.Tensor,
    theta0: torch.Tensor,
    tol: float = 1e-10,
    max_iter: int = 50,
) -> torch.Tensor:
    """Minimise ``mean_i loss(z_i) + (l2/2)||theta||^2`` by damped Newton from ``theta0``.

    Exact Hessian (``torch.func.hessian``), Armijo backtracking; converges quadratically for a
    strongly convex smooth top layer (logistic regression with ``l2 > 0``), to
    ``||grad|| <= tol``. Intended for small ``p`` (it forms the ``p x p`` Hessian).
    """

    def risk(th: torch.Tensor) -> torch.Tensor:
        return objective.risk(th, x, y)

    g_fn, h_fn = grad(risk), hessian(risk)
    theta = theta0.detach().clone()
    f0 = risk(theta)
    for _ in range(max_iter):
        g = g_fn(theta)
        if float(g.norm()) <= tol:
            return theta
        h = h_fn(theta)
        try:
            step = torch.linalg.solve(h, g)
        except RuntimeError as exc:  # singular Hessian (l2 = 0 and separable data, ...)
            raise SolverDivergedError(
                f"Newton refit: the Hessian is singular ({exc}); use l2 > 0 or retrain='lbfgs'"
            ) from exc
        slope = float(g @ step)
        if not slope > 0:  # not a descent direction: the objective is not convex here
            raise SolverDivergedError(
                "Newton refit: the Hessian is not positive definite at the current weights; "
                "the top layer is not convex. Pass retrain='lbfgs' or your own retrain callable"
            )
        t = 1.0
        while True:
            cand = theta - t * step
            f1 = risk(cand)
            if float(f1) <= float(f0) - 1e-4 * t * slope or t < 1e-12:
                break
            t *= 0.5
        if t < 1e-12:  # no decrease possible at machine precision: at the optimum
            return theta
        theta, f0 = cand, f1
    g = g_fn(theta)
    if float(g.norm()) > max(tol, 1e-6):
        raise SolverDivergedError(
            f"Newton refit did not converge in {max_iter} steps (gradient norm "
            f"{float(g.norm()):.2e}); raise max_iter or use retrain='lbfgs'"
        )
    return theta


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
        feature_change: ``[k]`` L2 change of each poisoned input's features (fast path) or None.
        history: per iteration ``{"target_loss", "n_flipped"}``.
        seconds: wall time.
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


# ---------------------------------------------------------------------------------- engines
class _GenericEngine:
    """The top-layer computations through :class:`Objective` (any model, loss and solver).

    "Inputs" are whatever the objective's model takes: cached features for a FeatureModel's
    top layer, or raw inputs for a whole model.
    """

    def __init__(
        self, obj: Objective, solver: str | Solver, damping: float, retrain: Any, tol: float
    ) -> None:
        self.obj, self.solver, self.damping, self.retrain, self.tol = (
            obj,
            solver,
            damping,
            retrain,
            tol,
        )
        self.dtype = obj.dtype

    def _at(self, theta: torch.Tensor) -> Objective:
        self.obj.theta = theta.detach().to(self.dtype).clone()
        return self.obj

    def s_test(self, theta, x, y, xt, yt, mean: bool) -> torch.Tensor:
        solver = copy.deepcopy(self.solver) if isinstance(self.solver, Solver) else self.solver
        inf = Influence(
            self._at(theta), (x, y), solver=solver, damping=self.damping, progress=False
        )
        return inf.fit().s_test((xt, yt), mean=mean)

    def input_grads(self, s: torch.Tensor, theta, x, y) -> torch.Tensor:
        """``[K, B, *input]``: ``grad_x (s_k . grad_theta loss(x_i, y_i))``."""
        obj = self._at(theta)
        return torch.stack([obj.input_grad_of_loss_jvp(v, x, y) for v in s])

    def refit(self, theta0, x, y) -> torch.Tensor:
        obj = self._at(theta0)
        if callable(self.retrain):
            return self.retrain(obj, (x, y), theta0).detach().to(self.dtype)
        if self.retrain == "newton":
            return newton_refit(obj, x, y, obj.theta, tol=self.tol)
        from ..train import fit_lbfgs

        return fit_lbfgs(obj, (x, y), theta0=obj.theta, tol=self.tol, max_iter=1000)

    def outputs(self, theta, x) -> torch.Tensor:
        with torch.no_grad():
            return self.obj.outputs(theta.to(self.dtype), x)

    def measurements(self, theta, x, y) -> torch.Tensor:
        with torch.no_grad():
            return self.obj.measurements(theta.to(self.dtype), x, y)


class _LogisticEngine:
    """Closed forms for a bias-free linear binary logistic top layer (PROTOCOL 1.7).

    With ``y`` in {-1, +1}, ``m_i = y_i theta . f_i``: ``grad loss_i = -y_i sigma(-m_i) f_i``,
    ``H = F^T diag(sigma(m) sigma(-m)) F / n + (l2 + damping) I`` and the feature gradient of
    ``s . grad_theta loss_i`` is ``-y_i sigma(-m_i) s + sigma(m_i) sigma(-m_i) (s . f_i) theta``.

    Linear systems in ``H`` are solved by conjugate gradients preconditioned with the inverse
    of ``H`` at an earlier theta (an attack changes a few rows of ``F`` and theta a
    little per step, so a handful of ``O(n p)`` products reach the tolerance);
    the factor is recomputed whenever that takes more than ``max_pcg`` iterations.
    Relative residual tolerance of the solves: ``rtol`` (1e-10); each solve starts from the
    previous solution of the same shape (the attack's ``s_test`` moves little per step).
    Refits are chord-Newton steps ``theta <- theta - H_old^-1 grad`` (two ``O(n p)`` products
    each, no inner solve) while they shrink the gradient norm by at least ``chord_rate``;
    otherwise a full Newton step solved as above, with Armijo backtracking. Either way they
    run to ``||grad|| <= tol``. Same numbers as :class:`_GenericEngine` with the exact solver
    and a Newton refit, without forming ``H`` (``O(n p^2)``) on every call.
    """

    dtype = torch.float64

    def __init__(
        self,
        l2: float,
        damping: float,
        tol: float,
        max_pcg: int = 30,
        rtol: float = 1e-10,
        chord_rate: float = 0.5,
    ) -> None:
        self.l2, self.damping, self.tol, self.max_pcg, self.rtol = l2, damping, tol, max_pcg, rtol
        self.chord_rate = chord_rate
        self._inv: torch.Tensor | None = None  # (H + (l2 + damping) I)^-1 at an earlier theta
        self._warm: dict[tuple[int, float], torch.Tensor] = {}  # last solution per (rows, shift)
        self.stats = {"factorizations": 0, "pcg_iterations": 0, "solves": 0, "chord_steps": 0}

    @staticmethod
    def _signs(y: torch.Tensor) -> torch.Tensor:
        return torch.where(y > 0, 1.0, -1.0).to(torch.float64)

    @staticmethod
    def _curv(theta, f) -> torch.Tensor:
        z = f @ theta
        return torch.sigmoid(z) * torch.sigmoid(-z)

    def _factor(self, w, f, shift: float) -> torch.Tensor:
        """The explicit inverse of ``F^T diag(w) F / n + shift I`` (symmetric)."""
        h = (f.T * w) @ f / f.shape[0]
        h.diagonal().add_(shift)
        inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        self.stats["factorizations"] += 1
        return 0.5 * (inv + inv.T)

    def _solve(self, theta, f, b: torch.Tensor, shift: float) -> torch.Tensor:
        """``(F^T diag(w) F / n + shift I)^-1 b`` for the rows of ``b [k, p]``, ``w`` at theta."""
        self.stats["solves"] += 1
        w = self._curv(theta, f)
        n = f.shape[0]
        own = self.l2 + self.damping

        def hvp(v: torch.Tensor) -> torch.Tensor:
            return ((v @ f.T) * w) @ f / n + shift * v

        if self._inv is None or b.shape[0] > 8:
            self._inv = self._factor(w, f, own)
            if shift == own:
                return b @ self._inv
        inv = self._inv
        warm = self._warm.get((b.shape[0], shift))
        x = warm.clone() if warm is not None and warm.shape == b.shape else b @ inv
        r = b - hvp(x)
        z = r @ inv
        d = z.clone()
        rz = (r * z).sum(1)
        bnorm = b.norm(dim=1).clamp_min(1e-300)
        for _ in range(self.max_pcg):
            if bool((r.norm(dim=1) <= self.rtol * bnorm).all()):
                self._warm[(b.shape[0], shift)] = x
                return x
            self.stats["pcg_iterations"] += 1
            hd = hvp(d)
            alpha = rz / (d * hd).sum(1)
            x = x + alpha[:, None] * d
            r = r - alpha[:, None] * hd
            z = r @ inv
            rz_new = (r * z).sum(1)
            d = z + (rz_new / rz)[:, None] * d
            rz = rz_new
        if bool((r.norm(dim=1) <= self.rtol * bnorm).all()):
            self._warm[(b.shape[0], shift)] = x
            return x
        # the preconditioner is stale: factor H here and solve directly
        self._inv = self._factor(w, f, own)
        inv = self._inv if shift == own else self._factor(w, f, shift)
        x = b @ inv
        self._warm[(b.shape[0], shift)] = x
        return x

    def _risk(self, theta, f, ys) -> torch.Tensor:
        return F.softplus(-ys * (f @ theta)).mean() + 0.5 * self.l2 * theta @ theta

    def _grad(self, theta, f, ys) -> torch.Tensor:
        r = -ys * torch.sigmoid(-ys * (f @ theta))
        return r @ f / f.shape[0] + self.l2 * theta

    def s_test(self, theta, f, y, ft, yt, mean: bool) -> torch.Tensor:
        yts = self._signs(yt)
        gt = (-yts * torch.sigmoid(-yts * (ft @ theta)))[:, None] * ft  # [m, p], no reg
        if mean:
            gt = gt.mean(0, keepdim=True)
        return self._solve(theta, f, gt, self.l2 + self.damping)

    def input_grads(self, s, theta, f, y) -> torch.Tensor:
        ys = self._signs(y)
        z = f @ theta
        m = ys * z
        a = -ys * torch.sigmoid(-m)  # [B]
        c = torch.sigmoid(z) * torch.sigmoid(-z)  # [B]
        sf = s @ f.T  # [K, B]
        return a[None, :, None] * s[:, None, :] + (c[None, :] * sf)[..., None] * theta

    def refit(self, theta0, f, y) -> torch.Tensor:
        ys = self._signs(y)
        theta = theta0.detach().to(torch.float64).clone()
        g = self._grad(theta, f, ys)
        gnorm = float(g.norm())
        # chord steps with the cached inverse Hessian (the shift differs by `damping`, which
        # only slows the contraction); accepted only while the gradient norm shrinks fast
        if self._inv is not None and self.damping == 0.0:
            for _ in range(50):
                if gnorm <= self.tol:
                    return theta
                cand = theta - g @ self._inv
                g1 = self._grad(cand, f, ys)
                g1norm = float(g1.norm())
                if not g1norm <= self.chord_rate * gnorm:
                    break
                self.stats["chord_steps"] += 1
                theta, g, gnorm = cand, g1, g1norm
        f0 = self._risk(theta, f, ys)
        for _ in range(100):
            if gnorm <= self.tol:
                break
            step = self._solve(theta, f, g[None, :], self.l2)[0]
            # near the optimum the risk cannot resolve the decrease (round-off); a full step
            # that halves the gradient norm is taken without the line search
            g_full = self._grad(theta - step, f, ys)
            if float(g_full.norm()) <= 0.5 * gnorm:
                theta = theta - step
                f0 = self._risk(theta, f, ys)
                g, gnorm = g_full, float(g_full.norm())
                continue
            slope = float(g @ step)
            t = 1.0
            while True:
                cand = theta - t * step
                f1 = self._risk(cand, f, ys)
                if float(f1) <= float(f0) - 1e-4 * t * slope or t < 1e-12:
                    break
                t *= 0.5
            if t < 1e-12:
                break
            theta, f0 = cand, f1
            g = self._grad(theta, f, ys)
            gnorm = float(g.norm())
        return theta

    def outputs(self, theta, f) -> torch.Tensor:
        return f @ theta.to(torch.float64)

    def measurements(self, theta, f, y) -> torch.Tensor:
        return F.softplus(-self._signs(y) * self.outputs(theta, f))


class _BatchedLogistic:
    """:class:`_LogisticEngine`'s algebra for ``K`` independent attacks at once.

    Attack ``t`` has its own theta ``theta_t`` and replaces the rows ``P_t`` (``k`` of them) of
    the clean feature matrix ``F`` by its poisoned features ``Fp_t``. Every product with ``F``
    is one ``[K, p] x [p, n]`` matrix product for all attacks (compute-bound, where ``K``
    separate attacks would each stream ``F`` from memory), followed by a rank-``k`` correction
    for the rows each attack changed. Solves are conjugate gradients preconditioned by the
    clean ``(H + (l2 + damping) I)^-1`` with per-row convergence (rows still short of the
    tolerance after ``5 max_pcg`` steps are solved directly with their own Hessian); refits are
    chord-Newton steps with that inverse, falling back to Newton steps with a per-row Armijo
    line search, to ``||grad|| <= tol`` for every row.
    """

    def __init__(
        self, eng: _LogisticEngine, f: torch.Tensor, y: torch.Tensor, theta0: torch.Tensor
    ) -> None:
        self.eng, self.f, self.n = eng, f, f.shape[0]
        self.ys = eng._signs(y)
        self.inv = eng._factor(eng._curv(theta0, f), f, eng.l2 + eng.damping)

    # rows P [K, k], poisoned features fp [K, k, p]
    def margins(self, th: torch.Tensor, P: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
        """``z = F_t theta_t`` for every attack ``[K, n]``."""
        z = th @ self.f.T
        return z.scatter(1, P, (fp * th[:, None, :]).sum(-1))

    def _apply_t(self, u: torch.Tensor, P: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
        """``F_t^T u_t / n`` for every attack (``u [K, n]``)."""
        out = u @ self.f
        up = u.gather(1, P)  # [K, k]
        out += (up[..., None] * (fp - self.f[P])).sum(1)
        return out / self.n

    def risk(self, th, P, fp) -> torch.Tensor:
        z = self.margins(th, P, fp)
        return F.softplus(-self.ys * z).mean(1) + 0.5 * self.eng.l2 * (th * th).sum(1)

    def grad(self, th, P, fp) -> torch.Tensor:
        z = self.margins(th, P, fp)
        return self._apply_t(-self.ys * torch.sigmoid(-self.ys * z), P, fp) + self.eng.l2 * th

    def solve(self, th, P, fp, b, shift: float, x0: torch.Tensor | None = None) -> torch.Tensor:
        """``(F_t^T W_t F_t / n + shift I)^-1 b_t`` for every row, PCG to rtol."""
        eng = self.eng
        z = self.margins(th, P, fp)
        w = torch.sigmoid(z) * torch.sigmoid(-z)

        def hvp(v: torch.Tensor) -> torch.Tensor:
            u = self.margins(v, P, fp) * w
            return self._apply_t(u, P, fp) + shift * v

        inv = self.inv
        x = b @ inv if x0 is None else x0.clone()
        r = b - hvp(x)
        zr = r @ inv
        d = zr.clone()
        rz = (r * zr).sum(1)
        tol = eng.rtol * b.norm(dim=1).clamp_min(1e-300)
        # a PCG step costs one matrix product for all rows, a direct solve O(n p^2) per row
        for _ in range(5 * eng.max_pcg):
            live = r.norm(dim=1) > tol
            if not bool(live.any()):
                return x
            eng.stats["pcg_iterations"] += 1
            hd = hvp(d)
            alpha = torch.where(live, rz / (d * hd).sum(1), torch.zeros_like(rz))
            x = x + alpha[:, None] * d
            r = r - alpha[:, None] * hd
            zr = r @ inv
            rz_new = (r * zr).sum(1)
            beta = torch.where(live, rz_new / rz, torch.zeros_like(rz))
            d = zr + beta[:, None] * d
            rz = torch.where(live, rz_new, rz)
        stale = (r.norm(dim=1) > tol).nonzero()[:, 0]
        # the clean-data preconditioner is too far from these attacks' Hessians: solve them
        # directly with their own explicit Hessian (O(n p^2) each)
        for t in stale.tolist():
            ft = self.f.clone()
            ft[P[t]] = fp[t]
            h = (ft.T * w[t]) @ ft / self.n
            h.diagonal().add_(shift)
            x[t] = torch.cholesky_solve(b[t, :, None], torch.linalg.cholesky(h))[:, 0]
            eng.stats["factorizations"] += 1
        return x

    def refit(self, th, P, fp) -> torch.Tensor:
        """Exact refits of every row to ``||grad|| <= tol`` (warm start ``th``).

        A row whose Newton step cannot lower the risk even at a step of 1e-12 is at the
        optimum to machine precision and is left there (as :class:`_LogisticEngine` does);
        one still above a gradient norm of ``max(tol, 1e-6)`` after 200 rounds is an error.
        """
        eng = self.eng
        th = th.clone()
        g = self.grad(th, P, fp)
        gn = g.norm(dim=1)
        done = gn <= eng.tol
        for _ in range(200):
            if bool(done.all()):
                return th
            a = (~done).nonzero()[:, 0]
            ta, ga, gna, Pa, fa = th[a], g[a], gn[a], P[a], fp[a]
            cand = ta - ga @ self.inv
            g1 = self.grad(cand, Pa, fa)
            g1n = g1.norm(dim=1)
            ok = g1n <= eng.chord_rate * gna
            eng.stats["chord_steps"] += int(ok.sum())
            stalled = torch.zeros_like(ok)
            if not bool(ok.all()):
                bad = (~ok).nonzero()[:, 0]
                tb, gb, Pb, fb = ta[bad], ga[bad], Pa[bad], fa[bad]
                step = self.solve(tb, Pb, fb, gb, eng.l2)
                slope = (gb * step).sum(1)
                f0 = self.risk(tb, Pb, fb)
                # near the optimum the risk cannot resolve the decrease (round-off); a full
                # step that halves the gradient norm is taken without the line search
                full = self.grad(tb - step, Pb, fb).norm(dim=1) <= 0.5 * gna[bad]
                t = torch.ones_like(slope)
                for _ls in range(45):
                    c = tb - t[:, None] * step
                    fail = (self.risk(c, Pb, fb) > f0 - 1e-4 * t * slope) & ~full
                    if not bool(fail.any()):
                        break
                    t = torch.where(fail, 0.5 * t, t)
                st = t < 1e-12  # no decrease possible: keep theta (the optimum to round-off)
                t = torch.where(st, torch.zeros_like(t), t)
                c = tb - t[:, None] * step
                cand[bad] = c
                g1[bad] = self.grad(c, Pb, fb)
                g1n = g1.norm(dim=1)
                stalled[bad] = st
            th[a], g[a], gn[a] = cand, g1, g1n
            done[a] = (g1n <= eng.tol) | stalled
        if bool((gn[~done] > max(eng.tol, 1e-6)).any()):
            raise SolverDivergedError(
                f"batched refit did not converge (largest gradient norm {float(gn.max()):.2e})"
            )
        return th


def _is_linear_head(head: nn.Module, obj: Objective, f: torch.Tensor) -> bool:
    """True if the selected top layer computes exactly ``f @ theta`` (one logit, no bias)."""
    if obj.p != f.shape[1] or len(obj.names) != 1:
        return False
    probe = f[:8].to(obj.dtype)
    theta = torch.randn(obj.p, dtype=obj.dtype, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = obj.outputs(theta, probe)
    except Exception:  # noqa: BLE001 - any failure means "not a plain linear head"
        return False
    return out.numel() == probe.shape[0] and torch.allclose(
        out.reshape(-1), probe @ theta, rtol=1e-10, atol=1e-10
    )


class TrainingSetAttack:
    """Poison a few training inputs to flip the predictions on target test points.

    Args:
        objective: the trained model; ``params`` selects the part that is retrained (e.g.
            ``params="top."`` for an :class:`~inflens.features.FeatureModel`); every other
            parameter is frozen, and input gradients flow through it.
        train: training inputs and labels ``(X, y)`` (tensors; X floating point).
        step: size of one signed step in model units (default: 0.02 8-bit levels of
            ``value_range``, the paper's individual attacks).
        box: where poisoned inputs may lie (default ``PixelBox.eight_bit(value_range)``: half
            an 8-bit level around each original pixel).
        value_range: the range 8-bit 0..255 maps to (``(-1, 1)`` for ``x / 127.5 - 1``).
        solver: inverse-HVP solver for ``s_test`` (``"exact"`` suits a small top layer).
        damping: added to ``H`` (Sec. 4.2).
        retrain: ``"newton"`` (exact Newton refit, for a smooth convex top layer; the default
            for a FeatureModel top layer of at most 4,096 parameters), ``"lbfgs"``
            (:func:`inflens.train.fit_lbfgs` to ``tol``) or a callable
            ``(objective, (x, y), theta0) -> theta``.
        tol: gradient-norm tolerance of the refits.
        chunk_size: images per batch through the extractor.
        refit_start: first refit theta exactly on the clean training data, so that "before"
            and "after" are both exact optima (a model trained to a looser tolerance would
            otherwise drift in the first refit and blur the attack's effect).
        progress: progress bars.

    For a FeatureModel whose top layer is a bias-free linear logit trained with
    ``"binary_logistic"`` (the paper's model) and the exact solver, the top-layer algebra runs
    in closed form (float64); otherwise through :class:`~inflens.Objective` and
    :class:`~inflens.Influence` with the given solver.
    """

    def __init__(
        self,
        objective: Objective,
        train: tuple[torch.Tensor, torch.Tensor],
        *,
        step: float | None = None,
        box: PixelBox | None = None,
        value_range: tuple[float, float] = (-1.0, 1.0),
        solver: str | Solver = "exact",
        damping: float = 0.0,
        retrain: str | Retrain = "auto",
        tol: float = 1e-10,
        chunk_size: int = 128,
        refit_start: bool = True,
        progress: bool = False,
    ) -> None:
        if not isinstance(objective, Objective):
            raise InputError(f"objective must be an inflens.Objective, got {type(objective)}")
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
        if not (float(damping) >= 0):
            raise InputError(f"damping must be non-negative, got {damping}")
        self.objective = objective
        self.x, self.y = x.to(objective.dtype), y
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.step = 0.02 * eight_bit_level(self.value_range) if step is None else float(step)
        if not self.step > 0:
            raise InputError(f"step must be positive, got {step}")
        self.box = box if box is not None else PixelBox.eight_bit(self.value_range)
        self.chunk_size = int(chunk_size)
        self.progress = progress
        self.theta0 = objective.theta.detach().clone()
        model = objective.model
        self.fast = isinstance(model, FeatureModel) and all(
            n.startswith("top.") for n in objective.names
        )
        if retrain == "auto":
            retrain = "newton" if self.fast and objective.p <= 4096 else "lbfgs"
        if isinstance(retrain, str) and retrain not in ("newton", "lbfgs"):
            raise InputError(f"retrain must be 'newton', 'lbfgs' or a callable, got {retrain!r}")
        self.retrain = retrain
        self.engine: _GenericEngine | _LogisticEngine
        if self.fast:
            self.extractor = model.features
            head_obj = Objective(
                copy.deepcopy(model.top).double(),
                objective.loss_fn,
                objective.l2,
                params=[n[len("top.") :] for n in objective.names],
                measurement=objective.measurement,
            )
            self.f = self._features(self.x)
            closed = (
                objective.loss_name == "binary_logistic"
                and objective.builtin_loss
                and objective.measurement is None
                and (solver == "exact" or isinstance(solver, Exact))
                and retrain in ("newton", "lbfgs")
                and _is_linear_head(model.top, head_obj, self.f)
            )
            self.engine = (
                _LogisticEngine(objective.l2, float(damping), float(tol))
                if closed
                else _GenericEngine(head_obj, solver, float(damping), retrain, float(tol))
            )
        else:
            # a private copy: the attack moves its theta, never the caller's objective's
            work = Objective(
                model,
                objective.loss_fn,
                objective.l2,
                params=objective.names,
                measurement=objective.measurement,
            )
            self.f = self.x
            self.engine = _GenericEngine(work, solver, float(damping), retrain, float(tol))
        if refit_start:
            self.theta0 = self.engine.refit(self.theta0.to(self.engine.dtype), self.f, self.y)

    # ------------------------------------------------------------------ helpers
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return extract_features(self.extractor, x, self.chunk_size).double()

    def _target_inputs(self, x_t: torch.Tensor) -> torch.Tensor:
        x_t = x_t.to(self.objective.dtype)
        return self._features(x_t) if self.fast else x_t

    def _pixel_grads(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Chain rule through the frozen extractor: ``J(x_i)^T u_i`` for every row, batched.

        ``u`` is ``[B, d]`` (feature-space gradients); one forward and one backward pass.
        """
        out = []
        for j in range(0, x.shape[0], self.chunk_size):
            xb = x[j : j + self.chunk_size].detach().requires_grad_(True)
            with torch.enable_grad():
                fb = self.extractor(xb)
                (gx,) = torch.autograd.grad(
                    fb, xb, grad_outputs=u[j : j + xb.shape[0]].to(fb.dtype)
                )
            out.append(gx)
        return torch.cat(out, 0)

    def _input_grads(
        self, s: torch.Tensor, theta: torch.Tensor, inputs: torch.Tensor, x: torch.Tensor, y
    ) -> torch.Tensor:
        """``[B, *x]``: ``g_i = grad_x (s . grad_theta loss(z_i)) = -I_pert,loss(z_i)``."""
        u = self.engine.input_grads(s.reshape(1, -1), theta, inputs, y)[0]
        return self._pixel_grads(u, x) if self.fast else u

    def _state(self, theta: torch.Tensor, ft: torch.Tensor, yt: torch.Tensor):
        out = self.engine.outputs(theta, ft)
        loss = float(self.engine.measurements(theta, ft, yt).mean())
        pred = predicted_labels(self.objective, out)
        if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
            p1 = torch.sigmoid(out.reshape(-1))
            p_true = torch.where(_as_class(yt) == 1, p1, 1 - p1)
        elif out.ndim == 2:
            p_true = out.softmax(1).gather(1, _as_class(yt)[:, None])[:, 0]
        else:
            p_true = torch.full((out.shape[0],), float("nan"))
        return pred != _as_class(yt), loss, p_true.detach()

    # ------------------------------------------------------------------ public API
    def rank(
        self,
        targets: tuple[torch.Tensor, torch.Tensor],
        candidates: Sequence[int] | torch.Tensor | None = None,
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
        th = self.theta0.to(self.engine.dtype)
        s = self.engine.s_test(th, self.f, self.y, self._target_inputs(x_t), y_t, mean=True)[0]
        parts = []
        for j in range(0, cand.numel(), self.chunk_size):
            c = cand[j : j + self.chunk_size]
            g = self._input_grads(s, th, self.f[c], self.x[c], self.y[c])
            parts.append(g.reshape(g.shape[0], -1).abs().sum(1))
        l1 = torch.cat(parts)
        order = torch.argsort(l1, descending=True)
        return cand[order], l1[order]

    def rank_each(
        self,
        targets: tuple[torch.Tensor, torch.Tensor],
        top: int = 10,
        target_chunk: int = 100,
        strategy: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`rank` for every target *separately*, keeping the ``top`` best of each.

        For a FeatureModel the extractor's Jacobian ``J_i = d features / d x_i`` is formed once
        per training image (``d`` backward passes) and reused for every target:
        ``g_i = J_i^T u_i`` with ``u_i`` the gradient with respect to the features. That is
        ``d`` backward passes per training image instead of one per (image, target) pair.
        Same numbers as :meth:`rank` up to rounding. ``strategy``: ``"jacobian"``,
        ``"per_target"`` (one :meth:`rank` per target) or ``"auto"`` (Jacobians when the
        targets outnumber half the feature dimension).

        Returns:
            ``(indices [m, top], l1 [m, top])``, best first.
        """
        x_t, y_t = targets
        m = x_t.shape[0]
        n = self.x.shape[0]
        top = min(int(top), n)
        d = self.f.shape[1]
        # Jacobians cost d backward passes per training image, per-target ranking m: use the
        # Jacobians only when there are more targets than about half the feature dimension.
        if not self.fast or (strategy == "auto" and m <= d // 2) or strategy == "per_target":
            rows = [self.rank((x_t[j : j + 1], y_t[j : j + 1])) for j in range(m)]
            return (
                torch.stack([r[0][:top] for r in rows]),
                torch.stack([r[1][:top] for r in rows]),
            )
        th = self.theta0.to(self.engine.dtype)
        s_all = self.engine.s_test(th, self.f, self.y, self._target_inputs(x_t), y_t, mean=False)
        best_v = torch.full((m, top), -math.inf, dtype=torch.float64)
        best_i = torch.zeros((m, top), dtype=torch.long)
        chunk = 16
        bar = tqdm(
            range(0, n, chunk), desc="Ranking (Jacobians)", disable=not self.progress, leave=False
        )
        for start in bar:
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
                s = s_all[t0 : t0 + target_chunk]
                u = self.engine.input_grads(s, th, fb, yb)  # [k, B, d]
                l1 = torch.einsum("kbd,bdD->kbD", u.to(jb.dtype), jb).abs().sum(-1).double()
                vals = torch.cat([best_v[t0 : t0 + target_chunk], l1], 1)
                idx = torch.cat([best_i[t0 : t0 + target_chunk], ids.expand(l1.shape[0], -1)], 1)
                v, pos = vals.topk(top, dim=1)
                best_v[t0 : t0 + target_chunk] = v
                best_i[t0 : t0 + target_chunk] = idx.gather(1, pos)
        return best_i, best_v

    def run(
        self,
        targets: tuple[torch.Tensor, torch.Tensor],
        indices: Sequence[int] | torch.Tensor,
        iterations: int = 100,
        early_stop: bool = True,
        step: float | None = None,
    ) -> AttackResult:
        """Attack: perturb ``indices`` for up to ``iterations`` steps to raise the target loss.

        Starts from the original data and theta every time (attempts are independent).

        Args:
            targets: ``(X_T, y_T)``, one or several test points; their *mean* loss is raised.
            indices: training points to perturb (e.g. ``rank(targets)[0][:k]``).
            iterations: maximum number of steps.
            early_stop: stop once every initially correct target is mispredicted.
            step: override the step size (model units) for this run.

        Returns:
            An :class:`AttackResult`.
        """
        t_start = time.perf_counter()
        x_t, y_t = targets
        if x_t.shape[0] != y_t.shape[0] or x_t.shape[0] == 0:
            raise InputError("targets must be a non-empty pair (X_T, y_T) of equal length")
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() == 0:
            raise InputError("indices is empty: choose at least one training point to poison")
        if idx.unique().numel() != idx.numel():
            raise InputError("indices contains repeats")
        if int(idx.min()) < 0 or int(idx.max()) >= self.x.shape[0]:
            raise InputError(f"indices must lie in [0, {self.x.shape[0] - 1}]")
        alpha = self.step if step is None else float(step)
        ft = self._target_inputs(x_t)
        x0 = self.x[idx].clone()
        xp = x0.clone()
        yp = self.y[idx]
        inputs = self.f.clone()
        f_before = self.f[idx].clone() if self.fast else None
        theta = self.theta0.to(self.engine.dtype).clone()
        flipped, loss0, p0 = self._state(theta, ft, y_t)
        correct0 = ~flipped
        history: list[dict[str, float]] = []
        done = 0
        bar = tqdm(range(iterations), desc="Attack", disable=not self.progress, leave=False)
        for _ in bar:
            if early_stop and bool(correct0.any()) and bool(flipped[correct0].all()):
                break
            # 1. s_test at the current, retrained theta (fresh Hessian)
            s = self.engine.s_test(theta, inputs, self.y, ft, y_t, mean=True)[0]
            # 2-3. signed step along sign(I_pert,loss) = -sign(g), projected onto the box
            g = self._input_grads(s, theta, inputs[idx], xp, yp)
            xp = self.box.project(xp - alpha * torch.sign(g), x0)
            # 4. new features (or inputs) of the poisoned points only
            inputs[idx] = self._features(xp) if self.fast else xp
            # 5. exact refit, warm-started
            theta = self.engine.refit(theta, inputs, self.y)
            flipped, loss, _ = self._state(theta, ft, y_t)
            done += 1
            history.append({"target_loss": loss, "n_flipped": int((flipped & correct0).sum())})
            bar.set_postfix(loss=f"{loss:.3f}", flipped=history[-1]["n_flipped"])
        bar.close()
        flipped, loss1, p1 = self._state(theta, ft, y_t)
        return AttackResult(
            indices=idx,
            x_poisoned=xp.detach(),
            x_original=x0,
            theta=theta.detach(),
            theta_original=self.theta0.detach().clone(),
            iterations=done,
            flipped=flipped,
            initially_correct=correct0,
            target_loss_before=loss0,
            target_loss_after=loss1,
            prob_true_before=p0,
            prob_true_after=p1,
            feature_change=None if f_before is None else (inputs[idx] - f_before).norm(dim=1),
            history=history,
            seconds=time.perf_counter() - t_start,
        )

    def run_many(
        self,
        targets: tuple[torch.Tensor, torch.Tensor],
        indices: torch.Tensor,
        iterations: int = 100,
        early_stop: bool = True,
        step: float | None = None,
        batch: int = 256,
    ) -> list[AttackResult]:
        """``K`` independent single-target attacks: attack ``t`` poisons ``indices[t]`` against
        target ``t``, exactly as ``run((X_T[t:t+1], y_T[t:t+1]), indices[t])`` would.

        For the closed-form logistic top layer the ``K`` attacks run together, ``batch`` at a
        time: each product with the training features is one matrix-matrix product for all of
        them, and the poisoned images of all attacks pass through the extractor as one batch.
        Otherwise this is a loop over :meth:`run`. ``seconds`` of each result is its share of
        the batch's wall time.

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
        if idx.shape[0] == 0 or idx.shape[1] == 0:
            raise InputError("run_many needs at least one target and one index per target")
        if int(idx.min()) < 0 or int(idx.max()) >= self.x.shape[0]:
            raise InputError(f"indices must lie in [0, {self.x.shape[0] - 1}]")
        if bool((idx.sort(1).values.diff(dim=1) == 0).any()):
            raise InputError("a row of indices contains repeats")
        if not (self.fast and isinstance(self.engine, _LogisticEngine)):
            return [
                self.run((x_t[t : t + 1], y_t[t : t + 1]), idx[t], iterations, early_stop, step)
                for t in range(idx.shape[0])
            ]
        out: list[AttackResult] = []
        for s in range(0, idx.shape[0], int(batch)):
            sl = slice(s, s + int(batch))
            out += self._run_batched(x_t[sl], y_t[sl], idx[sl], iterations, early_stop, step)
        return out

    def _run_batched(self, x_t, y_t, P, iterations, early_stop, step) -> list[AttackResult]:
        t_start = time.perf_counter()
        eng = self.engine
        assert isinstance(eng, _LogisticEngine)
        alpha = self.step if step is None else float(step)
        K, k = P.shape
        theta0 = self.theta0.to(torch.float64)
        B = _BatchedLogistic(eng, self.f, self.y, theta0)
        ft = self._target_inputs(x_t)  # [K, p]
        yts = eng._signs(y_t)
        x0 = self.x[P.reshape(-1)].reshape(K, k, *self.x.shape[1:]).clone()
        xp = x0.clone()
        fp0 = self.f[P].clone()  # [K, k, p]
        fp = fp0.clone()
        yp = self.y[P]  # [K, k]
        th = theta0.expand(K, -1).clone()
        s_prev: torch.Tensor | None = None

        cls = _as_class(y_t)

        def state(th_: torch.Tensor, rows: torch.Tensor | slice = slice(None)):
            z = (ft[rows] * th_).sum(1)
            m = yts[rows] * z
            return (z > 0).long() != cls[rows], F.softplus(-m), torch.sigmoid(m)

        flipped, loss0, p0 = state(th)
        correct0 = ~flipped
        done_it = torch.zeros(K, dtype=torch.long)
        live = torch.ones(K, dtype=torch.bool)
        history: list[list[dict[str, float]]] = [[] for _ in range(K)]
        for _ in range(iterations):
            if early_stop:
                live &= ~(correct0 & flipped)
            if not bool(live.any()):
                break
            a = live.nonzero()[:, 0]
            Pa, fa, tha = P[a], fp[a], th[a]
            # 1. s_test at the current theta of every live attack (warm start)
            gt = (-yts[a] * torch.sigmoid(-yts[a] * (ft[a] * tha).sum(1)))[:, None] * ft[a]
            x_init = None if s_prev is None else s_prev[a]
            s = B.solve(tha, Pa, fa, gt, eng.l2 + eng.damping, x_init)
            if s_prev is None:
                s_prev = torch.zeros(K, s.shape[1], dtype=s.dtype)
            s_prev[a] = s
            # 2-3. feature-space gradients, then through the extractor in one batch
            ysp = eng._signs(yp[a])  # [A, k]
            zp = (fa * tha[:, None, :]).sum(-1)
            coef_s = -ysp * torch.sigmoid(-ysp * zp)  # [A, k]
            coef_t = torch.sigmoid(zp) * torch.sigmoid(-zp) * (fa * s[:, None, :]).sum(-1)
            u = coef_s[..., None] * s[:, None, :] + coef_t[..., None] * tha[:, None, :]
            A = a.numel()
            xa = xp[a].reshape(A * k, *self.x.shape[1:])
            g = self._pixel_grads(u.reshape(A * k, -1), xa)
            xa = self.box.project(xa - alpha * torch.sign(g), x0[a].reshape_as(xa))
            xp[a] = xa.reshape(A, k, *self.x.shape[1:])
            # 4. new features of the poisoned images
            fp[a] = self._features(xa).reshape(A, k, -1)
            # 5. exact refits
            th[a] = B.refit(tha, Pa, fp[a])
            fl, ls, _ = state(th[a], a)
            flipped[a] = fl
            done_it[a] += 1
            nf = (fl & correct0[a]).long().tolist()
            for r, t in enumerate(a.tolist()):
                history[t].append({"target_loss": float(ls[r]), "n_flipped": nf[r]})
        flipped, loss1, p1 = state(th)
        share = (time.perf_counter() - t_start) / K
        return [
            AttackResult(
                indices=P[t].clone(),
                x_poisoned=xp[t].detach(),
                x_original=x0[t],
                theta=th[t].detach(),
                theta_original=self.theta0.detach().clone(),
                iterations=int(done_it[t]),
                flipped=flipped[t : t + 1],
                initially_correct=correct0[t : t + 1],
                target_loss_before=float(loss0[t]),
                target_loss_after=float(loss1[t]),
                prob_true_before=p0[t : t + 1],
                prob_true_after=p1[t : t + 1],
                feature_change=(fp[t] - fp0[t]).norm(dim=1),
                history=history[t],
                seconds=share,
            )
            for t in range(K)
        ]

    def run_schedule(
        self,
        targets: tuple[torch.Tensor, torch.Tensor],
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
