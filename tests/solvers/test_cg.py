"""``CG``: batched conjugate gradients against the exact solve."""

from __future__ import annotations

import warnings

import pytest
import torch

import inflens
from cases import Fitted, fitted, rel_err
from inflens.curvature import Curvature
from inflens.data import Data
from inflens.errors import InflensWarning, NotFittedError
from inflens.solvers import CG

DT = torch.float64


def _curv(case: Fitted, damping: float = 0.0, dtype=DT) -> Curvature:
    c = case.case
    model = case.fresh_model().to(dtype)
    obj = inflens.Objective(model, c.loss, l2=c.l2, params=c.params, t=c.t, backend=case.backend)
    return Curvature(obj, Data((case.x.to(dtype), case.y)), damping, progress=False)


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_cg_matches_exact(case: Fitted, damping: float) -> None:
    p = case.theta.numel()
    rhs = torch.randn(3, p, generator=torch.Generator().manual_seed(0), dtype=DT)
    rhs[1] = 0  # a zero right-hand side is solved by zero, without NaN
    solver = CG(tol=1e-12).fit(_curv(case, damping))
    with warnings.catch_warnings():
        warnings.simplefilter("error", InflensWarning)  # converged: no warning
        got = solver.solve(rhs)
    want = torch.linalg.solve(case.hess + damping * torch.eye(p, dtype=DT), rhs.T).T
    assert torch.equal(got[1], torch.zeros(p, dtype=DT))
    assert rel_err(got, want) < 1e-10
    info = solver.diagnostics()
    assert info["solves"] == 3 and len(info["iterations"]) == 3
    assert max(info["relative_residuals"]) <= 1e-11
    # in exact arithmetic CG needs at most p iterations; round-off costs a few more
    assert max(info["iterations"]) <= 2 * p


def test_cg_one_vector_and_influence_agree_with_exact() -> None:
    case = fitted("mlp_tanh")
    c = case.case
    test = (case.xt, case.yt)
    out = {}
    for name, solver in (("exact", "exact"), ("cg", CG(tol=1e-12))):
        obj = inflens.Objective(case.fresh_model(), c.loss, l2=c.l2, backend=case.backend)
        inf = inflens.Influence(obj, (case.x, case.y), solver=solver, progress=False).fit()
        out[name] = (
            inf.loss_influence(test),
            inf.param_influence([2]),
            inf.s_test(test, mean=True),
        )
    for a, b in zip(out["cg"], out["exact"]):
        assert rel_err(a, b) < 1e-10


def test_cg_warns_with_the_residual_when_max_iter_is_reached() -> None:
    case = fitted("mlp_tanh")
    solver = CG(tol=1e-12, max_iter=2).fit(_curv(case))
    rhs = torch.randn(2, case.theta.numel(), generator=torch.Generator().manual_seed(1), dtype=DT)
    with pytest.warns(
        InflensWarning, match=r"after 2 iterations with relative residual \d\.\d\de[-+]\d\d"
    ):
        out = solver.solve(rhs)
    res = solver.diagnostics()["relative_residuals"]
    assert min(res) > 1e-6  # and it really is far from converged
    true = (_curv(case).matvec(out) - rhs).norm(dim=1) / rhs.norm(dim=1)
    torch.testing.assert_close(torch.tensor(res, dtype=DT), true, rtol=1e-10, atol=0)


