"""Arnoldi (low-rank eigendecomposition) against explicit float64 eigendecompositions."""

from __future__ import annotations

import re
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


@pytest.mark.parametrize("residual", ["mean", "none", "shift"])
@pytest.mark.parametrize("name", ["logreg_multiclass", "mlp_tanh", "mlp_mse", "smooth_hinge_svm"])
def test_full_rank_equals_exact(name: str, residual: str) -> None:
    obj, f = _objective(name)
    p = obj.p
    solver = Arnoldi(rank=p, n_iters=p, residual=residual)
    ar = Influence(obj, (f.x, f.y), solver=solver, progress=False).fit()
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
    solver = Arnoldi(rank=rank, n_iters=obj.p, residual="none")
    inf = Influence(obj, (f.x, f.y), solver=solver, progress=False)
    inf.fit()
    lam, q = torch.linalg.eigh(f.hess)
    order = torch.argsort(lam.abs(), descending=True)
    top = order[:rank]
    u, mu = q[:, top], lam[top]
    rhs = torch.randn(3, obj.p, generator=torch.Generator().manual_seed(2), dtype=DT)
    ref = ((rhs @ u) / mu) @ u.T
    assert rel_err(inf.solver.solve(rhs), ref) < 1e-8
    # the mean complement: the rest of the spectrum at its average (exact here: the Krylov
    # space is the whole space, so the trace is the sum of all Ritz values)
    mean = Influence(obj, (f.x, f.y), solver=Arnoldi(rank=rank, n_iters=obj.p), progress=False)
    mean.fit()
    sigma = float(lam[order[rank:]].mean())
    assert mean.diagnostics()["complement_eigenvalue"] == pytest.approx(sigma, rel=1e-10)
    want = ref + (rhs - (rhs @ u) @ u.T) / sigma
    assert rel_err(mean.solver.solve(rhs), want) < 1e-8
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
    with pytest.raises(InputError, match="rank_tol"):
        Arnoldi(rank_tol=0.0)
    with pytest.raises(InputError, match="probes"):
        Arnoldi(probes=0)
    d = Arnoldi()
    assert (d.rank, d.n_iters, d.residual, d.rank_tol, d.probes) == (None, None, "mean", 0.5, 30)


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


def _spectrum_problem(eigs: torch.Tensor, l2: float = 0.0, seed: int = 0):
    """Least squares ``mean_i (x_i . w - y_i)^2`` whose Hessian ``2 X^T X / n + l2 I`` has the
    eigenvalues ``eigs + l2`` in a random eigenbasis: ``X = sqrt(n eigs / 2) Q^T`` rows."""
    p = eigs.numel()
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=DT))
    n = p
    x = (eigs.mul(n / 2).sqrt()[:, None] * q.T).to(DT)  # X^T X = Q diag(n eigs / 2) Q^T
    y = torch.randn(n, 1, generator=g, dtype=DT)
    model = nn.Linear(p, 1, bias=False).to(DT)
    h = q @ torch.diag(eigs) @ q.T + l2 * torch.eye(p, dtype=DT)
    return Objective(model, "mse", l2=l2), x, y, h


def test_mean_complement_beats_the_plain_low_rank_inverse_on_a_flat_spectrum() -> None:
    """Eigenvalues spread evenly over [1, 2]: any rank-5 eigenspace holds a small part of a
    random vector, so dropping the rest (``"none"``) loses most of ``A^-1 v``; the mean
    complement misses each left-out direction by at most ``max |lambda / sigma - 1|``."""
    p = 40
    eigs = torch.linspace(1.0, 2.0, p, dtype=DT)
    obj, x, y, h = _spectrum_problem(eigs, l2=0.01)
    rhs = torch.randn(6, p, generator=torch.Generator().manual_seed(1), dtype=DT)
    exact = torch.linalg.solve(h, rhs.T).T
    errs, fitted_by = {}, {}
    for residual in ("mean", "none", "shift"):
        # n_iters = 12 < p: the complement of the Krylov space (28 dimensions) is traced by 10
        # Hutchinson probes, so the mean is an estimate
        solver = Arnoldi(rank=5, n_iters=12, residual=residual, probes=10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InflensWarning)  # interior Ritz pairs: unconverged
            inf = Influence(obj, (x, y), solver=solver, progress=False).fit()
        errs[residual] = rel_err(inf.solver.solve(rhs), exact)
        fitted_by[residual] = inf
    lam = torch.linalg.eigvalsh(h)
    assert errs["none"] > 0.8  # the top 5 of 40 flat directions carry little of A^-1 v
    assert errs["shift"] > 10  # 1 / l2 = 100 against 1 / lambda <= 1
    # the mean complement's error is that of replacing 1/lambda by 1/sigma, at most 1/3 here
    # (sigma ~ 1.44 against lambda in [1.01, 1.9]); a little more for the Krylov pairs
    assert errs["mean"] < 0.35
    assert errs["mean"] < errs["none"] / 2.5
    d = fitted_by["mean"].diagnostics()
    assert d["trace_estimate"] == pytest.approx(float(lam.sum()), rel=0.05)
    assert d["trace_probes"] == 10


