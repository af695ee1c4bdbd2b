"""The paper's models: shapes, parameter counts, initialisation, and the losses they pair with."""

from __future__ import annotations

import math

import pytest
import torch

from inflens import Objective
from inflens.errors import InputError
from inflens.models import LinearSVM, LogisticRegression, PaperCNN, truncated_normal_

DT = torch.float64


def test_paper_cnn_has_2616_parameters_in_the_published_layout() -> None:
    m = PaperCNN()
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert sum(p.numel() for p in m.parameters()) == 2616  # PROTOCOL 4.3, paper Sec. 4.2
    assert shapes["convs.h1_a.weight"] == (8, 1, 3, 3)
    assert shapes["convs.h1_c.weight"] == (8, 8, 3, 3)
    assert shapes["convs.h3_c.weight"] == (10, 8, 1, 1)
    assert shapes["dense.weight"] == (10, 10) and shapes["dense.bias"] == (10,)
    assert m.convs["h1_c"].stride == (2, 2) and m.convs["h2_c"].stride == (2, 2)
    assert m.weight_names == [n for n in shapes if n.endswith("weight")]


def test_paper_cnn_feature_map_sizes_and_input_shapes() -> None:
    m = PaperCNN(dtype=DT)
    x = torch.rand(3, 784, dtype=DT)
    h = x.reshape(3, 1, 28, 28)
    sizes = []
    for name, *_ in PaperCNN.LAYERS:
        h = torch.tanh(m.convs[name](h))
        sizes.append(tuple(h.shape[1:]))
    assert sizes == [(8, 26, 26), (8, 12, 12), (8, 10, 10), (8, 4, 4), (8, 2, 2), (10, 2, 2)]
    out = m(x)
    assert out.shape == (3, 10)
    torch.testing.assert_close(m(x.reshape(3, 1, 28, 28)), out)
    torch.testing.assert_close(m(x.reshape(3, 28, 28)), out)
    # tanh after every conv, then global average pooling and the dense layer
    torch.testing.assert_close(out, m.dense(h.mean(dim=(2, 3))))
    with pytest.raises(InputError, match="28x28"):
        m(torch.rand(2, 100, dtype=DT))


def test_paper_cnn_init_follows_the_protocol_and_the_seed() -> None:
    a, b, c = PaperCNN(seed=0), PaperCNN(seed=0), PaperCNN(seed=1)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
        if n.endswith("bias"):
            assert torch.count_nonzero(p) == 0
        else:
            assert not torch.equal(p, r), n
    for name, k, cin, _, _ in PaperCNN.LAYERS:
        sigma = 2.0 / math.sqrt(k * k * cin)
        assert a.convs[name].weight.abs().max() <= 2 * sigma + 1e-6
    assert a.dense.weight.abs().max() <= 2 / math.sqrt(10) + 1e-6


def test_truncated_normal_statistics() -> None:
    t = torch.empty(200_000, dtype=DT)
    truncated_normal_(t, 0.5, torch.Generator().manual_seed(0))
    assert t.abs().max() <= 1.0
    # std of N(0,1) truncated to [-2, 2] is 0.8796 (closed form)
    phi = math.exp(-2.0) / math.sqrt(2 * math.pi)
    z = math.erf(2 / math.sqrt(2))
    std = 0.5 * math.sqrt(1 - 2 * 2 * phi / z)
    assert abs(float(t.std()) - std) < 3e-3
    assert abs(float(t.mean())) < 5e-3


def test_logistic_regression_shapes_and_no_bias() -> None:
    x = torch.rand(5, 784, dtype=DT)
    binary = LogisticRegression(784, 1, dtype=DT)
    multi = LogisticRegression(784, 10, dtype=DT)
    assert binary(x).shape == (5,) and multi(x).shape == (5, 10)
    assert [n for n, _ in binary.named_parameters()] == ["linear.weight"]
    assert sum(p.numel() for p in multi.parameters()) == 7840  # PROTOCOL 4.2
    assert torch.count_nonzero(binary.linear.weight) == 0
    with pytest.raises(InputError):
        LogisticRegression(0, 1)


def test_binary_logistic_gradient_matches_the_closed_form() -> None:
    """PROTOCOL 1.7: grad L = -sigma(-y theta.x) y x."""
    g = torch.Generator().manual_seed(0)
    model = LogisticRegression(6, 1, dtype=DT)
    with torch.no_grad():
        model.linear.weight.copy_(torch.randn(1, 6, generator=g, dtype=DT))
    obj = Objective(model, "binary_logistic", l2=0.0)
    x = torch.randn(7, 6, generator=g, dtype=DT)
    y01 = torch.randint(0, 2, (7,), generator=g)
    y = 2.0 * y01.to(DT) - 1
    theta = model.linear.weight[0].detach()
    expected = -torch.sigmoid(-y * (x @ theta))[:, None] * y[:, None] * x
    torch.testing.assert_close(obj.per_example_grads(x, y01), expected)


def test_linear_svm_smooth_hinge_tends_to_the_hinge() -> None:
    """0 <= SmoothHinge(s, t) - Hinge(s) <= t log 2, with equality at s = 1 (Sec. 4.3)."""
    model = LinearSVM(1, dtype=DT)
    with torch.no_grad():
        model.linear.weight.fill_(1.0)
    s = torch.linspace(-1, 3, 401, dtype=DT)[:, None]  # margins y w.x with y = +1
    y = torch.ones(401, dtype=DT)
    hinge = Objective(model, "hinge").losses(model.linear.weight[0].detach(), s, y)
    torch.testing.assert_close(hinge, torch.clamp(1 - s[:, 0], min=0))
    prev = float("inf")
    for t in (1.0, 0.1, 0.01, 1e-3, 1e-4):
        sh = Objective(model, "smooth_hinge", t=t).losses(model.linear.weight[0].detach(), s, y)
        gap = sh - hinge
        assert float(gap.min()) >= -1e-15  # rounding only
        assert float(gap.max()) <= t * math.log(2) * (1 + 1e-12)
        at_one = int(torch.argmin((s[:, 0] - 1).abs()))
        assert math.isclose(float(gap[at_one]), t * math.log(2), rel_tol=1e-9)
        assert float(gap.max()) < prev
        prev = float(gap.max())


def test_smooth_hinge_second_derivative_on_linear_svm() -> None:
    """d^2/ds^2 SmoothHinge = sigma(u)(1 - sigma(u)) / t with u = (1 - s)/t (PROTOCOL 1.9)."""
    t = 0.1
    model = LinearSVM(1, dtype=DT)
    obj = Objective(model, "smooth_hinge", t=t)
    s = torch.tensor([[0.7], [1.0], [1.2]], dtype=DT)
    y = torch.ones(3, dtype=DT)
    theta = torch.ones(1, dtype=DT)
    # Hessian of sum_i loss at w = 1 in direction 1 = sum_i x_i^2 * second derivative
    hv = obj.hvp_sum(torch.ones(1, 1, dtype=DT), s, y, theta=theta)
    u = (1 - s[:, 0]) / t
    sig = torch.sigmoid(u)
    expected = (s[:, 0] ** 2 * sig * (1 - sig) / t).sum()
    torch.testing.assert_close(hv[0, 0], expected)
