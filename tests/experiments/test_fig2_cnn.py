"""Fig. 2 (right) reproduction: the paired Adam retraining, the protocols, and the quick run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import inflens.train
from inflens import Objective
from inflens.errors import InputError
from inflens.experiments import fig2_cnn as f2
from inflens.solvers import CG, Exact
from inflens.train import AdamConfig, AdamStart, fit_adam, piecewise_constant

DT = torch.float64


def _problem(n: int = 37, d: int = 6, c: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, c)).to(DT)
    return model, x, y


def _state(obj: Objective, x, y):
    """A short training run whose final Adam state the continuations start from."""
    fit = fit_adam(obj, (x, y), AdamConfig(7, 8, 1e-2, seed=3))
    return fit.theta, fit.state


def test_paired_adam_with_every_point_equals_fit_adam():
    """With nothing removed the continuation is the library's Adam on the same batches."""
    model, x, y = _problem()
    obj = Objective(model, "cross_entropy", l2=0.001, params=["0.weight", "2.weight"])
    theta, state = _state(obj, x, y)
    sched = piecewise_constant([10], [1.0, 0.1])
    cfg = AdamConfig(9, 8, 1e-2, schedule=sched, seed=17)
    ref = fit_adam(obj, (x, y), cfg, start=AdamStart(theta, state)).theta
    paired = f2.PairedAdam(obj, (x, y), state, cfg)
    got, info = paired(torch.ones(len(y), dtype=torch.bool), theta)
    assert info["steps"] == 9
    assert torch.allclose(got, ref, rtol=0, atol=1e-13)
    # 9 batches of 8 from 37 points cross an epoch boundary: every point is used
    used = torch.cat(paired.batches())
    assert used.numel() == 72 and torch.unique(used).numel() == len(y)


def test_paired_adam_drops_the_removed_point_from_its_batches():
    """One step equals an Adam step on the mean loss of the batch without the removed point."""
    model, x, y = _problem(seed=1)
    obj = Objective(model, "cross_entropy", l2=0.001)
    theta, state = _state(obj, x, y)
    paired = f2.PairedAdam(obj, (x, y), state, AdamConfig(1, 8, 1e-2, seed=5))
    batch = paired.batches()[0]
    removed = int(batch[2])
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[removed] = False
    got, _ = paired(keep, theta)

    rest = batch[batch != removed]
    th = theta.clone().requires_grad_(True)
    risk = obj.losses(th, x[rest], y[rest]).mean() + obj.regularizer(th)
    (g,) = torch.autograd.grad(risk, th)
    k = state["step"] + 1
    m = 0.9 * state["m"] + 0.1 * g
    v = 0.999 * state["v"] + 0.001 * g * g
    ref = theta - 1e-2 * (m / (1 - 0.9**k)) / ((v / (1 - 0.999**k)).sqrt() + 1e-8)
    assert torch.allclose(got, ref, rtol=0, atol=1e-14)
    # and it differs from the full-data step
    full, _ = paired(torch.ones(len(y), dtype=torch.bool), theta)
    assert (full - got).abs().max() > 1e-8


def test_protocols_follow_the_paper():
    full = f2.PROTOCOLS["full"]
    assert (full.train_steps, full.retrain_steps, full.batch_size, full.k) == (
        500_000,
        30_000,
        500,
        100,
    )
    sched = piecewise_constant(list(full.boundaries), list(full.factors))
    assert full.lr * sched(full.train_steps) == pytest.approx(1e-6)  # retraining lr
    assert f2.PROTOCOLS["reduced"].k == 100 and f2.DAMPING == 0.01 and f2.L2 == 0.001


def test_trained_state_round_trip(tmp_path: Path):
    cfg = f2.PROTOCOLS["quick"]
    theta = torch.randn(11)
    state = {"m": torch.randn(11), "v": torch.rand(11), "step": 42, "losses": [1.0, 0.5]}
    path = tmp_path / "theta.safetensors"
    f2._save_trained(path, cfg, theta, state)
    got = f2._load_trained(path, cfg, 11)
    assert got is not None
    assert torch.equal(got[0], theta) and got[1]["step"] == 42
    assert torch.equal(got[1]["v"], state["v"]) and got[1]["losses"] == [1.0, 0.5]
    assert f2._load_trained(path, f2.PROTOCOLS["reduced"], 11) is None  # other schedule
    assert f2._load_trained(path, cfg, 12) is None


