"""What was trained: a model, a per-example loss, the parameters theta and the L2 penalty.

The empirical risk is ``R(theta) = mean_i loss(z_i, theta) + (l2 / 2) * ||theta||^2`` over the
*selected* parameters theta (all others are held fixed). All functions here take theta as one
flat vector, so solvers see plain ``[p]`` / ``[k, p]`` tensors; the model is evaluated with
``torch.func.functional_call`` and per-example quantities are vectorised with ``vmap``.

The model is always evaluated in eval mode (BatchNorm uses its running statistics, dropout is
off): influence is defined for a fixed, deterministic function of theta.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from .errors import InputError, VmapError
from .forward_mode import directional_derivative
from .losses import LossFn, check_targets, output_hessians, resolve_loss

if TYPE_CHECKING:  # pragma: no cover
    from .linear_head import LinearHead

Measurement = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_VMAP_HINT = (
    "Per-example gradients run the model on one example at a time under torch.func.vmap. "
    "Common causes of failure: in-place operations on inputs or parameters (use out-of-place "
    "ops), BatchNorm forced into training mode, data-dependent Python control flow or "
    ".item() calls inside forward(), or layers that only accept batched inputs of a fixed size."
)


def _plain(*tensors: torch.Tensor) -> bool:
    """True when no tensor is wrapped by a torch.func transform (so plain autograd may run)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not any(wrapped(t) for t in tensors)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


def _select(model: nn.Module, params: str | Sequence[str] | None) -> list[str]:
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
        if not names:
            raise InputError("the model has no parameters that require grad; pass params=...")
        return names
    wanted = [params] if isinstance(params, str) else list(params)
    names: list[str] = []
    for w in wanted:
        hits = [n for n in named if n == w or n.startswith(w)]
        if not hits:
            raise InputError(
                f"params entry {w!r} matches no parameter; the model has: {', '.join(named)}"
            )
        names += [h for h in hits if h not in names]
    return names


