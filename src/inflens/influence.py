"""Influence queries (Koh & Liang 2017, eqs. 1, 2 and 5) on top of an inverse-HVP solver.

Conventions (those of the paper and its original code):

- ``H = (1/n) sum_i Hess loss(z_i) + l2 I (+ damping I)`` at theta-hat (``diag(l2)`` for a
  per-parameter l2, where every ``l2 * theta`` below is elementwise).
- The *training-side* gradient includes the regulariser's gradient,
  ``g_i = grad loss(z_i) + l2 * theta`` (so that removing ``z_i`` and refitting the mean risk
  over ``n - 1`` points with the same ``l2`` is predicted exactly to first order); the
  *test-side* gradient is that of the measurement alone (the test loss by default).
- ``I_up,loss(z_i, z_test) = -grad L(z_test)^T H^-1 g_i``. **Negative = helpful**: upweighting
  ``z_i`` lowers the test loss. Removing ``z_i`` changes the test loss by about
  ``-I_up,loss / n`` (:meth:`Influence.predicted_loss_change`): positive means removing the
  point would hurt, i.e. it was helpful.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .curvature import Curvature, check_curvature
from .data import Data, DataLike, index_batch
from .errors import InflensWarning, InputError, NotFittedError
from .losses import IGNORE_INDEX
from .memory import budget_bytes, check_budget
from .objective import Objective
from .solvers import Solver, make_solver

Indices = torch.Tensor | Sequence[int] | None
_CLASSIFICATION = ("cross_entropy", "sequence_classification")


def _cat_padded(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate per-token tensors along ``dim``, zero-padding the last (token) axis to the
    longest chunk: a collate function may pad each chunk to its own length, and a padded
    position has no counted token, so its term is exactly 0."""
    t = max(part.shape[-1] for part in parts)
    return torch.cat(
        [torch.nn.functional.pad(part, (0, t - part.shape[-1])) for part in parts], dim
    )


