"""TracIn, gradient dot/cosine and TRAK on the index, against explicit autograd formulas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from inflens import GradientIndex, InputError, Objective
from inflens.attribution import AttributionSettings, build_attribution_index
from inflens.index import IndexConfig

DT = torch.float64
N, D, H, C, M = 120, 4, 5, 3, 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(D, H)
        self.fc = nn.Linear(H, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.hidden(x)))


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + M, D, generator=g, dtype=DT)
    y = torch.randint(C, (N + M,), generator=g)
    torch.manual_seed(0)
    model = Net().double()
    obj = Objective(model, "cross_entropy", l2=0.01)
    # two "checkpoints": the final model and a perturbed copy of it
    ck = []
    for s in (1, 2):
        gen = torch.Generator().manual_seed(s)
        ck.append(
            {
                k: v + 0.2 * torch.randn(v.shape, generator=gen, dtype=DT)
                for k, v in model.state_dict().items()
            }
        )
    return obj, (x[:N], y[:N]), (x[N:], y[N:]), ck


def _grads(model: nn.Module, state: dict, fn, x, y) -> torch.Tensor:
    """``[B, p]`` per-example gradients of ``fn(outputs, y)`` at ``state``, one autograd call per
    example (parameters in ``named_parameters`` order)."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in state.items()}
    rows = []
    for i in range(x.shape[0]):
        out = torch.func.functional_call(model, params, (x[i : i + 1],))
        gs = torch.autograd.grad(fn(out, y[i : i + 1]).sum(), list(params.values()))
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def _ce(out, y):
    return -torch.log_softmax(out, 1).gather(1, y[:, None])[:, 0]


def _margin(out, y):
    p = torch.softmax(out, 1).gather(1, y[:, None])[:, 0]
    return torch.log(p) - torch.log1p(-p)


def test_tracin_with_one_checkpoint_is_lr_times_grad_dot(tmp_path: Path) -> None:
    obj, train, test, _ = _problem()
    state = obj.model.state_dict()
    g_tr = _grads(obj.model, state, _ce, *train)
    g_te = _grads(obj.model, state, _ce, *test)
    dot = build_attribution_index(obj, train, tmp_path / "dot", AttributionSettings("grad_dot"))
    want = -(g_te @ g_tr.T)  # negative = helpful; no l2 theta term
    torch.testing.assert_close(dot.loss_influence(test), want, rtol=1e-10, atol=1e-12)
    tr = build_attribution_index(
        obj, train, tmp_path / "tr", AttributionSettings("tracin", (0.3,)), checkpoints=[state]
    )
    torch.testing.assert_close(tr.loss_influence(test), 0.3 * want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tr.self_influence(), -0.3 * (g_tr * g_tr).sum(1))
    # the identity survives a projection with the same seed
    cfg = IndexConfig(dim=20, projection="dense", seed=4)
    dot_s = AttributionSettings("grad_dot")
    pdot = build_attribution_index(obj, train, tmp_path / "pdot", dot_s, config=cfg)
    tr_s = AttributionSettings("tracin", (0.3,))
    ptr = build_attribution_index(obj, train, tmp_path / "ptr", tr_s, [state], cfg)
    torch.testing.assert_close(
        ptr.loss_influence(test), 0.3 * pdot.loss_influence(test), rtol=1e-10, atol=1e-12
    )


def test_tracin_over_checkpoints_and_cosine(tmp_path: Path) -> None:
    obj, train, test, ck = _problem()
    lrs = (0.1, 0.05)
    want = torch.zeros(M, N, dtype=DT)
    cos = torch.zeros(M, N, dtype=DT)
    for lr, state in zip(lrs, ck):
        g_tr = _grads(obj.model, state, _ce, *train)
        g_te = _grads(obj.model, state, _ce, *test)
        want -= lr * g_te @ g_tr.T
        cos -= (
            0.5
            * (g_te / g_te.norm(dim=1, keepdim=True))
            @ (g_tr / g_tr.norm(dim=1, keepdim=True)).T
        )
    tr = build_attribution_index(
        obj, train, tmp_path / "tr", AttributionSettings("tracin", lrs), ck
    )
    torch.testing.assert_close(tr.loss_influence(test), want, rtol=1e-10, atol=1e-12)
    c = build_attribution_index(obj, train, tmp_path / "cos", AttributionSettings("cosine"), ck)
    torch.testing.assert_close(c.loss_influence(test), cos, rtol=1e-10, atol=1e-12)
    # reopened: no training data, checkpoints read from the folder
    again = GradientIndex.open(tmp_path / "tr", obj)
    assert torch.equal(again.loss_influence(test), tr.loss_influence(test))
    with pytest.raises(InputError, match="learning rate"):
        build_attribution_index(
            obj, train, tmp_path / "bad", AttributionSettings("tracin", (0.1,)), ck
        )


def test_trak_equals_its_formula(tmp_path: Path) -> None:
    """Without a projection: ``tau = mean_c phi_c(z)^T (Phi_c^T Phi_c + lam I)^-1 Phi_c^T *
    mean_c (1 - p_c)``, score ``-tau``; self-influence is its diagonal on training points."""
    obj, train, test, ck = _problem()
    lam = 1e-3
    num_te = torch.zeros(M, N, dtype=DT)
    num_tr = torch.zeros(N, dtype=DT)
    q = torch.zeros(N, dtype=DT)
    for state in ck:
        phi = _grads(obj.model, state, _margin, *train)
        phi_t = _grads(obj.model, state, _margin, *test)
        kinv = torch.linalg.inv(phi.T @ phi + lam * torch.eye(phi.shape[1], dtype=DT))
        num_te += 0.5 * phi_t @ kinv @ phi.T
        num_tr += 0.5 * ((phi @ kinv) * phi).sum(1)
        out = torch.func.functional_call(obj.model, state, (train[0],))
        q += 0.5 * (1 - torch.softmax(out, 1).gather(1, train[1][:, None])[:, 0])
    trak_s = AttributionSettings("trak", trak_damping=lam)
    trak = build_attribution_index(obj, train, tmp_path / "trak", trak_s, ck)
    torch.testing.assert_close(trak.loss_influence(test), -num_te * q, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(trak.self_influence(), -num_tr * q, rtol=1e-8, atol=1e-10)
    again = GradientIndex.open(tmp_path / "trak", obj, train=train)
    assert torch.equal(again.loss_influence(test), trak.loss_influence(test))
    # a projected TRAK index against its unprojected reference
    small = build_attribution_index(
        obj, train, tmp_path / "p", trak_s, ck, IndexConfig(dim=30, dtype="float32")
    )
    qual = small.quality(test, k=5)
    assert -1.0 <= qual.pearson <= 1.0 and qual.dim == 60  # two checkpoints side by side
    exact = GradientIndex.open(tmp_path / "trak", obj).quality(test, k=5, train=train)
    assert exact.pearson > 1 - 1e-9 and exact.recall_helpful == 1.0


def test_trak_refuses_a_regression_loss(tmp_path: Path) -> None:
    model = nn.Linear(3, 1).double()
    obj = Objective(model, "mse")
    x, y = torch.randn(10, 3, dtype=DT), torch.randn(10, 1, dtype=DT)
    with pytest.raises(InputError, match="TRAK needs a classification loss"):
        build_attribution_index(obj, (x, y), tmp_path / "t", AttributionSettings("trak"))
    with pytest.raises(InputError, match="method must be one of"):
        AttributionSettings("datamodels")
    with pytest.raises(InputError, match="settings must be an AttributionSettings"):
        build_attribution_index(obj, (x, y), tmp_path / "t", "trak")