def test_cg_float32_converges_without_spurious_warning() -> None:
    case = fitted("logreg_multiclass")
    solver = CG(tol=1e-6).fit(_curv(case, dtype=torch.float32))
    rhs = torch.randn(2, case.theta.numel(), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", InflensWarning)
        got = solver.solve(rhs)
    assert got.dtype == torch.float32
    assert rel_err(got.double(), torch.linalg.solve(case.hess, rhs.double().T).T) < 1e-4


def test_cg_arguments_and_fit_state() -> None:
    with pytest.raises(ValueError, match="tol must be positive"):
        CG(tol=0)
    with pytest.raises(NotFittedError):
        CG().solve(torch.zeros(1, 3))


@pytest.mark.parametrize("pre", ["kfac", "ekfac"])
@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_preconditioned_cg_matches_exact(case: Fitted, pre: str, damping: float) -> None:
    """PCG converges to the exact solve of the Hessian system (the K-FAC family only
    approximates the Gauss-Newton matrix; as a preconditioner it changes the path, not the
    answer)."""
    from inflens.solvers import KFAC

    p = case.theta.numel()
    rhs = torch.randn(3, p, generator=torch.Generator().manual_seed(1), dtype=DT)
    curv = _curv(case, damping)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflensWarning)  # K-FAC's diagonal-fallback notice
        solver = CG(tol=1e-12, preconditioner=pre).fit(curv)
    if curv.shift == 0 and isinstance(solver.preconditioner, KFAC):
        pytest.skip("no l2 or damping: the Kronecker factors may be singular")
    got = solver.solve(rhs)
    want = torch.linalg.solve(case.hess + damping * torch.eye(p, dtype=DT), rhs.T).T
    assert rel_err(got, want) < 1e-10
    assert solver.diagnostics()["preconditioner"] == pre
    assert max(solver.diagnostics()["relative_residuals"]) <= 1e-11


def test_kfac_preconditioner_cuts_iterations_on_an_ill_conditioned_linear_model() -> None:
    """Features on scales 1..100 make the Hessian ill-conditioned; K-FAC captures the feature
    covariance exactly for a linear model, so PCG needs far fewer iterations."""
    g = torch.Generator().manual_seed(0)
    n, d, c = 400, 12, 4
    x = torch.randn(n, d, generator=g, dtype=DT) * torch.logspace(0, 2, d, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    model = torch.nn.Linear(d, c).to(DT)
    obj = inflens.Objective(model, "cross_entropy", l2=1e-3)
    # any theta will do: the cross-entropy Hessian plus l2 I is positive definite everywhere
    rhs = torch.randn(2, obj.p, generator=g, dtype=DT)
    iters = {}
    for pre in (None, "kfac"):
        curv = Curvature(obj, Data((x, y)), progress=False)
        solver = CG(tol=1e-10, preconditioner=pre).fit(curv)
        sol = solver.solve(rhs)
        iters[pre] = max(solver.diagnostics()["iterations"])
        want = torch.linalg.solve(curv.dense(), rhs.T).T
        assert rel_err(sol, want) < 1e-8
    assert iters["kfac"] * 2 <= iters[None], iters


def test_preconditioner_must_be_a_solver() -> None:
    with pytest.raises(inflens.InputError, match="preconditioner"):
        CG(preconditioner=3.0)
    with pytest.raises(inflens.InputError, match="cannot precondition"):
        CG(preconditioner=CG())
    with pytest.raises(ValueError, match="not known by name; use 'kfac', 'ekfac'"):
        CG(preconditioner="nope")


@pytest.mark.determinism
def test_pcg_by_name_is_cg_with_kfac_and_round_trips(tmp_path) -> None:
    """``solver="pcg"``: CG preconditioned by K-FAC; same answer as Exact; saved and loaded by
    name with its preconditioner."""
    from inflens.solvers import KFAC, PCG, make_solver

    case = fitted("logreg_multiclass")
    c = case.case
    obj = inflens.Objective(case.fresh_model(), c.loss, l2=c.l2, backend=case.backend)
    inf = inflens.Influence(obj, (case.x, case.y), solver="pcg", progress=False).fit()
    assert isinstance(inf.solver, PCG) and isinstance(inf.solver.preconditioner, KFAC)
    got = inf.loss_influence((case.xt, case.yt))
    exact = inflens.Influence(obj, (case.x, case.y), progress=False).fit()
    assert rel_err(got, exact.loss_influence((case.xt, case.yt))) < 1e-6
    inf.save(tmp_path)
    loaded = inflens.Influence.load(tmp_path, obj, (case.x, case.y), progress=False)
    assert isinstance(loaded.solver, PCG)
    assert torch.equal(loaded.loss_influence((case.xt, case.yt)), got)
    assert isinstance(make_solver("pcg"), PCG) and make_solver("pcg").tol == 1e-8
