"""Per-example losses against their formulas; the smooth hinge of Sec. 4.3 (PROTOCOL 1.9)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, vmap

import inflens
from cases import ref_loss
from inflens.errors import InputError
from inflens.losses import (
    SmoothHinge,
    binary_logistic,
    check_targets,
    cross_entropy,
    hinge,
    mse,
    resolve_loss,
    sampled_token_factor,
    signed_labels,
    smooth_hinge_value,
)

DT = torch.float64


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_signed_labels_maps_01_and_keeps_pm1() -> None:
    assert signed_labels(torch.tensor([0, 1, 1, 0])).tolist() == [-1, 1, 1, -1]
    assert signed_labels(torch.tensor([-1, 1, -1])).tolist() == [-1, 1, -1]
    assert signed_labels(torch.tensor([0.0, 1.0], dtype=DT)).dtype == DT


@pytest.mark.parametrize("name", ["cross_entropy", "binary_logistic", "hinge", "mse"])
def test_builtin_losses_match_formulas(name: str, gen: torch.Generator) -> None:
    b = 9
    if name == "cross_entropy":
        out = torch.randn(b, 4, generator=gen, dtype=DT)
        y = torch.randint(0, 4, (b,), generator=gen)
    elif name == "mse":
        out = torch.randn(b, 2, 3, generator=gen, dtype=DT)
        y = torch.randn(b, 2, 3, generator=gen, dtype=DT)
    else:
        out = 3 * torch.randn(b, 1, generator=gen, dtype=DT)
        y = torch.randint(0, 2, (b,), generator=gen)
    _, fn = resolve_loss(name)
    got = fn(out, y)
    assert got.shape == (b,)
    torch.testing.assert_close(got, ref_loss(name)(out, y), rtol=1e-14, atol=1e-14)


def test_binary_logistic_derivatives_are_exact_for_large_margins() -> None:
    # d/ds log(1 + e^{-ys}) = -y sigma(-ys); d2/ds2 = sigma(ys) sigma(-ys), also for |s| in 20..36
    s = torch.tensor([-36.0, -25.0, -21.0, -5.0, 0.3, 5.0, 21.0, 25.0, 36.0], dtype=DT)
    y = torch.ones(1, dtype=torch.long)
    d1 = vmap(grad(lambda m: binary_logistic(m[None], y)[0]))(s)
    d2 = vmap(grad(grad(lambda m: binary_logistic(m[None], y)[0])))(s)
    torch.testing.assert_close(d1, -torch.sigmoid(-s), rtol=1e-14, atol=0)
    # (where the curvature is below 1e-15 autograd of softplus has rounding error; ignore that)
    torch.testing.assert_close(d2, torch.sigmoid(s) * torch.sigmoid(-s), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(
        binary_logistic(s, y), torch.log1p(torch.exp(-s)), rtol=1e-15, atol=0
    )


def test_binary_losses_accept_both_label_conventions_and_shapes(gen: torch.Generator) -> None:
    s = torch.randn(7, generator=gen, dtype=DT)
    y01 = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    ypm = 2 * y01 - 1
    for fn in (binary_logistic, hinge, SmoothHinge(0.1)):
        a = fn(s, y01)
        torch.testing.assert_close(a, fn(s, ypm), rtol=0, atol=0)
        torch.testing.assert_close(a, fn(s[:, None], y01), rtol=0, atol=0)
    # label 1 with a large positive score is a near-zero logistic loss, label 0 a large one
    big = torch.tensor([20.0], dtype=DT)
    assert binary_logistic(big, torch.tensor([1])) < 1e-8
    assert binary_logistic(big, torch.tensor([0])) > 19.9


def test_binary_loss_refuses_several_logits() -> None:
    with pytest.raises(InputError, match="one logit"):
        binary_logistic(torch.zeros(3, 2, dtype=DT), torch.tensor([0, 1, 0]))


def test_cross_entropy_is_log_softmax() -> None:
    out = torch.tensor([[0.0, math.log(3.0)]], dtype=DT)  # softmax = [1/4, 3/4]
    torch.testing.assert_close(
        cross_entropy(out, torch.tensor([1])), torch.tensor([math.log(4 / 3)], dtype=DT)
    )
    torch.testing.assert_close(
        mse(out, torch.zeros_like(out)), torch.tensor([math.log(3.0) ** 2 / 2], dtype=DT)
    )


# ---------------------------------------------------------------------------- smooth hinge
def test_smooth_hinge_tends_to_hinge() -> None:
    s = torch.linspace(-3, 4, 701, dtype=DT)
    h = torch.clamp(1 - s, min=0)
    prev = math.inf
    for t in (1.0, 0.1, 0.01, 0.001, 1e-5):
        sh = smooth_hinge_value(s, t)
        gap = float((sh - h).abs().max())
        # t log(1 + e^{(1-s)/t}) - max(0, 1-s) = t log(1 + e^{-|1-s|/t}) in (0, t log 2], max at s=1
        assert 0 < gap <= t * math.log(2) * (1 + 1e-12)
        assert gap == pytest.approx(t * math.log(2), rel=1e-9)
        assert gap < prev
        prev = gap
    torch.testing.assert_close(smooth_hinge_value(s, 0.0), h, rtol=0, atol=0)
    torch.testing.assert_close(SmoothHinge(0.0)(s, torch.ones_like(s)), h, rtol=0, atol=0)


def test_smooth_hinge_is_stable_for_extreme_margins() -> None:
    s = torch.tensor([-1e4, -50.0, 1.0, 50.0, 1e4], dtype=DT)
    v = smooth_hinge_value(s, 1e-3)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v[[0, 1, 3, 4]], torch.clamp(1 - s[[0, 1, 3, 4]], min=0))


@pytest.mark.parametrize("t", [1.0, 0.1, 0.01, 0.001])
def test_smooth_hinge_derivatives_match_protocol_formulas(t: float) -> None:
    # margins with (1 - s)/t from -2000 to 36: deep inside the margin the curvature is tiny but
    # must not be truncated to 0 (F.softplus's default threshold=20 did exactly that)
    s = torch.cat(
        [torch.linspace(-1, 3, 41, dtype=DT), 1 - t * torch.linspace(18, 36, 7, dtype=DT)]
    )
    d1 = vmap(grad(lambda m: smooth_hinge_value(m, t)))(s)
    d2 = vmap(grad(grad(lambda m: smooth_hinge_value(m, t))))(s)
    sig = torch.sigmoid((1 - s) / t)
    torch.testing.assert_close(d1, -sig, rtol=1e-14, atol=0)  # d/ds = -sigma((1-s)/t)
    torch.testing.assert_close(d2, sig * (1 - sig) / t, rtol=1e-10, atol=1e-300)


def test_hinge_derivatives_are_autodiff_of_max() -> None:
    s = torch.tensor([-2.0, 0.0, 0.5, 1.5, 3.0], dtype=DT)
    d1 = vmap(grad(lambda m: hinge(m[None], torch.ones(1))[0]))(s)
    d2 = vmap(grad(grad(lambda m: hinge(m[None], torch.ones(1))[0])))(s)
    assert d1.tolist() == [-1.0, -1.0, -1.0, 0.0, 0.0]
    assert d2.abs().max() == 0


def test_hinge_hessian_is_exactly_l2_identity() -> None:
    torch.manual_seed(0)
    x = torch.randn(30, 5, dtype=DT)
    y = (torch.rand(30) > 0.5).long()
    model = torch.nn.Linear(5, 1, bias=False).to(DT)
    obj = inflens.Objective(model, "hinge", l2=0.01)
    margins = (2 * y - 1) * (x @ obj.theta)
    assert (margins < 1).sum() > 5  # points inside the margin have non-zero gradients
    inf = inflens.Influence(obj, (x, y), solver="exact", progress=False).fit()
    h = inf.curvature_.dense()
    assert torch.equal(h, 0.01 * torch.eye(5, dtype=DT))
    # hence s_test = grad L(z_test) / l2 (PROTOCOL 1.9)
    g = inf.test_gradients((x[:3], y[:3]))
    torch.testing.assert_close(inf.s_test((x[:3], y[:3])), g / 0.01, rtol=1e-13, atol=0)


def test_smooth_hinge_curvature_grows_as_t_shrinks_near_margin() -> None:
    # second derivative at the margin s = 1 is 1/(4t): the reason small t is badly conditioned
    for t in (0.1, 0.01):
        d2 = grad(grad(lambda m, t=t: smooth_hinge_value(m, t)))(torch.tensor(1.0, dtype=DT))
        assert float(d2) == pytest.approx(1 / (4 * t), rel=1e-12)


# ---------------------------------------------------------------------------- resolution and checks
def test_resolve_loss_names_and_errors() -> None:
    name, fn = resolve_loss("smooth_hinge", t=0.5)
    assert name == "smooth_hinge" and isinstance(fn, SmoothHinge) and fn.t == 0.5
    assert resolve_loss("smooth_hinge")[1].t == 0.001
    with pytest.raises(InputError, match="unknown loss 'logistic'"):
        resolve_loss("logistic")
    with pytest.raises(InputError, match="only used by 'smooth_hinge'"):
        resolve_loss("hinge", t=0.1)
    with pytest.raises(InputError, match="t must be >= 0"):
        SmoothHinge(-1.0)

    def my_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return out.sum(1)

    assert resolve_loss(my_loss) == ("my_loss", my_loss)


def test_check_targets() -> None:
    out3 = torch.zeros(4, 3)
    check_targets("cross_entropy", out3, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(InputError, match=r"labels must lie in \[0, 2\]"):
        check_targets("cross_entropy", out3, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(InputError, match=r"labels must lie in \[0, 2\]"):
        check_targets("cross_entropy", out3, torch.tensor([0, -1, 2, 0]))
    with pytest.raises(InputError, match="integer class labels"):
        check_targets("cross_entropy", out3, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(InputError, match=r"\[batch, classes\]"):
        check_targets("cross_entropy", torch.zeros(4), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(InputError, match="4 outputs for a batch with 3 labels"):
        check_targets("cross_entropy", out3, torch.tensor([0, 1, 2]))
    out1 = torch.zeros(4, 1)
    check_targets("binary_logistic", out1, torch.tensor([-1, 1, 1, -1]))
    with pytest.raises(InputError, match=r"values such as \[2\]"):
        check_targets("binary_logistic", out1, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(InputError, match="not a mix"):
        check_targets("hinge", out1, torch.tensor([0, 1, -1, 0]))
    with pytest.raises(InputError, match="same shape"):
        check_targets("mse", out1, torch.zeros(4))


def test_cross_entropy_output_hessian_factor_is_exact() -> None:
    """``sum_m u_m u_m^T`` equals the autograd Hessian of the cross-entropy in the logits."""
    from torch.func import hessian, vmap

    from inflens.losses import cross_entropy, output_hessian_factor

    g = torch.Generator().manual_seed(0)
    out = 3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    u = output_hessian_factor(cross_entropy, out, y)
    assert u is not None and u.shape == (5, 6, 5)
    got = torch.einsum("mbc,mbd->bcd", u, u)
    want = vmap(hessian(lambda o, t: cross_entropy(o[None], t[None])[0]))(out, y)
    assert float((got - want).abs().max()) < 1e-14


def test_output_hessian_factor_only_for_the_builtin_cross_entropy() -> None:
    """A user function that happens to be called cross_entropy (label smoothing, say) is not
    given the built-in closed form."""
    import torch.nn.functional as F

    from inflens.losses import mse, output_hessian_factor

    def cross_entropy(o, t):
        return F.cross_entropy(o, t, reduction="none", label_smoothing=0.1)

    out, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    assert output_hessian_factor(cross_entropy, out, y) is None
    assert output_hessian_factor(mse, out, out) is None


def test_sampled_token_factor_is_an_unbiased_estimate_of_the_output_hessian() -> None:
    """``E[u u^T]`` per position must be ``(diag p - p p^T) / N_i`` (the Hessian of the mean
    token cross-entropy in the logits), zero across positions and at ignored labels; checked
    against that closed form with a Monte-Carlo tolerance of a few standard errors."""
    g = torch.Generator().manual_seed(0)
    b, t, v, s = 2, 4, 5, 160_000
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[1, 2] = -100  # an ignored label: position 1 of sequence 1 predicts nothing
    u = sampled_token_factor(logits, targets, s, torch.Generator().manual_seed(1))
    assert u.shape == (s, b, t, v)
    assert (u[:, :, -1] == 0).all() and (u[:, 1, 1] == 0).all()
    est = torch.einsum("sbtv,sbrw->btvrw", u, u)  # sum over samples (u carries 1/sqrt(s))
    p = torch.softmax(logits[:, :-1], -1)
    counts = (targets[:, 1:] != -100).sum(1).double()
    for i in range(b):
        for j in range(t - 1):
            if targets[i, j + 1] == -100:
                continue
            want = (torch.diag(p[i, j]) - torch.outer(p[i, j], p[i, j])) / counts[i]
            # per entry, the draw's variance is at most 1 / counts^2; s samples average it
            tol = 5 / (counts[i] * s**0.5)
            assert (est[i, j, :, j] - want).abs().max() < tol
            for r in range(t):  # different positions are independent: E[u_t u_r^T] = 0
                if r != j:
                    assert est[i, j, :, r].abs().max() < tol
