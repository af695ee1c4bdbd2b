"""``LiSSA``: the Neumann-series estimator against direct solves (PROTOCOL 2.3)."""

from __future__ import annotations

import re

import pytest
import torch

import inflens
from cases import Fitted, fitted, rel_err
from inflens.errors import InputError, SolverDivergedError
from inflens.solvers import LiSSA

DT = torch.float64


def _influence(case: Fitted, solver, damping: float = 0.0) -> inflens.Influence:
    c = case.case
    obj = inflens.Objective(case.fresh_model(), c.loss, l2=c.l2, params=c.params, t=c.t)
    return inflens.Influence(
        obj, (case.x, case.y), solver=solver, damping=damping, progress=False
    ).fit()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@pytest.mark.parametrize("d,delta", [(0.0, 0.0), (0.05, 0.0), (0.05, 0.1)])
def test_full_batch_lissa_solves_the_damped_system(d: float, delta: float) -> None:
    """Full batch (deterministic): the fixed point is (H + delta I + scale * d * I)^-1 v."""
    case = fitted("logreg_multiclass")
    scale = 0.6  # eigenvalues of H: 0.05 .. 0.40
    lissa = LiSSA(depth=400, repeats=3, scale=scale, damping=d, batch_size=None)
    _influence(case, lissa, damping=delta)
    p = case.theta.numel()
    a = case.hess + (delta + scale * d) * torch.eye(p, dtype=DT)
    rhs = torch.randn(1, p, generator=torch.Generator().manual_seed(0), dtype=DT)
    # contraction <= 1 - 0.05 / 0.6 per step: 0.917^400 < 1e-14
    assert rel_err(lissa.solve(rhs), torch.linalg.solve(a, rhs.T).T) < 1e-10
    assert lissa.diagnostics()["effective_damping"] == pytest.approx(scale * d)


def test_automatic_scale_from_the_largest_eigenvalue() -> None:
    case = fitted("logreg_binary")
    lissa = LiSSA(depth=150, repeats=1, scale=None, batch_size=None)
    inf = _influence(case, lissa)
    lam_max = float(torch.linalg.eigvalsh(case.hess)[-1])
    assert lissa.diagnostics()["scale"] == pytest.approx(1.5 * lam_max, rel=1e-3)
    exact = _influence(case, "exact")
    test = (case.xt[:1], case.yt[:1])
    assert rel_err(inf.loss_influence(test), exact.loss_influence(test)) < 1e-10


@pytest.mark.parametrize("batch_size,depth,repeats", [(1, 100, 30), (5, 100, 8), (10, 100, 8)])
def test_stochastic_lissa_scores_correlate_with_exact(
    batch_size: int, depth: int, repeats: int
) -> None:
    """Mini-batch Hessian samples: Pearson > 0.99 with the exact scores (Fig. 2 Mid)."""
    case = fitted("lissa_logreg")
    test = (case.xt, case.yt)
    exact = _influence(case, "exact")
    want = exact.loss_influence(test)
    # the scale bounds every per-sample Hessian (rank one + l2 I) so each step contracts
    per_sample = max(
        float(
            torch.linalg.eigvalsh(
                case.ref.hessian(case.theta, case.x[i : i + 1], case.y[i : i + 1])
            )[-1]
        )
        for i in range(case.x.shape[0])
    )
    lissa = LiSSA(depth=depth, repeats=repeats, scale=per_sample, batch_size=batch_size, seed=3)
    got = _influence(case, lissa).loss_influence(test)
    assert _pearson(got, want) > 0.99
    assert rel_err(got, want) < 0.3
    # the test can fail: ignoring H (s_test = grad L(z_test)) correlates much worse here
    no_hessian = exact.score(exact.test_gradients(test))
    assert _pearson(no_hessian, want) < 0.95


@pytest.mark.filterwarnings("ignore:LiSSA is far from converged")  # short on purpose
def test_stochastic_lissa_is_seeded() -> None:
    case = fitted("lissa_logreg")
    rhs = torch.ones(1, 3, dtype=DT)
    runs = []
    for seed in (0, 0, 1):
        lissa = LiSSA(depth=30, repeats=2, scale=2.0, batch_size=1, seed=seed)
        _influence(case, lissa)
        runs.append(lissa.solve(rhs))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("batch_size", [None, 1])
def test_too_small_scale_raises_with_a_scale_to_try(batch_size: int | None) -> None:
    case = fitted("logreg_binary")
    lam_max = float(torch.linalg.eigvalsh(case.hess)[-1])
    lissa = LiSSA(depth=500, repeats=1, scale=lam_max / 5, batch_size=batch_size)
    inf = _influence(case, lissa)
    with pytest.raises(SolverDivergedError, match="scale") as err:
        inf.s_test((case.xt[:1], case.yt[:1]))
    suggested = float(re.search(r"try scale >= (\S+?)[\s(]", str(err.value)).group(1))
    assert suggested > lam_max
    # the suggested scale works (full batch: deterministic, converges to the exact answer)
    fixed = _influence(case, LiSSA(depth=300, repeats=1, scale=suggested, batch_size=None))
    exact = _influence(case, "exact")
    test = (case.xt[:1], case.yt[:1])
    assert rel_err(fixed.loss_influence(test), exact.loss_influence(test)) < 1e-8


