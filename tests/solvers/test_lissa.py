"""``LiSSA``: the Neumann-series estimator against direct solves (PROTOCOL 2.3)."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

import inflens
from cases import Fitted, fitted, rel_err
from inflens.errors import (
    CurvatureError,
    InflensWarning,
    InputError,
    NotFittedError,
    SolverDivergedError,
)
from inflens.solvers import LiSSA

DT = torch.float64


def _influence(case: Fitted, solver, damping: float = 0.0) -> inflens.Influence:
    c = case.case
    obj = inflens.Objective(
        case.fresh_model(), c.loss, l2=c.l2, params=c.params, t=c.t, backend=case.backend
    )
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


# ---------------------------------------------------------------------------- batched recursion
def _example_hessians(case: Fitted) -> torch.Tensor:
    """``[n, p, p]``: each training example's explicit Hessian, ``l2 I`` included (so the
    mean over a mini-batch is that mini-batch's ``A_j``)."""
    return torch.stack(
        [
            case.ref.hessian(case.theta, case.x[i : i + 1], case.y[i : i + 1])
            for i in range(case.x.shape[0])
        ]
    )


def _reference_chain(
    hess: torch.Tensor, idx: torch.Tensor | None, v: torch.Tensor, scale: float, steps: int
) -> list[torch.Tensor]:
    """The per-vector recursion ``h_j = v + h_{j-1} - A_j h_{j-1} / scale`` on explicit
    matrices (``A_j`` the mean of the sampled examples' Hessians, or ``hess`` itself when
    ``idx`` is None), one right-hand side at a time; returns ``[h_1, ..., h_steps]`` stacked
    over the rows of ``v``."""
    out = []
    for row in v:
        h, hs = row.clone(), []
        for j in range(steps):
            a = hess if idx is None else hess[idx[j]].mean(0)
            h = row + h - a @ h / scale
            hs.append(h)
        out.append(torch.stack(hs))
    return [torch.stack([o[j] for o in out]) for j in range(steps)]


def _checkpoints(max_depth: int) -> list[int]:
    """The documented checkpoints: 50, then ceil(1.5 x the previous one), and max_depth."""
    out = [min(50, max_depth)]
    while out[-1] < max_depth:
        out.append(min(math.ceil(1.5 * out[-1]), max_depth))
    return out


@pytest.mark.parametrize("name", ["logreg_multiclass", "mlp_tanh"])  # closed form, autograd
@pytest.mark.parametrize("depth", [40, None])
def test_batched_recursion_equals_the_per_vector_recursion(name: str, depth: int | None) -> None:
    """All right-hand sides in one ``[k, p]`` recursion give what one-row solves with the same
    seed give (same mini-batches, same stopping checkpoints); with a fixed depth both equal the
    recursion written out on explicit per-example Hessians of the sampled mini-batches."""
    case = fitted(name)
    p = case.theta.numel()
    lam_max = float(torch.linalg.eigvalsh(case.hess)[-1])
    hess = _example_hessians(case)
    scale = 2.0 * float(torch.linalg.eigvalsh(hess)[:, -1].max())  # every sample contracts
    # the MLP's autograd steps are the slow ones: a shorter cap (rows then all stop there)
    cap = 200 if name == "logreg_multiclass" else 120
    lissa = LiSSA(depth=depth, scale=scale, batch_size=8, seed=5, tol=0.2, max_depth=cap)
    _influence(case, lissa)
    rhs = torch.randn(4, p, generator=torch.Generator().manual_seed(1), dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflensWarning)  # short chains on purpose
        batched = lissa.solve(rhs)
        single = torch.cat([lissa.solve(rhs[i : i + 1]) for i in range(4)])
    assert rel_err(batched, single) < 1e-12
    if depth is None:
        depths = lissa.diagnostics()["depths"]
        assert depths[:4] == depths[4:]
        if name == "logreg_multiclass":  # rows stop on their own: [200, 170, 200, 170]
            assert len(set(depths[:4])) > 1
        return
    idx = lissa.sample_indices(0)
    assert idx.shape == (depth, 8)
    ref = _reference_chain(hess, idx, rhs, scale, depth)[-1] / scale
    assert rel_err(batched, ref) < 1e-12
    assert scale > lam_max  # not the trivial regime


