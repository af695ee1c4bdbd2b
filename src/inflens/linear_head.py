"""Closed-form per-example gradients when theta is one ``nn.Linear`` layer of a frozen network.

This is the paper's Inception setting (Sec. 5.1): a network is frozen and only its last
linear layer is the parameter vector theta. For ``s_i = W phi_i + b`` with features ``phi_i``
that do not depend on theta (and any frozen, per-example computation after the layer), the
chain rule gives

- ``grad_W l_i = e_i phi_i^T`` and ``grad_b l_i = e_i``, with the *output error*
  ``e_i = d l_i / d s_i`` (``[C]``);
- the directional derivative along ``v = (V_W, v_b)``: ``grad l_i . v = e_i . (V_W phi_i + v_b)``.

One forward pass gives ``phi`` and ``s``; ``e`` is the gradient of the summed loss with respect
to ``s`` alone (a backward pass through the loss only, not through the network). Per-example
gradients are then an outer product and scores ``s_test . g_i`` are two small matrix products,
without forming ``[B, p]`` at all.

:func:`find_linear_head` decides whether an objective qualifies structurally; the backend checks
the closed form against autograd on a few examples before it is used
(:func:`inflens.backends.select_backend`); anything unusual (a layer called twice, features
with extra dimensions, a loss that mixes examples) selects another backend, with the reason
recorded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class LinearHead:
    """Per-example derivatives of an objective whose theta is the parameters of one Linear layer.

    Args:
        objective: the objective; ``objective.names`` must be ``<prefix>weight`` and/or
            ``<prefix>bias`` of ``module``.
        module: the ``nn.Linear`` whose parameters are theta.
    """

    def __init__(self, objective: Any, module: nn.Linear, prefix: str) -> None:
        self.objective = objective
        self.module = module
        # (kind, slice into theta) in theta's order
        self.parts: list[tuple[str, slice]] = []
        start = 0
        for name, numel in zip(objective.names, objective.numels):
            self.parts.append((name[len(prefix) :], slice(start, start + numel)))
            start += numel
        self.out_features = module.out_features
        self.in_features = module.in_features
        #: the model output's per-example shape when it is the layer's output reshaped
        #: (:meth:`direct_output_check`); the many-theta closed forms need it
        self.output_shape: tuple[int, ...] | None = None

    # ------------------------------------------------------------------ one forward pass
    @contextlib.contextmanager
    def _at_layer_output(self) -> Iterator[list[torch.Tensor]]:
        """While active, the layer's output is replaced by a detached leaf ``s`` (so the rest
        of the forward depends on theta only through ``s``); yields the list that collects
        ``(input, s)`` of each call."""
        seen: list[torch.Tensor] = []

        def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            seen.append(inputs[0].detach())
            s = output.detach().requires_grad_(True)
            seen.append(s)
            return s

        handle = self.module.register_forward_hook(hook)
        try:
            yield seen
        finally:
            handle.remove()

    @staticmethod
    def _captured(seen: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi, s)`` of the single call, or ``ValueError``."""
        if len(seen) != 2:
            raise ValueError(f"the layer was called {len(seen) // 2} times")
        phi, s = seen
        if phi.ndim != 2 or s.ndim != 2:
            raise ValueError("the layer input is not [batch, features]")
        return phi, s

    def features_and_errors(
        self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, which: str = "loss"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi [B, d], e [B, C])``: the layer's inputs and ``d l_i / d s_i`` at ``theta``.

        Raises ``ValueError`` when the layer is not called exactly once on 2-D features.
        """
        fn = self.objective.losses if which == "loss" else self.objective.measurements
        with self._at_layer_output() as seen, torch.enable_grad():
            vals = fn(theta.detach(), x, y)
            phi, s = self._captured(seen)
            (e,) = torch.autograd.grad(vals.sum(), s, allow_unused=True)
        if e is None:
            e = torch.zeros_like(s)
        return phi, e.detach()

    def output_hessians(
        self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi [B, d], Lambda [B, C, C])``: layer inputs and ``d^2 l_i / d s_i^2``.

        ``C`` backward passes through the loss only (never through the network): examples are
        independent, so the gradient of ``sum_i e_i[c]`` with respect to ``s`` holds row ``c``
        of every ``Lambda_i``.
        """
        with self._at_layer_output() as seen, torch.enable_grad():
            vals = self.objective.losses(theta.detach(), x, y)
            phi, s = self._captured(seen)
            (e,) = torch.autograd.grad(vals.sum(), s, create_graph=True)
            rows = []
            for c in range(s.shape[1]):
                (r,) = (
                    torch.autograd.grad(e[:, c].sum(), s, retain_graph=True, allow_unused=True)
                    if e.requires_grad
                    else (None,)
                )
                rows.append(torch.zeros_like(s) if r is None else r)
        return phi, torch.stack(rows, 1).detach()

    @property
    def has_bias(self) -> bool:
        return any(kind == "bias" for kind, _ in self.parts)

    def curvature_blocks(
        self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[C, D, C, D]`` (``D = d + 1`` with a bias): upper blocks ``a <= b`` of
        ``sum_i J_i^T Lambda_i J_i`` in the layout ``(class, feature)``, added to ``out``.

        The outputs ``s_i = W phi_i + b`` are linear in theta, so the full matrix
        (:meth:`to_theta_order`) is the Hessian of ``sum_i l_i`` exactly (and its Gauss-Newton
        matrix): with ``phi~ = (phi, 1)``, block ``(a, b)`` is
        ``sum_i Lambda_i[a, b] phi~_i phi~_i^T``, one ``[D, B] x [B, D]`` product per pair.
        """
        phi, lam = self.output_hessians(theta, x, y)
        c = self.out_features
        if self.has_bias:
            phi = torch.cat([phi, phi.new_ones(phi.shape[0], 1)], 1)
        dd = phi.shape[1]
        if out is None:
            out = phi.new_zeros(c, dd, c, dd)
        for a in range(c):
            for b in range(a, c):
                out[a, :, b, :] += (phi * lam[:, a, b, None]).T @ phi
        return out

    def curvature_product(
        self, vecs: torch.Tensor, phi: torch.Tensor, lam: torch.Tensor
    ) -> torch.Tensor:
        """``[k, p]``: ``sum_i J_i^T Lambda_i J_i v_j`` for each row of ``vecs``, the exact
        Hessian(-vector) product of ``sum_i l_i`` (outputs linear in theta), from the layer
        inputs ``phi`` and output Hessians ``Lambda`` of :meth:`output_hessians`.

        ``u_i = V_W phi_i + v_b`` (``J_i v``), ``w_i = Lambda_i u_i``, then back:
        ``sum_i w_i phi_i^T`` and ``sum_i w_i``. Two ``[B, d] x [d, kC]``-sized matrix products
        instead of forward-over-reverse autograd through the whole model.
        """
        k, c, b = vecs.shape[0], self.out_features, phi.shape[0]
        u = phi.new_zeros(b, k, c)
        for kind, sl in self.parts:
            v = vecs[:, sl]
            if kind == "weight":
                u += (phi @ v.reshape(k * c, -1).T).view(b, k, c)
            else:
                u += v[None]
        w = torch.bmm(u, lam.transpose(1, 2))  # w[i, j] = Lambda_i u[i, j]
        out = vecs.new_empty(k, vecs.shape[1])
        for kind, sl in self.parts:
            if kind == "weight":
                out[:, sl] = (w.reshape(b, k * c).T @ phi).view(k, -1)
            else:
                out[:, sl] = w.sum(0)
        return out

    def to_theta_order(self, blocks: torch.Tensor) -> torch.Tensor:
        """The ``[p, p]`` matrix in theta's order from the upper blocks of
        :meth:`curvature_blocks` (the lower blocks are their mirror images)."""
        c, dd = blocks.shape[0], blocks.shape[1]
        for a in range(c):
            for b in range(a + 1, c):
                blocks[b, :, a, :] = blocks[a, :, b, :].T
        perm = []
        rows = torch.arange(c, device=blocks.device)[:, None] * dd
        for kind, _ in self.parts:
            if kind == "weight":
                cols = torch.arange(self.in_features, device=blocks.device)[None, :]
                perm.append((rows + cols).reshape(-1))
            else:
                perm.append(rows[:, 0] + self.in_features)
        idx = torch.cat(perm)
        flat = blocks.reshape(c * dd, c * dd)
        if idx.numel() == flat.shape[0] and bool((idx == torch.arange(idx.numel())).all()):
            return flat  # weight only, or weight then bias: already theta's order
        return flat[idx][:, idx]

    # ------------------------------------------------------------------ closed forms
    def per_example_grads(
        self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        """``[B, p]``: ``e_i phi_i^T`` for the weight and ``e_i`` for the bias, in theta's order."""
        phi, e = self.features_and_errors(theta, x, y, which)
        cols = []
        for kind, _ in self.parts:
            if kind == "weight":
                cols.append((e[:, :, None] * phi[:, None, :]).reshape(e.shape[0], -1))
            else:
                cols.append(e)
        return torch.cat(cols, 1)

    def loss_jvp(
        self,
        vecs: torch.Tensor,
        theta: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        which: str = "loss",
    ) -> torch.Tensor:
        """``[k, B]``: ``grad l_i . v_j = e_i . (V_W,j phi_i + v_b,j)`` (two matrix products)."""
        phi, e = self.features_and_errors(theta, x, y, which)
        return self.directional(vecs, phi, e)

    def directional(self, vecs: torch.Tensor, phi: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``[k, B]`` directional derivatives from precomputed features and output errors."""
        k, c = vecs.shape[0], self.out_features
        out = e.new_zeros(k, e.shape[0])
        for kind, sl in self.parts:
            v = vecs[:, sl]
            if kind == "weight":
                # [B, d] @ [d, k*C] -> [B, k, C], contracted with e over C
                z = (phi @ v.reshape(k * c, -1).T).view(-1, k, c)
                out += torch.einsum("bkc,bc->kb", z, e)
            else:
                out += v @ e.T
        return out

    # ------------------------------------------------------------------ many thetas
    # When the model's output is the layer's output up to views (no computation after the
    # layer), the loss is a function of ``s`` alone and ``s`` for many thetas is one matrix
    # product: problems with their own theta run together (``EditedProblems``).
    def direct_output_check(self, theta: torch.Tensor, x: torch.Tensor) -> str:
        """``""`` when the model's output is the layer's output ``s`` reshaped (only view
        operations after the layer, found on the autograd graph), else why not."""
        with self._at_layer_output() as seen, torch.enable_grad():
            out = self.objective.outputs(theta.detach(), x)
            try:
                _, s = self._captured(seen)
            except ValueError as exc:
                return str(exc)
        if not isinstance(out, torch.Tensor) or out.shape[:1] != s.shape[:1]:
            return "the model's output is not one tensor with a row per example"
        if out.numel() != s.numel():
            return "the model's output has another size than the layer's output"
        node = out.grad_fn
        while node is not None and type(node).__name__ != "AccumulateGrad":
            kind = type(node).__name__
            if not any(v in kind for v in ("View", "Squeeze", "Select", "Reshape", "Alias")):
                return f"the model computes after the layer ({kind})"
            nxt = [f for f, _ in node.next_functions if f is not None]
            if len(nxt) != 1:
                return f"the model computes after the layer ({kind})"
            node = nxt[0]
        if (out is not s) if node is None else (node.variable is not s):
            return "the model's output does not come from the layer's output"
        self.output_shape = tuple(out.shape[1:])
        return ""

    def layer_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``phi [B, d]``: the layer's inputs for ``x`` (they do not depend on theta)."""
        with self._at_layer_output() as seen, torch.no_grad():
            self.objective.outputs(self.objective.theta.detach(), x)
            return self._captured(seen)[0]

    def _split(self, thetas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W [K, C, d], b [K, C] or None)`` of each row of ``thetas [K, p]``."""
        w = b = None
        for kind, sl in self.parts:
            if kind == "weight":
                w = thetas[:, sl].reshape(thetas.shape[0], self.out_features, self.in_features)
            else:
                b = thetas[:, sl]
        if w is None:
            w = thetas.new_zeros(thetas.shape[0], self.out_features, self.in_features)
        return w, b

    def _join(self, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[K, p]`` in theta's order from weight parts ``[K, C, d]`` and bias parts ``[K, C]``."""
        return torch.cat(
            [w.reshape(w.shape[0], -1) if kind == "weight" else b for kind, _ in self.parts], 1
        )

    def _value_fn(self, which: str) -> Any:
        obj = self.objective
        return obj.measurement if which != "loss" and obj.measurement is not None else obj.loss_fn

    def _derivatives(
        self, s: torch.Tensor, y: torch.Tensor, which: str, order: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(values [R], e [R, C], Lambda [R, C, C])`` of the loss in the outputs ``s [R, C]``
        (``order`` 0: values only; 1: and ``e``; 2: and ``Lambda``)."""
        fn = self._value_fn(which)
        shape = (s.shape[0], *self.output_shape)
        if order == 0:
            return fn(s.reshape(shape), y).detach(), None, None
        leaf = s.detach().requires_grad_(True)
        lam = None
        with torch.enable_grad():
            vals = fn(leaf.reshape(shape), y)
            (e,) = torch.autograd.grad(vals.sum(), leaf, create_graph=order == 2, allow_unused=True)
            if order == 2:  # examples are independent: d(sum_i e_i[c])/ds is row c of each Lambda_i
                rows = [
                    torch.autograd.grad(e[:, c].sum(), leaf, retain_graph=True, allow_unused=True)[
                        0
                    ]
                    if e is not None and e.requires_grad
                    else None
                    for c in range(s.shape[1])
                ]
                lam = torch.stack([torch.zeros_like(s) if r is None else r for r in rows], 1)
        e = torch.zeros_like(s) if e is None else e.detach()
        return vals.detach(), e, None if lam is None else lam.detach()

    # The many-theta methods of the derivatives backend, in closed form (``x`` = ``phi``, the
    # layer's inputs): "at" methods take one theta per example, "sums" methods sum the batch at
    # each of K thetas with one [B, d] x [d, K C] product (compute-bound, not a pass per theta).
    def outputs_at(self, thetas: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """``[R, *output]``: the model's output for layer inputs ``phi [R, d]``, row ``r`` at
        ``thetas[r]`` (the output is the layer's, :meth:`direct_output_check`)."""
        w, b = self._split(thetas)
        s = torch.einsum("rcd,rd->rc", w, phi) + (0 if b is None else b)
        return s.reshape(s.shape[0], *self.output_shape)

    def _at(self, thetas: torch.Tensor, phi: torch.Tensor, y: torch.Tensor, which: str, order: int):
        return self._derivatives(
            self.outputs_at(thetas, phi).reshape(len(phi), -1), y, which, order
        )

    def values_at(
        self, thetas: torch.Tensor, phi: torch.Tensor, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        """``[R]``: ``l(z_r; theta_r)``."""
        return self._at(thetas, phi, y, which, 0)[0]

    def grads_at(
        self, thetas: torch.Tensor, phi: torch.Tensor, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        """``[R, p]``: ``e_r phi_r^T`` and ``e_r`` at ``theta_r``."""
        e = self._at(thetas, phi, y, which, 1)[1]
        return self._join(e[:, :, None] * phi[:, None, :], e)

    def hvps_at(
        self, vecs: torch.Tensor, thetas: torch.Tensor, phi: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """``[R, p]``: ``J_r^T Lambda_r J_r v_r`` at ``theta_r`` (``J_r v_r = V_W phi_r + v_b``)."""
        lam = self._at(thetas, phi, y, "loss", 2)[2]
        w = torch.einsum("rab,rb->ra", lam, self.outputs_at(vecs, phi).reshape(len(phi), -1))
        return self._join(w[:, :, None] * phi[:, None, :], w)

    def _outputs_many(self, thetas: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """``[K, B, C]``: ``W_t phi_i + b_t``, one ``[B, d] x [d, K C]`` product."""
        k, c, n = thetas.shape[0], self.out_features, phi.shape[0]
        w, b = self._split(thetas)
        z = (w.reshape(k * c, -1) @ phi.T).view(k, c, n).transpose(1, 2)
        return z if b is None else z + b[:, None, :]

    def _back_many(self, e: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """``[K, p]``: ``sum_i e_ti phi_i^T`` and ``sum_i e_ti`` from ``e [K, B, C]``."""
        k, n, c = e.shape
        gw = (e.transpose(1, 2).reshape(k * c, n) @ phi).view(k, c, -1)
        return self._join(gw, e.sum(1))

    def _many(
        self, thetas: torch.Tensor, phi: torch.Tensor, y: torch.Tensor, which: str, order: int
    ):
        k, n = thetas.shape[0], phi.shape[0]
        s = self._outputs_many(thetas, phi).reshape(k * n, -1)
        yy = y.expand(k, *y.shape).reshape(k * n, *y.shape[1:])
        vals, e, lam = self._derivatives(s, yy, which, order)
        return (
            vals.view(k, n),
            None if e is None else e.view(k, n, -1),
            None if lam is None else lam.view(k, n, *lam.shape[1:]),
        )

    def value_sums(
        self, thetas: torch.Tensor, phi: torch.Tensor, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        """``[K]``: ``sum_i l(z_i; theta_t)``."""
        return self._many(thetas, phi, y, which, 0)[0].sum(1)

    def grad_sums(
        self, thetas: torch.Tensor, phi: torch.Tensor, y: torch.Tensor, which: str = "loss"
    ) -> torch.Tensor:
        """``[K, p]``: ``sum_i grad l(z_i; theta_t)``."""
        return self._back_many(self._many(thetas, phi, y, which, 1)[1], phi)

    def hvp_sums(
        self, vecs: torch.Tensor, thetas: torch.Tensor, phi: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """``[K, p]``: ``sum_i Hess l(z_i; theta_t) v_t``."""
        return self.product_many(vecs, self.output_curvature_many(thetas, phi, y), phi)

    def output_curvature_many(
        self, thetas: torch.Tensor, phi: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """``[K, B, C, C]``: ``Lambda_i`` at each theta (the factors of :meth:`product_many`)."""
        return self._many(thetas, phi, y, "loss", 2)[2]

    def product_many(
        self, vecs: torch.Tensor, lam: torch.Tensor, phi: torch.Tensor
    ) -> torch.Tensor:
        """``[K, p]``: ``sum_i J_i^T Lambda_ti J_i v_t`` (the Hessian of ``sum_i l_i`` at
        theta_t along ``v_t``) from :meth:`output_curvature_many`."""
        u = self._outputs_many(vecs, phi)  # J_i v_t: the outputs are linear in theta
        return self._back_many(torch.einsum("knab,knb->kna", lam, u), phi)


def find_linear_head(objective: Any) -> tuple[LinearHead | None, str]:
    """``(LinearHead, "")`` when theta is exactly the parameters of one ``nn.Linear`` module
    (structure only; :func:`inflens.backends.select_backend` then checks the closed form against
    autograd), else ``(None, why not)``."""
    names = objective.names
    prefix = names[0].rpartition(".")[0]
    prefix = prefix + "." if prefix else ""
    if not all(n in (prefix + "weight", prefix + "bias") for n in names):
        return None, "theta is not the parameters of one module"
    try:
        module = objective.model.get_submodule(prefix[:-1]) if prefix else objective.model
    except AttributeError:
        return None, "theta's module was not found"
    if type(module) is not nn.Linear:  # subclasses may override forward
        return None, f"theta's module is a {type(module).__name__}, not nn.Linear"
    return LinearHead(objective, module, prefix), ""
