"""Which training labels to check first: rank training points by self-influence (Sec. 5.4).

A point whose label is wrong tends to be one the model bends towards: its own loss would drop a
lot if it were upweighted. The paper ranks training points by (minus) their self-influence

    ``-I_up,loss(z_i, z_i) = grad loss(z_i)^T H^-1 grad loss(z_i) >= 0``    (largest first),

with ``H`` the Hessian of the regularised mean training risk (``l2 I`` included) and the plain
loss gradient on both sides (no ``l2 theta`` term). For linear binary logistic regression
``grad loss(z_i) = -sigma(-y_i theta^T x_i) y_i x_i``, so the score is
``sigma(-y_i theta^T x_i)^2 x_i^T H^-1 x_i``; the 2017 release code used the first power of
sigma instead (a bug fixed in 2020, PROTOCOL.md section 6), available here as the
``"influence_sigma1"`` method. The baselines the paper compares against are the training loss
(largest first) and a random order.

:func:`rank_for_review` orders the training points of a fitted :class:`inflens.Influence`;
:func:`simulate_label_fixing` runs the paper's experiment on any model: flip a fraction of the
training labels, check the top-ranked fraction, fix the flipped labels found there, refit and
measure the test accuracy.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import Data, DataLike
from ..errors import InputError
from ..influence import Influence
from ..objective import Objective
from .labels import as_classes, predict_labels

#: Ranking methods understood by :func:`rank_for_review` and :func:`simulate_label_fixing`.
METHODS = ("influence", "influence_sigma1", "loss", "random")

#: ``(objective at theta, (x_train, y_train)) -> [n]`` scores; higher = check first.
Scorer = Callable[[Objective, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
#: ``(objective, (x_train, y_train), theta0) -> theta``: minimise the regularised mean risk.
Fitter = Callable[[Objective, tuple[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor]


def objective_at(objective: Objective, theta: torch.Tensor) -> Objective:
    """A shallow copy of ``objective`` whose theta-hat is ``theta`` (the model is not touched).

    Every :class:`Objective` computation uses ``self.theta`` through ``functional_call``, so a
    copy with another ``theta`` is the same model evaluated at other parameters.
    """
    theta = torch.as_tensor(theta).detach()
    if theta.shape != objective.theta.shape:
        raise InputError(
            f"theta has shape {tuple(theta.shape)}, the objective has {objective.p} parameters"
        )
    out = copy.copy(objective)
    out.theta = theta.to(objective.theta).clone()
    return out


def training_losses(
    objective: Objective, train: DataLike | Data, batch_size: int | None = 4096
) -> torch.Tensor:
    """``[n]`` per-example training losses at ``objective.theta`` (no regulariser)."""
    data = train if isinstance(train, Data) else Data(train, "training data")
    out = []
    with torch.no_grad():
        for start, x, y in data.chunks(batch_size):
            x, y = objective.prepare(x, y, data.name, start)
            out.append(objective.losses(objective.theta, x, y))
    return torch.cat(out)


def self_influence_scores(influence: Influence, variant: str = "sigma2") -> torch.Tensor:
    """``[n]`` non-negative review scores from a fitted :class:`Influence` (largest = check first).

    ``variant="sigma2"``: ``grad loss(z_i)^T H^-1 grad loss(z_i) = -I_up,loss(z_i, z_i)`` (no
    ``l2 theta`` term), the paper's ranking, for any model and loss.
    ``variant="sigma1"``: the 2017 code's ``sigma(-y_i s_i) x_i^T H^-1 x_i``, defined for the
    ``"binary_logistic"`` loss only; it equals the sigma2 score divided by
    ``sigma(-y_i s_i) = 1 - exp(-loss_i)`` (exact for a linear model without bias).
    """
    if variant not in ("sigma2", "sigma1"):
        raise InputError(f"variant must be 'sigma2' or 'sigma1', got {variant!r}")
    scores = -influence.self_influence(include_l2_gradient=False)
    if variant == "sigma1":
        obj = influence.objective
        if obj.loss_name != "binary_logistic":
            raise InputError(
                "the sigma1 (2017 code) variant is defined for the 'binary_logistic' loss only, "
                f"this objective uses {obj.loss_name!r}; use variant='sigma2'"
            )
        # sigma(-y s) = 1 - p(y|x) = -expm1(-loss): accurate also for tiny losses.
        weight = -torch.expm1(-training_losses(obj, influence.train))
        scores = torch.where(
            weight > 0, scores / weight.clamp_min(1e-300), torch.zeros_like(scores)
        )
    return scores


def _dense_rows(x: Any, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    rows = x[start:stop]
    if hasattr(rows, "toarray"):  # scipy.sparse
        rows = rows.toarray()
    return torch.as_tensor(rows, dtype=dtype)


def logistic_gram(x: Any) -> torch.Tensor:
    """``X X^T`` as a dense float64 ``[n, n]`` tensor (``x`` dense or ``scipy.sparse``)."""
    if hasattr(x, "tocsr"):
        xs = x.tocsr().astype(np.float64)
        return torch.from_numpy(np.asarray((xs @ xs.T).toarray()))
    xt = torch.as_tensor(x, dtype=torch.float64)
    return xt @ xt.T


def logistic_leverage(
    x: Any,
    theta: Any,
    l2: float,
    damping: float = 0.0,
    method: str = "auto",
    gram: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``q_i = x_i^T H^-1 x_i`` for linear binary logistic regression (no bias), ``[n]`` float64.

    ``H = (1/n) X^T diag(p (1 - p)) X + (l2 + damping) I`` with ``p = sigma(X theta)`` (labels do
    not enter ``H``). Two exact ways:

    - ``"primal"``: Cholesky factor ``L`` of the ``[p, p]`` matrix ``H``, then
      ``q_i = ||L^-1 x_i||^2`` on chunks of rows; ``O(n p^2 + p^3)`` time, ``O(p^2)`` memory.
    - ``"dual"`` (for ``n < p``, e.g. bag-of-words): with ``K = X X^T``, ``s = sqrt(p(1-p)/n)``,
      ``c = l2 + damping`` and ``M = c I + diag(s) K diag(s)`` (Woodbury),
      ``q_i = (K_ii - ||L_M^-1 (s * K[:, i])||^2) / c``; ``O(n^3)`` time, ``O(n^2)`` memory.
      Pass a precomputed ``gram = X X^T`` (:func:`logistic_gram`) to reuse it across refits.

    ``"auto"`` takes the dual form when ``n < p``.

    Args:
        x: ``[n, p]`` features: a tensor, a numpy array or a ``scipy.sparse`` matrix.
        theta: ``[p]`` weights (the model's logit is ``x @ theta``).
        l2: weight of ``(l2/2) ||theta||^2`` on the mean loss.
    """
    if method not in ("auto", "primal", "dual"):
        raise InputError(f"method must be 'auto', 'primal' or 'dual', got {method!r}")
    dt = torch.float64
    x, theta_t = _logistic_inputs(x, theta)
    n, p = x.shape
    shift = float(l2) + float(damping)
    if not shift > 0:
        raise InputError("logistic regression self-influence needs l2 + damping > 0")
    prob = torch.sigmoid(_logits(x, theta_t))
    curv = prob * (1 - prob) / n  # H = X^T diag(curv) X + shift I
    if method == "auto":
        method = "dual" if n < p else "primal"
    quad = torch.empty(n, dtype=dt)
    if method == "primal":
        if hasattr(x, "tocsr"):
            h = torch.from_numpy(np.asarray((x.T @ x.multiply(curv.numpy()[:, None])).todense()))
        else:
            h = (x.T * curv) @ x
        h = 0.5 * (h + h.T)
        h.diagonal().add_(shift)
        chol = torch.linalg.cholesky(h)
        for s in range(0, n, chunk_size):
            z = torch.linalg.solve_triangular(
                chol, _dense_rows(x, s, s + chunk_size, dt).T, upper=False
            )
            quad[s : s + chunk_size] = (z * z).sum(0)
        return quad
    k = logistic_gram(x) if gram is None else torch.as_tensor(gram, dtype=dt)
    if k.shape != (n, n):
        raise InputError(f"gram must be X X^T of shape [{n}, {n}], got {tuple(k.shape)}")
    sq = curv.sqrt()
    m = sq[:, None] * k * sq[None, :]
    m.diagonal().add_(shift)
    chol = torch.linalg.cholesky(m)
    diag = k.diagonal()
    for s in range(0, n, chunk_size):
        w = torch.linalg.solve_triangular(chol, sq[:, None] * k[:, s : s + chunk_size], upper=False)
        quad[s : s + chunk_size] = (diag[s : s + chunk_size] - (w * w).sum(0)) / shift
    return quad


