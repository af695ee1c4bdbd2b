"""Arnoldi (low-rank eigendecomposition) against explicit float64 eigendecompositions."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cases import DT, fitted, rel_err
from inflens import CurvatureError, InflensWarning, Influence, InputError, Objective
from inflens.solvers import Arnoldi, Exact


def _objective(name: str) -> tuple[Objective, object]:
    f = fitted(name)
    c = f.case
    return Objective(f.fresh_model(), c.loss, l2=c.l2, params=c.params, t=c.t), f


@pytest.mark.parametrize("name", ["logreg_multiclass", "mlp_tanh", "mlp_mse", "smooth_hinge_svm"])
def test_full_rank_equals_exact(name: str) -> None:
    obj, f = _objective(name)
    p = obj.p
    ar = Influence(obj, (f.x, f.y), solver=Arnoldi(rank=p, n_iters=p), progress=False).fit()
    g = torch.Generator().manual_seed(0)
    rhs = torch.randn(4, p, generator=g, dtype=DT)
    ref = torch.linalg.solve(f.hess, rhs.T).T  # explicit Hessian of the reference
    assert rel_err(ar.solver.solve(rhs), ref) < 1e-8
    # the query path too: loss influence against the explicit formula
    scores = ar.loss_influence((f.xt, f.yt))
    gt = f.ref.grad_each(f.theta, f.xt, f.yt)
    gtr = f.ref.grad_each(f.theta, f.x, f.y) + f.case.l2 * f.theta
    assert rel_err(scores, -(gt @ torch.linalg.solve(f.hess, gtr.T))) < 1e-8
    # self-influence uses the solver's inner product
    si = ar.self_influence()
    g_tr = f.ref.grad_each(f.theta, f.x, f.y)
    want = -(g_tr * torch.linalg.solve(f.hess, gtr.T).T).sum(1)
    assert rel_err(si, want) < 1e-8


def _low_rank_problem(rank: int = 3, d: int = 12, n: int = 50):
    """Least squares whose inputs span a ``rank``-dim subspace: ``H = X^T X (2/n) + l2 I``."""
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(rank, d, generator=g, dtype=DT)
    x = torch.randn(n, rank, generator=g, dtype=DT) @ basis
    y = torch.randn(n, 1, generator=g, dtype=DT)
    model = nn.Linear(d, 1, bias=False).to(DT)
    obj = Objective(model, "mse", l2=0.1)
    h = 2 * x.T @ x / n + 0.1 * torch.eye(d, dtype=DT)
    return obj, x, y, h


def test_low_rank_with_shift_residual_is_exact_when_rank_suffices() -> None:
    obj, x, y, h = _low_rank_problem()
    inf = Influence(obj, (x, y), solver=Arnoldi(rank=3, n_iters=12, residual="shift"), damping=0.05)
    inf.progress = False
    inf.fit()
    rhs = torch.randn(5, obj.p, generator=torch.Generator().manual_seed(1), dtype=DT)
    ref = torch.linalg.solve(h + 0.05 * torch.eye(obj.p, dtype=DT), rhs.T).T
    assert rel_err(inf.solver.solve(rhs), ref) < 1e-8


def test_low_rank_projection_matches_top_eigenpairs() -> None:
    f = fitted("mlp_tanh")
    obj, _ = _objective("mlp_tanh")
    rank = 6
    inf = Influence(obj, (f.x, f.y), solver=Arnoldi(rank=rank, n_iters=obj.p), progress=False)
    inf.fit()
    lam, q = torch.linalg.eigh(f.hess)
    top = torch.argsort(lam.abs(), descending=True)[:rank]
    u, mu = q[:, top], lam[top]
    rhs = torch.randn(3, obj.p, generator=torch.Generator().manual_seed(2), dtype=DT)
    ref = ((rhs @ u) / mu) @ u.T
    assert rel_err(inf.solver.solve(rhs), ref) < 1e-8
    d = inf.diagnostics()
    assert d["rank"] == rank
    assert abs(d["max_eigenvalue"] - float(lam[-1])) < 1e-8 * float(lam[-1])
    assert sorted(d["eigenvalues"]) == pytest.approx(sorted(mu.tolist()), rel=1e-8)


def test_damping_is_applied_in_the_eigenbasis() -> None:
    f = fitted("logreg_multiclass")
    obj, _ = _objective("logreg_multiclass")
    p = obj.p
    inf = Influence(obj, (f.x, f.y), solver=Arnoldi(rank=p, n_iters=p), damping=0.3)
    inf.progress = False
    inf.fit()
    lam = torch.linalg.eigvalsh(f.hess) + 0.3
    assert sorted(inf.diagnostics()["eigenvalues"]) == pytest.approx(lam.tolist(), rel=1e-8)


def test_indefinite_kept_eigenvalue_is_refused_with_a_damping_hint() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    x = torch.randn(40, 3, dtype=DT)
    y = torch.randint(0, 3, (40,))
    obj = Objective(model, "cross_entropy")  # untrained: H is indefinite
    ex = Influence(obj, (x, y), solver=Exact(), damping=1e-3, progress=False)
    with pytest.raises(CurvatureError):
        ex.fit()
    with pytest.raises(CurvatureError, match="damping"):
        Influence(obj, (x, y), solver=Arnoldi(rank=obj.p, n_iters=obj.p), progress=False).fit()
    # the GGN is positive semi-definite: with a little damping Arnoldi accepts it
    Influence(
        obj, (x, y), solver=Arnoldi(rank=5), curvature="ggn", damping=1e-3, progress=False
    ).fit()


def test_unconverged_eigenpairs_warn_and_say_what_to_change() -> None:
    f = fitted("mlp_tanh")
    obj, _ = _objective("mlp_tanh")
    with pytest.warns(InflensWarning, match="raise n_iters"):
        Influence(obj, (f.x, f.y), solver=Arnoldi(rank=4, n_iters=4), progress=False).fit()


def test_arguments_are_checked() -> None:
    with pytest.raises(InputError):
        Arnoldi(rank=0)
    with pytest.raises(InputError):
        Arnoldi(rank=5, n_iters=3)
    with pytest.raises(InputError):
        Arnoldi(rank=5, residual="other")


def test_registered_by_name_and_shift_residual_needs_a_shift() -> None:
    obj, x, y, _ = _low_rank_problem()
    obj = Objective(obj.model, "mse", l2=0.0)
    inf = Influence(obj, (x, y), solver="arnoldi", progress=False)
    assert isinstance(inf.solver, Arnoldi)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflensWarning)
        with pytest.raises(CurvatureError):  # rank-3 H, rank 12 kept: zero eigenvalues
            Influence(obj, (x, y), solver=Arnoldi(rank=12), progress=False).fit()
        with pytest.raises(InputError, match="residual"):
            Influence(
                obj, (x, y), solver=Arnoldi(rank=3, n_iters=12, residual="shift"), progress=False
            ).fit()
