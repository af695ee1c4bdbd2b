"""What was trained: a model, a per-example loss, the parameters theta and the L2 penalty.

The empirical risk is ``R(theta) = mean_i loss(z_i, theta) + (1/2) sum_j l2_j theta_j^2`` over
the *selected* parameters theta (all others are held fixed), with one ``l2`` for every entry
(a float) or one per entry (a ``[p]`` tensor, e.g. weights regularised and biases not). All functions here take theta as one
flat vector, so solvers see plain ``[p]`` / ``[k, p]`` tensors; the model is evaluated with
``torch.func.functional_call`` and per-example quantities are vectorised with ``vmap``.

The model is always evaluated in eval mode (BatchNorm uses its running statistics, dropout is
off): influence is defined for a fixed, deterministic function of theta.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad

from .backends import DerivativesBackend, is_plain, math_attention, select_backend
from .data import Batch, batch_len, float_leaves, index_batch, to_device
from .errors import InputError
from .forward_mode import directional_derivative
from .losses import TOKEN_LOSSES, LossFn, check_targets, resolve_loss

Measurement = Callable[[Any, torch.Tensor], torch.Tensor]


def prediction_tensor(out: Any) -> torch.Tensor:
    """The tensor a built-in loss reads from a model's output: the output itself, its
    ``logits`` (a Hugging Face ``ModelOutput`` or a dict), or the first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InputError(
        f"the model returned a {type(out).__name__}; inflens needs a tensor, a ModelOutput or "
        "dict with 'logits', or a tuple whose first element is the prediction"
    )


def call_model(model: nn.Module, params: dict[str, torch.Tensor], x: Batch) -> Any:
    """``model(x)``, ``model(*x)`` for a tuple or ``model(**x)`` for a dict, at ``params``."""
    if isinstance(x, Mapping):
        return functional_call(model, params, (), dict(x))
    if isinstance(x, tuple):
        return functional_call(model, params, x)
    return functional_call(model, params, (x,))


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


