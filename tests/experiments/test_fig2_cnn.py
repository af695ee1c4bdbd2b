"""Fig. 2 (right) reproduction: the paired Adam retraining, the protocols, and the quick run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from inflens import Objective
from inflens.experiments import fig2_cnn as f2
from inflens.train import AdamConfig, fit_adam, piecewise_constant

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
    ref = fit_adam(obj, (x, y), cfg, theta0=theta, state=state).theta
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