def test_automatic_depth_stops_at_the_documented_checkpoint_deterministic() -> None:
    """Full batch: the estimate is ``h_J / scale`` at the checkpoints; each row stops at the
    first one whose relative change is <= tol, and is then that accurate."""
    case = fitted("logreg_multiclass")
    p = case.theta.numel()
    tol = 1e-6
    lissa = LiSSA(batch_size=None, tol=tol)
    _influence(case, lissa)
    scale = lissa.diagnostics()["scale"]
    rhs = torch.randn(3, p, generator=torch.Generator().manual_seed(2), dtype=DT)
    got = lissa.solve(rhs)
    chain = _reference_chain(case.hess, None, rhs, scale, 2000)
    checks = _checkpoints(lissa.max_depth)
    want_depth = []
    for i in range(3):
        prev = None
        for c in checks:
            est = chain[c - 1][i] / scale
            if prev is not None and (est - prev).norm() <= tol * est.norm():
                want_depth.append(c)
                assert rel_err(got[i], est) < 1e-12
                break
            prev = est
    assert lissa.diagnostics()["depths"] == want_depth
    assert max(lissa.diagnostics()["relative_changes"]) <= tol
    exact = torch.linalg.solve(case.hess, rhs.T).T
    for i in range(3):  # the achieved accuracy: the change bounds the remaining error
        assert 0 < rel_err(got[i], exact[i]) <= tol


def test_automatic_depth_stops_at_the_documented_checkpoint_sampled() -> None:
    """Mini-batches: the estimate at a checkpoint is the mean of ``h_j / scale`` since the
    previous one; the rows stop where the documented rule says, and the result is within a
    small multiple of tol of the exact solve."""
    case = fitted("lissa_logreg")
    p = case.theta.numel()
    tol = 0.05
    hess = _example_hessians(case)
    lissa = LiSSA(batch_size=4, tol=tol, seed=3)
    _influence(case, lissa)
    scale = lissa.diagnostics()["scale"]
    rhs = torch.randn(2, p, generator=torch.Generator().manual_seed(4), dtype=DT)
    got = lissa.solve(rhs)
    depths = lissa.diagnostics()["depths"]
    steps = max(depths)
    chain = torch.stack(_reference_chain(hess, lissa.sample_indices(0, steps), rhs, scale, steps))
    checks = _checkpoints(lissa.max_depth)
    for i in range(2):
        prev, last = None, 0
        for c in checks:
            est = chain[last:c, i].mean(0) / scale
            if prev is not None and (est - prev).norm() <= tol * est.norm():
                assert depths[i] == c
                assert rel_err(got[i], est) < 1e-10
                break
            prev, last = est, c
        else:
            raise AssertionError("the reference chain did not stop")
    exact = torch.linalg.solve(case.hess, rhs.T).T
    assert rel_err(got, exact) < 2 * tol