def _logistic_inputs(x: Any, theta: Any) -> tuple[Any, torch.Tensor]:
    x = x.tocsr().astype(np.float64) if hasattr(x, "tocsr") else torch.as_tensor(x).double()
    theta_t = torch.as_tensor(theta).double().reshape(-1)
    if len(x.shape) != 2 or x.shape[1] != theta_t.numel():
        raise InputError(
            f"x must be [n, p] with p = len(theta) = {theta_t.numel()}, got {tuple(x.shape)}"
        )
    return x, theta_t


def _logits(x: Any, theta: torch.Tensor) -> torch.Tensor:
    if hasattr(x, "tocsr"):
        return torch.from_numpy(np.asarray(x @ theta.numpy()))
    return x @ theta


def logistic_residual_weight(x: Any, y: Any, theta: Any) -> torch.Tensor:
    """``sigma(-y_i theta^T x_i) = 1 - p(y_i | x_i)``, ``[n]`` (labels 0/1 or -1/+1)."""
    x, theta_t = _logistic_inputs(x, theta)
    ys = torch.where(torch.as_tensor(np.asarray(y)).double() > 0, 1.0, -1.0).double()
    if ys.shape != (x.shape[0],):
        raise InputError(f"y must have {x.shape[0]} labels, got shape {tuple(ys.shape)}")
    return torch.sigmoid(-ys * _logits(x, theta_t))