class Objective:
    """A trained model together with its per-example loss and L2 regularisation.

    Args:
        model: any ``torch.nn.Module``; its current parameters are theta-hat.
        loss: a built-in name (``"cross_entropy"``, ``"binary_logistic"``, ``"hinge"``,
            ``"smooth_hinge"``, ``"mse"``) or a callable ``(outputs, targets) -> [batch]``.
        l2: weight of ``(l2 / 2) ||theta||^2`` added to the *mean* loss (so ``H`` contains
            ``l2 * I`` and the training-side gradient contains ``l2 * theta``).
        params: ``None`` for every parameter that requires grad, or parameter names / name
            prefixes (e.g. ``"fc."``) to take as theta; the rest of the network is frozen.
        measurement: optional ``(outputs, targets) -> [batch]`` to explain instead of the test
            loss (a margin, a logit, a probability). Defaults to the loss.
        t: temperature of ``"smooth_hinge"`` (default 0.001).

    Example:
        >>> obj = Objective(nn.Linear(4, 3, bias=False), "cross_entropy", l2=0.01)
        >>> obj.p
        12
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | LossFn,
        l2: float = 0.0,
        params: str | Sequence[str] | None = None,
        measurement: Measurement | None = None,
        t: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (float(l2) >= 0.0):
            raise InputError(f"l2 must be a non-negative number, got {l2}")
        if measurement is not None and not callable(measurement):
            raise InputError("measurement must be a callable (outputs, targets) -> [batch]")
        self.model = model
        self.loss_name, self.loss_fn = resolve_loss(loss, t)
        self.builtin_loss = isinstance(loss, str)
        self.l2 = float(l2)
        self.measurement = measurement
        self.names = _select(model, params)
        named = dict(model.named_parameters())
        tensors = [named[n].detach() for n in self.names]
        dtypes = {t_.dtype for t_ in tensors}
        if len(dtypes) != 1:
            raise InputError(
                f"the selected parameters mix dtypes {sorted(map(str, dtypes))}; convert the "
                "model with model.double() or model.float()"
            )
        self.dtype = tensors[0].dtype
        if not self.dtype.is_floating_point:
            raise InputError(f"parameters must be floating point, got {self.dtype}")
        self.device = tensors[0].device
        self.shapes = [tuple(t_.shape) for t_ in tensors]
        self.numels = [t_.numel() for t_ in tensors]
        self.theta = torch.cat([t_.reshape(-1) for t_ in tensors]).clone()
        bad = ~torch.isfinite(self.theta)
        if bad.any():
            raise InputError(
                f"the model parameters contain {int(bad.sum())} NaN/inf values; "
                "influence is undefined at a non-finite theta"
            )
        selected = set(self.names)
        self.frozen = {n: p.detach() for n, p in named.items() if n not in selected}
        self.frozen.update({n: b for n, b in model.named_buffers()})
        #: use the closed-form per-example gradients of a top Linear layer when theta is exactly
        #: that layer (see :mod:`inflens.linear_head`); set False to force autograd
        self.use_linear_head = True
        self._head: object | None = None  # None: not probed yet; False: not applicable
        self._held_eval = False

    # ------------------------------------------------------------------ parameters
    @property
    def p(self) -> int:
        """Number of parameters in theta."""
        return int(self.theta.numel())

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat ``[p]`` vector into the named parameter tensors."""
        parts = torch.split(theta, self.numels)
        return {n: part.view(s) for n, part, s in zip(self.names, parts, self.shapes)}

    def load_into_model(self, theta: torch.Tensor) -> None:
        """Copy a flat theta into the model's selected parameters (in place) and make it this
        objective's theta (every later computation uses it; an :class:`~inflens.Influence`
        fitted before must be fitted again)."""
        if theta.shape != self.theta.shape:
            raise InputError(
                f"theta must have shape {tuple(self.theta.shape)}, got {tuple(theta.shape)}"
            )
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in self.unflatten(theta).items():
                named[n].copy_(v)
        self.theta = theta.detach().to(self.theta.dtype).clone()

    # ------------------------------------------------------------------ data checks
    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, name: str = "data", start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Move a chunk to theta's device and check dtype and finiteness."""
        x = x.to(self.device)
        y = y.to(self.device)
        if x.is_floating_point() and x.dtype != self.dtype:
            raise InputError(
                f"{name} inputs are {x.dtype} but the model parameters are {self.dtype}; "
                f"convert the inputs (e.g. X.to({self.dtype})) or the model"
            )
        for t_, what in ((x, "inputs"), (y, "targets")):
            if t_.is_floating_point():
                bad = ~torch.isfinite(t_)
                if bad.any():
                    row = int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0, 0]) + start
                    raise InputError(
                        f"{name} {what} contain {int(bad.sum())} NaN/inf values "
                        f"(first in example {row}); clean or drop those examples"
                    )
        return x, y

    def check_batch(self, x: torch.Tensor, y: torch.Tensor, name: str = "data") -> None:
        """Run the model on a small batch and check outputs against targets and the loss."""
        try:
            with torch.no_grad():
                out = self.outputs(self.theta, x)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here is a shape/type mismatch
            raise InputError(
                f"the model could not process {name} inputs of shape {tuple(x.shape)} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(out, torch.Tensor):
            raise InputError(f"the model must return a tensor, got {type(out).__name__}")
        if self.builtin_loss:
            check_targets(self.loss_name, out, y)
        with torch.no_grad():
            vals = self.losses(self.theta, x, y)
        if vals.shape != (x.shape[0],):
            raise InputError(
                f"the loss must return one value per example, shape [{x.shape[0]}], "
                f"got {tuple(vals.shape)}"
            )
        if not torch.isfinite(vals).all():
            raise InputError(f"the loss is NaN/inf on some {name} examples at theta-hat")
        if self.measurement is not None:
            with torch.no_grad():
                m = self.measurement(out, y)
            if m.shape != (x.shape[0],):
                raise InputError(
                    f"the measurement must return one value per example, shape "
                    f"[{x.shape[0]}], got {tuple(m.shape)}"
                )

    # ------------------------------------------------------------------ functions of theta
    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Hold the model in eval mode for a whole loop.

        Inside, :meth:`outputs` skips switching every submodule to eval mode and back on each
        call (a per-call cost that dominates tiny batch-1 steps such as LiSSA's). Re-entrant.
        """
        if self._held_eval:
            yield
            return
        with eval_mode(self.model):
            self._held_eval = True
            try:
                yield
            finally:
                self._held_eval = False

    def outputs(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Model outputs at a flat ``theta`` (eval mode)."""
        if self._held_eval:
            return functional_call(self.model, {**self.frozen, **self.unflatten(theta)}, (x,))
        with eval_mode(self.model):
            return functional_call(self.model, {**self.frozen, **self.unflatten(theta)}, (x,))

    def losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example losses ``[B]`` (no regulariser)."""
        return self.loss_fn(self.outputs(theta, x), y)

    def measurements(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example test measurement ``[B]`` (the loss unless ``measurement`` was given)."""
        if self.measurement is None:
            return self.losses(theta, x, y)
        return self.measurement(self.outputs(theta, x), y)

    def regularizer(self, theta: torch.Tensor) -> torch.Tensor:
        """``(l2 / 2) * ||theta||^2``."""
        return 0.5 * self.l2 * (theta * theta).sum()

    def risk(
        self,
        theta: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``mean_i w_i loss(z_i) + (l2/2)||theta||^2`` on one batch (``w = 1`` by default)."""
        vals = self.losses(theta, x, y)
        if weights is not None:
            vals = vals * weights
        return vals.mean() + self.regularizer(theta)

    # ------------------------------------------------------------------ per-example derivatives
    def _single(self, which: str) -> Callable:
        fn = self.losses if which == "loss" else self.measurements

        def one(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return fn(theta, x.unsqueeze(0), y.unsqueeze(0))[0]

        return one

    def linear_head(self, x: torch.Tensor, y: torch.Tensor):
        """The closed-form :class:`~inflens.linear_head.LinearHead` if theta is one top Linear
        layer on frozen features (probed once on ``x, y``), else ``None``."""
        if not self.use_linear_head:
            return None
        if self._head is None:
            from .linear_head import probe

            self._head = probe(self, x, y) or False
        return self._head or None

    def per_example_grads(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        which: str = "loss",
        theta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-example gradients ``[B, p]`` of the loss (or the measurement), no regulariser.

        Closed form ``e_i phi_i^T`` when theta is a top Linear layer (:mod:`inflens.linear_head`),
        autograd under ``vmap`` otherwise.
        """
        theta = self.theta if theta is None else theta
        head = self.linear_head(x, y)
        if head is not None:
            return head.per_example_grads(theta, x, y, which)
        return self._per_example_grads_autograd(x, y, which, theta)

    def _per_example_grads_autograd(
        self, x: torch.Tensor, y: torch.Tensor, which: str, theta: torch.Tensor
    ) -> torch.Tensor:
        f = grad(self._single(which))
        try:
            return vmap(f, in_dims=(None, 0, 0))(theta, x, y)
        except (RuntimeError, NotImplementedError) as exc:
            raise VmapError(f"{_VMAP_HINT} Original error: {exc}") from exc

    def mean_grad(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        which: str = "loss",
        theta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gradient ``[p]`` of the *sum* over the batch of the loss (or measurement)."""
        theta = self.theta if theta is None else theta
        fn = self.losses if which == "loss" else self.measurements
        return grad(lambda th: fn(th, x, y).sum())(theta)

    def hvp_sum(
        self,
        vecs: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        theta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``sum_{i in batch} Hess_theta loss(z_i) @ v`` for each row ``v`` of ``vecs [k, p]``.

        Pearlmutter's trick, forward-over-reverse: ``jvp(grad(sum loss), v)`` under ``vmap``
        (reverse-over-reverse autograd for a single vector outside torch.func transforms).
        No regulariser.
        """
        theta = self.theta if theta is None else theta
        closed = self._head_curvature_product(vecs, x, y, theta)
        if closed is not None:
            return closed
        if vecs.shape[0] == 1 and _plain(vecs, x, theta):
            return self._hvp_double_backward(vecs[0], x, y, theta).unsqueeze(0)
        g = grad(lambda th: self.losses(th, x, y).sum())

        def one(v: torch.Tensor) -> torch.Tensor:
            return jvp(g, (theta,), (v,))[1]

        try:
            return vmap(one)(vecs)
        except (RuntimeError, NotImplementedError) as exc:
            raise VmapError(f"{_VMAP_HINT} Original error: {exc}") from exc

    def head_curvature_factors(
        self, x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor | None = None
    ) -> tuple[LinearHead, torch.Tensor, torch.Tensor] | None:
        """``(head, phi, Lambda)`` for the closed-form curvature products of a top Linear layer
        (:meth:`~inflens.linear_head.LinearHead.output_hessians`), or None when theta is not
        one (or a torch.func transform is active). A caller making several products at the
        same theta may keep them (:meth:`inflens.curvature.Curvature.reusing`)."""
        theta = self.theta if theta is None else theta
        if not _plain(x, theta):
            return None
        head = self.linear_head(x, y)
        if head is None:
            return None
        try:
            phi, lam = head.output_hessians(theta, x, y)
        except (ValueError, RuntimeError):
            return None
        return head, phi, lam

    def _head_curvature_product(
        self, vecs: torch.Tensor, x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor
    ) -> torch.Tensor | None:
        """The closed-form product of a top Linear layer (see :meth:`head_curvature_factors`),
        or None."""
        if not _plain(vecs):
            return None
        factors = self.head_curvature_factors(x, y, theta)
        if factors is None:
            return None
        head, phi, lam = factors
        return head.curvature_product(vecs.to(self.dtype), phi, lam)

    def _hvp_double_backward(
        self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor
    ) -> torch.Tensor:
        """One HVP by reverse-over-reverse autograd: for a single vector this avoids the
        per-call overhead of forward-mode decompositions (several times faster on batch-1
        LiSSA steps)."""
        th = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            total = self.losses(th, x, y).sum()
            (g,) = torch.autograd.grad(total, th, create_graph=True)
            if not g.requires_grad:  # piecewise-linear loss (hinge): zero Hessian
                return torch.zeros_like(v)
            (hv,) = torch.autograd.grad(g, th, grad_outputs=v, allow_unused=True)
        return torch.zeros_like(v) if hv is None else hv.detach()

    def ggn_sum(
        self,
        vecs: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        theta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``sum_{i in batch} J_i^T Lambda_i J_i v`` (generalized Gauss-Newton) for rows of ``vecs``.

        ``J_i = d f(x_i) / d theta`` is the Jacobian of the model outputs and ``Lambda_i`` the
        Hessian of the loss with respect to the outputs. Computed as a forward-mode JVP of the
        outputs, an output-space Hessian-vector product of the loss, and a VJP back. Positive
        semi-definite whenever the loss is convex in the outputs (all built-in losses). No
        regulariser (its Hessian ``l2 I`` is exact and added by the curvature operator).
        """
        theta = self.theta if theta is None else theta
        closed = self._head_curvature_product(vecs, x, y, theta)
        if closed is not None:  # outputs linear in theta: the GGN is the Hessian
            return closed
        fwd = lambda th: self.outputs(th, x)  # noqa: E731
        out, pull = vjp(fwd, theta)
        out = out.detach()
        dloss = grad(lambda o: self.loss_fn(o, y).sum())

        def one(v: torch.Tensor) -> torch.Tensor:
            jv = jvp(fwd, (theta,), (v,))[1]
            hjv = jvp(dloss, (out,), (jv,))[1]
            return pull(hjv)[0]

        if vecs.shape[0] == 1:
            return one(vecs[0]).unsqueeze(0)
        try:
            return vmap(one)(vecs)
        except (RuntimeError, NotImplementedError) as exc:
            raise VmapError(f"{_VMAP_HINT} Original error: {exc}") from exc

    def ggn_dense_sum(
        self, x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[p, p]``: ``sum_{i in batch} J_i^T Lambda_i J_i`` formed explicitly.

        Per-example output Jacobians ``J_i [C, p]`` (reverse mode under ``vmap``, ``C``
        outputs per example) and output Hessians ``Lambda_i [C, C]``, then one
        ``[B C, p]^T x [B C, p]`` product: ``C`` backward passes instead of the ``p``
        Gauss-Newton-vector products a column-by-column build needs. Memory ``O(B C p)``.
        """
        theta = self.theta if theta is None else theta

        def f1(th: torch.Tensor, xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.outputs(th, xi.unsqueeze(0))[0]
            return out.reshape(-1), out  # the outputs ride along as aux: no second forward

        try:
            jac, outs = vmap(jacrev(f1, has_aux=True), in_dims=(None, 0))(theta, x)  # [B, C, p]
            lam = output_hessians(self.loss_fn, outs.detach(), y)  # [B, C, C]
        except (RuntimeError, NotImplementedError) as exc:
            raise VmapError(f"{_VMAP_HINT} Original error: {exc}") from exc
        lj = torch.einsum("bcd,bdp->bcp", lam, jac)
        return jac.reshape(-1, jac.shape[-1]).T @ lj.reshape(-1, lj.shape[-1])

    def loss_jvp(
        self,
        vecs: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        theta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[k, B]`` directional derivatives ``grad_theta loss(z_i) . v`` (forward mode, no reg).

        Closed form when theta is a top Linear layer (:mod:`inflens.linear_head`).
        """
        theta = self.theta if theta is None else theta
        head = self.linear_head(x, y)
        if head is not None:
            return head.loss_jvp(vecs, theta, x, y)

        def one(v: torch.Tensor) -> torch.Tensor:
            return jvp(lambda th: self.losses(th, x, y), (theta,), (v,))[1]

        if vecs.shape[0] == 1:
            if _plain(vecs, x, theta):
                try:  # one dual pass with fused convolution tangents (inflens.forward_mode)
                    return directional_derivative(
                        lambda th: self.losses(th, x, y), theta, vecs[0]
                    ).unsqueeze(0)
                except (RuntimeError, NotImplementedError):
                    pass  # an op without a forward-AD rule on dual tensors: torch.func below
            return one(vecs[0]).unsqueeze(0)
        try:
            return vmap(one)(vecs)
        except (RuntimeError, NotImplementedError) as exc:
            raise VmapError(f"{_VMAP_HINT} Original error: {exc}") from exc

    def input_grad_of_loss_jvp(
        self, vec: torch.Tensor, x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, *x.shape[1:]]``: ``grad_x (v . grad_theta loss(x_i, y_i))`` for each example.

        With ``v = H^-1 grad L(z_test)`` this is ``-I_pert,loss(z_i, z_test)`` (eq. 5).
        """
        theta = self.theta if theta is None else theta
        one_loss = self._single("loss")

        def dir_deriv(xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return jvp(lambda th: one_loss(th, xi, yi), (theta,), (vec,))[1]

        try:
            return vmap(grad(dir_deriv), in_dims=(0, 0))(x, y)
        except (RuntimeError, NotImplementedError) as exc:
            raise VmapError(f"{_VMAP_HINT} Original error: {exc}") from exc
