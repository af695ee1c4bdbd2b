"""The curvature operator ``A = H + damping * I`` over the training set, matrix-free.

``H = (1/n) sum_i Hess_theta loss(z_i, theta_hat) + l2 * I`` is the Hessian of the regularised
mean risk (as in the paper's code; ``+ diag(l2)`` for a per-parameter l2, so ``A = H + diag(l2)
+ damping I``, in every product and in :meth:`Curvature.dense` alike); ``damping`` (Sec. 4.2) makes a non-convex or not-converged
model's quadratic surrogate convex. Products are exact full-data Hessian-vector products
(Pearlmutter's trick), summed over chunks of the training data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from .backends import is_plain
from .data import Data, batch_len, index_batch, to_device
from .errors import InputError
from .memory import default_budget_bytes, fit_chunk, saved_activation_bytes
from .objective import Objective

#: largest automatic chunk on a CPU: bigger chunks fall out of the caches and run slower
#: (measured, docs/solvers.md: for the paper's CNN, forward and JVP passes ran 1.7-2x slower
#: per example with 1024-example chunks than with 512, per-example gradients 1.2x; 512 was
#: within 15% of the best of 256/512/1024 for every pass of the CNN and of MNIST-LR)
CPU_CHUNK_CAP = 512


def auto_chunk_size(
    n: int, p: int, itemsize: int, budget_bytes: int = 128 * 2**20, cap: int | None = None
) -> int:
    """Largest chunk whose ``[chunk, p]`` per-example gradient block fits ``budget_bytes``
    (and at most ``cap`` examples)."""
    size = min(n, budget_bytes // max(1, p * itemsize))
    if cap is not None:
        size = min(size, cap)
    return int(max(1, size))


CURVATURES = ("hessian", "ggn")


def check_curvature(kind: str) -> str:
    """Validate a curvature name (``"hessian"`` or ``"ggn"``)."""
    if not isinstance(kind, str) or kind.lower() not in CURVATURES:
        raise InputError(
            f"curvature must be 'hessian' (the exact Hessian) or 'ggn' (the generalized "
            f"Gauss-Newton matrix, positive semi-definite), got {kind!r}"
        )
    return kind.lower()


class Curvature:
    """``A v = (H + damping I) v`` for the training data, with ``H`` as in the module docstring.

    Args:
        objective: the trained objective (model, loss, theta-hat, l2).
        data: the training data.
        damping: ``delta >= 0`` added to the diagonal.
        chunk_size: examples per vectorised chunk (``None``: derived from a memory budget).
        progress: show a progress bar on passes over the training set.
        curvature: ``"hessian"`` (default) or ``"ggn"``: replace each ``Hess loss(z_i)`` by its
            generalized Gauss-Newton part ``J_i^T Lambda_i J_i`` (``J_i`` the Jacobian of the
            model outputs, ``Lambda_i`` the Hessian of the loss in the outputs). The GGN is
            positive semi-definite for every loss convex in the outputs, the usual choice for
            non-convex models; it equals the Hessian for linear models.
    """

    def __init__(
        self,
        objective: Objective,
        data: Data,
        damping: float = 0.0,
        chunk_size: int | None = None,
        progress: bool = True,
        curvature: str = "hessian",
        budget_bytes: int | None = None,
    ) -> None:
        if not (float(damping) >= 0.0):
            raise InputError(f"damping must be a non-negative number, got {damping}")
        self.curvature = check_curvature(curvature)
        self.objective = objective
        self.data = data
        self.damping = float(damping)
        self.n = len(data)
        self.p = objective.p
        self.dtype = objective.dtype
        self.device = objective.device
        #: the memory budget (bytes) of one computation (:mod:`inflens.memory`)
        self.budget_bytes = int(budget_bytes) if budget_bytes else default_budget_bytes()
        self.progress = progress
        self.chunk_size = chunk_size or self._auto_chunk_size()
        self.num_matvecs = 0
        self._reuse: dict | None = None  # per-chunk cache, only inside reusing()
        self._reuse_left = 0

    def _auto_chunk_size(self) -> int:
        """The largest chunk whose per-example gradients ``[chunk, p]`` fit 128 MiB (at most
        :data:`CPU_CHUNK_CAP` on a CPU) and whose derivative computation (the backend's
        estimate from the measured activations of one example) fits a quarter of the budget."""
        itemsize = torch.finfo(self.dtype).bits // 8
        cap = CPU_CHUNK_CAP if torch.device(self.device).type == "cpu" else None
        size = auto_chunk_size(self.n, self.p, itemsize, cap=cap)
        if self.n == 0:
            return size
        obj = self.objective
        x, y = self.data.get(torch.arange(1))
        x, y = obj.prepare(x, y, self.data.name)
        th = obj.theta.detach().requires_grad_(True)
        with obj.evaluating():
            act = saved_activation_bytes(lambda: obj.losses(th, x, y).sum())
        backend = self.backend
        return fit_chunk(
            lambda b: backend.chunk_bytes(b, self.p, itemsize, act),
            self.budget_bytes / 4,
            size,
            f"a {backend.name} derivative pass",
            "raise max_memory_gb, select fewer parameters (Objective(params=...)), or use "
            "shorter sequences",
        )

    @property
    def backend(self):
        """The objective's derivatives backend, selected on the first examples if no
        ``Influence.fit`` did it yet (a Curvature used on its own)."""
        obj = self.objective
        if obj._backend is None:
            x, y = self.data.get(torch.arange(min(self.n, 4)))
            obj.select_backend(*obj.prepare(x, y, self.data.name))
        return obj.backend

    @property
    def shift(self) -> float:
        """The multiple of the identity in ``A``: ``l2 + damping``. Refuses (InputError) for a
        per-parameter l2, where the shift is the diagonal :attr:`shift_diag`: a solver that
        needs a scalar shift must refuse such an objective at ``fit``."""
        return self.objective.l2 + self.damping

    @property
    def scalar_shift(self) -> bool:
        """Whether ``A = (loss curvature) + shift * I`` (a scalar l2); else the shift is the
        diagonal :attr:`shift_diag`."""
        return self.objective.l2_diag is None

    @property
    def shift_diag(self) -> torch.Tensor:
        """``[p]``: the diagonal added to the loss curvature, ``l2_j + damping``."""
        return self.objective.l2_vector() + self.damping

    def add_shift(self, out: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
        """``out + (l2 + damping) * vecs`` (elementwise ``l2_j`` for a per-parameter l2): the
        regulariser and damping part of ``A v`` added to a loss-curvature product."""
        if self.scalar_shift:
            return out + self.shift * vecs
        return out + self.shift_diag.to(vecs) * vecs

    def chunks(self, desc: str | None = None, check: bool = False, chunk_size: int | None = None):
        """Yield prepared ``(start, x, y)`` chunks (of ``chunk_size``, default
        :attr:`chunk_size`), with a progress bar when ``desc`` is given."""
        size = chunk_size or self.chunk_size
        it = self.data.chunks(size)
        if desc is not None:
            it = tqdm(
                it,
                total=self.data.num_chunks(size),
                desc=desc,
                disable=not self.progress,
                leave=False,
            )
        for start, x, y in it:
            x, y = (
                self.objective.prepare(x, y, self.data.name, start)
                if check
                else (to_device(x, self.device), y.to(self.device))
            )
            yield start, x, y

    def matvec(self, vecs: torch.Tensor, desc: str | None = None) -> torch.Tensor:
        """``A @ v`` for each row of ``vecs [k, p]`` (or a single ``[p]`` vector)."""
        single = vecs.ndim == 1
        v = vecs.reshape(-1, self.p).to(self.dtype)
        out = torch.zeros_like(v)
        group = self.vectors_per_product()
        with self.objective.evaluating():
            for start, x, y in self.chunks(desc):
                for g in range(0, v.shape[0], group):
                    vg = v[g : g + group]
                    cached = self._cached_head_product(start, vg, x, y)
                    out[g : g + group] += self.sum_product(vg, x, y) if cached is None else cached
        self.all_reduce(out)  # the other ranks' shards (inflens.distributed); else a no-op
        out = self.add_shift(out / self.n, v)
        self.num_matvecs += v.shape[0]
        return out[0] if single else out

    def vectors_per_product(self) -> int:
        """How many vectors one vectorised product takes: each carries ``[p]``-sized tangents,
        gradients and temporaries (about 8 copies), within a quarter of the budget."""
        itemsize = torch.finfo(self.dtype).bits // 8
        return max(1, int(self.budget_bytes / 4 // (8 * self.p * itemsize)))

    @contextlib.contextmanager
    def reusing(self, budget_bytes: int = 2**30) -> Iterator[None]:
        """Within this block theta and the data must not change, so :meth:`matvec` may compute
        per-chunk quantities that depend only on them once and reuse them in every product
        (for a Linear layer on frozen features: its inputs and the output Hessians
        ``Lambda_i``, about ``C^2 + d`` numbers per example, within ``budget_bytes``).
        Iterative solvers wrap their loops in it."""
        self._reuse, self._reuse_left = {}, int(budget_bytes)
        try:
            yield
        finally:
            self._reuse = None

    def _cached_head_product(
        self, start: int, vecs: torch.Tensor, x, y: torch.Tensor
    ) -> torch.Tensor | None:
        """The product from the backend's cached per-chunk curvature factors inside
        :meth:`reusing` (a Linear layer on frozen features: its inputs and output Hessians),
        or None (then :meth:`sum_product` computes it afresh)."""
        store = self._reuse
        if store is None or not is_plain(vecs):
            return None
        backend = self.backend
        hit = store.get(start)
        if hit is None:
            hit = backend.curvature_factors(self.objective.theta, x, y)
            if hit is None:
                return None
            size = backend.factors_nbytes(hit, x)
            if size <= self._reuse_left:
                self._reuse_left -= size
                store[start] = hit
        return backend.product_from_factors(vecs, hit)

    def sum_product(self, vecs: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``sum_{i in batch} C_i v`` with ``C_i`` the Hessian (or GGN) of ``loss(z_i)``, no shift."""
        if self.curvature == "ggn":
            return self.objective.ggn_sum(vecs, x, y)
        return self.objective.hvp_sum(vecs, x, y)

    def batch_matvec(self, vecs: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mini-batch estimate ``((1/B) sum_{i in B} Hess loss(z_i) + (l2 + damping) I) v``
        (``diag(l2)`` for a per-parameter l2)."""
        return self.add_shift(self.sum_product(vecs, x, y) / y.shape[0], vecs)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes (one process: ``t`` itself)."""
        return t

    def _as_operator(self, total: torch.Tensor) -> torch.Tensor:
        """``A = total / n + shift I`` (``+ diag(l2) + damping I`` for a per-parameter l2)
        from a full-data curvature sum, symmetrised."""
        total = total / self.n
        total.diagonal().add_(self.shift if self.scalar_shift else self.shift_diag.to(total))
        return 0.5 * (total + total.T)

    def _dense_closed_form(self) -> torch.Tensor | None:
        """``A`` from the backend's closed form (a Linear layer on frozen features:
        ``O(n C^2 d^2)`` in a few matrix products instead of ``p`` products), else None."""
        obj = self.objective
        with obj.evaluating():
            total = self.backend.dense_curvature_sum(
                obj.theta, self.chunks("Hessian (closed form)")
            )
        if total is None:
            return None
        return self._as_operator(self.all_reduce(total))

    def _dense_ggn(self) -> torch.Tensor:
        """The GGN ``A`` from per-example output Jacobians (``C`` backward passes per chunk,
        :meth:`inflens.objective.Objective.ggn_dense_sum`)."""
        obj = self.objective
        total = torch.zeros(self.p, self.p, dtype=self.dtype, device=self.device)
        with obj.evaluating():
            sub = None
            for _, x, y in self.chunks("Gauss-Newton (Jacobians)"):
                if sub is None:  # sub-chunks of O(sub C p) <= O(4 p^2) Jacobian entries
                    c = max(1, obj.predictions(obj.theta, index_batch(x, slice(0, 1))).numel())
                    sub = max(1, (4 * self.p) // c)
                for s in range(0, batch_len(x), sub):
                    sl = slice(s, s + sub)
                    total += obj.ggn_dense_sum(index_batch(x, sl), y[sl])
        return self._as_operator(self.all_reduce(total))

    def dense(self, block: int = 256, method: str = "auto") -> torch.Tensor:
        """The explicit ``[p, p]`` matrix ``A = H + damping I`` (with ``diag(l2)`` for a
        per-parameter l2, on every path).

        ``method="auto"``: in closed form for a Linear layer on frozen features (see
        :meth:`_dense_closed_form`), from per-example output Jacobians for the GGN, otherwise
        from ``p`` matrix-free products, blocked; ``"products"``: always the latter.
        """
        if method not in ("auto", "products"):
            raise InputError(f"method must be 'auto' or 'products', got {method!r}")
        if method == "auto":
            closed = self._dense_closed_form()
            if closed is not None:
                return closed
            if self.curvature == "ggn":
                return self._dense_ggn()
        eye = torch.eye(self.p, dtype=self.dtype, device=self.device)
        cols = []
        bar = tqdm(range(0, self.p, block), desc="Hessian", disable=not self.progress, leave=False)
        for s in bar:
            cols.append(self.matvec(eye[s : s + block]))
        a = torch.cat(cols, 0)
        return 0.5 * (a + a.T)

    def lanczos(self, iters: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Ritz values ``[m]`` (ascending) and their residual norms ``[m]`` after ``m <= iters``
        Lanczos steps on ``A`` (one full-data product each, full reorthogonalisation).

        The extreme Ritz values converge first: after 20-30 steps the largest is usually
        accurate to a few digits and the smallest is an upper bound on ``lambda_min(A)``.
        """
        res = krylov(
            lambda v: self.matvec(v[None])[0], self.p, iters, self.dtype, self.device, seed
        )
        return res.values, res.residuals

    def extreme_eigenvalues(self, iters: int = 30, seed: int = 0) -> dict[str, float]:
        """Estimates of the smallest and largest eigenvalues of ``A`` (and of ``H`` without the
        damping) from :meth:`lanczos`, with the residual of each estimate."""
        vals, res = self.lanczos(iters, seed)
        return {
            "min_eigenvalue": float(vals[0]),
            "max_eigenvalue": float(vals[-1]),
            "min_eigenvalue_residual": float(res[0]),
            "max_eigenvalue_residual": float(res[-1]),
            "lanczos_steps": int(vals.numel()),
        }

    def top_eigenvalue(self, iters: int = 30, seed: int = 0, rtol: float = 1e-3) -> float:
        """Largest-magnitude eigenvalue of ``A`` by power iteration (a few full passes)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.randn(self.p, generator=g, dtype=self.dtype).to(self.device)
        return power_iteration(self.matvec, v, iters, rtol)


def power_iteration(matvec, v: torch.Tensor, iters: int = 30, rtol: float = 1e-3) -> float:
    """Largest-magnitude eigenvalue of a symmetric operator: the Rayleigh quotient of power
    iteration from ``v [p]``, stopped when it changes by at most ``rtol`` (relative)."""
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        w = matvec(v)
        new = float(v @ w)
        nrm = w.norm()
        if nrm == 0:
            return 0.0
        v = w / nrm
        if abs(new - lam) <= rtol * abs(new):
            return new
        lam = new
    return lam


class KrylovResult:
    """Output of :func:`krylov`: Ritz values (ascending), Ritz vectors ``[m, p]`` and residuals.

    ``residuals[j] = ||A u_j - theta_j u_j||`` for the unit Ritz vector ``u_j``.
    """

    def __init__(
        self, values: torch.Tensor, vectors: torch.Tensor, residuals: torch.Tensor, steps: int
    ) -> None:
        self.values, self.vectors, self.residuals, self.steps = values, vectors, residuals, steps


def krylov(
    matvec,
    p: int,
    iters: int,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    vectors: bool = False,
) -> KrylovResult:
    """Arnoldi iteration on a symmetric operator (Lanczos with full re-orthogonalisation).

    Builds an orthonormal basis ``Q`` of the Krylov space of a random start vector, one
    ``matvec`` per step, orthogonalising each new vector twice against all previous ones
    ("twice is enough") so that the projected matrix ``T = Q^T A Q`` stays accurate to round-off.
    When the space becomes invariant before ``iters`` steps (the start vector lies in an
    eigenspace) it continues with a fresh random vector orthogonal to ``Q``, so ``iters = p``
    always recovers the full eigendecomposition. Returns the eigenpairs of the symmetrised
    ``T`` mapped back (``u = Q y``) when ``vectors`` is true.
    """
    iters = int(min(iters, p))
    g = torch.Generator(device="cpu").manual_seed(seed)

    def fresh(q: torch.Tensor | None) -> torch.Tensor | None:
        for _ in range(3):
            v = torch.randn(p, generator=g, dtype=dtype).to(device)
            if q is not None and q.shape[0]:
                v -= q.T @ (q @ v)
                v -= q.T @ (q @ v)
            nrm = v.norm()
            if nrm > 1e-8:
                return v / nrm
        return None

    q = torch.empty(iters + 1, p, dtype=dtype, device=device)
    t = torch.zeros(iters + 1, iters, dtype=dtype, device=device)
    first = fresh(None)
    assert first is not None
    q[0] = first
    m = 0
    for j in range(iters):
        w = matvec(q[j])
        m = j + 1
        anorm = float(w.norm())
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            c = q[: j + 1] @ w
            w = w - q[: j + 1].T @ c
            t[: j + 1, j] += c
        beta = float(w.norm())
        if j + 1 == iters:
            t[j + 1, j] = beta
            break
        if beta <= 1e-10 * max(anorm, 1e-300):  # invariant subspace: restart orthogonally
            nxt = fresh(q[: j + 1])
            if nxt is None:
                break
            q[j + 1] = nxt
            t[j + 1, j] = 0.0
        else:
            q[j + 1] = w / beta
            t[j + 1, j] = beta
    tm = t[:m, :m]
    tm = 0.5 * (tm + tm.T)
    vals, ys = torch.linalg.eigh(tm)
    # ||A Q y - theta Q y|| = |beta_m| |y_m| (Arnoldi relation A Q_m = Q_m T_m + beta q e_m^T)
    residuals = (t[m, m - 1] * ys[m - 1, :]).abs() if m == iters else torch.zeros_like(vals)
    vecs = ys.T @ q[:m] if vectors else torch.empty(0, p, dtype=dtype, device=device)
    return KrylovResult(vals, vecs, residuals, m)
