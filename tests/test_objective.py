"""``inflens.Objective``: flat parameters, per-example gradients, HVPs and JVPs vs autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import inflens
from cases import Fitted, rel_err
from inflens.errors import InputError
from inflens.objective import eval_mode

DT = torch.float64


def _objective(case: Fitted, **kw) -> inflens.Objective:
    c = case.case
    return inflens.Objective(
        case.fresh_model(), c.loss, l2=c.l2, params=c.params, t=c.t, backend=case.backend, **kw
    )


# ---------------------------------------------------------------------------- parameters
def test_theta_is_the_selected_parameters_in_order(case: Fitted) -> None:
    obj = _objective(case)
    assert obj.names == case.ref.names
    assert obj.p == case.theta.numel() and obj.dtype == DT
    torch.testing.assert_close(obj.theta, case.theta, rtol=0, atol=0)
    parts = obj.unflatten(obj.theta)
    named = dict(obj.model.named_parameters())
    for n in obj.names:
        assert torch.equal(parts[n], named[n].detach())


def test_load_into_model_round_trip(case: Fitted) -> None:
    obj = _objective(case)
    new = torch.arange(obj.p, dtype=DT)
    obj.load_into_model(new)
    named = dict(obj.model.named_parameters())
    torch.testing.assert_close(torch.cat([named[n].detach().reshape(-1) for n in obj.names]), new)
    # the objective computes at the loaded theta from now on, not at a stale copy
    assert torch.equal(obj.theta, new)
    x, y = case.x[:3], case.y[:3]
    torch.testing.assert_close(obj.losses(obj.theta, x, y), obj.losses(new, x, y))
    with pytest.raises(InputError, match="theta must have shape"):
        obj.load_into_model(new[:-1])


def test_parameter_selection() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    assert inflens.Objective(model, "mse").p == 3 * 4 + 4 + 4 * 2 + 2
    assert inflens.Objective(model, "mse", params="2.").names == ["2.weight", "2.bias"]
    assert inflens.Objective(model, "mse", params=["0.bias", "2.weight"]).p == 4 + 8
    model[0].weight.requires_grad_(False)  # frozen by the user: not part of theta by default
    assert "0.weight" not in inflens.Objective(model, "mse").names
    with pytest.raises(InputError, match="'3.' matches no parameter"):
        inflens.Objective(model, "mse", params="3.")


def test_bad_objective_arguments() -> None:
    lin = nn.Linear(2, 1).to(DT)
    with pytest.raises(InputError, match="torch.nn.Module"):
        inflens.Objective(lambda x: x, "mse")
    with pytest.raises(InputError, match="l2 must be a non-negative"):
        inflens.Objective(lin, "mse", l2=-1.0)
    with pytest.raises(InputError, match="l2 must be a non-negative"):
        inflens.Objective(lin, "mse", l2=float("nan"))
    with pytest.raises(InputError, match="measurement must be a callable"):
        inflens.Objective(lin, "mse", measurement=3)
    with pytest.raises(InputError, match="unknown loss"):
        inflens.Objective(lin, "cross_entropyy")
    mixed = nn.Sequential(nn.Linear(2, 2).to(DT), nn.Linear(2, 1))
    with pytest.raises(InputError, match="mix dtypes"):
        inflens.Objective(mixed, "mse")
    with torch.no_grad():
        lin.weight[0, 1] = float("nan")
    with pytest.raises(InputError, match="NaN/inf"):
        inflens.Objective(lin, "mse")


# ---------------------------------------------------------------------------- values
def test_losses_and_risk_match_reference(case: Fitted) -> None:
    obj = _objective(case)
    th = case.theta + 0.1 * torch.randn(
        case.theta.shape, generator=torch.Generator().manual_seed(0), dtype=DT
    )
    torch.testing.assert_close(
        obj.losses(th, case.x, case.y), case.ref.losses(th, case.x, case.y), rtol=1e-13, atol=1e-15
    )
    torch.testing.assert_close(
        obj.risk(th, case.x, case.y), case.ref.risk(th, case.x, case.y), rtol=1e-13, atol=0
    )
    w = torch.linspace(0, 2, case.x.shape[0], dtype=DT)
    want = (w * case.ref.losses(th, case.x, case.y)).mean() + case.ref.reg(th)
    torch.testing.assert_close(obj.risk(th, case.x, case.y, weights=w), want, rtol=1e-13, atol=0)


def test_gradient_of_risk_vanishes_at_theta_hat(case: Fitted) -> None:
    obj = _objective(case)
    g = torch.func.grad(lambda th: obj.risk(th, case.x, case.y))(obj.theta)
    assert float(g.norm()) < 1e-11


# ---------------------------------------------------------------------------- derivatives
def test_per_example_grads_match_autograd(case: Fitted) -> None:
    obj = _objective(case)
    got = obj.per_example_grads(case.x, case.y)
    want = case.ref.grad_each(case.theta, case.x, case.y)
    assert got.shape == (case.x.shape[0], obj.p)
    assert rel_err(got, want) < 1e-13
    # at another theta
    th = case.theta + 0.3
    assert (
        rel_err(
            obj.per_example_grads(case.x, case.y, theta=th), case.ref.grad_each(th, case.x, case.y)
        )
        < 1e-13
    )
    # mean_grad is the gradient of the summed loss
    assert rel_err(obj.mean_grad(case.x, case.y), want.sum(0)) < 1e-13


def test_measurement_gradients(case: Fitted) -> None:
    def first_output(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return out.reshape(out.shape[0], -1)[:, 0]

    obj = _objective(case, measurement=first_output)
    got = obj.per_example_grads(case.xt, case.yt, which="measurement")
    rows = []
    for i in range(case.xt.shape[0]):
        th = case.theta.clone().requires_grad_(True)
        out = torch.func.functional_call(case.ref.model, case.ref.params(th), (case.xt[i : i + 1],))
        rows.append(torch.autograd.grad(first_output(out, None).sum(), th)[0])
    assert rel_err(got, torch.stack(rows)) < 1e-13
    # the training loss is unaffected by the measurement
    assert (
        rel_err(
            obj.per_example_grads(case.x, case.y), case.ref.grad_each(case.theta, case.x, case.y)
        )
        < 1e-13
    )


def test_hvp_sum_matches_explicit_hessian(case: Fitted) -> None:
    obj = _objective(case)
    n = case.x.shape[0]
    # hessian of the summed loss alone: n (H_risk - l2 I)
    h_sum = n * (case.hess - case.case.l2 * torch.eye(obj.p, dtype=DT))
    v = torch.randn(3, obj.p, generator=torch.Generator().manual_seed(1), dtype=DT)
    assert rel_err(obj.hvp_sum(v, case.x, case.y), v @ h_sum) < 1e-12
    assert rel_err(obj.hvp_sum(v[:1], case.x, case.y), v[:1] @ h_sum) < 1e-12


def test_loss_jvp_is_gradient_dot_vector(case: Fitted) -> None:
    obj = _objective(case)
    v = torch.randn(4, obj.p, generator=torch.Generator().manual_seed(2), dtype=DT)
    want = v @ case.ref.grad_each(case.theta, case.x, case.y).T
    got = obj.loss_jvp(v, case.x, case.y)
    assert got.shape == (4, case.x.shape[0])
    assert rel_err(got, want) < 1e-13


def test_input_grad_of_loss_jvp_matches_double_backward(case: Fitted) -> None:
    obj = _objective(case)
    v = torch.randn(obj.p, generator=torch.Generator().manual_seed(3), dtype=DT)
    got = obj.input_grad_of_loss_jvp(v, case.x[:6], case.y[:6])
    rows = []
    for i in range(6):
        th = case.theta.clone().requires_grad_(True)
        xi = case.x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(
            case.ref.losses(th, xi, case.y[i : i + 1]).sum(), th, create_graph=True
        )
        (gx,) = torch.autograd.grad(g @ v, xi)
        rows.append(gx[0])
    assert got.shape == case.x[:6].shape
    assert rel_err(got, torch.stack(rows)) < 1e-12


# ---------------------------------------------------------------------------- modes and checks
def test_eval_mode_restores_each_flag() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    model.train()
    model[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_prepare_refuses_wrong_dtype_and_nonfinite() -> None:
    obj = inflens.Objective(nn.Linear(3, 1).to(DT), "mse")
    x = torch.zeros(4, 3, dtype=DT)
    obj.prepare(x, torch.zeros(4, 1, dtype=DT))
    with pytest.raises(InputError, match="float32 but the model parameters are torch.float64"):
        obj.prepare(x.float(), torch.zeros(4, 1))
    x[2, 1] = float("inf")
    with pytest.raises(InputError, match="first in example 12"):
        obj.prepare(x, torch.zeros(4, 1, dtype=DT), start=10)
    with pytest.raises(InputError, match="targets contain 1 NaN"):
        obj.prepare(x[:2], torch.tensor([[0.0], [float("nan")]], dtype=DT))


def test_check_batch_reports_shape_and_loss_problems() -> None:
    obj = inflens.Objective(nn.Linear(3, 2).to(DT), "cross_entropy")
    with pytest.raises(InputError, match=r"could not process data inputs of shape \(4, 5\)"):
        obj.check_batch(torch.zeros(4, 5, dtype=DT), torch.zeros(4, dtype=torch.long))

    def bad_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return out  # [B, 2], not one value per example

    obj = inflens.Objective(nn.Linear(3, 2).to(DT), bad_loss)
    with pytest.raises(InputError, match="one value per example"):
        obj.check_batch(torch.zeros(4, 3, dtype=DT), torch.zeros(4))
    obj = inflens.Objective(nn.Linear(3, 2).to(DT), "cross_entropy", measurement=lambda o, y: o)
    with pytest.raises(InputError, match="measurement must return one value per example"):
        obj.check_batch(torch.zeros(4, 3, dtype=DT), torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------- per-parameter l2
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)  # p = 26


def test_per_parameter_l2_risk_gradient_and_accessors() -> None:
    model = _mlp()
    l2 = torch.zeros(26, dtype=DT)
    l2[:12] = torch.linspace(0.1, 1.2, 12, dtype=DT)  # first weight; biases and 2.weight: 0
    obj = inflens.Objective(model, "cross_entropy", l2=l2)
    g = torch.Generator().manual_seed(1)
    th = torch.randn(26, generator=g, dtype=DT)
    x, y = torch.randn(5, 3, generator=g, dtype=DT), torch.tensor([0, 1, 1, 0, 1])
    reg = 0.5 * (l2 * th * th).sum()
    torch.testing.assert_close(obj.regularizer(th), reg, rtol=1e-15, atol=0)
    torch.testing.assert_close(obj.risk(th, x, y), obj.losses(th, x, y).mean() + reg)
    # the gradient of the regulariser, by autograd on the formula
    want = torch.autograd.grad(0.5 * (l2 * th.requires_grad_() ** 2).sum(), th)[0]
    assert torch.equal(obj.regularizer_grad(th.detach()), want)
    vecs = torch.randn(3, 26, generator=g, dtype=DT)
    torch.testing.assert_close(obj.regularizer_inner(vecs), vecs @ (l2 * obj.theta))
    assert torch.equal(obj.l2_vector(), l2) and obj.l2_diag is not None
    with pytest.raises(InputError, match="per-parameter l2.*l2_vector"):
        _ = obj.l2  # code that reads one scalar must not silently drop the vector
    # a scalar l2: l2 stays the float, the vector is constant, no diagonal
    scalar = inflens.Objective(model, "cross_entropy", l2=0.3)
    assert scalar.l2 == 0.3 and scalar.l2_diag is None
    assert torch.equal(scalar.l2_vector(), torch.full((26,), 0.3, dtype=DT))
    assert torch.equal(scalar.regularizer_grad(th.detach()), 0.3 * th.detach())
    # with_l2: the same model and theta, another regulariser
    other = scalar.with_l2(l2)
    assert other.model is model and torch.equal(other.theta, scalar.theta)
    assert torch.equal(other.l2_vector(), l2) and scalar.l2 == 0.3
    assert inflens.Objective(model, "mse", l2=torch.tensor(0.25)).l2 == 0.25  # a 0-d tensor


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.full((25,), 0.1), r"shape \[26\]"),
        (torch.full((26, 1), 0.1), r"shape \[26\]"),
        (torch.full((1,), 0.1), r"shape \[26\]"),
        (torch.cat([torch.full((25,), 0.1), torch.tensor([-1e-3])]), "entry 25"),
        (torch.cat([torch.tensor([float("nan")]), torch.zeros(25)]), "finite and non-negative"),
        (torch.cat([torch.zeros(25), torch.tensor([float("inf")])]), "finite and non-negative"),
        ([0.1] * 26, r"non-negative number or a \[26\] tensor"),
    ],
)
def test_bad_per_parameter_l2_is_refused(bad, match: str) -> None:
    model = _mlp()
    with pytest.raises(InputError, match=match):
        inflens.Objective(model, "cross_entropy", l2=bad)
    with pytest.raises(InputError, match=match):
        inflens.Objective(model, "cross_entropy").with_l2(bad)
