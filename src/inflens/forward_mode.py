"""Forward-mode directional derivatives with fused convolution tangents.

Scoring every training point against one ``s_test`` vector ``v`` needs ``d/de f(theta + e v)``
for the per-example losses ``f``: one forward-mode pass. PyTorch's own rule for a convolution
``s = conv(x, W) + b`` with dual ``x`` and ``W`` runs separate convolutions for the primal
``conv(x, W)`` and the tangent parts ``conv(x, dW)`` and ``conv(dx, W)`` (on a CPU it ran three
for the first layer of the paper's CNN, whose input is not even dual). Here the primal and
``conv(x, dW) + db`` come from *one* convolution with the output channels ``[W; dW]`` (bias
``[b; db]``), which reads and unfolds ``x`` once; only ``conv(dx, W)`` is a second call.

:func:`directional_derivative` runs ``f`` on a dual theta (``torch.autograd.forward_ad``) under a
:class:`~torch.overrides.TorchFunctionMode` that applies this rule to ``conv1d``/``conv2d``/
``conv3d`` calls with a dual weight and ``groups == 1``; every other operation keeps PyTorch's
own forward-mode rule. The tangent is exactly the JVP ``J_f(theta) v``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwad
from torch.overrides import TorchFunctionMode

_CONVS = (torch.conv1d, torch.conv2d, torch.conv3d)


class FusedConvolutionTangents(TorchFunctionMode):
    """Inside an ``fwad.dual_level()``: convolutions with a dual weight compute their primal and
    weight/bias tangents in one call (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVS:
            fused = self._conv(func, *args, **kwargs)
            if fused is not None:
                return fused
        return func(*args, **kwargs)

    @staticmethod
    def _conv(func, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: A002
        # (argument names as torch.conv2d's, so keyword calls such as conv2d(input=...) bind)
        wp, wt = fwad.unpack_dual(weight)
        if wt is None or groups != 1:
            return None  # nothing to fuse (or grouped: output channels are tied to groups)
        xp, xt = fwad.unpack_dual(input)
        co = wp.shape[0]
        if bias is None:
            both_bias = None
        else:
            bp, bt = fwad.unpack_dual(bias)
            both_bias = torch.cat([bp, bt if bt is not None else torch.zeros_like(bp)])
        both = func(xp, torch.cat([wp, wt]), both_bias, stride, padding, dilation, 1)
        # contiguous halves: make_dual would otherwise copy the tangent, and slower
        primal, tangent = both[:, :co].contiguous(), both[:, co:].contiguous()
        if xt is not None:
            tangent = tangent + func(xt, wp, None, stride, padding, dilation, 1)
        return fwad.make_dual(primal, tangent)


def directional_derivative(
    fn: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``J_fn(theta) v`` (the tangent of ``fn`` at ``theta`` along ``v``), one forward pass.

    Plain tensors only (not inside a torch.func transform). Raises whatever ``fn`` raises on a
    dual input (the caller may then use ``torch.func.jvp``); a ``fn`` output that does not
    depend on theta has tangent zero.
    """
    with fwad.dual_level(), FusedConvolutionTangents():
        out = fn(fwad.make_dual(theta.detach(), v.to(theta.dtype)))
        primal, tangent = fwad.unpack_dual(out)
    return torch.zeros_like(primal) if tangent is None else tangent
