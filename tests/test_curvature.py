"""``inflens.curvature.Curvature``: matrix-free ``(H + damping I) v`` vs an explicit Hessian."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import inflens
from cases import Fitted, rel_err
from inflens.curvature import Curvature, auto_chunk_size
from inflens.data import Data
from inflens.errors import InputError

DT = torch.float64


def _curv(
    case: Fitted, damping: float = 0.0, chunk: int | None = None, data=None, backend: str = ""
) -> Curvature:
    c = case.case
    obj = inflens.Objective(
        case.fresh_model(), c.loss, l2=c.l2, params=c.params, t=c.t, backend=backend or case.backend
    )
    return Curvature(obj, Data(data or (case.x, case.y)), damping, chunk, progress=False)


@pytest.mark.parametrize("chunk", [7, None])
def test_matvec_and_dense_match_explicit_hessian(case: Fitted, chunk: int | None) -> None:
    damping = 0.3
    curv = _curv(case, damping, chunk)
    a = case.hess + damping * torch.eye(curv.p, dtype=DT)
    v = torch.randn(3, curv.p, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert rel_err(curv.matvec(v), v @ a) < 1e-12
    assert rel_err(curv.matvec(v[1]), a @ v[1]) < 1e-12
    assert curv.num_matvecs == 4
    dense = curv.dense(block=5)
    assert torch.equal(dense, dense.T)
    assert rel_err(dense, a) < 1e-12
    assert curv.shift == pytest.approx(case.case.l2 + damping)


def test_dataset_gives_the_same_products(case: Fitted) -> None:
    v = torch.randn(2, case.theta.numel(), generator=torch.Generator().manual_seed(1), dtype=DT)
    a = _curv(case, 0.0, 4).matvec(v)
    b = _curv(case, 0.0, 4, data=TensorDataset(case.x, case.y)).matvec(v)
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


def test_batch_matvec_is_the_minibatch_hessian(case: Fitted) -> None:
    curv = _curv(case, 0.1)
    xb, yb = case.x[3:8], case.y[3:8]
    hb = case.ref.hessian(case.theta, xb, yb) + 0.1 * torch.eye(curv.p, dtype=DT)
    v = torch.randn(2, curv.p, generator=torch.Generator().manual_seed(2), dtype=DT)
    assert rel_err(curv.batch_matvec(v, xb, yb), v @ hb) < 1e-12


def test_top_eigenvalue(case: Fitted) -> None:
    curv = _curv(case, 0.2)
    want = float(torch.linalg.eigvalsh(case.hess)[-1]) + 0.2
    assert curv.top_eigenvalue(iters=500, rtol=1e-12) == pytest.approx(want, rel=1e-6)
    # the default (few iterations) is a rough estimate from below, within a few percent here
    est = curv.top_eigenvalue()
    assert 0.9 * want <= est <= want * (1 + 1e-12)


def test_bad_damping_and_chunk_budget() -> None:
    obj = inflens.Objective(torch.nn.Linear(3, 1).to(DT), "mse")
    data = Data((torch.zeros(5, 3, dtype=DT), torch.zeros(5, 1, dtype=DT)))
    with pytest.raises(InputError, match="damping must be a non-negative"):
        Curvature(obj, data, damping=-1.0)
    assert auto_chunk_size(10_000, 1000, 8, budget_bytes=8 * 1000 * 64) == 64
    assert auto_chunk_size(10, 1000, 8, budget_bytes=8 * 1000 * 64) == 10
    assert auto_chunk_size(10, 10**9, 8) == 1


@pytest.mark.parametrize(
    "name", ["logreg_binary", "logreg_multiclass", "smooth_hinge_svm", "mlp_top_layer"]
)
def test_dense_in_closed_form_for_a_linear_layer(name: str) -> None:
    """theta = one Linear layer on frozen features: ``A`` from ``sum_i J_i^T Lambda_i J_i``
    without a single Hessian-vector product, equal to the explicit float64 Hessian."""
    from cases import fitted

    case = fitted(name)
    curv = _curv(case, damping=0.2)
    dense = curv.dense()
    assert curv.num_matvecs == 0, "the closed form was not used"
    a = case.hess + 0.2 * torch.eye(curv.p, dtype=DT)
    assert rel_err(dense, a) < 1e-12 and torch.equal(dense, dense.T)
    # the same objective with the closed form switched off takes p products, same matrix
    slow = _curv(case, damping=0.2, backend="vmap")
    assert rel_err(slow.dense(), dense) < 1e-12 and slow.num_matvecs == curv.p


def test_dense_falls_back_for_a_hidden_layer() -> None:
    from cases import fitted

    case = fitted("mlp_tanh")
    curv = _curv(case)
    assert rel_err(curv.dense(), case.hess) < 1e-12 and curv.num_matvecs == curv.p


@pytest.mark.parametrize(
    "name", ["logreg_binary", "logreg_multiclass", "smooth_hinge_svm", "mlp_top_layer"]
)
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_matvec_in_closed_form_for_a_linear_layer(name: str, kind: str, monkeypatch) -> None:
    """Matrix-free products through ``LinearHead.curvature_product`` (no autograd through the
    model) equal the explicit float64 Hessian, for the Hessian and the GGN alike."""
    from cases import fitted
    from inflens.backends import LinearHeadBackend

    case = fitted(name)
    curv = _curv(case, damping=0.2)
    curv.curvature = kind
    calls = []
    real = LinearHeadBackend.product_from_factors

    def spy(self, *args):
        calls.append(True)
        return real(self, *args)

    monkeypatch.setattr(LinearHeadBackend, "product_from_factors", spy)
    v = torch.randn(3, curv.p, generator=torch.Generator().manual_seed(0), dtype=DT)
    want = v @ (case.hess + 0.2 * torch.eye(curv.p, dtype=DT))
    assert rel_err(curv.matvec(v), want) < 1e-12
    assert calls and all(calls), "the closed form was not used"
    # under a torch.func transform the closed form (hooks, autograd.grad) steps aside
    calls.clear()
    got = torch.func.vmap(lambda u: curv.matvec(u[None])[0])(v)
    assert rel_err(got, want) < 1e-10 and not any(calls)


def test_reusing_computes_the_output_hessians_once_per_chunk(monkeypatch) -> None:
    """Inside ``Curvature.reusing()`` a Linear head's ``(phi, Lambda)`` are computed once per
    chunk and reused: same products, a third of the output-Hessian passes for three products;
    outside it they are recomputed (theta may change between calls)."""
    from cases import fitted
    from inflens.linear_head import LinearHead

    case = fitted("logreg_multiclass")
    curv = _curv(case, damping=0.1, chunk=7)
    calls = []
    real = LinearHead.output_hessians

    def spy(self, *args):
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(LinearHead, "output_hessians", spy)
    v = torch.randn(3, 2, curv.p, generator=torch.Generator().manual_seed(0), dtype=DT)
    plain = [curv.matvec(u) for u in v]
    fresh_calls = len(calls)
    calls.clear()
    with curv.reusing():
        reused = [curv.matvec(u) for u in v]
    chunks = curv.data.num_chunks(curv.chunk_size)
    assert len(calls) == chunks and fresh_calls == 3 * chunks
    for a, b in zip(plain, reused):
        assert rel_err(b, a) < 1e-14
    want = v @ (case.hess + 0.1 * torch.eye(curv.p, dtype=DT))
    assert rel_err(torch.stack(reused), want) < 1e-12
    # a zero budget caches nothing but still gives the same products
    calls.clear()
    with curv.reusing(budget_bytes=0):
        again = [curv.matvec(u) for u in v]
    assert len(calls) == 3 * chunks and all(rel_err(b, a) < 1e-14 for a, b in zip(plain, again))