# ---------------------------------------------------------------------------- diagnosis
def _quadratic(eigs: list[float], sign: float, l2: float = 0.0):
    """A linear model with loss ``sign * s^2 / 2``: ``H = sign * diag(eigs) + l2 I``
    (``n = d`` rows ``x_i = sqrt(n eig_i) e_i``)."""
    d = len(eigs)
    x = torch.diag(torch.tensor(eigs, dtype=DT).mul(d).sqrt())
    y = torch.zeros(d, dtype=DT)
    model = torch.nn.Linear(d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.fill_(0.1)

    def quad(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sign * 0.5 * out[:, 0] ** 2

    h = sign * torch.diag(torch.tensor(eigs, dtype=DT)) + l2 * torch.eye(d, dtype=DT)
    return inflens.Objective(model, quad, l2=l2), (x, y), h


@pytest.mark.parametrize(
    "eigs,sign,what", [([3.0, 1.0, 0.5], -1.0, "indefinite"), ([2.0, 1.0, 0.0], 1.0, "singular")]
)
def test_indefinite_or_singular_hessian_is_refused_with_a_damping_that_works(
    eigs: list[float], sign: float, what: str
) -> None:
    obj, train, h = _quadratic(eigs, sign)
    # the suggestion lets the series converge within max_depth (2,000 here: a quick test)
    refused = LiSSA(max_depth=2000)
    with pytest.raises(CurvatureError, match=what) as err:
        inflens.Influence(obj, train, solver=refused, progress=False).fit()
    with pytest.raises(NotFittedError):  # a refused fit leaves nothing to solve with
        refused.solve(torch.ones(1, 3, dtype=DT))
    msg = str(err.value)
    if what == "indefinite":
        found = float(re.search(r"most negative eigenvalue about (\S+)", msg).group(1))
        assert found == pytest.approx(-max(eigs), rel=1e-6)
    suggested = float(re.search(r"damping=(\S+?)[\s)]", msg).group(1))
    # the suggestion works: LiSSA (automatic depth, full batch) converges to the damped solve
    v = torch.tensor([[1.0, -2.0, 0.5]], dtype=DT)
    want = torch.linalg.solve(h + suggested * torch.eye(3, dtype=DT), v.T).T
    with warnings.catch_warnings():
        warnings.simplefilter("error", InflensWarning)
        lissa = LiSSA(batch_size=None, tol=1e-3, max_depth=2000)
        inf = inflens.Influence(obj, train, solver=lissa, damping=suggested, progress=False)
        got = inf.fit().solver.solve(v)
    assert rel_err(got, want) < 1e-3
    assert lissa.diagnostics()["depths"][0] < lissa.max_depth


def test_not_converging_by_max_depth_warns_with_a_damping_that_works() -> None:
    """A smallest eigenvalue far below the largest: the series cannot converge in max_depth
    steps; the warning names a damping with which it does."""
    obj, train, h = _quadratic([4.0, 1.0, 0.001], 1.0)
    v = torch.tensor([[1.0, -2.0, 0.5]], dtype=DT)
    lissa = LiSSA(batch_size=None, tol=1e-3, max_depth=500)
    inf = inflens.Influence(obj, train, solver=lissa, progress=False).fit()
    with pytest.warns(InflensWarning, match="did not converge within max_depth=500") as rec:
        inf.solver.solve(v)
    suggested = float(re.search(r"damping=(\S+?)\s", str(rec[0].message)).group(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", InflensWarning)
        inf = inflens.Influence(obj, train, solver=lissa, damping=suggested, progress=False)
        got = inf.fit().solver.solve(v)
    want = torch.linalg.solve(h + suggested * torch.eye(3, dtype=DT), v.T).T
    assert rel_err(got, want) < 1e-3


def test_sampling_noise_warning_says_to_raise_the_batch_size() -> None:
    case = fitted("lissa_logreg")
    lissa = LiSSA(batch_size=1, tol=1e-4, max_depth=300, seed=0)
    _influence(case, lissa)
    with pytest.warns(InflensWarning, match="raise batch_size"):
        lissa.solve(torch.ones(1, 3, dtype=DT))


def test_defaults_and_the_paper_protocol() -> None:
    d = LiSSA()
    assert (d.depth, d.repeats, d.scale, d.batch_size, d.tol, d.max_depth) == (
        None,
        1,
        None,
        64,
        0.05,
        10_000,
    )
    with pytest.raises(InputError, match="tol"):
        LiSSA(tol=0.0)
    with pytest.raises(InputError, match="max_depth"):
        LiSSA(max_depth=0)
    with pytest.raises(InputError, match="batch_size"):
        LiSSA(batch_size=0)


def test_fitted_state_is_saved_and_restored(tmp_path) -> None:
    """The automatic-depth solver round-trips through inflens.artifacts (tensors and JSON
    values only) and, being seeded, gives identical scores after loading."""
    case = fitted("logreg_multiclass")
    inf = _influence(case, LiSSA(batch_size=8, seed=2))
    test = (case.xt, case.yt)
    want = inf.loss_influence(test)
    inf.save(tmp_path / "fit")
    c = case.case
    obj = inflens.Objective(case.fresh_model(), c.loss, l2=c.l2, params=c.params, t=c.t)
    back = inflens.Influence.load(tmp_path / "fit", obj, (case.x, case.y), progress=False)
    assert isinstance(back.solver, LiSSA) and back.solver.depth is None
    assert torch.equal(back.loss_influence(test), want)
