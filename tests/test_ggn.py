"""The Gauss-Newton curvature option (``curvature="ggn"``) against explicit ``J^T Lambda J``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from cases import DT, MLP, Reference, fitted, rel_err
from inflens import Influence, InputError, Objective
from inflens.curvature import Curvature
from inflens.data import Data
from inflens.solvers import CG, Arnoldi, Exact, LiSSA


def explicit_ggn(model: nn.Module, obj: Objective, loss: str, x, y, t=None) -> torch.Tensor:
    """``(1/n) sum_i J_i^T Lambda_i J_i`` from dense Jacobians and output Hessians (no inflens)."""
    ref = Reference(model, loss, 0.0, t=t)
    params = dict(model.named_parameters())

    def f(theta: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**params, **obj.unflatten(theta)}, (x,))

    jac = jacrev(f)(obj.theta.detach())  # [B, *out, p]
    outs = f(obj.theta).detach()
    n = x.shape[0]
    total = torch.zeros(obj.p, obj.p, dtype=DT)
    for i in range(n):
        lam = torch.autograd.functional.hessian(
            lambda o, i=i: ref.loss(o[None], y[i : i + 1]).sum(), outs[i]
        )
        c = outs[i].numel()
        ji = jac[i].reshape(c, -1)
        total += ji.T @ lam.reshape(c, c) @ ji
    return total / n


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.c(x)).flatten(1))


def _cases():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=DT)
    yield "mlp_ce", MLP(3, 4, 3).to(DT), "cross_entropy", x, torch.randint(0, 3, (12,), generator=g)
    yield "mlp_mse", MLP(3, 4, 2).to(DT), "mse", x, torch.randn(12, 2, generator=g, dtype=DT)
    yield (
        "mlp_logistic",
        MLP(3, 4, 1).to(DT),
        "binary_logistic",
        x,
        torch.randint(0, 2, (12,), generator=g),
    )
    xc = torch.randn(10, 1, 4, 4, generator=g, dtype=DT)
    yield "conv_ce", _Conv().to(DT), "cross_entropy", xc, torch.randint(0, 3, (10,), generator=g)


@pytest.mark.parametrize("name,model,loss,x,y", list(_cases()), ids=[c[0] for c in _cases()])
def test_ggn_products_equal_explicit_jt_lambda_j(name, model, loss, x, y) -> None:
    obj = Objective(model, loss, l2=0.1)
    curv = Curvature(obj, Data((x, y)), damping=0.2, progress=False, curvature="ggn")
    want = explicit_ggn(model, obj, loss, x, y) + 0.3 * torch.eye(obj.p, dtype=DT)
    dense = curv.dense()
    assert rel_err(dense, want) < 1e-12 and torch.equal(dense, dense.T)
    assert curv.num_matvecs == 0, "dense GGN should come from Jacobians, not p products"
    # the column-by-column build (p GGN-vector products) gives the same matrix
    cols = Curvature(obj, Data((x, y)), damping=0.2, progress=False, curvature="ggn", chunk_size=5)
    assert rel_err(cols.dense(method="products"), dense) < 1e-12 and cols.num_matvecs == obj.p
    v = torch.randn(3, obj.p, generator=torch.Generator().manual_seed(1), dtype=DT)
    assert rel_err(curv.matvec(v), v @ want) < 1e-12
    assert rel_err(curv.matvec(v[0]), want @ v[0]) < 1e-12


def test_ggn_is_positive_semidefinite_where_the_hessian_is_not() -> None:
    torch.manual_seed(3)
    model = MLP(3, 6, 3).to(DT)  # untrained: an indefinite Hessian
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (40,), generator=g)
    obj = Objective(model, "cross_entropy")
    hess = Curvature(obj, Data((x, y)), progress=False).dense()
    ggn = Curvature(obj, Data((x, y)), progress=False, curvature="ggn").dense()
    assert float(torch.linalg.eigvalsh(hess)[0]) < -1e-3
    assert float(torch.linalg.eigvalsh(ggn)[0]) > -1e-12


@pytest.mark.parametrize("name", ["logreg_multiclass", "logreg_binary", "smooth_hinge_svm"])
def test_ggn_equals_hessian_for_linear_models(name: str) -> None:
    f = fitted(name)
    c = f.case
    obj = Objective(f.fresh_model(), c.loss, l2=c.l2, t=c.t)
    ggn = Curvature(obj, Data((f.x, f.y)), progress=False, curvature="ggn").dense()
    assert rel_err(ggn, f.hess) < 1e-10


@pytest.mark.parametrize(
    "solver",
    [
        CG(tol=1e-12),
        Arnoldi(rank=39, n_iters=39),
        LiSSA(depth=300, repeats=1, batch_size=None),
    ],
    ids=["cg", "arnoldi", "lissa_full_batch"],
)
def test_every_matrix_free_solver_uses_the_ggn(solver) -> None:
    f = fitted("mlp_tanh")  # p = 39, a non-linear model: GGN != Hessian
    obj = Objective(f.fresh_model(), "cross_entropy", l2=f.case.l2)
    want = explicit_ggn(obj.model, obj, "cross_entropy", f.x, f.y) + (f.case.l2 + 0.1) * torch.eye(
        obj.p, dtype=DT
    )
    assert rel_err(want, f.hess + 0.1 * torch.eye(obj.p, dtype=DT)) > 1e-3  # they differ
    inf = Influence(obj, (f.x, f.y), solver=solver, damping=0.1, curvature="ggn", progress=False)
    inf.fit()
    rhs = torch.randn(2, obj.p, generator=torch.Generator().manual_seed(0), dtype=DT)
    tol = 1e-4 if isinstance(solver, LiSSA) else 1e-8
    assert rel_err(inf.solver.solve(rhs), torch.linalg.solve(want, rhs.T).T) < tol
    assert inf.diagnostics()["curvature"] == "ggn"


def test_exact_with_ggn_and_unknown_curvature_name() -> None:
    f = fitted("mlp_mse")
    obj = Objective(f.fresh_model(), "mse", l2=f.case.l2)
    inf = Influence(obj, (f.x, f.y), solver=Exact(), curvature="GGN", progress=False).fit()
    want = explicit_ggn(obj.model, obj, "mse", f.x, f.y) + f.case.l2 * torch.eye(obj.p, dtype=DT)
    assert rel_err(inf.solver.dense_inverse(), torch.linalg.inv(want)) < 1e-10
    with pytest.raises(InputError, match="ggn"):
        Influence(obj, (f.x, f.y), curvature="fisher")
    with pytest.raises(InputError, match="ggn"):
        Curvature(obj, Data((f.x, f.y)), curvature="gauss")