class Influence:
    """Fits the curvature of a trained objective once, then answers influence queries.

    Args:
        objective: the trained model, loss, parameters and l2 (:class:`inflens.Objective`).
        train: the training data: ``(X, y)`` tensors, a ``Dataset`` or a non-shuffling
            ``DataLoader``. Row ``i`` of every score refers to training example ``i``.
        solver: ``"exact"``, ``"cg"``, ``"lissa"`` or a solver object from
            :mod:`inflens.solvers`.
        damping: ``delta >= 0`` added to ``H`` in every solver (Sec. 4.2).
        batch_size: examples per vectorised chunk (``None``: from a 128 MiB budget for the
            ``[chunk, p]`` per-example gradients, at most 512 on a CPU where larger chunks
            run slower). Results do not depend on it.
        progress: show progress bars on passes over the training set.
        scoring: how training points are scored against ``k`` s_test vectors: ``"jvp"``
            (forward-mode directional derivatives, no per-example gradients; best for few test
            points), ``"grad"`` (per-example gradients and one matrix product per chunk) or
            ``"auto"`` (``"jvp"`` for ``k <= 8``).
        curvature: ``"hessian"`` (default) or ``"ggn"``, the generalized Gauss-Newton matrix
            (positive semi-definite, the usual choice for non-convex models) in place of each
            ``Hess loss(z_i)`` in ``H``, for every matrix-free solver (Exact, CG, LiSSA,
            Arnoldi). K-FAC and EK-FAC always approximate the GGN.
        max_memory_gb: the memory budget of every computation that grows with ``n``, ``p``,
            the sequence length or the vocabulary (``None``: half of the memory this process
            may use, :func:`inflens.memory.default_budget_bytes`). Chunk sizes are derived from
            it; what cannot fit raises :class:`~inflens.errors.MemoryBudgetError` before
            allocating.

    Example:
        >>> inf = Influence(obj, (X, y), solver="exact").fit()
        >>> scores = inf.loss_influence((X_test, y_test))   # [n_test, n_train]
    """

    #: the operator ``fit`` builds (inflens.distributed swaps in a sharded one)
    curvature_class: type[Curvature] = Curvature

    def __init__(
        self,
        objective: Objective,
        train: DataLike,
        solver: str | Solver = "exact",
        damping: float = 0.0,
        batch_size: int | None = None,
        progress: bool = True,
        scoring: str = "auto",
        curvature: str = "hessian",
        max_memory_gb: float | None = None,
    ) -> None:
        if not isinstance(objective, Objective):
            raise InputError(
                f"objective must be an inflens.Objective, got {type(objective).__name__}"
            )
        if scoring not in ("auto", "jvp", "grad"):
            raise InputError(f"scoring must be 'auto', 'jvp' or 'grad', got {scoring!r}")
        if batch_size is not None and int(batch_size) < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size}")
        if not (float(damping) >= 0.0):
            raise InputError(f"damping must be a non-negative number, got {damping}")
        self.objective = objective
        self.train = Data(train, "training data")
        self.solver = make_solver(solver)
        self.damping = float(damping)
        self.batch_size = batch_size
        self.progress = progress
        self.scoring = scoring
        self.curvature = check_curvature(curvature)
        if max_memory_gb is not None and not float(max_memory_gb) > 0:
            raise InputError(f"max_memory_gb must be a positive number, got {max_memory_gb}")
        self.max_memory_gb = max_memory_gb
        #: the memory budget of every computation (:mod:`inflens.memory`)
        self.budget_bytes = budget_bytes(max_memory_gb)
        self.curvature_: Curvature | None = None

    # ------------------------------------------------------------------ fitting
    def fit(self) -> Influence:
        """Check the training data against the model and prepare the solver; returns self."""
        obj = self.objective
        x0, y0 = self.train.get(torch.arange(min(len(self.train), 16)))
        x0, y0 = obj.prepare(x0, y0, "training data")
        obj.check_batch(x0, y0, "training data")
        obj.select_backend(x0, y0)  # once, before any pass over the data
        curv = self.curvature_class(
            obj, self.train, self.damping, self.batch_size, self.progress,
            budget_bytes=self.budget_bytes,
        )  # fmt: skip
        curv.curvature = self.curvature  # set after construction: subclasses keep their signature
        self.__dict__.pop("scoring_costs_", None)  # re-measured on the next auto scoring pass
        n_classes = None
        if obj.builtin_loss and obj.loss_name in _CLASSIFICATION:
            with torch.no_grad():
                n_classes = obj.predictions(obj.theta, index_batch(x0, slice(0, 1))).shape[1]
        seen: set[int] = set()  # binary label values over all chunks (to refuse a 0/-1 mix)
        for start, _x, y in curv.chunks(desc="Checking data", check=True):
            if obj.builtin_loss:
                self._check_labels(y, n_classes, start, "training", seen)
        self.n_classes_ = n_classes
        self.solver.fit(curv).canonicalize()  # the layout a reloaded solver will have
        self.curvature_ = curv
        self.model_state_ = obj.state_token()  # queries refuse a model changed after this
        self.n_train_ = curv.n
        return self

    def _check_labels(
        self,
        y: torch.Tensor,
        n_classes: int | None,
        start: int,
        what: str = "training",
        seen: set[int] | None = None,
    ) -> None:
        """Check every label of a chunk (``check_batch`` only sees the first 16 examples).

        ``seen`` collects binary label values across chunks: {0, 1} and {-1, +1} are both
        accepted, but a mix would silently map 0 and -1 to the same class.
        """
        name = self.objective.loss_name
        if name in _CLASSIFICATION and n_classes is not None:
            if y.is_floating_point():
                raise InputError(f"{name!r} needs integer class labels; convert with y.long()")
            if (y == IGNORE_INDEX).any():
                i = int((y == IGNORE_INDEX).nonzero()[0, 0])
                raise InputError(
                    f"{what} label of example {start + i} is -100 (PyTorch's ignore_index): a "
                    "classification loss would give it zero loss and zero influence. Drop such "
                    "examples, or use loss='causal_lm' for token sequences (-100 = not counted)"
                )
            bad = (y < 0) | (y >= n_classes)
            if bad.any():
                i = int(bad.nonzero()[0, 0])
                raise InputError(
                    f"{what} label {int(y[i])} of example {start + i} is outside "
                    f"[0, {n_classes - 1}] for a model with {n_classes} outputs"
                )
        elif name in ("binary_logistic", "hinge", "smooth_hinge"):
            ok = (y == 0) | (y == 1) | (y == -1)
            if not ok.all():
                i = int((~ok).nonzero()[0, 0])
                raise InputError(
                    f"{what} label {y[i].item()} of example {start + i} is not in {{0, 1}} "
                    f"or {{-1, +1}} as {name!r} needs"
                )
            if seen is not None:
                seen.update(int(v) for v in torch.unique(y).tolist())
                if 0 in seen and -1 in seen:
                    raise InputError(
                        f"the {what} labels mix the {{0, 1}} and {{-1, +1}} conventions (both 0 "
                        f"and -1 occur, up to example {start + len(y) - 1}); {name!r} would treat "
                        "0 and -1 as the same class. Use one convention throughout"
                    )

    def _fitted(self) -> Curvature:
        if self.curvature_ is None:
            raise NotFittedError(
                "this Influence is not fitted yet: call .fit() before querying "
                "(e.g. inf = Influence(obj, train).fit())"
            )
        token = getattr(self, "model_state_", None)
        if token is not None and token != self.objective.state_token():
            raise InputError(
                "the model's parameters or buffers changed after fit() (an optimizer step, "
                "load_state_dict, or a forward pass in train mode): the fitted curvature and "
                "theta no longer describe it. Build a new Objective and Influence and fit again"
            )
        return self.curvature_

    @property
    def n(self) -> int:
        """Number of training points."""
        return len(self.train)

    # ------------------------------------------------------------------ building blocks
    def _test_data(self, test: DataLike) -> Data:
        return test if isinstance(test, Data) else Data(test, "test data")

    def _prep_test(
        self, data: Data, start: int, x: torch.Tensor, y: torch.Tensor, seen: set[int] | None = None
    ):
        x, y = self.objective.prepare(x, y, data.name, start)
        if start == 0:
            self.objective.check_batch(index_batch(x, slice(0, 16)), y[:16], data.name)
        if self.objective.builtin_loss:
            # all labels, not only the 16 check_batch saw: an out-of-range class would fail deep
            # inside vmap, and a binary label 2 would silently count as +1
            self._check_labels(y, getattr(self, "n_classes_", None), start, "test", seen)
        return x, y

    def test_gradients(self, test: DataLike) -> torch.Tensor:
        """``[m, p]`` gradients of the measurement at each test point (no regulariser)."""
        curv = self._fitted()
        data = self._test_data(test)
        out = []
        seen: set[int] = set()
        for start, x, y in data.chunks(curv.chunk_size):
            x, y = self._prep_test(data, start, x, y, seen)
            out.append(self.objective.per_example_grads(x, y, "measurement"))
        return torch.cat(out, 0)

    def s_test(self, test: DataLike, mean: bool = False) -> torch.Tensor:
        """``s_test = H^-1 grad L(z_test)`` per test point ``[m, p]``, or ``[1, p]`` of the mean."""
        self._fitted()
        g = self.test_gradients(test)
        if mean:
            g = g.mean(0, keepdim=True)
        return self.solver.solve(g)

    def train_gradients(self, indices: Indices) -> torch.Tensor:
        """``[k, p]`` training-side gradients ``grad loss(z_i) + l2 * theta``."""
        curv = self._fitted()
        x, y = self._get_train(indices)
        g = self.objective.per_example_grads(x, y, "loss")
        return g + curv.objective.regularizer_grad(curv.objective.theta)

    def _get_train(self, indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
        if indices is None:
            indices = torch.arange(self.n)
        x, y = self.train.get(indices)
        return self.objective.prepare(x, y, "training data")

    def _scoring_chunk_size(self, k: int) -> int:
        """The curvature's chunk size, or the backend's larger one (a closed-form Linear head
        scores in chunks of up to 4,096 within 256 MiB)."""
        curv = self._fitted()
        return self.objective.backend.scoring_chunk_size(k, curv.chunk_size, self.n)

    #: the most examples in the probe chunk that times the two scoring methods
    #: (``scoring="auto"``)
    _PROBE = 256
    #: the probe runs 9 passes over its chunk (a warm-up and two timings of three
    #: computations); a chunk of at most ``1 / _PROBE_SHARE`` of the scored examples keeps
    #: it under an eighth of the pass it is meant to speed up
    _PROBE_SHARE = 72
    _PROBE_MIN = 16

    def _use_jvp(self, k: int, n_scored: int | None = None) -> bool:
        """Forward-mode JVPs (cost ~ ``a + b k``) or per-example gradients (cost ~ ``g``)?

        ``"auto"`` measures both once on a probe chunk of the training data (each timed
        after a warm-up), of at most ``1/72`` of the scored examples, and picks the cheaper
        for ``k`` vectors; for passes too short for a probe of 16 examples it uses JVPs for
        ``k <= 8``.
        """
        if self.scoring != "auto":
            return self.scoring == "jvp"
        n = self.n if n_scored is None else n_scored
        if n < self._PROBE_MIN * self._PROBE_SHARE and not hasattr(self, "scoring_costs_"):
            return k <= 8
        cost = self._scoring_costs(n)
        if cost is None:
            return k <= 8
        return cost["jvp_fixed_s"] + cost["jvp_per_vector_s"] * k < cost["per_example_grad_s"]

    def _scoring_costs(self, n_scored: int) -> dict[str, float] | None:
        if hasattr(self, "scoring_costs_"):
            return self.scoring_costs_
        self.scoring_costs_: dict[str, float] | None = None
        obj = self.objective
        if obj.backend.closed_form_scoring:
            return None  # the closed form is used for any k
        probe = min(  # within the budget and a small share of the pass
            self._PROBE, self.n, self._fitted().chunk_size, n_scored // self._PROBE_SHARE
        )
        x, y = self._get_train(torch.arange(max(1, probe)))
        g = torch.Generator(device="cpu").manual_seed(0)
        vecs = torch.randn(4, obj.p, generator=g, dtype=obj.dtype).to(obj.device)

        def timed(fn) -> float:
            fn()  # warm-up: lazy initialisation, allocator
            runs = []
            for _ in range(2):
                t = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - t)
            return min(runs)

        try:
            with obj.evaluating():
                t1 = timed(lambda: obj.loss_jvp(vecs[:1], x, y))
                t4 = timed(lambda: obj.loss_jvp(vecs, x, y))
                tg = timed(lambda: vecs @ obj.per_example_grads(x, y, "loss").T)
        except Exception:  # noqa: BLE001 - a model that fails one path: keep the rule of thumb
            return None
        per_vec = max((t4 - t1) / 3, 0.0)
        self.scoring_costs_ = {
            "jvp_fixed_s": max(t1 - per_vec, 0.0),
            "jvp_per_vector_s": per_vec,
            "per_example_grad_s": tg,
            "probe_examples": int(y.shape[0]),
        }
        return self.scoring_costs_

    def score(self, vecs: torch.Tensor, indices: Indices = None) -> torch.Tensor:
        """``[k, n]`` (or ``[k, len(indices)]``): ``-v_j^T (grad loss(z_i) + l2 theta)``.

        With ``v_j = s_test`` this is ``I_up,loss(z_i, z_test_j)``. One pass over the training
        data: forward-mode JVPs for few vectors, per-example gradients otherwise (``scoring``;
        ``"auto"`` picks the cheaper from a one-off timing), or the closed form of a top
        Linear layer (:mod:`inflens.backends`) for any number of vectors.
        """
        curv = self._fitted()
        obj = self.objective
        s = vecs.reshape(-1, obj.p).to(obj.dtype)
        reg = obj.regularizer_inner(s)
        n_scored = self.n if indices is None else int(torch.as_tensor(indices).numel())
        use_jvp = self._use_jvp(s.shape[0], n_scored)
        chunk = self._scoring_chunk_size(s.shape[0])

        closed = obj.backend.closed_form_scoring

        def block(x, y: torch.Tensor) -> torch.Tensor:
            # a closed-form backend has cheap directional derivatives for any k
            if use_jvp or closed:
                return obj.loss_jvp(s, x, y)
            return s @ obj.per_example_grads(x, y, "loss").T

        with obj.evaluating():  # one eval-mode switch for the whole pass
            if indices is not None:
                idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
                parts = []
                for j in range(0, idx.numel(), chunk):
                    x, y = self._get_train(idx[j : j + chunk])
                    parts.append(block(x, y))
                vals = torch.cat(parts, 1) if parts else s.new_zeros(s.shape[0], 0)
            else:
                vals = torch.cat(
                    [block(x, y) for _, x, y in curv.chunks(desc="Scoring", chunk_size=chunk)], 1
                )
        return -(vals + reg[:, None])

    # ------------------------------------------------------------------ queries
    def param_influence(self, indices: Indices) -> torch.Tensor:
        """``I_up,params(z_i) = -H^-1 (grad loss(z_i) + l2 theta)`` (eq. 1), shape ``[k, p]``.

        Removing ``z_i`` and refitting moves theta by about ``-I_up,params(z_i) / n``.
        """
        return -self.solver.solve(self.train_gradients(indices))

    def loss_influence(self, test: DataLike) -> torch.Tensor:
        """``I_up,loss(z_i, z_test)`` for every test and training point, ``[n_test, n_train]``.

        ``= -grad L(z_test)^T H^-1 (grad loss(z_i) + l2 theta)`` (eq. 2). Negative = helpful.
        """
        return self.score(self.s_test(test))

    def predicted_loss_change(self, test: DataLike, indices: Indices = None) -> torch.Tensor:
        """Predicted change of each test loss when ``z_i`` is removed and the model refit.

        ``= -I_up,loss(z_i, z_test) / n``, shape ``[n_test, k]``. Positive = removing the
        point raises the test loss (the point was helpful).
        """
        return -self.score(self.s_test(test), indices) / self.n

    def self_influence(self, include_l2_gradient: bool = True) -> torch.Tensor:
        """``I_up,loss(z_i, z_i) = -grad loss(z_i)^T H^-1 g_i`` for every training point, ``[n]``.

        ``g_i`` includes ``l2 theta`` unless ``include_l2_gradient=False`` (then the value is
        ``-grad loss(z_i)^T H^-1 grad loss(z_i) <= 0``, the ranking of Sec. 5.4).

        One pass over the data with per-example gradients; each chunk is solved at once, which
        is cheap for the direct solvers (Exact, Arnoldi: ``g^T U diag(1/lambda) U^T g``, K-FAC,
        EK-FAC: a few Kronecker products per layer). Iterative solvers (CG, LiSSA) would solve
        one system per training point; a warning says so when ``n`` is large.
        """
        curv = self._fitted()
        obj = self.objective
        if not self.solver.direct and curv.n > 1000:
            warnings.warn(
                f"self_influence with the iterative {self.solver.name!r} solver solves one "
                f"system per training point ({curv.n} of them); use solver='exact' (small p), "
                "'arnoldi', 'kfac' or 'ekfac', whose solves are cheap",
                InflensWarning,
                stacklevel=2,
            )
        out = []
        with obj.evaluating():
            for _, x, y in curv.chunks(desc="Self-influence"):
                g = obj.per_example_grads(x, y, "loss")
                gt = g + obj.regularizer_grad(obj.theta) if include_l2_gradient else g
                out.append(-self.solver.inner(g, gt))
        return torch.cat(out)

    def token_influence(
        self, test: DataLike, indices: Indices, side: str = "train"
    ) -> torch.Tensor:
        """Per-token terms of ``I_up,loss`` for a sequence loss (``"causal_lm"``).

        ``side="train"`` (``[n_test, k, T]``): term ``t`` of training sequence ``i``'s
        ``loss_influence``, ``-grad L(z_test)^T H^-1 (grad l_it / N_i + l2 theta / N_i)`` for
        each counted label position ``t`` (the ``l2 theta`` part of the training-side gradient
        is shared equally by the ``N_i`` counted tokens), exactly 0 at position 0, at
        ``-100`` labels and at padding. Summed over ``t`` it is ``loss_influence[j, i]``;
        negative = that token makes the sequence helpful for the test loss.

        ``side="test"`` (``[n_test, k, T_test]``): which test tokens training sequence ``i``
        affects, ``-(grad l_test,t / N_test)^T H^-1 (grad L(z_i) + l2 theta)``; also sums over
        ``t`` to ``loss_influence[j, i]``. Costs one solve per training sequence ``i``.
        """
        if side not in ("train", "test"):
            raise InputError(f"side must be 'train' or 'test', got {side!r}")
        curv = self._fitted()
        obj = self.objective
        if side == "test":
            k = self.n if indices is None else int(torch.as_tensor(indices).numel())
            itemsize = torch.finfo(obj.dtype).bits // 8
            check_budget(  # the k gradients, their solves and a temporary: [k, p] each
                3 * k * obj.p * itemsize,
                self.budget_bytes,
                f"per-token influence on the test side for {k} training sequences",
                "pass fewer training indices (each costs one solve and one [p] vector)",
            )
            v = self.solver.solve(self.train_gradients(indices))  # [k, p]: H^-1 g_i
            data = self._test_data(test)
            size = self._token_chunk(v.shape[0], curv.chunk_size)
            parts = []
            seen: set[int] = set()
            for start, x, y in data.chunks(size):
                x, y = self._prep_test(data, start, x, y, seen)
                with obj.evaluating():
                    parts.append(-obj.token_loss_jvp(v, x, y).transpose(0, 1))
            return _cat_padded(parts, 0)
        s = self.s_test(test)  # [m, p]
        reg = obj.regularizer_inner(s)  # [m]
        idx = torch.arange(self.n) if indices is None else torch.as_tensor(indices).reshape(-1)
        size = self._token_chunk(s.shape[0], curv.chunk_size)
        parts = []
        for lo in range(0, idx.numel(), size):
            x, y = self._get_train(idx[lo : lo + size])
            with obj.evaluating():
                terms = obj.token_loss_jvp(s, x, y)  # [m, b, T]
            counted = torch.zeros_like(y, dtype=s.dtype)
            counted[:, 1:] = (y[:, 1:] != IGNORE_INDEX).to(s.dtype)
            share = counted / counted.sum(1, keepdim=True).clamp_min(1)  # 1 / N_i where counted
            parts.append(-(terms + reg[:, None, None] * share[None]))
        return _cat_padded(parts, 1)

    @staticmethod
    def _token_chunk(k: int, chunk_size: int) -> int:
        """Sequences per forward-mode pass along ``k`` directions: the curvature's
        budget-derived chunk (sized for per-example gradients, which hold about as much per
        example as a JVP along one direction) shared among the ``k`` directions."""
        return max(1, chunk_size // max(1, k))

    def input_influence(self, test: DataLike, indices: Indices) -> torch.Tensor:
        """``I_pert,loss(z_i, z_test) = -grad L(z_test)^T H^-1 grad_x grad_theta loss(z_i)`` (eq. 5).

        For the mean measurement over the given test points; shape ``[k, *input_shape]``.
        Moving ``x_i`` by a small ``delta`` changes the test loss by about
        ``I_pert,loss . delta / n``; a step along ``sign(I_pert,loss)`` raises it.
        """
        s = self.s_test(test, mean=True)[0]
        x, y = self._get_train(indices)
        if not x.is_floating_point():
            raise InputError(
                "input influence needs floating-point inputs (the gradient with respect to "
                f"the input); the training inputs are {x.dtype}"
            )
        return -self.objective.input_grad_of_loss_jvp(s, x, y)

    def label_influence(
        self, test: DataLike, indices: Indices, new_labels: torch.Tensor | Sequence
    ) -> torch.Tensor:
        """Influence of changing the labels of ``z_i`` to ``new_labels`` (Sec. 2.2), ``[n_test, k]``.

        Moving weight ``eps`` from ``(x_i, y_i)`` to ``(x_i, y_new)`` changes the test loss at
        rate ``-grad L(z_test)^T H^-1 (grad loss(x_i, y_new) - grad loss(x_i, y_i))`` (the
        regulariser cancels); relabelling the point outright changes it by about this / n.
        """
        self._fitted()
        obj = self.objective
        x, y = self._get_train(indices)
        y_new = torch.as_tensor(new_labels, device=obj.device)
        if y_new.shape != y.shape:
            raise InputError(
                f"new_labels has shape {tuple(y_new.shape)} but the chosen training labels "
                f"have shape {tuple(y.shape)}"
            )
        y_new = y_new.to(y.dtype)
        obj.check_batch(x, y_new, "relabelled training data")
        diff = obj.per_example_grads(x, y_new) - obj.per_example_grads(x, y)
        return -(self.s_test(test) @ diff.T)

    # ------------------------------------------------------------------ artifacts (artifacts.py)
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the fitted state, configuration and model/data fingerprints to ``folder``."""
        from .artifacts import save_influence

        return save_influence(self, folder)

    @classmethod
    def load(
        cls, folder: str | os.PathLike, objective: Objective, train: DataLike, progress: bool = True
    ) -> Influence:
        """A fitted Influence from :meth:`save`; refuses a different model or training data."""
        from .artifacts import load_influence

        return load_influence(folder, objective, train, progress=progress, influence_class=cls)

    def score_to_folder(
        self, test: DataLike, folder: str | os.PathLike, chunk_size: int = 4096, **kwargs: Any
    ) -> torch.Tensor:
        """``loss_influence(test)`` written chunk by chunk to ``folder``; resumes if killed.

        The s_test vectors are saved first (``folder/s_test.safetensors``) and reused on a
        restart; see :func:`inflens.artifacts.score_to_folder`. Returns the ``[n_test, n]``
        scores once every chunk is on disk.
        """
        from .artifacts import score_folder_for_test

        return score_folder_for_test(self, test, folder, chunk_size, **kwargs)

    def build_index(
        self,
        folder: str | os.PathLike,
        dim: int | None = None,
        projection: str = "auto",
        **kwargs: Any,
    ) -> "GradientIndex":  # noqa: F821, UP037 - imported lazily (index.py imports this module's peers)
        """Write every training gradient, preconditioned and optionally projected, to ``folder``.

        ``index.loss_influence(test)`` then equals :meth:`loss_influence` (``dim=None``, to
        round-off) or estimates it without bias (a random projection to ``dim``), reading the
        stored rows instead of the training data; see :mod:`inflens.index` (``kwargs``:
        :class:`inflens.index.IndexConfig`).
        """
        from .index import build_index

        return build_index(self, folder, dim=dim, projection=projection, **kwargs)

    def my_chunks(self, chunk_size: int) -> list[int] | None:
        """The score chunks this process writes in :meth:`score_to_folder` (None: all of
        them; :class:`inflens.distributed.DistributedInfluence` gives each rank its share)."""
        return None

    def diagnostics(self, eigenvalues: bool = False) -> dict[str, Any]:
        """Solver and problem facts: n, p, damping, l2, and what the solver measured.

        Solver entries include, where they apply: the extreme eigenvalues (Exact: exact;
        Arnoldi: Ritz values; LiSSA: Lanczos estimates and the contraction per step; K-FAC:
        of the approximation), CG's relative residuals, LiSSA's scale. ``eigenvalues=True``
        adds Lanczos estimates (30 full-data products) of the smallest and largest eigenvalue
        of ``H + damping`` for any solver. ``"advice"`` lists what to change when something
        looks wrong (an empty list otherwise).
        """
        curv = self._fitted()
        out = {
            "solver": self.solver.name,
            "curvature": getattr(curv, "curvature", "hessian"),
            "n_train": curv.n,
            "p": curv.p,
            # None and the range for a per-parameter l2
            "l2": self.objective.l2 if self.objective.l2_diag is None else None,
            "l2_range": _l2_range(self.objective),
            "damping": self.damping,
            "chunk_size": curv.chunk_size,
            "hessian_vector_products": curv.num_matvecs,
            **self.objective.backend.describe(),
            **self.solver.diagnostics(),
        }
        if getattr(self, "scoring_costs_", None):
            out["scoring_costs"] = dict(self.scoring_costs_)
        if eigenvalues:
            ext = curv.extreme_eigenvalues(iters=30)
            out["curvature_min_eigenvalue"] = ext["min_eigenvalue"]
            out["curvature_max_eigenvalue"] = ext["max_eigenvalue"]
        out["advice"] = _advice(out)
        return out


def _l2_range(obj: Objective) -> list[float]:
    """``[min_j l2_j, max_j l2_j]`` (both the scalar l2 when there is one)."""
    if obj.l2_diag is None:
        return [obj.l2, obj.l2]
    return [float(obj.l2_diag.min()), float(obj.l2_diag.max())]


def _advice(d: dict[str, Any]) -> list[str]:
    """Plain-language fixes for what the diagnostics show is off."""
    tips: list[str] = []
    res = d.get("relative_residuals") or []
    if res and max(res) > 1e-5:
        tips.append(
            f"CG's worst relative residual is {max(res):.1e}: raise CG(max_iter=...), add "
            "damping, or use curvature='ggn'"
        )
    bias = d.get("bias_factor")
    if d.get("solver") == "lissa" and "contraction" in d and (bias is None or bias > 0.05):
        tips.append(
            "LiSSA's depth is too small for its scale and the smallest eigenvalue "
            f"(contraction {d['contraction']:.6f} per step): raise depth, add damping, or use "
            "a smaller scale (>= the largest eigenvalue)"
        )
    rr = d.get("max_ritz_relative_residual")
    if rr is not None and rr > 1e-2:
        tips.append(f"Arnoldi's eigenpairs have not converged (residual {rr:.1e}): raise n_iters")
    lo = d.get("curvature_min_eigenvalue")
    if lo is not None and lo <= 0:
        tips.append(
            f"H + damping has a non-positive eigenvalue (about {lo:.3g}): add damping > "
            f"{-lo:.3g} or use curvature='ggn'"
        )
    return tips
