"""Random projections: Johnson-Lindenstrauss statistics, Kronecker structure, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from inflens import InputError, Objective
from inflens.projection import (
    DenseProjection,
    IdentityProjection,
    KroneckerProjection,
    kronecker_ranks,
    linear_layers,
    make_projection,
    projection_from_config,
)

DT = torch.float64


def _pairs(m: int, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` pairs of correlated vectors with varied norms."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(m, q, generator=g, dtype=DT)
    v = 0.6 * u + torch.randn(m, q, generator=g, dtype=DT)
    scale = torch.exp(torch.randn(m, 1, generator=g, dtype=DT))
    return u * scale, v


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_dense_projection_preserves_inner_products_jl(kind: str) -> None:
    """Over independent projections, ``(Ru).(Rv)`` is unbiased with variance at most
    ``(|u|^2|v|^2 + (u.v)^2)/dim`` (equality for Gaussian entries), and the fraction of
    errors above ``eps |u||v|`` stays under the JL tail bound ``2 exp(-dim eps^2 / 8)``."""
    q, dim, m, trials = 120, 64, 40, 60
    u, v = _pairs(m, q, 0)
    exact = (u * v).sum(1)
    var = ((u * u).sum(1) * (v * v).sum(1) + exact**2) / dim
    z = []
    for seed in range(trials):
        proj = DenseProjection(q, dim, kind, seed=seed)
        est = (proj.project(u) * proj.project(v)).sum(1)
        z.append((est - exact) / var.sqrt())
    z = torch.stack(z)  # [trials, m], standardised errors
    # unbiased: the mean of 2400 standardised errors is N(0, ~1/2400); 5 sigma margin
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel())
    msz = float((z**2).mean())
    if kind == "gaussian":  # E[z^2] = 1 exactly; sd of the mean of z^2 is ~0.04 here
        assert 0.8 < msz < 1.2, msz
    else:  # Rademacher entries have a smaller fourth moment: variance <= the Gaussian one
        assert msz < 1.2, msz
    eps = 0.5
    rel = (z * var.sqrt()).abs() / ((u * u).sum(1) * (v * v).sum(1)).sqrt()
    frac = float((rel > eps).double().mean())
    assert frac <= 2 * math.exp(-dim * eps**2 / 8), frac


def test_dense_projection_regenerated_in_blocks_equals_cached_matrix() -> None:
    g = torch.randn(5, 1000, dtype=DT, generator=torch.Generator().manual_seed(1))
    cached = DenseProjection(1000, 32, seed=7, block_rows=128)
    blocks = DenseProjection(1000, 32, seed=7, block_rows=128, cache_mb=0)  # never cached
    torch.testing.assert_close(cached.project(g), blocks.project(g), rtol=1e-12, atol=1e-12)
    # the matrix is a function of the configuration: another instance, the same numbers
    again = projection_from_config(cached.config())
    assert torch.equal(again.project(g), cached.project(g))
    assert again.fingerprint() == cached.fingerprint()
    assert DenseProjection(1000, 32, seed=8).fingerprint() != cached.fingerprint()
    rt = cached.transposed_matrix()
    torch.testing.assert_close(cached.project(g), g @ rt.to(DT))
    # E[R^T R] = I: each row of R^T (one input coordinate) has unit squared norm on average
    assert abs(float((rt**2).sum(1).mean()) - 1.0) < 0.05


class _Seq(nn.Module):
    """Linear layers applied to every position of a sequence (T > 1), then pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 7)
        self.out = nn.Linear(7, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x))).mean(1)  # x: [B, T, 5]


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 9)
        self.fc = nn.Linear(9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.hidden(x)))


@pytest.mark.parametrize("model_kind", ["mlp", "sequence"])
def test_kronecker_projection_equals_dense_kronecker_product(model_kind: str) -> None:
    """Hooks + factors (never forming the gradient) == ``(R_out (x) R_in) vec([W | b])`` of the
    full autograd per-example gradient, per layer."""
    torch.manual_seed(0)
    if model_kind == "mlp":
        model, x = _MLP().double(), torch.randn(8, 6, dtype=DT)
    else:
        model, x = _Seq().double(), torch.randn(8, 4, 5, dtype=DT)
    y = torch.randint(0, 3 if model_kind == "sequence" else 4, (8,))
    obj = Objective(model, "cross_entropy", l2=0.1)
    layers = linear_layers(obj)
    assert layers is not None
    ranks = [(min(3, lay.d_out), min(4, lay.cols)) for lay in layers]
    proj = KroneckerProjection(layers, obj.p, ranks, seed=3)
    full = obj.per_example_grads(x, y, "loss")  # [B, p]
    via_hooks = proj.project_examples(obj, x, y, "loss")
    # the explicit Kronecker product applied to the row-major vec of [W | b]
    parts = []
    for i, lay in enumerate(layers):
        r_out, r_in = proj.factors(i)
        mat = lay.gather(full).reshape(full.shape[0], -1)
        parts.append(mat @ torch.kron(r_out, r_in).T)
    dense = torch.cat(parts, 1)
    torch.testing.assert_close(via_hooks, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(proj.project(full), dense, rtol=1e-10, atol=1e-12)
    assert proj.dim == sum(a * b for a, b in ranks)
    again = projection_from_config(proj.config())
    assert torch.equal(again.project(full), proj.project(full))


def test_kronecker_ranks_and_auto_choice() -> None:
    model = _MLP().double()
    obj = Objective(model, "cross_entropy")
    layers = linear_layers(obj)
    ranks = kronecker_ranks(layers, 40)
    assert sum(a * b for a, b in ranks) <= 40
    assert sum(a * b for a, b in kronecker_ranks(layers, 10_000)) == obj.p  # uncompressed
    assert isinstance(make_projection("auto", obj.p, None, obj), IdentityProjection)
    assert isinstance(make_projection("auto", obj.p, obj.p + 5, obj), IdentityProjection)
    assert isinstance(make_projection("auto", obj.p, 20, obj), DenseProjection)
    assert isinstance(make_projection("kronecker", obj.p, 20, obj), KroneckerProjection)
    with pytest.raises(InputError, match="needs dim"):
        make_projection("dense", obj.p, None, obj)

    class WithEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(6))
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(x * self.scale)

    other = Objective(WithEmbedding().double(), "cross_entropy")
    assert linear_layers(other) is None
    with pytest.raises(InputError, match="nn.Linear"):
        make_projection("kronecker", other.p, 4, other)


def test_kronecker_refuses_a_layer_called_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    obj = Objective(Twice().double(), "cross_entropy")
    proj = make_projection("kronecker", obj.p, 4, obj)
    x, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 2, 0])
    with pytest.raises(InputError, match="ran 2 times"):
        proj.project_examples(obj, x, y)