def test_unknown_protocol_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ValueError, match="unknown protocol"):
        f2.run(None, tmp_path, protocol="fast")
    # the protocol is an argument only: the old environment variable changes nothing
    monkeypatch.setenv("INFLENS_FIG2_CNN_PROTOCOL", "fast")
    import inspect

    assert inspect.signature(f2.run).parameters["protocol"].default == "reduced"


@pytest.mark.realdata
def test_quick_run_on_mnist(shared_data: Path, tmp_path: Path):
    if not (shared_data / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not available in {shared_data / 'mnist'}")
    m = f2.run(shared_data, tmp_path, quick=True, progress=False)
    assert (tmp_path / "fig2_cnn.png").stat().st_size > 1000
    assert json.loads((tmp_path / "metrics.json").read_text())["protocol"]["name"] == "quick"
    k = f2.PROTOCOLS["quick"].k
    assert m["p_theta"] == 2556 and m["p_model"] == 2616
    for key in ("predicted", "actual_vs_theta_tilde", "actual_vs_continuation"):
        assert len(m["loo"][key]) == k and np.isfinite(m["loo"][key]).all()
    # paired batches: the two measures differ by the continuation's drift only
    diff = np.subtract(m["loo"]["actual_vs_theta_tilde"], m["loo"]["actual_vs_continuation"])
    assert np.allclose(diff, m["continuation_drift"], atol=1e-6)
    assert np.isfinite(m["pearson_vs_continuation"])
    # the last recorded horizon is the final retrain: same numbers as the main result
    last = m["by_retrain_steps"][str(f2.PROTOCOLS["quick"].retrain_steps)]
    assert last["pearson"] == pytest.approx(m["pearson_vs_continuation"], abs=1e-6)
    assert set(m["by_retrain_steps"]) == {"5", "10"}


# The CLI's quick protocol retrains only 4 points for 10 steps: too few to measure agreement.
# This variant (16 points, 300 training steps, 40 retraining steps; about 23 s on one thread)
# was measured once by running exactly this test's call (seed 0, one thread) and printing:
# Pearson 0.588, sign agreement 13/16 = 0.8125 against 0.5 expected by chance from the sign
# frequencies (8 positive predictions, 8 positive actual changes); within the predicted-positive
# cluster R = 0.06 and within the negative one R = 0.45 (8 points each). Seeds 1 and 2 of the
# 24-point, 150-step variant gave sign agreement 0.63 / 0.58 and within-cluster R between -0.42
# and 0.14: the within-cluster correlation is not above chance at this size, so it is not
# asserted (the paper-scale runs are in docs/reproduction.md).
AGREEMENT = f2.Protocol(
    name="quick",
    train_steps=300,
    lr=3e-3,
    boundaries=(200,),
    factors=(1.0, 0.1),
    retrain_steps=40,
    report_steps=(20,),
    batch_size=50,
    k=16,
    n_train=300,
    cg_tol=1e-2,
    cg_max_iter=40,
    note="test: agreement variant of the quick protocol",
)


@pytest.mark.realdata
def test_quick_variant_predicts_the_sign_of_retraining(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    if not (shared_data / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not available in {shared_data / 'mnist'}")
    monkeypatch.setitem(f2.PROTOCOLS, "quick", AGREEMENT)
    m = f2.run(shared_data, tmp_path, quick=True, progress=False)
    pred = np.asarray(m["loo"]["predicted"])
    actual = np.asarray(m["loo"]["actual_vs_continuation"])
    assert len(pred) == 16
    agree = float(np.mean(np.sign(pred) == np.sign(actual)))
    q_pred, q_act = float(np.mean(pred > 0)), float(np.mean(actual > 0))
    chance = q_pred * q_act + (1 - q_pred) * (1 - q_act)
    # measured 0.8125 vs chance 0.5; threshold two points (2/16) below the measurement
    assert agree >= chance + 0.18, (agree, chance)
    # measured 0.588; a random predictor on 16 points exceeds 0.4 with probability ~6%
    assert m["pearson_vs_continuation"] > 0.4


# ---------------------------------------------------------------- paper protocol (paper_run)


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_per_parameter_l2_predictions_match_an_explicit_hessian(solver: str):
    """pred = g_test^T (H_loss + diag(l2) + damping I)^-1 (g_i + l2 * theta) / n, with the
    Hessian formed independently by autograd; the biases carry no l2."""
    model, x, y = _problem(n=29, seed=2)
    obj = Objective(model, "cross_entropy", l2=0.0)
    l2 = torch.zeros(obj.p, dtype=DT)
    for name, (a, b) in obj.offsets().items():
        if name.endswith("weight"):
            l2[a:b] = 0.05
    assert 0 < int((l2 == 0).sum()) < obj.p  # biases unregularised, weights regularised
    damping = 0.5  # the random network is not at a minimum: enough damping for a PD matrix
    theta = obj.theta.clone()
    xt, yt = x[:1] + 0.3, y[:1]

    def risk(th):
        return obj.losses(th, x, y).mean()

    h = torch.autograd.functional.hessian(risk, theta) + torch.diag(l2 + damping)
    assert torch.linalg.eigvalsh(h).min() > 0  # a well-posed reference
    g_test = torch.autograd.grad(obj.losses(theta.requires_grad_(), xt, yt).sum(), theta)[0]
    rows = []
    for i in range(len(y)):
        th = theta.detach().requires_grad_()
        rows.append(torch.autograd.grad(obj.losses(th, x[i : i + 1], y[i : i + 1]).sum(), th)[0])
    g_train = torch.stack(rows) + l2 * theta.detach()
    ref = g_train @ torch.linalg.solve(h, g_test) / len(y)

    sol = Exact() if solver == "exact" else CG(tol=1e-12, max_iter=500)
    got, info = f2.per_parameter_l2_predictions(obj, (x, y), (xt, yt), l2, damping, sol)
    # float64, condition number of h below 1e4: 1e-9 relative leaves a wide margin
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
    assert info["solver"] == solver and info["curvature"] == "hessian"
    # the Gauss-Newton variant: the dense path (Exact) and the matrix-free one (CG) agree, so
    # both include the per-parameter l2
    ggn_exact, _ = f2.per_parameter_l2_predictions(
        obj, (x, y), (xt, yt), l2, damping, Exact(), curvature="ggn"
    )
    ggn_cg, _ = f2.per_parameter_l2_predictions(
        obj, (x, y), (xt, yt), l2, damping, CG(tol=1e-12, max_iter=500), curvature="ggn"
    )
    assert torch.allclose(ggn_exact, ggn_cg, rtol=1e-8, atol=1e-9 * float(ggn_exact.abs().max()))
    # the per-parameter l2 matters: a scalar l2 on the biases too gives other predictions
    other, _ = f2.per_parameter_l2_predictions(
        obj, (x, y), (xt, yt), torch.full_like(l2, 0.05), damping, Exact()
    )
    assert (other - ref).abs().max() > 1e-3 * ref.abs().max()
    # the same as Influence on an Objective that carries the per-parameter l2 itself
    from inflens import Influence

    direct = Influence(
        Objective(model, "cross_entropy", l2=l2), (x, y), solver="exact", damping=damping,
        progress=False,
    ).fit().predicted_loss_change((xt, yt))[0]  # fmt: skip
    assert torch.allclose(direct, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
    # an objective that already has an l2 is refused (the l2 would count twice)
    with pytest.raises(InputError, match="l2=0"):
        f2.per_parameter_l2_predictions(
            Objective(model, "cross_entropy", l2=0.01), (x, y), (xt, yt), l2, damping, Exact()
        )


def test_weight_l2_covers_the_weights_not_the_biases():
    model = f2.PaperCNN(dtype=torch.float32)
    obj = Objective(model, "cross_entropy", l2=0.0)
    vec = f2.weight_l2(model, obj)
    assert obj.p == 2616 and int((vec == f2.L2).sum()) == 2556 and int((vec == 0).sum()) == 60


def test_paper_config_is_the_paper_and_validates():
    cfg = f2.PaperConfig()
    assert (cfg.train_steps, cfg.retrain_steps, cfg.k, cfg.batch_size) == (
        500_000,
        30_000,
        100,
        500,
    )
    assert (cfg.lr, cfg.damping, cfg.solver) == (1e-4, 0.01, "exact")
    sched = piecewise_constant(list(cfg.boundaries), list(cfg.factors))
    assert cfg.lr * sched(cfg.train_steps) == pytest.approx(1e-6)
    with pytest.raises(InputError, match="solver"):
        f2.PaperConfig(solver="lissa")


TINY = dict(
    train_steps=8,
    retrain_steps=6,
    batch_size=20,
    k=3,
    n_train=40,
    solver="cg",
    cg_tol=1e-3,
    cg_max_iter=5,
    chunk_steps=4,
    report_steps=(3,),
)


@pytest.mark.realdata
@pytest.mark.filterwarnings("ignore:CG stopped")  # 5 CG iterations: resumption is tested here
def test_paper_run_resumes_after_a_kill_with_the_same_result(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Kill the run in training and again in retraining; the resumed run's numbers equal an
    uninterrupted run's (the same arithmetic is replayed from the checkpoints)."""
    if not (shared_data / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not available in {shared_data / 'mnist'}")
    cfg = f2.PaperConfig(**TINY)
    train, test = f2._paper_data(shared_data, cfg.n_train)
    ref = f2.paper_run(cfg, train, test, tmp_path / "ref", progress=False)

    real = inflens.train.fit_adam  # the chunks of inflens.train.fit_adam_resumable
    calls = {"n": 0, "limit": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["limit"]:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    out = tmp_path / "killed"
    monkeypatch.setattr(inflens.train, "fit_adam", dying)
    for limit in (2, 6):  # chunk 2 of training; a chunk in the middle of the retraining
        calls.update(n=0, limit=limit)
        with pytest.raises(KeyboardInterrupt):
            f2.paper_run(cfg, train, test, out, progress=False)
    assert (out / "train_8.safetensors").is_file() and (out / "retrain_8_6.json").is_file()
    assert (out / "influence_8.safetensors").is_file()  # the Hessian is not recomputed
    monkeypatch.setattr(inflens.train, "fit_adam", real)
    got = f2.paper_run(cfg, train, test, out, progress=False)
    assert got["loo"]["indices"] == ref["loo"]["indices"]
    # identical operations in the same order: equal up to float32 round-off at most
    np.testing.assert_allclose(got["loo"]["predicted"], ref["loo"]["predicted"], rtol=1e-6)
    np.testing.assert_allclose(got["loo"]["actual"], ref["loo"]["actual"], rtol=1e-5, atol=1e-8)
    assert got["pearson"] == pytest.approx(ref["pearson"], abs=1e-6)
    assert set(got["by_retrain_steps"]) == {"3", "6"}
    assert got["p"] == 2616 and got["curvature"] in ("hessian", "ggn")


def test_paper_trend_writes_each_rung_and_keeps_earlier_rungs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The trend file is rewritten after every rung; a second call skips finished rungs and the
    full-protocol estimate is (500k + 101 x 30k) steps at the slowest measured retraining rate."""
    ran: list[tuple[int, int]] = []

    def fake_run(cfg, train, test, out, progress=True):
        ran.append((cfg.train_steps, cfg.retrain_steps))
        secs = {"train": 1.0, "influence": 1.0, "retrain": (cfg.k + 1) * cfg.retrain_steps / 10}
        by = {str(cfg.retrain_steps): {"pearson": 0.5, "sign_agreement": 0.8}}
        return {
            "config": {"k": cfg.k},
            "pearson": 0.5,
            "slope": 2.0,
            "sign_agreement": 0.8,
            "by_retrain_steps": by,
            "curvature": "ggn",
            "hessian_indefinite": "indefinite",
            "solver_info": {"solver": "cg", "iterations": [3]},
            "train_risk": 1.0,
            "test_loss_at_theta_tilde": 2.0,
            "seconds": secs,
        }

    monkeypatch.setattr(f2, "paper_run", fake_run)
    monkeypatch.setattr(f2, "_paper_data", lambda d, n: (None, None))
    base = f2.PaperConfig(k=3)
    trend = f2.paper_trend([(10, 4), (20, 8)], tmp_path, base=base, progress=False)
    assert ran == [(10, 4), (20, 8)] and len(trend["rungs"]) == 2
    assert trend["rungs"][0]["adam_steps_per_second"] == pytest.approx(10.0)
    assert trend["full_protocol_hours_at_measured_rate"] == pytest.approx(
        (500_000 + 101 * 30_000) / 10.0 / 3600
    )
    assert trend["rungs"][1]["hessian_indefinite"] is True
    ran.clear()
    trend = f2.paper_trend([(10, 4), (40, 4)], tmp_path, base=base, progress=False)
    assert ran == [(40, 4)] and [r["train_steps"] for r in trend["rungs"]] == [10, 20, 40]
    saved = json.loads((tmp_path / "metrics_paper_protocol_trend.json").read_text())
    assert saved["rungs"] == trend["rungs"] and saved["paper_pearson"] == 0.86