def logistic_self_influence(
    x: Any,
    y: Any,
    theta: Any,
    l2: float,
    variant: str = "sigma2",
    damping: float = 0.0,
    method: str = "auto",
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Closed-form review scores of linear binary logistic regression (no bias), ``[n]``.

    ``score_i = sigma(-y_i theta^T x_i)^k x_i^T H^-1 x_i`` with ``k = 2`` (``"sigma2"``, equal to
    ``-I_up,loss(z_i, z_i)`` without the ``l2 theta`` term) or ``k = 1`` (``"sigma1"``, the 2017
    code); ``x_i^T H^-1 x_i`` from :func:`logistic_leverage` (same ``damping``, ``method``,
    ``gram``). Much cheaper than the general path when ``p`` is in the thousands.

    Args:
        x: ``[n, p]`` features: a tensor, a numpy array or a ``scipy.sparse`` matrix.
        y: ``[n]`` labels in {0, 1} or {-1, +1}.
        theta: ``[p]`` weights.
        l2: weight of ``(l2/2) ||theta||^2`` on the mean loss.
    """
    if variant not in ("sigma2", "sigma1"):
        raise InputError(f"variant must be 'sigma2' or 'sigma1', got {variant!r}")
    weight = logistic_residual_weight(x, y, theta)
    quad = logistic_leverage(x, theta, l2, damping, method, gram)
    return quad * weight**2 if variant == "sigma2" else quad * weight


def _builtin_scorer(name: str, solver: Any) -> Scorer:
    if name == "loss":
        return lambda obj, train: training_losses(obj, train)
    if name in ("influence", "influence_sigma1"):
        variant = "sigma2" if name == "influence" else "sigma1"

        def score(obj: Objective, train: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            inf = Influence(obj, train, solver=copy.deepcopy(solver), progress=False).fit()
            return self_influence_scores(inf, variant)

        return score
    raise InputError(f"unknown method {name!r}; use one of {', '.join(METHODS)} or a callable")


def review_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorted by decreasing score (ties by index, so the order is deterministic)."""
    s = torch.as_tensor(scores).detach().cpu().double().numpy()
    return torch.from_numpy(np.lexsort((np.arange(s.size), -s)).astype(np.int64))


def rank_for_review(influence: Influence, method: str = "influence", seed: int = 0) -> torch.Tensor:
    """Training indices in the order to check their labels, most suspicious first.

    Args:
        influence: a fitted :class:`Influence` of the model trained on the (noisy) labels.
        method: ``"influence"`` (self-influence, sigma^2 form), ``"influence_sigma1"`` (the
            2017 code's form, binary logistic loss only), ``"loss"`` (training loss, largest
            first) or ``"random"``.
        seed: seed of the ``"random"`` order.

    Example:
        >>> inf = Influence(obj, (X, y_noisy), solver="exact").fit()
        >>> order = rank_for_review(inf)       # check X[order[:50]] by hand first
    """
    if method == "random":
        return torch.from_numpy(np.random.RandomState(seed).permutation(influence.n))
    if method == "loss":
        return review_order(training_losses(influence.objective, influence.train))
    if method in ("influence", "influence_sigma1"):
        variant = "sigma2" if method == "influence" else "sigma1"
        return review_order(self_influence_scores(influence, variant))
    raise InputError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")


# ---------------------------------------------------------------------------------- simulation
def flip_labels(
    y: torch.Tensor, indices: np.ndarray, rng: np.random.RandomState, num_classes: int | None = None
) -> torch.Tensor:
    """A copy of ``y`` with the labels at ``indices`` changed.

    Binary labels: ``0 <-> 1`` or ``-1 <-> +1``; ``num_classes`` given: a uniformly random
    other class.
    """
    y = y.clone()
    idx = torch.as_tensor(indices, dtype=torch.long)
    if num_classes is None:
        vals = set(torch.unique(y).tolist())
        if vals <= {0, 1}:
            y[idx] = 1 - y[idx]
        elif vals <= {-1, 1}:
            y[idx] = -y[idx]
        else:
            raise InputError(
                f"labels {sorted(vals)[:10]} are not binary; pass num_classes to flip them"
            )
        return y
    shift = torch.as_tensor(rng.randint(1, num_classes, size=len(indices)), dtype=y.dtype)
    y[idx] = (y[idx] + shift) % num_classes
    return y


def _default_fitter(tol: float, max_iter: int) -> Fitter:
    def fit(obj: Objective, train: tuple[torch.Tensor, torch.Tensor], theta0: torch.Tensor):
        from ..train import fit_lbfgs  # trainers sit beside the influence engine

        return fit_lbfgs(obj, train, theta0=theta0, tol=tol, max_iter=max_iter).theta

    return fit


@dataclass
class LabelFixingResult:
    """Outcome of :func:`simulate_label_fixing`; arrays are ``[repeats, len(check_counts)]``.

    ``fixed`` counts the flipped labels found (and restored) among the checked points;
    ``accuracy`` / ``test_loss`` are measured after refitting on the partly fixed labels.
    ``flipped_*`` describe the model trained on the flipped labels (nothing checked) and
    ``clean_*`` the model trained on the true labels.
    """

    n_train: int
    n_flipped: int
    check_counts: list[int]
    methods: list[str]
    accuracy: dict[str, np.ndarray]
    test_loss: dict[str, np.ndarray]
    fixed: dict[str, np.ndarray]
    flipped_accuracy: np.ndarray
    flipped_test_loss: np.ndarray
    clean_accuracy: float
    clean_test_loss: float
    seeds: list[int]
    refits: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def repeats(self) -> int:
        return int(self.flipped_accuracy.shape[0])

    @property
    def check_fractions(self) -> list[float]:
        """Fraction of the training set checked at each step (``count / n_train``)."""
        return [c / self.n_train for c in self.check_counts]

    def summary(self) -> dict[str, Any]:
        """Means and standard errors (``std / sqrt(repeats)``, ``ddof=0``) per method and step.

        ``fraction_fixed = fixed / n_flipped``. Step 0 (nothing checked) is included first.
        """
        r = self.repeats

        def stats(a: np.ndarray) -> tuple[list[float], list[float]]:
            return a.mean(0).tolist(), (a.std(0) / np.sqrt(r)).tolist()

        out: dict[str, Any] = {
            "fraction_checked": [0.0, *self.check_fractions],
            "repeats": r,
            "n_flipped": self.n_flipped,
            "clean_accuracy": self.clean_accuracy,
            "methods": {},
        }
        for m in self.methods:
            acc = np.concatenate([self.flipped_accuracy[:, None], self.accuracy[m]], 1)
            loss = np.concatenate([self.flipped_test_loss[:, None], self.test_loss[m]], 1)
            fixed = np.concatenate([np.zeros((r, 1)), self.fixed[m] / self.n_flipped], 1)
            (am, ase), (lm, lse), (fm, fse) = stats(acc), stats(loss), stats(fixed)
            out["methods"][m] = {
                "accuracy": am,
                "accuracy_se": ase,
                "test_loss": lm,
                "test_loss_se": lse,
                "fraction_fixed": fm,
                "fraction_fixed_se": fse,
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready lists (raw per-repeat values and the summary)."""
        return {
            "n_train": self.n_train,
            "n_flipped": self.n_flipped,
            "check_counts": self.check_counts,
            "seeds": self.seeds,
            "refits": self.refits,
            "clean_test_loss": self.clean_test_loss,
            "raw": {
                "flipped_accuracy": self.flipped_accuracy.tolist(),
                "flipped_test_loss": self.flipped_test_loss.tolist(),
                **{
                    m: {
                        "accuracy": self.accuracy[m].tolist(),
                        "test_loss": self.test_loss[m].tolist(),
                        "fixed": self.fixed[m].tolist(),
                    }
                    for m in self.methods
                },
            },
            "summary": self.summary(),
            **({"info": self.info} if self.info else {}),
        }

    def plot(
        self, path: str | Path, title: str | None = None, labels: Mapping[str, str] | None = None
    ) -> Path:
        """Fig 6: test accuracy and fraction of flips fixed against fraction checked (SE bars)."""
        from matplotlib.figure import Figure

        s = self.summary()
        x = s["fraction_checked"]
        fig = Figure(figsize=(8.5, 3.9), layout="constrained")
        ax_acc, ax_fix = fig.subplots(1, 2)
        for m in self.methods:
            st = s["methods"][m]
            name = (labels or {}).get(m, m)
            ax_acc.errorbar(
                x, st["accuracy"], yerr=st["accuracy_se"], label=name, capsize=2, marker="o", ms=3
            )
            ax_fix.errorbar(
                x,
                st["fraction_fixed"],
                yerr=st["fraction_fixed_se"],
                label=name,
                capsize=2,
                marker="o",
                ms=3,
            )
        ax_acc.axhline(self.clean_accuracy, ls="--", color="k", lw=1, label="clean data")
        ax_acc.set_xlabel("fraction of training data checked")
        ax_acc.set_ylabel("test accuracy")
        ax_fix.set_xlabel("fraction of training data checked")
        ax_fix.set_ylabel("fraction of flips fixed")
        handles, names = ax_acc.get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncol=5, fontsize=7, frameon=False)
        if title:
            fig.suptitle(title, fontsize=9)
        path = Path(path)
        fig.savefig(path, dpi=110)
        return path


def _as_pair(data: DataLike, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = Data(data, name)
    return d.get(torch.arange(len(d)))


@dataclass(frozen=True)
class LabelFixingConfig:
    """Settings of :func:`simulate_label_fixing` (validated on creation).

    Attributes:
        flip_fraction: fraction of training labels flipped per repeat.
        check_fractions: fractions of the training set checked (one refit each).
        methods: names from :data:`METHODS`, or a mapping from a display name to a name or a
            scorer ``(objective at theta, (x, y_flipped)) -> [n]`` (higher = check first).
        repeats: independent repeats (seed ``seed + 2 r``).
        seed: seed of the first repeat.
        n_flipped, check_counts: exact numbers of points to flip and to check, overriding
            ``flip_fraction`` and ``check_fractions`` (the paper used ``int(n/20) * k``).
        fit: ``(objective, (x, y), theta0) -> theta`` minimising the regularised mean risk;
            default :func:`inflens.train.fit_lbfgs` with ``tol`` (gradient 2-norm; 1e-8 as the
            paper's scikit-learn fits) and ``max_iter``.
        tol, max_iter: of the default fit.
        solver: inverse-HVP solver of the built-in influence scorers.
        num_classes: flip to a random other class of ``num_classes`` (default: binary flip).
        predict: ``outputs -> labels`` for losses other than the built-in classifiers.
        progress: progress bar.
        time_budget_s: start no new repeat after this many seconds; the result then holds the
            completed repeats only (``result.repeats``, ``result.info["stopped_early"]``).
    """

    flip_fraction: float = 0.1
    check_fractions: Sequence[float] = (0.05, 0.10, 0.15, 0.20, 0.25, 0.30)
    methods: Sequence[str] | Mapping[str, str | Scorer] = ("influence", "loss", "random")
    repeats: int = 10
    seed: int = 0
    n_flipped: int | None = None
    check_counts: Sequence[int] | None = None
    fit: Fitter | None = None
    tol: float = 1e-8
    max_iter: int = 1000
    solver: Any = "exact"
    num_classes: int | None = None
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None
    progress: bool = True
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.flip_fraction < 1:
            raise InputError(f"flip_fraction must lie in (0, 1), got {self.flip_fraction}")
        if self.repeats < 1:
            raise InputError(f"repeats must be at least 1, got {self.repeats}")
        if not float(self.tol) > 0 or int(self.max_iter) < 1:
            raise InputError(f"need tol > 0 and max_iter >= 1, got {self.tol}, {self.max_iter}")
        names = self.methods.values() if isinstance(self.methods, Mapping) else self.methods
        for m in names:
            if isinstance(m, str) and m not in METHODS:
                raise InputError(f"unknown method {m!r}; use one of {', '.join(METHODS)}")


def simulate_label_fixing(
    objective: Objective,
    train: DataLike,
    test: DataLike,
    config: LabelFixingConfig | None = None,
) -> LabelFixingResult:
    """Flip labels, check the top-ranked training points, fix, refit, measure (Sec. 5.4, Fig 6).

    For repeat ``r`` (seed ``seed + 2 r``): choose ``int(flip_fraction * n)`` training points
    uniformly without replacement and flip their labels; fit on the flipped labels (warm start
    from the clean fit); score every training point with each method *once* on that model
    (batch selection, not iterative); for each check count ``c = int(f * n)`` restore the true
    label of every flipped point among the ``c`` top-ranked ones and refit (warm start from the
    flipped fit); record test accuracy, test loss and the number fixed. The random order uses
    seed ``seed + 2 r + 1``. Test labels are never flipped.

    Args:
        objective: model, loss and l2 (:class:`inflens.Objective`); its current parameters are
            only the starting point of the first (clean) fit.
        train, test: the data with its true labels.
        config: flips, checks, methods, repeats and refits (:class:`LabelFixingConfig`).

    Returns:
        A :class:`LabelFixingResult` (``.summary()``, ``.plot(path)``, ``.to_dict()``).
    """
    cfg = LabelFixingConfig() if config is None else config
    if not isinstance(cfg, LabelFixingConfig):
        raise InputError(f"config must be a LabelFixingConfig, got {type(cfg).__name__}")
    flip_fraction, check_fractions, methods = cfg.flip_fraction, cfg.check_fractions, cfg.methods
    repeats, seed, n_flipped, check_counts = cfg.repeats, cfg.seed, cfg.n_flipped, cfg.check_counts
    solver, num_classes, predict, progress = cfg.solver, cfg.num_classes, cfg.predict, cfg.progress
    time_budget_s = cfg.time_budget_s
    x_tr, y_tr = _as_pair(train, "training data")
    x_te, y_te = _as_pair(test, "test data")
    x_tr, y_tr = objective.prepare(x_tr, y_tr, "training data")
    x_te, y_te = objective.prepare(x_te, y_te, "test data")
    n = int(x_tr.shape[0])
    if check_counts is None:
        counts = [int(f * n) for f in check_fractions]
    else:
        counts = [int(c) for c in check_counts]
    if not counts or any(c < 1 or c > n for c in counts):
        raise InputError(f"each check must cover between 1 and n={n} points, got {counts}")
    n_flip = int(flip_fraction * n) if n_flipped is None else int(n_flipped)
    if not 1 <= n_flip <= n:
        raise InputError(f"the number of flipped labels must lie in [1, {n}], got {n_flip}")
    if isinstance(methods, Mapping):
        named = dict(methods)
    else:
        named = {m: m for m in methods}
    scorers: dict[str, Scorer | None] = {}
    for name, m in named.items():
        if m == "random":
            scorers[name] = None
        elif isinstance(m, str):
            scorers[name] = _builtin_scorer(m, solver)
        elif callable(m):
            scorers[name] = m
        else:
            raise InputError(f"method {name!r} must be a name or a callable, got {m!r}")
    fitter = cfg.fit or _default_fitter(cfg.tol, cfg.max_iter)

    def measure(theta: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            if predict is None:
                pred, truth = predict_labels(objective, theta, x_te), as_classes(y_te)
            else:
                pred, truth = predict(objective.outputs(theta, x_te)), y_te
            acc = float((pred == truth).double().mean())
            loss = float(objective.losses(theta, x_te, y_te).mean())
        return acc, loss

    theta_clean = fitter(objective, (x_tr, y_tr), objective.theta.clone())
    clean_acc, clean_loss = measure(theta_clean)
    refits = 1
    shape = (repeats, len(counts))
    acc = {m: np.zeros(shape) for m in named}
    tloss = {m: np.zeros(shape) for m in named}
    fixed = {m: np.zeros(shape, dtype=np.int64) for m in named}
    f_acc, f_loss = np.zeros(repeats), np.zeros(repeats)
    seeds = [seed + 2 * r for r in range(repeats)]
    bar = tqdm(range(repeats), desc="Label-fixing repeats", disable=not progress, leave=False)
    t_start = time.perf_counter()
    done = repeats
    for r in bar:
        if time_budget_s is not None and r > 0 and time.perf_counter() - t_start > time_budget_s:
            done = r
            break
        rng = np.random.RandomState(seeds[r])
        flipped = rng.choice(n, size=n_flip, replace=False)
        y_flip = flip_labels(y_tr, flipped, rng, num_classes)
        theta_f = fitter(objective, (x_tr, y_flip), theta_clean)
        refits += 1
        f_acc[r], f_loss[r] = measure(theta_f)
        obj_f = objective_at(objective, theta_f)
        is_flipped = np.zeros(n, dtype=bool)
        is_flipped[flipped] = True
        cache: dict[bytes, tuple[float, float]] = {}
        for name, scorer in scorers.items():
            if scorer is None:
                order = np.random.RandomState(seeds[r] + 1).permutation(n)
            else:
                order = review_order(scorer(obj_f, (x_tr, y_flip))).numpy()
            for j, c in enumerate(counts):
                found = np.sort(order[:c][is_flipped[order[:c]]])
                fixed[name][r, j] = found.size
                key = found.tobytes()
                if key not in cache:
                    if found.size == 0:
                        cache[key] = (f_acc[r], f_loss[r])
                    else:
                        y_fix = y_flip.clone()
                        idx = torch.as_tensor(found, dtype=torch.long)
                        y_fix[idx] = y_tr[idx]
                        cache[key] = measure(fitter(objective, (x_tr, y_fix), theta_f))
                        refits += 1
                acc[name][r, j], tloss[name][r, j] = cache[key]
    return LabelFixingResult(
        n_train=n,
        n_flipped=n_flip,
        check_counts=counts,
        methods=list(named),
        accuracy={m: a[:done] for m, a in acc.items()},
        test_loss={m: a[:done] for m, a in tloss.items()},
        fixed={m: a[:done] for m, a in fixed.items()},
        flipped_accuracy=f_acc[:done],
        flipped_test_loss=f_loss[:done],
        clean_accuracy=clean_acc,
        clean_test_loss=clean_loss,
        seeds=seeds[:done],
        refits=refits,
        info={"stopped_early": done < repeats, "seconds": time.perf_counter() - t_start},
    )
