"""``inflens.forward_mode``: fused-convolution forward-mode products vs ``torch.func.jvp``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

import inflens
from cases import rel_err
from inflens import forward_mode
from inflens.forward_mode import directional_derivative

DT = torch.float64


class Convs(nn.Module):
    """conv1d/2d/3d with strides, padding, dilation, 'same' padding, a grouped conv and a
    reflect-padded conv, each followed by a nonlinearity."""

    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.a = conv(2, 4, 3, stride=2, padding=1, bias=bias)
        self.b = conv(4, 4, 3, dilation=2, padding="same", bias=bias)
        self.g = conv(4, 4, 1, groups=2, bias=bias)
        self.r = conv(4, 3, 3, padding=1, padding_mode="reflect", bias=bias)
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = torch.sin(self.b(h)) + h
        h = torch.relu(self.g(h)) + h
        h = torch.tanh(self.r(h))
        return self.fc(h.flatten(2).mean(-1))


def _case(dim: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Convs(dim, bias).to(DT)
    x = torch.randn(5, 2, *([9] * dim), generator=g, dtype=DT)
    y = torch.randint(0, 3, (5,), generator=g)
    return model, x, y, g


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_torch_func_jvp(dim: int, bias: bool) -> None:
    model, x, y, g = _case(dim, bias)
    obj = inflens.Objective(model, "cross_entropy", l2=0.0)
    v = torch.randn(obj.p, generator=g, dtype=DT)

    def f(th):
        return obj.losses(th, x, y)

    want = jvp(f, (obj.theta,), (v,))[1]
    got = directional_derivative(f, obj.theta, v)
    assert rel_err(got, want) < 1e-12
    # and through Objective.loss_jvp (one vector: the dual path) = per-example grads . v
    grads = obj.per_example_grads(x, y)
    assert rel_err(obj.loss_jvp(v[None], x, y)[0], grads @ v) < 1e-12


def test_dual_input_and_frozen_parts() -> None:
    """theta = only some tensors: a conv whose weight is frozen (bias in theta), a conv whose
    input is dual (its predecessor is in theta), a frozen bias on a dual weight."""
    model, x, y, g = _case(2, True, seed=3)
    params = ["a.weight", "b.bias", "r.weight", "fc.weight"]
    obj = inflens.Objective(model, "cross_entropy", l2=0.0, params=params)
    v = torch.randn(obj.p, generator=g, dtype=DT)

    def f(th):
        return obj.losses(th, x, y)

    assert rel_err(directional_derivative(f, obj.theta, v), jvp(f, (obj.theta,), (v,))[1]) < 1e-12


def test_the_fused_rule_is_what_runs(monkeypatch) -> None:
    """The conv2d calls of a dual pass go through the fused rule: with the rule's tangent
    deliberately broken the result changes (so the equality tests above test the rule)."""
    model, x, y, g = _case(2, True)
    obj = inflens.Objective(model, "cross_entropy", l2=0.0)
    v = torch.randn(obj.p, generator=g, dtype=DT)
    f = lambda th: obj.losses(th, x, y)  # noqa: E731
    good = directional_derivative(f, obj.theta, v)
    real = forward_mode.FusedConvolutionTangents._conv

    def broken(func, *args, **kwargs):
        out = real(func, *args, **kwargs)
        if out is None:
            return None
        p, t = torch.autograd.forward_ad.unpack_dual(out)
        return torch.autograd.forward_ad.make_dual(p, 2 * t)

    monkeypatch.setattr(forward_mode.FusedConvolutionTangents, "_conv", staticmethod(broken))
    assert rel_err(directional_derivative(f, obj.theta, v), good) > 1e-3


def test_output_independent_of_theta_has_zero_tangent() -> None:
    theta = torch.randn(4, dtype=DT)
    out = directional_derivative(lambda th: torch.ones(3, dtype=DT), theta, torch.ones(4, dtype=DT))
    assert torch.equal(out, torch.zeros(3, dtype=DT))


def test_loss_jvp_falls_back_when_an_op_has_no_forward_rule(monkeypatch) -> None:
    """An op that fails on dual tensors sends Objective.loss_jvp to torch.func.jvp."""
    from inflens import objective as objective_mod

    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 2)).to(DT)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 5, generator=g, dtype=DT)
    y = torch.randint(0, 2, (4,), generator=g)
    obj = inflens.Objective(model, "cross_entropy", l2=0.0)
    v = torch.randn(1, obj.p, generator=g, dtype=DT)

    def fails(*a, **k):
        raise RuntimeError("no forward AD formula")

    monkeypatch.setattr(objective_mod, "directional_derivative", fails)
    assert rel_err(obj.loss_jvp(v, x, y)[0], obj.per_example_grads(x, y) @ v[0]) < 1e-12


def test_functional_conv_calls_are_fused_too() -> None:
    """A model calling F.conv2d with its own parameters (no nn.Conv2d) is covered."""

    class Raw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 1, 2, 2, dtype=DT))
            self.fc = nn.Linear(3, 2).to(DT)

        def forward(self, x):
            h = F.conv2d(input=x, weight=self.w, stride=1)  # keyword arguments bind too
            return self.fc(torch.tanh(h).mean((2, 3)))

    model = Raw()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 5, 5, generator=g, dtype=DT)
    th = {k: v.detach() for k, v in model.named_parameters()}
    flat = torch.cat([t.reshape(-1) for t in th.values()])
    v = torch.randn_like(flat)

    def f(t):
        parts = dict(zip(th, torch.split(t, [u.numel() for u in th.values()])))
        return functional_call(model, {k: p.view_as(th[k]) for k, p in parts.items()}, (x,))

    assert rel_err(directional_derivative(f, flat, v), jvp(f, (flat,), (v,))[1]) < 1e-12
