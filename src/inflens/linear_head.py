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
