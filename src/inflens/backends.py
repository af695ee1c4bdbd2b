"""Derivatives backends: per-example gradients, curvature products and JVPs of an objective.

Every layer above (curvature, solvers, influence queries, indexes) asks an
:class:`~inflens.objective.Objective` for derivatives; the objective hands the work to one
backend, chosen once (:func:`select_backend`, at ``Influence.fit``) and recorded in
``Influence.diagnostics()["backend"]`` and in saved artifacts:

- ``"linear_head"`` (:class:`LinearHeadBackend`): theta is one ``nn.Linear`` on frozen
  features (the paper's Inception setting). Closed forms: per-example gradients
  ``e_i phi_i^T``, directional derivatives ``e_i . (V phi_i + v_b)``, Hessian products and the
  dense Hessian from the layer inputs ``phi_i`` and output Hessians ``Lambda_i``
  (:mod:`inflens.linear_head`). Chosen only after it reproduces autograd on a probe batch.
- ``"vmap"`` (:class:`VmapBackend`): ``torch.func`` transforms with ``vmap`` over *examples*
  (one example at a time, vectorised): the fastest general path.
- ``"jacobian"`` (:class:`JacobianBackend`): for models that ``vmap`` cannot run one example
  at a time (data-dependent control flow on the inputs, as in Hugging Face attention masks,
  ``.item()`` in ``forward``): the model runs on the whole batch and per-example gradients are
  the rows of the Jacobian of the per-example losses (reverse mode, ``vmap`` over the
  cotangents only); products ``vmap`` over the *vectors* only. Requires examples not to
  interact in ``forward`` (true in eval mode).

Attention: PyTorch's fused scaled-dot-product kernels on the CPU have no double backward and
no forward-mode rule, so every backend runs derivatives under the math kernel
(:func:`math_attention`), which computes the same function with differentiable primitives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch.func import grad, jacrev, jvp, vjp, vmap

from .data import Batch, batch_len, index_batch, unsqueeze_batch
from .errors import InputError, VmapError
from .linear_head import find_linear_head
from .losses import output_hessians

BACKENDS = ("auto", "linear_head", "vmap", "jacobian")
#: examples per forward pass when the linear head's layer inputs are computed for many thetas
CPU_CHUNK_MANY = 512

_VMAP_HINT = (
    "Per-example gradients run the model on one example at a time under torch.func.vmap. "
    "Common causes of failure: in-place operations on inputs or parameters (use out-of-place "
    "ops), BatchNorm forced into training mode, data-dependent Python control flow or "
    ".item() calls inside forward(), or layers that only accept batched inputs of a fixed size. "
    "Objective(backend='jacobian') runs the model on whole batches instead."
)


class ObjectiveLike(Protocol):
    """What a backend needs from an :class:`~inflens.objective.Objective`."""

    theta: torch.Tensor
    dtype: torch.dtype
    loss_fn: Callable

    def outputs(self, theta: torch.Tensor, x: Batch) -> Any: ...
    def predictions(self, theta: torch.Tensor, x: Batch) -> torch.Tensor: ...
    def losses(self, theta: torch.Tensor, x: Batch, y: torch.Tensor) -> torch.Tensor: ...
    def measurements(self, theta: torch.Tensor, x: Batch, y: torch.Tensor) -> torch.Tensor: ...


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Run attention with differentiable primitives: ``scaled_dot_product_attention`` with
    the math kernel (the fused CPU kernels have no double backward and no forward-mode rule)
    and ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` without their fused
    inference fast path (``aten::_transformer_encoder_layer_fwd`` has no forward-mode rule)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mha = getattr(torch.backends, "mha", None)
    before = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(before)


def is_plain(*tensors: torch.Tensor) -> bool:
    """True when no tensor is wrapped by a torch.func transform (so plain autograd may run)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not any(wrapped(t) for t in tensors)


