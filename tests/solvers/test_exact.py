"""``Exact``: direct solves with the explicit Hessian against an independent float64 Hessian."""

from __future__ import annotations

import pytest
import torch

import inflens
from cases import Fitted, fitted, rel_err
from inflens.curvature import Curvature
from inflens.data import Data
from inflens.errors import MemoryBudgetError, NotFittedError
from inflens.solvers import Exact

DT = torch.float64


def _curv(case: Fitted, damping: float = 0.0) -> Curvature:
    c = case.case
    obj = inflens.Objective(
        case.fresh_model(), c.loss, l2=c.l2, params=c.params, t=c.t, backend=case.backend
    )
    return Curvature(obj, Data((case.x, case.y)), damping, progress=False)


@pytest.mark.parametrize("damping", [0.0, 0.2])
def test_exact_solve_matches_explicit_hessian(case: Fitted, damping: float) -> None:
    solver = Exact().fit(_curv(case, damping))
    a = case.hess + damping * torch.eye(case.theta.numel(), dtype=DT)
    rhs = torch.randn(4, case.theta.numel(), generator=torch.Generator().manual_seed(0), dtype=DT)
    assert rel_err(solver.solve(rhs), torch.linalg.solve(a, rhs.T).T) < 1e-10
    assert rel_err(solver.dense_inverse(), torch.linalg.inv(a)) < 1e-10
    ev = torch.linalg.eigvalsh(a)
    info = solver.diagnostics()
    assert info["min_eigenvalue"] == pytest.approx(float(ev[0]), rel=1e-9)
    assert info["max_eigenvalue"] == pytest.approx(float(ev[-1]), rel=1e-9)
    assert info["condition_number"] == pytest.approx(float(ev[-1] / ev[0]), rel=1e-8)


def test_exact_solve_before_fit_raises() -> None:
    with pytest.raises(NotFittedError, match="before fit"):
        Exact().solve(torch.zeros(1, 3, dtype=DT))
    with pytest.raises(NotFittedError, match="before fit"):
        Exact().dense_inverse()


def test_exact_refuses_a_hessian_over_the_memory_budget() -> None:
    case = fitted("mlp_tanh")
    p = case.theta.numel()
    with pytest.raises(MemoryBudgetError, match=rf"{p}x{p} Hessian.*solver='cg'"):
        Exact(max_memory_gb=1e-9).fit(_curv(case))
    # just enough memory for 3 p x p float64 matrices is accepted
    Exact(max_memory_gb=3 * p * p * 8 / 2**30 * 1.01).fit(_curv(case))


def test_exact_float32() -> None:
    case = fitted("logreg_multiclass")
    obj = inflens.Objective(case.fresh_model().float(), "cross_entropy", l2=case.case.l2)
    solver = Exact().fit(Curvature(obj, Data((case.x.float(), case.y)), progress=False))
    rhs = torch.randn(2, obj.p, generator=torch.Generator().manual_seed(0))
    out = solver.solve(rhs)
    assert out.dtype == torch.float32
    assert rel_err(out.double(), torch.linalg.solve(case.hess, rhs.double().T).T) < 1e-4


@pytest.mark.parametrize("damping", [0.0, 0.2])
def test_cholesky_solve_matches_explicit_hessian(case: Fitted, damping: float) -> None:
    solver = Exact(method="cholesky").fit(_curv(case, damping))
    a = case.hess + damping * torch.eye(case.theta.numel(), dtype=DT)
    rhs = torch.randn(4, case.theta.numel(), generator=torch.Generator().manual_seed(0), dtype=DT)
    assert rel_err(solver.solve(rhs), torch.linalg.solve(a, rhs.T).T) < 1e-10
    assert rel_err(solver.dense_inverse(), torch.linalg.inv(a)) < 1e-10
    info = solver.diagnostics()
    assert info["factorisation"] == "cholesky" and info["eigenvalues_estimated"]
    ev = torch.linalg.eigvalsh(a)  # p <= 30 Lanczos steps: the Krylov space is everything
    assert info["min_eigenvalue"] == pytest.approx(float(ev[0]), rel=1e-8)
    assert info["max_eigenvalue"] == pytest.approx(float(ev[-1]), rel=1e-8)


def test_auto_uses_cholesky_for_large_p_with_estimated_extremes(monkeypatch) -> None:
    """p = 400 (over a lowered threshold): the Cholesky solve equals the explicit solve and the
    Lanczos estimates of the extreme eigenvalues are within 1e-6 of eigvalsh's."""
    g = torch.Generator().manual_seed(0)
    n, d, c = 2000, 80, 5
    x = torch.randn(n, d, generator=g, dtype=DT) * torch.linspace(0.2, 3, d, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    obj = inflens.Objective(torch.nn.Linear(d, c, bias=False).to(DT), "cross_entropy", l2=1e-2)
    curv = Curvature(obj, Data((x, y)), progress=False)
    monkeypatch.setattr(Exact, "EIGH_MAX_P", 100)
    solver = Exact().fit(curv)
    assert solver.diagnostics()["factorisation"] == "cholesky" and solver.evecs_ is None
    a = curv.dense()
    rhs = torch.randn(3, obj.p, generator=g, dtype=DT)
    assert rel_err(solver.solve(rhs), torch.linalg.solve(a, rhs.T).T) < 1e-10
    ev = torch.linalg.eigvalsh(a)
    info = solver.diagnostics()
    assert info["min_eigenvalue"] == pytest.approx(float(ev[0]), rel=1e-6)
    assert info["max_eigenvalue"] == pytest.approx(float(ev[-1]), rel=1e-6)


def test_exact_method_is_checked() -> None:
    with pytest.raises(inflens.InputError, match="method must be"):
        Exact(method="lu")