def _check_l2(
    l2: float | torch.Tensor, p: int, dtype: torch.dtype, device: torch.device
) -> tuple[float, torch.Tensor | None]:
    """``(scalar, None)`` for a number (or a 0-d tensor), ``(0.0, vector [p])`` for a
    per-parameter l2; refuses a wrong shape, a negative or a non-finite entry."""
    if isinstance(l2, torch.Tensor) and l2.ndim > 0:
        if tuple(l2.shape) != (p,):
            raise InputError(
                f"a per-parameter l2 must have shape [{p}] (one weight per entry of theta, in "
                f"the order of objective.offsets()), got {tuple(l2.shape)}; pass a float for "
                "one l2 on every parameter"
            )
        vec = l2.detach().to(device=device, dtype=dtype).clone()
        bad = ~torch.isfinite(vec) | (vec < 0)
        if bad.any():
            j = int(bad.nonzero()[0, 0])
            raise InputError(
                f"a per-parameter l2 must be finite and non-negative; entry {j} is "
                f"{float(l2[j])} ({int(bad.sum())} bad entries); use 0 for an unregularised "
                "parameter"
            )
        return 0.0, vec
    try:
        value = float(l2)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"l2 must be a non-negative number or a [{p}] tensor, got {type(l2).__name__}"
        ) from exc
    if not (value >= 0.0):
        raise InputError(f"l2 must be a non-negative number, got {l2}")
    return value, None


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
            ``l2 * I`` and the training-side gradient contains ``l2 * theta``); or a ``[p]``
            tensor of per-parameter weights, ``(1/2) sum_j l2_j theta_j^2`` (``H`` contains
            ``diag(l2)``, the gradient ``l2 * theta`` elementwise), kept in :attr:`l2_diag`.
            Then :attr:`l2` refuses (code that assumes one scalar must not use it silently);
            :meth:`l2_vector` and :meth:`regularizer_grad` serve both cases.
        params: ``None`` for every parameter that requires grad, or parameter names / name
            prefixes (e.g. ``"fc."``) to take as theta; the rest of the network is frozen.
        measurement: optional ``(outputs, targets) -> [batch]`` to explain instead of the test
            loss (a margin, a logit, a probability). Defaults to the loss.
        t: temperature of ``"smooth_hinge"`` (default 0.001).
        backend: how derivatives are computed (:mod:`inflens.backends`): ``"auto"`` (chosen
            once on the first training batch), ``"linear_head"``, ``"vmap"`` or ``"jacobian"``.

    Inputs may be a tensor, a tuple (``model(*x)``) or a dict (``model(**x)``) of tensors. A
    built-in loss reads the model's prediction tensor (a Hugging Face ``ModelOutput``'s
    ``logits``); a callable loss receives the model's output as it is.

    Example:
        >>> obj = Objective(nn.Linear(4, 3, bias=False), "cross_entropy", l2=0.01)
        >>> obj.p
        12
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | LossFn,
        l2: float | torch.Tensor = 0.0,
        params: str | Sequence[str] | None = None,
        measurement: Measurement | None = None,
        t: float | None = None,
        backend: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if measurement is not None and not callable(measurement):
            raise InputError("measurement must be a callable (outputs, targets) -> [batch]")
        self.model = model
        self.loss_name, self.loss_fn = resolve_loss(loss, t)
        self.builtin_loss = isinstance(loss, str)
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
        self._l2, self.l2_diag = _check_l2(l2, self.p, self.dtype, self.device)
        selected = set(self.names)
        self.frozen = {n: p.detach() for n, p in named.items() if n not in selected}
        self.frozen.update({n: b for n, b in model.named_buffers()})
        from .backends import BACKENDS

        if backend not in BACKENDS:
            raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.requested_backend = backend
        self._backend: DerivativesBackend | None = None
        self._held_eval = False
        self._structured_output = False  # the model returns a ModelOutput/dict/tuple

    # ------------------------------------------------------------------ parameters
    @property
    def p(self) -> int:
        """Number of parameters in theta."""
        return int(self.theta.numel())

    @property
    def l2(self) -> float:
        """The scalar l2 (``(l2 / 2) ||theta||^2``). Refuses (:class:`InputError`) when the
        objective has a per-parameter l2 (:attr:`l2_diag`), so that code assuming one scalar
        cannot silently drop the vector."""
        if self.l2_diag is not None:
            raise InputError(
                "this objective has a per-parameter l2 (objective.l2_diag, shape "
                f"[{self.p}]) and this computation reads a single scalar objective.l2; read "
                "objective.l2_vector() / objective.regularizer_grad(theta) instead, or build "
                "the Objective with a float l2"
            )
        return self._l2

    @property
    def l2_given(self) -> float | torch.Tensor:
        """The l2 as given to the constructor: the float, or the ``[p]`` per-parameter tensor
        (what a second objective over the same model, or a trainer, takes as ``l2``)."""
        return self._l2 if self.l2_diag is None else self.l2_diag

    def l2_vector(self) -> torch.Tensor:
        """``[p]``: the l2 weight of every entry of theta (a constant vector for a scalar l2)."""
        if self.l2_diag is not None:
            return self.l2_diag
        return torch.full_like(self.theta, self._l2)

    def with_l2(self, l2: float | torch.Tensor) -> Objective:
        """The same trained model, loss, parameters and measurement with another ``l2`` (a
        float or a ``[p]`` tensor, validated as in the constructor); the model is shared."""
        other = copy.copy(self)
        other._l2, other.l2_diag = _check_l2(l2, self.p, self.dtype, self.device)
        other._backend = None  # selected again for the copy (a backend refers to its objective)
        return other

    def offsets(self) -> dict[str, tuple[int, int]]:
        """``{name: (start, stop)}``: where each selected parameter lies in flat theta."""
        out, start = {}, 0
        for name, numel in zip(self.names, self.numels):
            out[name] = (start, start + numel)
            start += numel
        return out

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

    def state_token(self) -> tuple:
        """Identity and in-place version counter of every parameter and buffer of the model:
        equal tokens mean no tensor was replaced or modified in place in between (an optimizer
        step, ``load_state_dict``, a forward pass in train mode updating BatchNorm statistics)."""
        named = [*self.model.named_parameters(), *self.model.named_buffers()]
        return tuple((n, t.data_ptr(), t._version) for n, t in named)

    # ------------------------------------------------------------------ data checks
    def prepare(
        self, x: Batch, y: torch.Tensor, name: str = "data", start: int = 0
    ) -> tuple[Batch, torch.Tensor]:
        """Move a chunk to theta's device (documented: data on another device is moved) and
        check dtype and finiteness."""
        x = to_device(x, self.device)
        y = y.to(self.device)
        floats = float_leaves(x)
        for t_ in floats:
            if t_.dtype != self.dtype:
                raise InputError(
                    f"{name} inputs are {t_.dtype} but the model parameters are {self.dtype}; "
                    f"convert the inputs (e.g. X.to({self.dtype})) or the model"
                )
        for t_, what in [*((f, "inputs") for f in floats), (y, "targets")]:
            if t_.is_floating_point():
                bad = ~torch.isfinite(t_)
                if bad.any():
                    row = int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0, 0]) + start
                    raise InputError(
                        f"{name} {what} contain {int(bad.sum())} NaN/inf values "
                        f"(first in example {row}); clean or drop those examples"
                    )
        return x, y

    def check_batch(self, x: Batch, y: torch.Tensor, name: str = "data") -> None:
        """Run the model on a small batch and check outputs against targets and the loss."""
        b = batch_len(x)
        try:
            with torch.no_grad():
                raw = self.outputs(self.theta, x)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here is a shape/type mismatch
            shapes = (
                {k: tuple(v.shape) for k, v in x.items()}
                if isinstance(x, Mapping)
                else (
                    tuple(x.shape) if isinstance(x, torch.Tensor) else [tuple(v.shape) for v in x]
                )
            )
            raise InputError(
                f"the model could not process {name} inputs of shape {shapes} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        self._structured_output = not isinstance(raw, torch.Tensor)
        if self.builtin_loss:
            check_targets(self.loss_name, prediction_tensor(raw), y)
        with torch.no_grad():
            vals = self.losses(self.theta, x, y)
        if vals.shape != (b,):
            raise InputError(
                f"the loss must return one value per example, shape [{b}], got {tuple(vals.shape)}"
            )
        if not torch.isfinite(vals).all():
            raise InputError(f"the loss is NaN/inf on some {name} examples at theta-hat")
        if self.measurement is not None:
            with torch.no_grad():
                m = self.measurement(prediction_tensor(raw) if self.builtin_loss else raw, y)
            if m.shape != (b,):
                raise InputError(
                    f"the measurement must return one value per example, shape "
                    f"[{b}], got {tuple(m.shape)}"
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

    def outputs(self, theta: torch.Tensor, x: Batch) -> Any:
        """The model's output at a flat ``theta`` (eval mode), as the model returns it."""
        params = {**self.frozen, **self.unflatten(theta)}
        if self._held_eval:
            return call_model(self.model, params, x)
        with eval_mode(self.model):
            return call_model(self.model, params, x)

    def predictions(self, theta: torch.Tensor, x: Batch) -> torch.Tensor:
        """The prediction tensor the losses read (:func:`prediction_tensor` of the outputs)."""
        return prediction_tensor(self.outputs(theta, x))

    def _loss_input(self, theta: torch.Tensor, x: Batch) -> Any:
        # built-in losses read the prediction tensor; a callable gets the output as it is
        return self.predictions(theta, x) if self.builtin_loss else self.outputs(theta, x)

    def losses(self, theta: torch.Tensor, x: Batch, y: torch.Tensor) -> torch.Tensor:
        """Per-example losses ``[B]`` (no regulariser)."""
        return self.loss_fn(self._loss_input(theta, x), y)

    def measurements(self, theta: torch.Tensor, x: Batch, y: torch.Tensor) -> torch.Tensor:
        """Per-example test measurement ``[B]`` (the loss unless ``measurement`` was given)."""
        if self.measurement is None:
            return self.losses(theta, x, y)
        return self.measurement(self._loss_input(theta, x), y)

    def regularizer(self, theta: torch.Tensor) -> torch.Tensor:
        """``(1/2) sum_j l2_j theta_j^2`` (``(l2 / 2) ||theta||^2`` for a scalar l2)."""
        if self.l2_diag is not None:
            return 0.5 * (self.l2_diag.to(theta) * theta * theta).sum()
        return 0.5 * self._l2 * (theta * theta).sum()

    def regularizer_grad(self, theta: torch.Tensor) -> torch.Tensor:
        """``l2 * theta`` (elementwise for a per-parameter l2), the gradient of
        :meth:`regularizer`; ``theta`` is ``[p]`` or ``[k, p]``."""
        if self.l2_diag is not None:
            return self.l2_diag.to(theta) * theta
        return self._l2 * theta

    def regularizer_inner(self, vecs: torch.Tensor) -> torch.Tensor:
        """``[k]``: ``v_j^T (l2 * theta)`` for the rows of ``vecs [k, p]`` at theta-hat (the
        regulariser's part of ``-score``; for a scalar l2 computed as ``l2 (v_j^T theta)``)."""
        if self.l2_diag is not None:
            return vecs @ (self.l2_diag * self.theta).to(vecs)
        return self._l2 * (vecs @ self.theta)

    def risk(
        self,
        theta: torch.Tensor,
        x: Batch,
        y: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``mean_i w_i loss(z_i) + (1/2) sum_j l2_j theta_j^2`` on one batch (``w = 1`` by
        default)."""
        vals = self.losses(theta, x, y)
        if weights is not None:
            vals = vals * weights
        return vals.mean() + self.regularizer(theta)

    # ------------------------------------------------------------------ derivatives (backend)
    @property
    def backend(self) -> DerivativesBackend:
        """The derivatives backend (:mod:`inflens.backends`); selected by :meth:`select_backend`
        (``Influence.fit`` does it on the first training chunk)."""
        if self._backend is None:
            raise InputError(
                "no derivatives backend selected yet: call objective.select_backend(x, y) on a "
                "few training examples (Influence.fit does this)"
            )
        return self._backend

    def select_backend(self, x: Batch, y: torch.Tensor) -> DerivativesBackend:
        """Choose the backend once, probing on the batch ``x, y`` (:func:`select_backend`)."""
        if self._backend is None:
            with self.evaluating():
                self._backend = select_backend(self, x, y, self.requested_backend)
        return self._backend

    def _ready(self, x: Batch, y: torch.Tensor) -> DerivativesBackend:
        return self._backend if self._backend is not None else self.select_backend(x, y)

    def per_example_grads(
        self, x: Batch, y: torch.Tensor, which: str = "loss", theta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-example gradients ``[B, p]`` of the loss (or the measurement), no regulariser."""
        theta = self.theta if theta is None else theta
        return self._ready(x, y).per_example_grads(theta, x, y, which)

    def mean_grad(
        self, x: Batch, y: torch.Tensor, which: str = "loss", theta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Gradient ``[p]`` of the *sum* over the batch of the loss (or measurement)."""
        theta = self.theta if theta is None else theta
        fn = self.losses if which == "loss" else self.measurements
        with math_attention():
            return grad(lambda th: fn(th, x, y).sum())(theta)

    def hvp_sum(
        self, vecs: torch.Tensor, x: Batch, y: torch.Tensor, theta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``sum_{i in batch} Hess_theta loss(z_i) @ v`` for each row ``v`` of ``vecs [k, p]``
        (no regulariser)."""
        theta = self.theta if theta is None else theta
        return self._ready(x, y).hvp_sum(vecs, theta, x, y)

    def ggn_sum(
        self, vecs: torch.Tensor, x: Batch, y: torch.Tensor, theta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``sum_{i in batch} J_i^T Lambda_i J_i v`` (generalized Gauss-Newton; ``J_i`` the
        Jacobian of the prediction tensor, ``Lambda_i`` the Hessian of the loss in it) for each
        row of ``vecs``. Positive semi-definite for every loss convex in the outputs."""
        theta = self.theta if theta is None else theta
        self._require_tensor_loss("the Gauss-Newton matrix")
        return self._ready(x, y).ggn_sum(vecs, theta, x, y)

    def ggn_dense_sum(
        self, x: Batch, y: torch.Tensor, theta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[p, p]``: ``sum_{i in batch} J_i^T Lambda_i J_i`` formed explicitly."""
        theta = self.theta if theta is None else theta
        self._require_tensor_loss("the Gauss-Newton matrix")
        return self._ready(x, y).ggn_dense_sum(theta, x, y)

    def _require_tensor_loss(self, what: str) -> None:
        if not self.builtin_loss and self._structured_output:
            raise InputError(
                f"{what} needs a loss of the prediction tensor, but this model returns a "
                "structured output and the loss is a callable of it; pass a loss of the logits "
                "(e.g. a built-in name) or use curvature='hessian'"
            )

    def loss_jvp(
        self, vecs: torch.Tensor, x: Batch, y: torch.Tensor, theta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[k, B]`` directional derivatives ``grad_theta loss(z_i) . v`` (forward mode)."""
        theta = self.theta if theta is None else theta
        backend = self._ready(x, y)
        if (
            vecs.shape[0] == 1
            and not backend.closed_form_scoring
            and isinstance(x, torch.Tensor)
            and is_plain(vecs, x, theta)
        ):
            try:  # one dual pass with fused convolution tangents (inflens.forward_mode)
                return directional_derivative(
                    lambda th: self.losses(th, x, y), theta, vecs[0]
                ).unsqueeze(0)
            except (RuntimeError, NotImplementedError):
                pass  # an op without a forward-AD rule on dual tensors: torch.func below
        return backend.loss_jvp(vecs, theta, x, y)

    def token_loss_jvp(
        self, vecs: torch.Tensor, x: Batch, y: torch.Tensor, theta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[k, B, T]``: directional derivatives of the per-token terms of a sequence loss
        (``"causal_lm"``: ``l_it / N_i``, zero where not counted) along each row of ``vecs``;
        summed over ``T`` they are :meth:`loss_jvp`."""
        token_fn = TOKEN_LOSSES.get(self.loss_name) if self.builtin_loss else None
        if token_fn is None:
            raise InputError(
                f"per-token influence needs a sequence loss ({', '.join(TOKEN_LOSSES)}), "
                f"this objective's loss is {self.loss_name!r}"
            )
        theta = self.theta if theta is None else theta
        return self._ready(x, y).token_jvp(vecs, theta, x, y, token_fn)

    def input_grad_of_loss_jvp(
        self, vec: torch.Tensor, x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, *x.shape[1:]]``: ``grad_x (v . grad_theta loss(x_i, y_i))`` for each example.

        With ``v = H^-1 grad L(z_test)`` this is ``-I_pert,loss(z_i, z_test)`` (eq. 5).
        """
        theta = self.theta if theta is None else theta
        return self._ready(x, y).input_grad_of_loss_jvp(vec, theta, x, y)


__all__ = ["Objective", "call_model", "eval_mode", "index_batch", "prediction_tensor"]