def test_slightly_too_small_scale_with_short_depth_raises() -> None:
    """A contraction factor just above 1 does not blow up within a short depth; it must still
    be refused rather than returned as an answer."""
    case = fitted("logreg_binary")
    lam_max = float(torch.linalg.eigvalsh(case.hess)[-1])
    lissa = LiSSA(depth=40, repeats=1, scale=lam_max / 2.2, batch_size=None)
    inf = _influence(case, lissa)
    with pytest.raises(SolverDivergedError, match=r"try scale >= "):
        inf.s_test((case.xt[:1], case.yt[:1]))


def test_lissa_arguments() -> None:
    with pytest.raises(InputError, match="depth and repeats"):
        LiSSA(depth=0)
    with pytest.raises(InputError, match="scale must be positive"):
        LiSSA(scale=0.0)
    with pytest.raises(InputError, match=r"damping d must lie in \[0, 1\)"):
        LiSSA(damping=1.0)
    paper = LiSSA.paper()
    assert (
        paper.depth,
        paper.repeats,
        paper.scale,
        paper.damping,
        paper.batch_size,
        paper.seed,
    ) == (
        5000,
        10,
        25.0,
        0.0,
        1,
        17,
    )


def _outlier_logreg(n: int = 300, seed: int = 0):
    """Binary logistic regression where 1 point in 10 has 5x the feature scale: a single such
    example's Hessian is far above the average's top eigenvalue."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    x[::10] *= 5.0
    y = (torch.rand(n, generator=g, dtype=DT) < 0.5).long()
    model = torch.nn.Linear(4, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.zero_()  # sigma = 1/2: every example has its largest curvature
    return inflens.Objective(model, "binary_logistic", l2=0.05), (x, y)


def test_automatic_scale_covers_single_example_hessians() -> None:
    """Batch 1: 1.5 x the average Hessian's top eigenvalue lets the outliers' steps expand
    and LiSSA diverges; the automatic scale also probes mini-batches, bounds them, and the
    estimate converges to the exact one."""
    obj, train = _outlier_logreg()
    exact = inflens.Influence(obj, train, progress=False).fit()
    test = (train[0][:3], train[1][:3])
    want = exact.loss_influence(test)
    lam_max = exact.diagnostics()["max_eigenvalue"]
    old_rule = LiSSA(depth=3000, repeats=1, scale=1.5 * lam_max, batch_size=1, seed=0)
    with pytest.raises(SolverDivergedError, match="mini-batch Hessians up to") as err:
        inflens.Influence(obj, train, solver=old_rule, progress=False).fit().loss_influence(test)
    # the message's suggestion accounts for the mini-batches, and it works
    suggested = float(re.search(r"try scale >= (\S+?)[\s(]", str(err.value)).group(1))
    fixed = LiSSA(depth=3000, repeats=1, scale=suggested, batch_size=1, seed=0)
    inflens.Influence(obj, train, solver=fixed, progress=False).fit().loss_influence(test)
    auto = LiSSA(depth=3000, repeats=4, scale=None, batch_size=1, seed=0)
    inf = inflens.Influence(obj, train, solver=auto, progress=False).fit()
    info = inf.diagnostics()
    # per-example Hessians sigma(1-sigma) x x^T + l2 I: the probe sees the outliers' |x|^2 / 4
    per_example = 0.25 * (train[0] ** 2).sum(1) + 0.05
    assert info["estimated_max_batch_eigenvalue"] > 0.9 * float(per_example.max())
    assert info["scale"] >= info["estimated_max_batch_eigenvalue"] / 1.5 > 1.5 * lam_max
    got = inf.loss_influence(test)
    # batch 1 with a 60x spread of per-example curvature is noisy: 3,000 steps x 4 repeats
    # (seeded, so deterministic) give Pearson 0.96-0.99 per test point
    pears = [_pearson(got[j], want[j]) for j in range(3)]
    assert min(pears) > 0.9 and sum(pears) / 3 > 0.95, pears


def test_scale_probes_off_and_full_batch_skip_the_probe() -> None:
    obj, train = _outlier_logreg()
    for solver in (
        LiSSA(depth=5, repeats=1, scale=None, batch_size=1, scale_probes=0),
        LiSSA(depth=5, repeats=1, scale=None, batch_size=None),
    ):
        inf = inflens.Influence(obj, train, solver=solver, progress=False).fit()
        info = inf.diagnostics()
        assert "estimated_max_batch_eigenvalue" not in info
        assert info["scale"] == pytest.approx(1.5 * info["estimated_max_eigenvalue"])
    with pytest.raises(InputError, match="scale_probes"):
        LiSSA(scale_probes=-1)