def test_automatic_rank_keeps_the_spikes_of_a_spiked_spectrum() -> None:
    """Five large eigenvalues above a bulk in [0.95, 1.05]: the rank rule keeps the five (the
    next Ritz value is within 1.5x of the bulk's mean), and the mean complement then models
    the bulk to within 5%; the plain projection on the same rank does not."""
    p = 60
    bulk = torch.linspace(0.95, 1.05, p - 5, dtype=DT)
    eigs = torch.cat([torch.tensor([50.0, 40.0, 30.0, 20.0, 10.0], dtype=DT), bulk])
    obj, x, y, h = _spectrum_problem(eigs, l2=0.0)
    inf = Influence(obj, (x, y), solver=Arnoldi(n_iters=30), progress=False).fit()
    d = inf.diagnostics()
    assert d["rank"] == 5
    assert sorted(d["eigenvalues"]) == pytest.approx([10.0, 20.0, 30.0, 40.0, 50.0], rel=1e-8)
    assert d["complement_eigenvalue"] == pytest.approx(1.0, rel=0.02)
    rhs = torch.randn(4, p, generator=torch.Generator().manual_seed(2), dtype=DT)
    exact = torch.linalg.solve(h, rhs.T).T
    assert rel_err(inf.solver.solve(rhs), exact) < 0.07
    plain = Influence(obj, (x, y), solver=Arnoldi(rank=5, residual="none"), progress=False).fit()
    assert rel_err(plain.solver.solve(rhs), exact) > 0.9
    # a tight tolerance keeps more pairs (the bulk's own Ritz values), never fewer
    tight = Influence(obj, (x, y), solver=Arnoldi(n_iters=30, rank_tol=1e-3), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflensWarning)
        assert tight.fit().diagnostics()["rank"] >= 5


def test_the_krylov_basis_is_built_once_and_reused_by_every_query() -> None:
    f = fitted("logreg_multiclass")
    obj, _ = _objective("logreg_multiclass")
    inf = Influence(obj, (f.x, f.y), solver=Arnoldi(rank=4), progress=False).fit()
    curv = inf.curvature_
    before = curv.num_matvecs
    first = inf.solver.solve(f.x.new_ones(2, obj.p))
    second = inf.solver.solve(f.x.new_ones(2, obj.p))
    assert curv.num_matvecs == before and torch.equal(first, second)
    # inner() is the solve's bilinear form
    a = torch.randn(3, obj.p, generator=torch.Generator().manual_seed(3), dtype=DT)
    b = torch.randn(3, obj.p, generator=torch.Generator().manual_seed(4), dtype=DT)
    assert inf.solver.inner(a, b) == pytest.approx((a * inf.solver.solve(b)).sum(1).tolist())


def test_indefinite_hessian_with_the_mean_complement_is_refused_with_a_damping_that_works() -> None:
    """Every Ritz value counts with the mean complement (the whole spectrum is inverted): a
    negative one anywhere is refused, and the suggested damping is accepted and exact."""
    p = 12
    eigs = torch.linspace(-0.5, 2.0, p, dtype=DT)  # three negative eigenvalues
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=DT))
    model = nn.Linear(p, 1, bias=False).to(DT)

    def quad(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # loss_i = t_i s_i^2 / 2 with s_i = q_i . w and t_i = p eig_i: H = Q diag(eigs) Q^T
        return 0.5 * t * out[:, 0] ** 2

    obj = Objective(model, quad, l2=0.0)
    train = (q.T.contiguous(), eigs * p)
    h = q @ torch.diag(eigs) @ q.T
    with pytest.raises(CurvatureError, match="negative eigenvalue") as err:
        Influence(obj, train, solver=Arnoldi(), progress=False).fit()
    suggested = float(re.search(r"damping=(\S+?)\)", str(err.value)).group(1))
    assert suggested > 0.5
    Influence(obj, train, solver=Arnoldi(), damping=suggested, progress=False).fit()  # accepted
    solver = Arnoldi(rank=p)
    inf = Influence(obj, train, solver=solver, damping=suggested, progress=False).fit()
    rhs = torch.randn(2, p, generator=torch.Generator().manual_seed(5), dtype=DT)
    want = torch.linalg.solve(h + suggested * torch.eye(p, dtype=DT), rhs.T).T
    assert rel_err(inf.solver.solve(rhs), want) < 1e-8


def test_fitted_state_with_the_complement_is_saved_and_restored(tmp_path) -> None:
    f = fitted("mlp_tanh")
    obj, _ = _objective("mlp_tanh")
    inf = Influence(obj, (f.x, f.y), solver=Arnoldi(n_iters=20), progress=False).fit()
    assert inf.diagnostics()["complement_eigenvalue"] is not None
    want = inf.loss_influence((f.xt, f.yt))
    inf.save(tmp_path / "fit")
    back = Influence.load(tmp_path / "fit", obj, (f.x, f.y), progress=False)
    assert rel_err(back.loss_influence((f.xt, f.yt)), want) < 1e-12
