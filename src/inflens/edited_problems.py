"""Many training problems at once: one training set, each problem with a few rows replaced.

Problem ``t`` (of ``K``) trains on the training set ``z_1..z_n`` with the rows ``P_t`` (``k``
of them) replaced by new inputs ``x'_tj`` (same labels) and has its own parameters
``theta_t``. Its regularised mean risk, gradient and curvature are

``R_t(theta) = (1/n) [sum_i l(z_i) - sum_{j in P_t} l(z_j) + sum_j l(x'_tj, y_j)]
+ (1/2) theta^T diag(l2) theta``, ``A_t = Hess R_t(theta_t) + damping I``.

The sum over the shared set runs for all problems together
(:meth:`~inflens.backends.DerivativesBackend.grad_sums` and friends: one matrix product for
all thetas with the closed-form linear head), the ``2k`` changed rows per problem are
corrections at each problem's own theta. The training-set attack (Sec. 5.2) uses it for its
influence queries and exact refits of every attack at once; any per-problem batch (e.g.
leave-some-out refits) fits the same form.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .data import index_batch
from .errors import InflensWarning, InputError, SolverDivergedError
from .memory import default_budget_bytes, fit_chunk, saved_activation_bytes
from .objective import Objective
from .solvers._cg_core import conjugate_gradient
from .train import Fit, newton_minimize

__all__ = ["EditedProblems"]


class EditedProblems:
    """``K`` problems on one training set, problem ``t`` replacing the rows ``rows[t]``.

    Args:
        objective: the model, loss and l2 (its theta is only a shape and a default).
        train: the shared training set ``(X [n, ...], y [n])`` (tensors).
        rows: ``[K, k]`` distinct row indices per problem.
        budget_bytes: memory budget of one pass (default: half of what is free); the shared
            set runs in chunks (of rows and of problems) that fit a quarter of it.

    Every method takes the problems it is about, ``which [a]`` (indices into ``0..K-1``), and
    their thetas ``[a, p]``.
    """

    def __init__(
        self,
        objective: Objective,
        train: tuple[torch.Tensor, torch.Tensor],
        rows: torch.Tensor,
        budget_bytes: int | None = None,
    ) -> None:
        x, y = train
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            raise InputError("train must be a pair (X, y) of tensors (rows are replaced in X)")
        rows = torch.as_tensor(rows, dtype=torch.long)
        n = int(y.shape[0])
        if rows.ndim != 2 or rows.shape[1] == 0:
            raise InputError(
                f"the rows to replace must be a non-empty [K, k] matrix, got {tuple(rows.shape)}"
            )
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
            raise InputError(f"the rows to replace must lie in [0, {n - 1}]")
        if bool((rows.sort(1).values.diff(dim=1) == 0).any()):
            raise InputError(
                "the rows to replace contain repeats (a problem's rows must be distinct)"
            )
        self.objective, self.n, self.rows = objective, n, rows
        self.x, self.y = objective.prepare(x, y, "training data")
        self.backend = objective.select_backend(index_batch(self.x, slice(0, 4)), self.y[:4])
        # the data as the backend's many-theta methods read it (e.g. a linear head's inputs)
        self._px = self.backend.many_inputs(self.x)
        # the replaced rows of every problem, in that form [K, k, ...] (at first the originals)
        self._new_px = self._px[rows.reshape(-1)].reshape(*rows.shape, *self._px.shape[1:])
        self._y_rows = self.y[rows]
        self.budget = float(budget_bytes or default_budget_bytes()) / 4
        th = objective.theta.detach().requires_grad_(True)
        one = index_batch(self.x, slice(0, 1))
        with objective.evaluating():
            self._act = saved_activation_bytes(lambda: objective.losses(th, one, y[:1]).sum())

    def replace(self, which: torch.Tensor, new_x: torch.Tensor) -> None:
        """Set the replaced inputs of problems ``which [a]`` to ``new_x [a, k, ...]``."""
        flat = new_x.reshape(len(which) * self.rows.shape[1], *self.x.shape[1:])
        labels = self._y_rows[which].reshape(-1, *self.y.shape[1:])
        flat, _ = self.objective.prepare(flat, labels, "replaced inputs")
        px = self.backend.many_inputs(flat)
        self._new_px[which] = px.reshape(len(which), self.rows.shape[1], *px.shape[1:])

    # ------------------------------------------------------------------ the three quantities
    def risk(self, thetas: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """``[a]``: ``R_t(theta_t)``."""
        obj, be = self.objective, self.backend
        with obj.evaluating(), torch.no_grad():
            shared = self._shared(lambda th, x, y: be.value_sums(th, x, y), thetas)
            corr = self._corrected(lambda th, x, y: be.values_at(th, x, y), thetas, which)
        l2 = obj.l2_vector().to(thetas)
        return (shared + corr) / self.n + 0.5 * (l2 * thetas * thetas).sum(1)

    def gradient(self, thetas: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """``[a, p]``: ``grad R_t(theta_t)``."""
        obj, be = self.objective, self.backend
        with obj.evaluating():
            shared = self._shared(lambda th, x, y: be.grad_sums(th, x, y), thetas)
            corr = self._corrected(lambda th, x, y: be.grads_at(th, x, y), thetas, which)
        return ((shared + corr) / self.n + obj.regularizer_grad(thetas)).detach()

    def curvature_product(
        self, vecs: torch.Tensor, thetas: torch.Tensor, which: torch.Tensor, damping: float = 0.0
    ) -> torch.Tensor:
        """``[a, p]``: ``(Hess R_t(theta_t) + damping I) v_t``."""
        obj, be = self.objective, self.backend
        with obj.evaluating():
            shared = self._shared(lambda th, x, y, v: be.hvp_sums(v, th, x, y), thetas, vecs)
            corr = self._corrected(lambda th, x, y, u: be.hvps_at(u, th, x, y), thetas, which, vecs)
        out = (shared + corr) / self.n + obj.regularizer_grad(vecs) + float(damping) * vecs
        return out.detach()

    def target_gradients(
        self, thetas: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """``[a, p]``: ``grad_theta mean_{j in T_t} m(z_j; theta_t)`` of each problem's targets
        ``targets[t] = (X_T, y_T)`` (``m`` the measurement), the right-hand sides of influence
        queries."""
        sizes = torch.tensor([int(t[1].shape[0]) for t in targets])
        owner = torch.repeat_interleave(torch.arange(len(targets)), sizes)
        be = self.backend
        x = be.many_inputs(torch.cat([t[0] for t in targets]))
        with self.objective.evaluating():
            g = be.grads_at(thetas[owner], x, torch.cat([t[1] for t in targets]), "measurement")
        return torch.zeros_like(thetas).index_add_(0, owner, g) / sizes[:, None].to(g)

    # ------------------------------------------------------------------ solves and refits
    def solve(
        self,
        b: torch.Tensor,
        thetas: torch.Tensor,
        which: torch.Tensor,
        damping: float = 0.0,
        inverse: torch.Tensor | None = None,
        tol: float = 1e-10,
        x0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[a, p]``: ``(Hess R_t(theta_t) + damping I)^-1 b_t`` for every problem, by one
        batched conjugate-gradient run to relative residual ``tol`` (each row stops on its
        own), preconditioned by a fixed ``inverse [p, p]`` when given (e.g. the exact inverse
        Hessian at a nearby theta), from ``x0`` (a warm start, e.g. the previous solution)
        or zero. Warns when a row stays above ``10 tol``."""
        p = b.shape[1]
        res = conjugate_gradient(
            self.curvature_operator(thetas, which, damping),
            b,
            tol,
            min(10 * p, 1000),
            None if inverse is None else (lambda r, rows: r @ inverse),
            x0,
        )
        bad = ~res.converged(b, 10 * tol)
        if bool(bad.any()):
            warnings.warn(
                f"CG stopped above relative residual {10 * tol:.0e} for {int(bad.sum())} of "
                f"{b.shape[0]} problems; add damping to improve the conditioning",
                InflensWarning,
                stacklevel=2,
            )
        return res.x

    def refit(
        self,
        thetas: torch.Tensor,
        which: torch.Tensor,
        tol: float = 1e-12,
        inverse: torch.Tensor | None = None,
        cg_tol: float = 1e-10,
    ) -> Fit:
        """Every problem minimised to ``||grad R_t|| <= tol``, warm-started at ``thetas``, all
        together (:func:`~inflens.train.newton_minimize`): chord steps ``theta - M g`` with a
        fixed ``inverse`` ``M`` where they halve the gradient norm, Newton steps with
        directions from :meth:`solve` and an Armijo search on :meth:`risk` elsewhere.

        Raises:
            SolverDivergedError: a problem stopped above ``max(tol, 1e-6)`` (not strongly
                convex: use l2 > 0).
        """
        fit = newton_minimize(
            lambda th, r: self.gradient(th, which[r]),
            thetas,
            solve=lambda th, g, r: self.solve(g, th, which[r], 0.0, inverse, cg_tol),
            chord=None if inverse is None else (lambda g, r: g @ inverse),
            value=lambda th, r: self.risk(th, which[r]),
            tol=tol,
        )
        if max(fit.info.extra["grad_norms"], default=0.0) > max(tol, 1e-6):
            raise SolverDivergedError(
                f"the Newton refit stopped at gradient norm {fit.info.grad_norm:.2e}; the risk "
                "may not be strongly convex: use l2 > 0"
            )
        return fit

    def curvature_operator(
        self, thetas: torch.Tensor, which: torch.Tensor, damping: float = 0.0
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(v [b, p], rows [b]) -> (Hess R_t + damping I) v`` for the problems
        ``which[rows]`` at ``thetas[rows]``: :meth:`curvature_product` at fixed thetas, with
        the backend's per-theta factors of the shared set computed once (when it has them and
        they fit the budget), as conjugate gradients needs."""
        factors = self._factors(thetas)
        if factors is None:
            return lambda v, r: self.curvature_product(v, thetas[r], which[r], damping)
        obj, be = self.objective, self.backend

        def product(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            with obj.evaluating():
                shared = sum(
                    be.hvp_sums_from(v, f, r, x) for (x, _), f in zip(self._chunks(), factors)
                )
                corr = self._corrected(
                    lambda th, x, y, u: be.hvps_at(u, th, x, y), thetas[r], which[r], v
                )
            out = (shared + corr) / self.n + obj.regularizer_grad(v) + float(damping) * v
            return out.detach()

        return product

    def _factors(self, thetas: torch.Tensor) -> list | None:
        a = thetas.shape[0]
        if self._layout(a, thetas)[0] < a:  # the thetas do not even fit one pass together
            return None
        out, size = [], 0
        with self.objective.evaluating():
            for x, y in self._chunks():
                f = self.backend.hvp_sums_factors(thetas, x, y)
                if f is None:
                    return None
                size += f.numel() * f.element_size()
                if size > self.budget:
                    return None
                out.append(f)
        return out

    def _chunks(self):
        chunk = self._chunk
        for start in range(0, self.n, chunk):
            sl = slice(start, start + chunk)
            yield index_batch(self._px, sl), self.y[sl]

    # ------------------------------------------------------------------ the two parts
    def _layout(self, a: int, thetas: torch.Tensor) -> tuple[int, int]:
        """``(thetas per pass, rows per chunk)`` whose pass fits a quarter of the budget."""
        p, itemsize, be = thetas.shape[1], thetas.element_size(), self.backend

        def cost(b: int, kk: int) -> float:
            return be.sums_bytes(kk, b, p, itemsize, self._act)

        block = a
        while block > 1 and cost(1, block) > self.budget:
            block = (block + 1) // 2
        fix = "raise the memory budget or attack fewer targets at once"
        self._chunk = fit_chunk(lambda b: cost(b, block), self.budget, self.n, "a pass", fix)
        return block, self._chunk

    def _shared(self, fn, thetas: torch.Tensor, vecs: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_i f(z_i; theta_t)`` over the shared set, in chunks that fit the budget."""
        a = thetas.shape[0]
        block, chunk = self._layout(a, thetas)
        parts = []
        for s in range(0, a, block):
            th = thetas[s : s + block]
            v = None if vecs is None else vecs[s : s + block]
            acc = None
            for start in range(0, self.n, chunk):
                sl = slice(start, start + chunk)
                x, y = index_batch(self._px, sl), self.y[sl]
                val = fn(th, x, y) if v is None else fn(th, x, y, v)
                acc = val if acc is None else acc + val
            parts.append(acc)
        return torch.cat(parts)

    def _corrected(
        self, fn, thetas: torch.Tensor, which: torch.Tensor, vecs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``sum_j [f(x'_tj, y_j; theta_t) - f(z_j; theta_t)]`` over each problem's rows (with
        ``vecs``: ``f(..., v_t)``), a block of problems at a time: the per-example terms are
        ``[block k, p]``, sized to a quarter of the budget."""
        k = self.rows.shape[1]
        a, p = thetas.shape
        block = max(1, int(self.budget // (6 * k * p * thetas.element_size())))
        parts = []
        for s in range(0, a, block):
            th_b, w = thetas[s : s + block], which[s : s + block]
            b = th_b.shape[0]
            th = th_b.repeat_interleave(k, 0)
            y = self._y_rows[w].reshape(-1, *self.y.shape[1:])
            new = self._new_px[w].reshape(b * k, *self._new_px.shape[2:])
            old = self._px[self.rows[w].reshape(-1)]
            extra = () if vecs is None else (vecs[s : s + block].repeat_interleave(k, 0),)
            diff = fn(th, new, y, *extra) - fn(th, old, y, *extra)
            parts.append(diff.reshape(b, k, *diff.shape[1:]).sum(1))
        return torch.cat(parts)