def _vmapped(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``vmap(fn, ...)(...)`` with vmap's own failures re-raised as :class:`VmapError`.

    Only errors that torch.func raises about the transformed function are wrapped (they name
    vmap, a batching rule or the transform); anything else (an out-of-memory error, a shape
    error in the model) propagates unchanged.
    """
    with transform_errors():
        return vmap(fn, **kwargs)(*args)


@contextlib.contextmanager
def transform_errors() -> Iterator[None]:
    """Re-raise torch.func's refusals of the transformed function as :class:`VmapError`."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as exc:
        msg = str(exc).lower()
        if any(k in msg for k in ("vmap", "batching rule", "functorch", "transform")):
            raise VmapError(f"{_VMAP_HINT} Original error: {exc}") from exc
        raise


def _directional(
    f: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, vecs: torch.Tensor
):
    """``[k, *f(theta).shape]``: forward-mode derivatives of ``f`` at ``theta`` along each row
    of ``vecs`` (one pass for one vector, ``vmap`` over the vectors otherwise)."""

    def one(v: torch.Tensor) -> torch.Tensor:
        return jvp(f, (theta,), (v,))[1]

    with math_attention():
        if vecs.shape[0] == 1:
            return one(vecs[0]).unsqueeze(0)
        return _vmapped(one, vecs)


class DerivativesBackend:
    """Derivatives of an objective's per-example losses in theta (module docstring).

    Every method leaves the regulariser out (the callers add ``l2 * theta`` / ``l2 I``).
    """

    name = "backend"
    #: ``loss_jvp`` costs about the same for any number of vectors (closed form): influence
    #: scoring then always uses it and may take large chunks (:meth:`scoring_chunk_size`)
    closed_form_scoring = False

    def __init__(self, objective: ObjectiveLike, reason: str = "") -> None:
        self.obj = objective
        #: why this backend was chosen (reported in diagnostics)
        self.reason = reason

    # ------------------------------------------------------------------ first order
    def per_example_grads(
        self, theta: torch.Tensor, x: Batch, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        """``[B, p]``: ``grad_theta l(z_i)`` (or of the measurement), no regulariser."""
        raise NotImplementedError

    def loss_jvp(
        self,
        vecs: torch.Tensor,
        theta: torch.Tensor,
        x: Batch,
        y: torch.Tensor,
        which: str = "loss",
    ) -> torch.Tensor:
        """``[k, B]``: directional derivatives ``grad_theta l(z_i) . v_j`` (forward mode)."""
        fn = self._per_example_fn(which)
        return _directional(lambda th: fn(th, x, y), theta, vecs)

    def token_jvp(
        self,
        vecs: torch.Tensor,
        theta: torch.Tensor,
        x: Batch,
        y: torch.Tensor,
        token_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``[k, B, T]``: directional derivatives of per-token loss terms ``token_fn(outputs, y)
        [B, T]`` (whose row sums are the per-example losses) along each ``v_j``."""
        return _directional(lambda th: token_fn(self.obj.predictions(th, x), y), theta, vecs)

    # ------------------------------------------------------------------ second order
    def hvp_sum(
        self, vecs: torch.Tensor, theta: torch.Tensor, x: Batch, y: torch.Tensor
    ) -> torch.Tensor:
        """``[k, p]``: ``sum_{i in batch} Hess_theta l(z_i) v_j`` (Pearlmutter's trick)."""
        with math_attention():
            if vecs.shape[0] == 1 and is_plain(vecs, theta):
                return self._hvp_double_backward(vecs[0], x, y, theta).unsqueeze(0)
            g = grad(lambda th: self.obj.losses(th, x, y).sum())

            def one(v: torch.Tensor) -> torch.Tensor:
                return jvp(g, (theta,), (v,))[1]

            return _vmapped(one, vecs)

    def _hvp_double_backward(
        self, v: torch.Tensor, x: Batch, y: torch.Tensor, theta: torch.Tensor
    ) -> torch.Tensor:
        """One HVP by reverse-over-reverse autograd (cheaper per call than forward-over-reverse
        for a single vector, e.g. LiSSA's batch-1 steps)."""
        th = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            total = self.obj.losses(th, x, y).sum()
            (g,) = torch.autograd.grad(total, th, create_graph=True)
            if not g.requires_grad:  # piecewise-linear loss (hinge): zero Hessian
                return torch.zeros_like(v)
            (hv,) = torch.autograd.grad(g, th, grad_outputs=v, allow_unused=True)
        return torch.zeros_like(v) if hv is None else hv.detach()

    def ggn_sum(
        self, vecs: torch.Tensor, theta: torch.Tensor, x: Batch, y: torch.Tensor
    ) -> torch.Tensor:
        """``[k, p]``: ``sum_i J_i^T Lambda_i J_i v_j`` (generalized Gauss-Newton): a JVP of
        the outputs, an output-space Hessian product of the loss and a VJP back."""
        with math_attention():
            fwd = lambda th: self.obj.predictions(th, x)  # noqa: E731
            out, pull = vjp(fwd, theta)
            out = out.detach()
            dloss = grad(lambda o: self.obj.loss_fn(o, y).sum())

            def one(v: torch.Tensor) -> torch.Tensor:
                jv = jvp(fwd, (theta,), (v,))[1]
                hjv = jvp(dloss, (out,), (jv,))[1]
                return pull(hjv)[0]

            if vecs.shape[0] == 1:
                return one(vecs[0]).unsqueeze(0)
            return _vmapped(one, vecs)

    def ggn_dense_sum(self, theta: torch.Tensor, x: Batch, y: torch.Tensor) -> torch.Tensor:
        """``[p, p]``: ``sum_i J_i^T Lambda_i J_i`` from per-example output Jacobians
        ``J_i [C, p]`` and output Hessians ``Lambda_i [C, C]``: ``C`` backward passes."""
        jac, outs = self._output_jacobians(theta, x)  # [B, C, p], [B, *out]
        lam = output_hessians(self.obj.loss_fn, outs.detach(), y)  # [B, C, C]
        lj = torch.einsum("bcd,bdp->bcp", lam, jac)
        return jac.reshape(-1, jac.shape[-1]).T @ lj.reshape(-1, lj.shape[-1])

    def _output_jacobians(self, theta: torch.Tensor, x: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def input_grad_of_loss_jvp(
        self, vec: torch.Tensor, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """``[B, *x.shape[1:]]``: ``grad_x (v . grad_theta l(x_i, y_i))`` per example (eq. 5)."""
        one_loss = self._single("loss")

        def dir_deriv(xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return jvp(lambda th: one_loss(th, xi, yi), (theta,), (vec,))[1]

        with math_attention():
            return _vmapped(grad(dir_deriv), x, y, in_dims=(0, 0))

    # ------------------------------------------------------------------ many thetas
    # Problems that each have their own theta (EditedProblems): "at" methods take one theta
    # per example (``thetas [R, p]`` with ``x [R, ...]``), "sums" methods sum a shared batch
    # at each of ``K`` thetas. Defaults vmap over the thetas; subclasses may do better. Their
    # ``x`` is what :meth:`many_inputs` made of the data (except for ``input_grads_at``).
    def many_inputs(self, x: Batch) -> Batch:
        """The form of the data that the many-theta methods read (computed once per data)."""
        return x

    def outputs_at(self, thetas: torch.Tensor, x: Batch) -> torch.Tensor:
        """``[R, ...]``: the prediction tensor of example ``r`` at ``thetas[r]``."""

        def one(th: torch.Tensor, xi: Batch) -> torch.Tensor:
            return self.obj.predictions(th, unsqueeze_batch(xi))[0]

        with math_attention():
            return _vmapped(one, thetas, x, in_dims=(0, 0))

    def values_at(
        self, thetas: torch.Tensor, x: Batch, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        """``[R]``: ``l(z_r; theta_r)`` (or the measurement)."""
        with math_attention():
            return _vmapped(self._single(which), thetas, x, y, in_dims=(0, 0, 0))

    def grads_at(
        self, thetas: torch.Tensor, x: Batch, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        """``[R, p]``: ``grad_theta l(z_r; theta_r)`` (or of the measurement)."""
        with math_attention():
            return _vmapped(grad(self._single(which)), thetas, x, y, in_dims=(0, 0, 0))

    def hvps_at(
        self, vecs: torch.Tensor, thetas: torch.Tensor, x: Batch, y: torch.Tensor
    ) -> torch.Tensor:
        """``[R, p]``: ``Hess_theta l(z_r; theta_r) v_r``."""
        g = grad(self._single("loss"))

        def one(v: torch.Tensor, th: torch.Tensor, xi: Batch, yi: torch.Tensor) -> torch.Tensor:
            return jvp(lambda t: g(t, xi, yi), (th,), (v,))[1]

        with math_attention():
            return _vmapped(one, vecs, thetas, x, y, in_dims=(0, 0, 0, 0))

    def input_grads_at(
        self, vecs: torch.Tensor, thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """``[R, *x.shape[1:]]``: ``grad_x (v_r . grad_theta l(x_r, y_r; theta_r))`` (eq. 5 at
        each example's own theta)."""
        one = self._single("loss")

        def dir_deriv(v: torch.Tensor, th: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor):
            return jvp(lambda t: one(t, xi, yi), (th,), (v,))[1]

        with math_attention():
            return _vmapped(grad(dir_deriv, argnums=2), vecs, thetas, x, y, in_dims=(0,) * 4)

    def value_sums(
        self, thetas: torch.Tensor, x: Batch, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        """``[K]``: ``sum_i l(z_i; theta_t)`` over the batch for each row of ``thetas``."""
        fn = self._per_example_fn(which)
        with math_attention():
            return _vmapped(lambda th: fn(th, x, y).sum(), thetas)

    def grad_sums(
        self, thetas: torch.Tensor, x: Batch, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        """``[K, p]``: ``sum_i grad_theta l(z_i; theta_t)`` for each row of ``thetas``."""
        fn = self._per_example_fn(which)
        with math_attention():
            return _vmapped(grad(lambda th: fn(th, x, y).sum()), thetas)

    def hvp_sums(
        self, vecs: torch.Tensor, thetas: torch.Tensor, x: Batch, y: torch.Tensor
    ) -> torch.Tensor:
        """``[K, p]``: ``sum_i Hess_theta l(z_i; theta_t) v_t`` for each row ``t``."""
        g = grad(lambda th: self.obj.losses(th, x, y).sum())

        def one(v: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
            return jvp(g, (th,), (v,))[1]

        with math_attention():
            return _vmapped(one, vecs, thetas)

    def sums_bytes(self, k: int, b: int, p: int, itemsize: int, activations: int) -> float:
        """Estimated peak memory of a ``*_sums`` call for ``k`` thetas on ``b`` examples."""
        return k * b * 3 * activations + 3 * k * p * itemsize

    def hvp_sums_factors(self, thetas: torch.Tensor, x: Batch, y: torch.Tensor) -> Any | None:
        """Per-theta quantities of a batch that make repeated :meth:`hvp_sums` at fixed
        thetas cheap (:meth:`hvp_sums_from`; indexable by theta), or None (none exist)."""
        return None

    def hvp_sums_from(
        self, vecs: torch.Tensor, factors: Any, rows: torch.Tensor, x: Batch
    ) -> torch.Tensor:
        """:meth:`hvp_sums` for the thetas ``rows`` from :meth:`hvp_sums_factors`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ closed-form hooks
    def curvature_factors(self, theta: torch.Tensor, x: Batch, y: torch.Tensor) -> Any | None:
        """Per-chunk quantities that make repeated curvature products cheap at a fixed theta
        (see :meth:`product_from_factors`), or None when the backend has none."""
        return None

    def product_from_factors(self, vecs: torch.Tensor, factors: Any) -> torch.Tensor:
        """``sum_i C_i v_j`` from :meth:`curvature_factors`."""
        raise NotImplementedError

    def factors_nbytes(self, factors: Any, x: Batch) -> int:
        """Memory that keeping ``factors`` costs."""
        return 0

    def dense_curvature_sum(self, theta: torch.Tensor, chunks: Iterator) -> torch.Tensor | None:
        """``[p, p]``: ``sum_i Hess l(z_i)`` over ``chunks`` in closed form, or None."""
        return None

    def scoring_chunk_size(self, k: int, default: int, n: int) -> int:
        """Examples per scoring chunk for ``k`` vectors."""
        return default

    def chunk_bytes(self, b: int, p: int, itemsize: int, activations: int) -> float:
        """Estimated peak memory of one derivative pass over ``b`` examples (per-example
        gradients ``[b, p]`` and their temporaries, ``activations`` bytes saved per example
        for the backward pass, vectorised)."""
        return b * (3 * p * itemsize + 3 * activations)

    # ------------------------------------------------------------------ helpers
    def _per_example_fn(self, which: str) -> Callable:
        return self.obj.losses if which == "loss" else self.obj.measurements

    def _single(self, which: str) -> Callable:
        fn = self._per_example_fn(which)

        def one(theta: torch.Tensor, x: Batch, y: torch.Tensor) -> torch.Tensor:
            return fn(theta, unsqueeze_batch(x), y.unsqueeze(0))[0]

        return one

    def describe(self) -> dict[str, str]:
        """``{"backend": name, "backend_reason": why}`` for diagnostics and artifacts."""
        return {"backend": self.name, "backend_reason": self.reason}


class VmapBackend(DerivativesBackend):
    """``torch.func`` with ``vmap`` over examples (module docstring)."""

    name = "vmap"

    def per_example_grads(
        self, theta: torch.Tensor, x: Batch, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        with math_attention():
            return _vmapped(grad(self._single(which)), theta, x, y, in_dims=(None, 0, 0))

    def _output_jacobians(self, theta: torch.Tensor, x: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        def f1(th: torch.Tensor, xi: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.obj.predictions(th, unsqueeze_batch(xi))[0]
            return out.reshape(-1), out  # the outputs ride along as aux: no second forward

        with math_attention():
            return _vmapped(jacrev(f1, has_aux=True), theta, x, in_dims=(None, 0))


class JacobianBackend(DerivativesBackend):
    """Whole-batch forward passes; per-example gradients as rows of a Jacobian (module
    docstring)."""

    name = "jacobian"
    #: examples per Jacobian: each of the ``s`` cotangents is pulled back through the whole
    #: sub-batch's graph, so a chunk of ``b`` costs ``b s`` single-example backward passes
    #: (and ``s^2`` activations at once) instead of ``b^2``
    SUB_BATCH = 8

    def chunk_bytes(self, b: int, p: int, itemsize: int, activations: int) -> float:
        s = min(b, self.SUB_BATCH)
        return b * 3 * p * itemsize + s * s * 2 * activations + b * activations

    def per_example_grads(
        self, theta: torch.Tensor, x: Batch, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        fn = self._per_example_fn(which)
        return self.rows_jacobian(lambda th, xs, ys: fn(th, xs, ys), theta, x, y)

    def rows_jacobian(
        self,
        f: Callable[[torch.Tensor, Batch, torch.Tensor], torch.Tensor],
        theta: torch.Tensor,
        x: Batch,
        y: torch.Tensor,
    ) -> torch.Tensor:
        """``[B, q]``: the gradient in ``theta [q]`` of each example's value ``f(theta, x, y)
        [B]`` (examples independent), by Jacobians of sub-batches of :attr:`SUB_BATCH`."""
        out = []
        with math_attention(), transform_errors():
            for s in range(0, y.shape[0], self.SUB_BATCH):
                sl = slice(s, s + self.SUB_BATCH)
                xs, ys = index_batch(x, sl), y[sl]
                out.append(jacrev(lambda th, xs=xs, ys=ys: f(th, xs, ys))(theta))
        return torch.cat(out, 0)

    def input_grad_of_loss_jvp(
        self, vec: torch.Tensor, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        # examples do not interact, so the gradient of the sum in x_i is example i's own
        def total(xx: torch.Tensor) -> torch.Tensor:
            return jvp(lambda th: self.obj.losses(th, xx, y), (theta,), (vec,))[1].sum()

        with math_attention():
            return grad(total)(x)

    # vmap cannot run these models: one theta (one example) at a time
    def outputs_at(self, thetas: torch.Tensor, x: Batch) -> torch.Tensor:
        return torch.stack(
            [
                self.obj.predictions(t, index_batch(x, slice(r, r + 1)))[0]
                for r, t in enumerate(thetas)
            ]
        )

    def values_at(
        self, thetas: torch.Tensor, x: Batch, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        fn = self._per_example_fn(which)
        return torch.stack([fn(t, *self._row(x, y, r))[0] for r, t in enumerate(thetas)])

    def grads_at(
        self, thetas: torch.Tensor, x: Batch, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        rows = [self.per_example_grads(t, *self._row(x, y, r), which) for r, t in enumerate(thetas)]
        return torch.cat(rows)

    def hvps_at(
        self, vecs: torch.Tensor, thetas: torch.Tensor, x: Batch, y: torch.Tensor
    ) -> torch.Tensor:
        rows = [
            self.hvp_sum(v[None], t, *self._row(x, y, r))
            for r, (v, t) in enumerate(zip(vecs, thetas))
        ]
        return torch.cat(rows)

    def input_grads_at(
        self, vecs: torch.Tensor, thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        rows = [
            self.input_grad_of_loss_jvp(v, t, x[r : r + 1], y[r : r + 1])
            for r, (v, t) in enumerate(zip(vecs, thetas))
        ]
        return torch.cat(rows)

    def value_sums(
        self, thetas: torch.Tensor, x: Batch, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        fn = self._per_example_fn(which)
        return torch.stack([fn(t, x, y).sum() for t in thetas])

    def grad_sums(
        self, thetas: torch.Tensor, x: Batch, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        fn = self._per_example_fn(which)
        with math_attention():
            return torch.stack([grad(lambda th: fn(th, x, y).sum())(t) for t in thetas])

    def hvp_sums(
        self, vecs: torch.Tensor, thetas: torch.Tensor, x: Batch, y: torch.Tensor
    ) -> torch.Tensor:
        return torch.cat([self.hvp_sum(v[None], t, x, y) for v, t in zip(vecs, thetas)])

    def sums_bytes(self, k: int, b: int, p: int, itemsize: int, activations: int) -> float:
        return b * 3 * activations + 3 * k * p * itemsize

    @staticmethod
    def _row(x: Batch, y: torch.Tensor, r: int) -> tuple[Batch, torch.Tensor]:
        return index_batch(x, slice(r, r + 1)), y[r : r + 1]

    def _output_jacobians(self, theta: torch.Tensor, x: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with math_attention():
            out = self.obj.predictions(theta, x).detach()
            jac = jacrev(lambda th: self.obj.predictions(th, x))(theta)  # [B, *out, p]
        b = out.shape[0]
        return jac.reshape(b, -1, jac.shape[-1]), out


def _closed_form_if_direct(name: str) -> Callable:
    """:class:`LinearHeadBackend`'s ``name``: the head's closed form when the model's output
    is the layer's (``head.output_shape``), else the inherited ``vmap`` over thetas."""

    def method(self: LinearHeadBackend, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.head.output_shape is None:
            return getattr(super(LinearHeadBackend, self), name)(*args, **kwargs)
        return getattr(self.head, name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = getattr(DerivativesBackend, name).__doc__
    return method


class LinearHeadBackend(VmapBackend):
    """Closed forms for theta = one ``nn.Linear`` on frozen features (module docstring).

    Under an active ``torch.func`` transform (e.g. a caller's own ``vmap``) the products step
    aside to :class:`VmapBackend`'s autograd, which composes with transforms.
    """

    name = "linear_head"
    closed_form_scoring = True
    #: largest scoring chunk (its per-example work is a few matrix products, so bigger chunks
    #: amortise the per-chunk forward: scoring MNIST-LR for one test point took 42 ms in
    #: 512-example chunks, 25 ms in 4096)
    MAX_SCORING_CHUNK = 4096

    def __init__(self, objective: ObjectiveLike, head: Any, reason: str = "") -> None:
        super().__init__(objective, reason)
        self.head = head

    def per_example_grads(
        self, theta: torch.Tensor, x: Batch, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        return self.head.per_example_grads(theta, x, y, which)

    def loss_jvp(
        self,
        vecs: torch.Tensor,
        theta: torch.Tensor,
        x: Batch,
        y: torch.Tensor,
        which: str = "loss",
    ) -> torch.Tensor:
        return self.head.loss_jvp(vecs, theta, x, y, which)

    def curvature_factors(self, theta: torch.Tensor, x: Batch, y: torch.Tensor) -> Any | None:
        if not is_plain(theta, *[t for t in (x,) if isinstance(t, torch.Tensor)]):
            return None
        return self.head.output_hessians(theta, x, y)

    def product_from_factors(self, vecs: torch.Tensor, factors: Any) -> torch.Tensor:
        phi, lam = factors
        return self.head.curvature_product(vecs.to(phi.dtype), phi, lam)

    def factors_nbytes(self, factors: Any, x: Batch) -> int:
        phi, lam = factors
        size = lam.numel() * lam.element_size()
        if not isinstance(x, torch.Tensor) or (
            phi.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        ):
            size += phi.numel() * phi.element_size()  # computed features, not a view of x
        return size

    def hvp_sum(
        self, vecs: torch.Tensor, theta: torch.Tensor, x: Batch, y: torch.Tensor
    ) -> torch.Tensor:
        factors = self.curvature_factors(theta, x, y) if is_plain(vecs) else None
        if factors is None:
            return super().hvp_sum(vecs, theta, x, y)
        return self.product_from_factors(vecs, factors)

    def ggn_sum(
        self, vecs: torch.Tensor, theta: torch.Tensor, x: Batch, y: torch.Tensor
    ) -> torch.Tensor:
        # outputs linear in theta: the Gauss-Newton matrix is the Hessian
        return self.hvp_sum(vecs, theta, x, y)

    def dense_curvature_sum(self, theta: torch.Tensor, chunks: Iterator) -> torch.Tensor | None:
        """``sum_i J_i^T Lambda_i J_i`` (= the Hessian: outputs linear in theta) in
        ``O(n C^2 d^2)`` matrix products (:meth:`~inflens.linear_head.LinearHead.curvature_blocks`)
        instead of ``p`` Hessian-vector products."""
        head = self.head
        blocks = None
        for _, x, y in chunks:
            blocks = head.curvature_blocks(theta, x, y, blocks)
        if blocks is None:  # no data on this rank
            dd = head.in_features + int(head.has_bias)
            c = head.out_features
            blocks = torch.zeros(c, dd, c, dd, dtype=theta.dtype, device=theta.device)
        return head.to_theta_order(blocks)

    # many thetas: closed forms when the model's output is the layer's output reshaped
    # (``head.output_shape``, checked at selection; ``x`` is then the layer's inputs from
    # :meth:`many_inputs`), vmap over thetas otherwise. Not for use under torch.func
    # transforms (the closed forms run autograd).
    outputs_at = _closed_form_if_direct("outputs_at")
    values_at = _closed_form_if_direct("values_at")
    grads_at = _closed_form_if_direct("grads_at")
    hvps_at = _closed_form_if_direct("hvps_at")
    value_sums = _closed_form_if_direct("value_sums")
    grad_sums = _closed_form_if_direct("grad_sums")
    hvp_sums = _closed_form_if_direct("hvp_sums")

    def hvp_sums_factors(self, thetas: torch.Tensor, x: Batch, y: torch.Tensor) -> Any | None:
        if self.head.output_shape is None:
            return None
        return self.head.output_curvature_many(thetas, x, y)

    def hvp_sums_from(
        self, vecs: torch.Tensor, factors: Any, rows: torch.Tensor, x: Batch
    ) -> torch.Tensor:
        return self.head.product_many(vecs, factors[rows], x)

    def sums_bytes(self, k: int, b: int, p: int, itemsize: int, activations: int) -> float:
        if self.head.output_shape is None:
            return super().sums_bytes(k, b, p, itemsize, activations)
        c = self.head.out_features
        return (k * b * (c * c + 6 * c) + b * self.head.in_features + 3 * k * p) * itemsize

    def many_inputs(self, x: Batch) -> Batch:
        if self.head.output_shape is None:
            return x
        # the layer's inputs do not depend on theta: computed once, in chunks of the data
        size = CPU_CHUNK_MANY
        return torch.cat(
            [
                self.head.layer_inputs(index_batch(x, slice(s, s + size)))
                for s in range(0, batch_len(x), size)
            ]
        )

    def scoring_chunk_size(self, k: int, default: int, n: int) -> int:
        """The largest chunk whose ``[chunk, d + (2k + 1) C]`` working set fits 256 MiB."""
        head = self.head
        itemsize = torch.finfo(self.obj.dtype).bits // 8
        per_example = (head.in_features + (2 * k + 1) * head.out_features) * itemsize
        fits = max(1, (256 * 2**20) // per_example)
        return int(max(default, min(n, self.MAX_SCORING_CHUNK, fits)))


# ---------------------------------------------------------------------------- selection
def select_backend(
    objective: Any, x: Batch, y: torch.Tensor, requested: str = "auto"
) -> DerivativesBackend:
    """The backend for ``objective``, probed once on the batch ``x, y`` (a few examples).

    ``"auto"``: the closed-form Linear head when theta is one and it reproduces the autograd
    gradients of the probe batch to round-off; otherwise ``"vmap"`` when the model runs one
    example at a time under ``vmap`` on the probe batch, otherwise ``"jacobian"``. The probe
    is the only place where a failure selects a path; the choice and its reason are recorded.
    """
    if requested not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    xs, ys = index_batch(x, slice(0, 4)), y[:4]
    theta = objective.theta
    if requested == "jacobian":
        return JacobianBackend(objective, "requested")
    if requested in ("auto", "linear_head"):
        head, why = _probe_linear_head(objective, xs, ys)
        if head is not None:
            head.direct_output_check(theta, xs)  # sets head.output_shape where it applies
            return LinearHeadBackend(
                objective, head, "theta is one Linear layer on frozen features"
            )
        if requested == "linear_head":
            raise InputError(f"backend='linear_head' does not apply: {why}")
    if requested == "vmap":
        return VmapBackend(objective, "requested")
    try:
        VmapBackend(objective).per_example_grads(theta, xs, ys)
    except VmapError as exc:
        original = str(exc).split("Original error: ")[-1]
        if not any(k in original for k in _BATCHABLE_FAILURES):
            raise  # e.g. in-place writes to the inputs: whole batches would corrupt the data
        first = original.splitlines()[0][:160]
        return JacobianBackend(
            objective,
            f"vmap over examples failed on a probe batch ({first}); whole-batch Jacobians",
        )
    return VmapBackend(objective, "vmap over examples runs this model")


#: vmap failures that running the model on whole batches avoids (control flow that depends on
#: the data: Hugging Face attention masks, ``.item()``); others (in-place writes) are errors
_BATCHABLE_FAILURES = ("data-dependent", ".item()", "Data-dependent")


def _probe_linear_head(objective: Any, x: Batch, y: torch.Tensor) -> tuple[Any, str]:
    """``(LinearHead, "")`` when theta is one ``nn.Linear`` on frozen 2-D features and its
    closed-form gradients reproduce whole-batch autograd on ``x, y`` to round-off, else
    ``(None, why not)``."""
    head, why = find_linear_head(objective)
    if head is None:
        return None, why
    theta = objective.theta
    try:
        closed = head.per_example_grads(theta, x, y)
    except ValueError as exc:  # the layer's call is not one [batch, features] product
        return None, str(exc)
    auto = JacobianBackend(objective).per_example_grads(theta, x, y)
    eps = torch.finfo(objective.dtype).eps
    scale = float(auto.abs().max()) + eps
    if closed.shape != auto.shape or float((closed - auto).abs().max()) > 1e3 * eps * scale:
        return None, "the closed form does not reproduce autograd (a frozen part depends on theta?)"
    return head, ""
