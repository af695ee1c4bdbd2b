"""Trainers: L-BFGS to a gradient tolerance, Adam (deterministic, resumable), exact linear SVM.

References are independent of inflens: Newton's method with the closed-form logistic gradient
and Hessian (PROTOCOL 1.7) and the SVM dual QP solved by scipy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch

import inflens.train
from inflens import Objective
from inflens.errors import InflensWarning, InputError, SolverDivergedError
from inflens.models import LinearSVM, LogisticRegression
from inflens.train import (
    AdamConfig,
    AdamStart,
    CheckpointConfig,
    LBFGSConfig,
    _Batches,
    fit_adam,
    fit_adam_resumable,
    fit_lbfgs,
    fit_linear_svm,
    fit_newton,
    loo_weights,
    newton_minimize,
    piecewise_constant,
)

DT = torch.float64


def _data(n: int = 50, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = (x[:, 0] - x[:, 1] + 0.7 * torch.randn(n, generator=g, dtype=DT) > 0).long()
    return x, y


def _newton_logreg(x: torch.Tensor, y01: torch.Tensor, l2: float, w=None) -> torch.Tensor:
    """Newton's method on mean_i w_i log(1+exp(-y x.theta)) + l2/2 |theta|^2 (closed forms)."""
    n, d = x.shape
    y = 2.0 * y01.to(DT) - 1
    w = torch.ones(n, dtype=DT) if w is None else w
    theta = torch.zeros(d, dtype=DT)
    for _ in range(50):
        m = y * (x @ theta)
        s = torch.sigmoid(-m)
        g = -(w * s * y) @ x / n + l2 * theta
        h = (x.T * (w * s * (1 - s))) @ x / n + l2 * torch.eye(d, dtype=DT)
        theta = theta - torch.linalg.solve(h, g)
        if g.norm() < 1e-15:
            break
    return theta


def _logreg(d: int, l2: float) -> Objective:
    return Objective(LogisticRegression(d, 1, dtype=DT), "binary_logistic", l2=l2)


def test_fit_lbfgs_reaches_the_newton_optimum_to_tolerance() -> None:
    x, y = _data()
    obj = _logreg(4, 0.05)
    theta, info = fit_lbfgs(obj, (x, y), tol=1e-12)
    assert info.converged and info.grad_norm <= 1e-12 and info.iterations > 0
    ref = _newton_logreg(x, y, 0.05)
    # strong convexity: |theta - theta*| <= |grad| / l2
    assert float((theta - ref).norm()) <= 1e-12 / 0.05 * 10
    # the model is untouched unless load=True
    assert torch.count_nonzero(obj.model.linear.weight) == 0
    fit_lbfgs(obj, (x, y), tol=1e-12, load=True)
    torch.testing.assert_close(obj.theta, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(obj.model.linear.weight[0].detach(), ref, atol=1e-10, rtol=0)


def test_fit_lbfgs_weights_remove_a_point_with_l2_relative_to_n_minus_1() -> None:
    x, y = _data()
    obj = _logreg(4, 0.05)
    keep = torch.ones(50, dtype=torch.bool)
    keep[7] = False
    w = loo_weights(50, 7)
    assert w[7] == 0 and math.isclose(float(w.sum()), 50.0)
    loo = fit_lbfgs(obj, (x, y), weights=w, tol=1e-12).theta
    subset = fit_lbfgs(obj, (x[keep], y[keep]), tol=1e-12).theta
    torch.testing.assert_close(loo, subset, atol=1e-10, rtol=0)
    torch.testing.assert_close(loo, _newton_logreg(x[keep], y[keep], 0.05), atol=1e-10, rtol=0)


def test_fit_lbfgs_chunking_and_per_parameter_l2() -> None:
    x, y = _data(n=64)
    obj = _logreg(4, 0.05)
    a = fit_lbfgs(obj, (x, y), tol=1e-12).theta
    b = fit_lbfgs(obj, (x, y), config=LBFGSConfig(tol=1e-12, batch_size=7)).theta
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # per-parameter l2 equal to the scalar gives the same optimum
    c = fit_lbfgs(obj, (x, y), tol=1e-12, l2=torch.full((4,), 0.05, dtype=DT)).theta
    torch.testing.assert_close(a, c, atol=1e-10, rtol=0)


def test_fit_lbfgs_reports_non_convergence() -> None:
    x, y = _data()
    obj = _logreg(4, 0.05)
    with pytest.warns(InflensWarning, match="gradient norm"):
        _, info = fit_lbfgs(obj, (x, y), tol=1e-12, max_iter=1)
    assert not info.converged
    with pytest.raises(SolverDivergedError):
        fit_lbfgs(obj, (x, y), config=LBFGSConfig(tol=1e-12, max_iter=1, on_fail="raise"))
    with pytest.raises(InputError):
        fit_lbfgs(obj, (x, y), weights=torch.ones(3))


def test_lbfgs_config_is_validated_and_the_keywords_are_its_fields() -> None:
    x, y = _data()
    obj = _logreg(4, 0.05)
    cfg = LBFGSConfig(tol=1e-12, max_iter=500, history_size=10)
    a = fit_lbfgs(obj, (x, y), config=cfg)
    b = fit_lbfgs(obj, (x, y), tol=1e-12, max_iter=500, history_size=10)
    # the keyword path is the config path: the same iterations, bit for bit
    assert a.info.iterations == b.info.iterations and torch.equal(a.theta, b.theta)
    # keywords given with a config replace its fields
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on_fail="ignore" replaced the config's "warn"
        c = fit_lbfgs(obj, (x, y), config=cfg, max_iter=1, on_fail="ignore")
    assert not c.info.converged and c.info.iterations < a.info.iterations
    assert cfg.max_iter == 500 and cfg.to_dict()["history_size"] == 10  # frozen, unchanged
    bad = [
        ({"on_fail": "stop"}, "on_fail"),
        ({"tol": 0.0}, "tol > 0"),
        ({"max_iter": 0}, "max_iter >= 1"),
        ({"batch_size": 0}, "batch_size"),
        ({"history_size": 0}, "history_size"),
    ]
    for kwargs, match in bad:
        with pytest.raises(InputError, match=match):
            LBFGSConfig(**kwargs)
        with pytest.raises(InputError, match=match):
            fit_lbfgs(obj, (x, y), **kwargs)
    with pytest.raises(InputError, match="unknown settings.*'tolerance'"):
        fit_lbfgs(obj, (x, y), tolerance=1e-8)
    with pytest.raises(InputError, match="LBFGSConfig"):
        fit_lbfgs(obj, (x, y), config={"tol": 1e-8})


def test_batches_cover_each_epoch_once_and_cross_epochs_like_tensorflow() -> None:
    g = torch.Generator().manual_seed(0)
    b = _Batches(12, 4, g)
    epoch = torch.cat([b.next() for _ in range(3)])
    assert sorted(epoch.tolist()) == list(range(12))
    b = _Batches(10, 4, torch.Generator().manual_seed(0))
    first = torch.cat([b.next(), b.next()])
    crossing = b.next()  # 2 left in the epoch + 2 of the next one
    assert len(set(first.tolist()) | set(crossing[:2].tolist())) == 10
    assert crossing.numel() == 4


def _adam(obj, data, steps, batch, lr, **kw):
    """fit_adam with the schedule settings of ``AdamConfig`` and the rest as keywords."""
    cfg = {k: kw.pop(k) for k in ("schedule", "seed", "log_every") if k in kw}
    return fit_adam(obj, data, AdamConfig(steps, batch, lr, **cfg), **kw)


def test_fit_adam_is_deterministic_under_a_seed() -> None:
    x, y = _data()
    obj = _logreg(4, 0.05)
    a = _adam(obj, (x, y), 30, 8, 0.05, seed=3).theta
    b = _adam(obj, (x, y), 30, 8, 0.05, seed=3).theta
    c = _adam(obj, (x, y), 30, 8, 0.05, seed=4).theta
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_fit_adam_resumes_from_its_state() -> None:
    """Full-batch steps (order irrelevant): 5 + 5 steps with the state == 10 steps."""
    x, y = _data()
    obj = _logreg(4, 0.05)
    sched = piecewise_constant([4], [1.0, 0.5])
    whole = _adam(obj, (x, y), 10, 50, 0.05, schedule=sched)
    half = _adam(obj, (x, y), 5, 50, 0.05, schedule=sched)
    assert half.state is not None and half.state["step"] == 5 and half.info.iterations == 5
    rest = _adam(obj, (x, y), 5, 50, 0.05, schedule=sched, start=AdamStart.from_fit(half))
    assert rest.state["step"] == 10
    torch.testing.assert_close(rest.theta, whole.theta, atol=1e-14, rtol=0)
    torch.testing.assert_close(rest.state["m"], whole.state["m"], atol=1e-14, rtol=0)


def test_fit_adam_schedule_subset_and_weights() -> None:
    x, y = _data()
    obj = _logreg(4, 0.05)
    stop = piecewise_constant([5], [1.0, 0.0])  # lr 0 from step 5 on
    assert stop(4) == 1.0 and stop(5) == 0.0
    torch.testing.assert_close(
        _adam(obj, (x, y), 12, 50, 0.05, schedule=stop).theta,
        _adam(obj, (x, y), 5, 50, 0.05).theta,
    )
    keep = torch.arange(50) != 3
    torch.testing.assert_close(
        _adam(obj, (x, y), 6, 49, 0.05, subset=keep).theta,
        _adam(obj, (x[keep], y[keep]), 6, 49, 0.05).theta,
    )
    # full batches: weight 0 on a point == training without it; unit weights == no weights
    torch.testing.assert_close(
        _adam(obj, (x, y), 6, 50, 0.05, weights=keep.double()).theta,
        _adam(obj, (x[keep], y[keep]), 6, 49, 0.05).theta,
        rtol=1e-12,
        atol=1e-14,
    )
    torch.testing.assert_close(
        _adam(obj, (x, y), 6, 8, 0.05, seed=2, weights=torch.ones(50, dtype=DT)).theta,
        _adam(obj, (x, y), 6, 8, 0.05, seed=2).theta,
        rtol=1e-12,
        atol=1e-14,
    )
    seen = []
    _adam(obj, (x, y), 4, 8, 0.05, callback=lambda k, th: seen.append((k, th.norm())))
    assert [k for k, _ in seen] == [1, 2, 3, 4]
    with pytest.raises(InputError, match="lr > 0"):
        AdamConfig(5, 8, 0.0)
    with pytest.raises(InputError, match="not both"):
        _adam(obj, (x, y), 1, 8, 0.05, subset=keep, weights=keep.double())


def test_fit_adam_converges_to_the_convex_optimum() -> None:
    x, y = _data()
    obj = _logreg(4, 0.05)
    sched = piecewise_constant([300, 450], [1.0, 0.1, 0.01])
    fit = _adam(obj, (x, y), 600, 50, 0.05, schedule=sched, log_every=100)
    ref = _newton_logreg(x, y, 0.05)
    assert float((fit.theta - ref).norm()) < 1e-3
    assert fit.state["losses"][-1] <= fit.state["losses"][0]


def _chunked_reference(obj, data, cfg, chunk, l2=None, weights=None, start=None):
    """The resumable run's contract written out: chunk c is fit_adam with seed
    ``cfg.seed + 1_000_003 c`` continuing from the previous chunk's theta and state."""
    fits, done = [], 0
    while done < cfg.steps:
        steps = min(chunk, cfg.steps - done)
        c_cfg = dataclasses.replace(cfg, steps=steps, seed=cfg.seed + 1_000_003 * (done // chunk))
        start = start if not fits else AdamStart.from_fit(fits[-1])
        fits.append(fit_adam(obj, data, c_cfg, start=start, l2=l2, weights=weights))
        done += steps
    return fits


def _assert_same_fit(a, b) -> None:
    """Bit-for-bit equality: the same arithmetic in the same order."""
    assert torch.equal(a.theta, b.theta)
    assert torch.equal(a.state["m"], b.state["m"]) and torch.equal(a.state["v"], b.state["v"])
    assert a.state["step"] == b.state["step"]


def test_fit_adam_resumable_after_a_kill_equals_an_uninterrupted_run(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed during chunk 3 of 4, then called again: theta, moments, step and snapshots are
    exactly those of an uninterrupted run, which is exactly the chained fit_adam chunks."""
    x, y = _data()
    obj = _logreg(4, 0.05)
    cfg = AdamConfig(10, 8, 0.05, schedule=piecewise_constant([5], [1.0, 0.3]), seed=2)
    keep = (torch.arange(50) != 7).to(DT)  # weights and a per-parameter l2 pass through
    l2 = torch.tensor([0.05, 0.0, 0.05, 0.02], dtype=DT)
    warm = fit_adam(obj, (x, y), AdamConfig(3, 8, 0.05, seed=9))  # a warm start with state
    kw = {"start": AdamStart.from_fit(warm), "weights": keep, "l2": l2}

    def measure(th: torch.Tensor) -> float:
        return float(th.norm())

    snaps = (2, 6, 10)
    whole = fit_adam_resumable(
        obj,
        (x, y),
        cfg,
        CheckpointConfig(tmp_path / "a.st", 3, "run", snaps),
        **kw,
        measure=measure,
    )
    assert whole.state["step"] == 3 + 10 and whole.info.extra["resumed_at"] == 0
    ref = _chunked_reference(obj, (x, y), cfg, 3, l2=l2, weights=keep, start=kw["start"])
    _assert_same_fit(whole, ref[-1])
    # step 2 lies inside chunk 0: the first 2 of its 3 steps (same seed, same batches)
    two = fit_adam(obj, (x, y), dataclasses.replace(cfg, steps=2), **kw)
    assert whole.info.extra["snapshots"] == {
        "2": measure(two.theta),
        "6": measure(ref[1].theta),
        "10": measure(ref[3].theta),
    }
    real, calls = inflens.train.fit_adam, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    ckpt = CheckpointConfig(tmp_path / "b.st", 3, "run", snaps)
    monkeypatch.setattr(inflens.train, "fit_adam", dying)
    with pytest.raises(KeyboardInterrupt):
        fit_adam_resumable(obj, (x, y), cfg, ckpt, **kw, measure=measure)
    monkeypatch.setattr(inflens.train, "fit_adam", real)
    from safetensors import safe_open

    with safe_open(str(ckpt.path), framework="pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == ["m", "theta", "v"]
    assert meta["tag"] == "run" and meta["done"] == "6" and meta["step"] == str(3 + 6)
    assert json.loads(meta["snapshots"]) == {k: whole.info.extra["snapshots"][k] for k in "26"}
    resumed = fit_adam_resumable(obj, (x, y), cfg, ckpt, **kw, measure=measure)
    assert resumed.info.extra["resumed_at"] == 6 and resumed.info.iterations == 4
    _assert_same_fit(resumed, whole)
    assert resumed.info.extra["snapshots"] == whole.info.extra["snapshots"]
    # a finished run's checkpoint is returned as it is, without a step
    again = fit_adam_resumable(obj, (x, y), cfg, ckpt, **kw, measure=measure)
    assert again.info.iterations == 0
    _assert_same_fit(again, whole)


def test_fit_adam_resumable_resumes_a_checkpoint_written_by_hand(tmp_path) -> None:
    """The on-disk format (tensors theta/m/v; metadata tag/done/step/snapshots) is the contract:
    a checkpoint written with safetensors directly after chunk 1 resumes to the same bits."""
    from safetensors.torch import save_file

    x, y = _data()
    obj = _logreg(4, 0.05)
    cfg = AdamConfig(7, 8, 0.05, seed=4)
    ref = _chunked_reference(obj, (x, y), cfg, 4)
    first = ref[0]
    meta = {"tag": "t", "done": "4", "step": "4", "snapshots": "{}"}
    path = tmp_path / "ckpt.safetensors"
    save_file({"theta": first.theta, "m": first.state["m"], "v": first.state["v"]}, str(path), meta)
    got = fit_adam_resumable(obj, (x, y), cfg, CheckpointConfig(path, 4, "t"))
    assert got.info.extra["resumed_at"] == 4
    _assert_same_fit(got, ref[-1])


def test_fit_adam_resumable_ignores_a_checkpoint_with_another_tag(tmp_path) -> None:
    x, y = _data()
    obj = _logreg(4, 0.05)
    path = tmp_path / "shared.safetensors"
    other = fit_adam_resumable(
        obj, (x, y), AdamConfig(4, 8, 0.1, seed=1), CheckpointConfig(path, 2, "a")
    )
    cfg = AdamConfig(5, 8, 0.05, seed=3)
    got = fit_adam_resumable(obj, (x, y), cfg, CheckpointConfig(path, 2, "b"))
    fresh = fit_adam_resumable(obj, (x, y), cfg, CheckpointConfig(tmp_path / "fresh.st", 2, "b"))
    assert got.info.extra["resumed_at"] == 0 and got.info.iterations == 5
    _assert_same_fit(got, fresh)
    assert not torch.equal(got.theta, other.theta)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # replaced by the new run's checkpoint
        assert f.metadata()["tag"] == "b" and f.metadata()["done"] == "5"
    # zero steps: the start and zero moments, nothing written
    none = fit_adam_resumable(
        obj, (x, y), AdamConfig(0, 8, 0.1), CheckpointConfig(tmp_path / "z", 2)
    )
    assert torch.equal(none.theta, obj.theta) and none.state["step"] == 0
    assert not (tmp_path / "z").exists()


def test_adam_start_and_checkpoint_config_validate(tmp_path) -> None:
    x, y = _data()
    obj = _logreg(4, 0.05)
    for bad, match in [
        ({"chunk_steps": 0}, "chunk_steps"),
        ({"chunk_steps": 2.5}, "chunk_steps"),
        ({"chunk_steps": True}, "chunk_steps"),
        ({"tag": 3}, "tag"),
        ({"snapshots": (0, 2)}, "snapshots"),
        ({"snapshots": (1.5,)}, "snapshots"),
        ({"path": tmp_path}, "folder"),
        ({"path": 3}, "path"),
    ]:
        with pytest.raises(InputError, match=match):
            CheckpointConfig(**{"path": tmp_path / "c.st", "chunk_steps": 2, **bad})
    ok = CheckpointConfig(str(tmp_path / "c.st"), 2, snapshots=[3, 1, 3])
    assert ok.path == tmp_path / "c.st" and ok.snapshots == (1, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ok.chunk_steps = 3  # type: ignore[misc]
    cfg = AdamConfig(4, 8, 0.05)
    with pytest.raises(InputError, match="beyond"):
        fit_adam_resumable(
            obj, (x, y), cfg, ok.__class__(ok.path, 2, snapshots=(5,)), measure=float
        )
    with pytest.raises(InputError, match="measure"):
        fit_adam_resumable(obj, (x, y), cfg, ok)
    with pytest.raises(InputError, match="CheckpointConfig"):
        fit_adam_resumable(obj, (x, y), cfg, tmp_path / "c.st")  # type: ignore[arg-type]
    long = CheckpointConfig(tmp_path / "long.st", 2, "t")
    fit_adam_resumable(obj, (x, y), AdamConfig(4, 8, 0.05), long)
    with pytest.raises(InputError, match="more than"):
        fit_adam_resumable(obj, (x, y), AdamConfig(2, 8, 0.05), long)

    theta = torch.zeros(4, dtype=DT)
    state = {"m": torch.zeros(4, dtype=DT), "v": torch.zeros(4, dtype=DT), "step": 3}
    for start_args, match in [
        ((torch.zeros(2, 2, dtype=DT),), "flat"),
        ((theta, {"m": theta, "step": 1}), "missing"),
        ((theta, {**state, "v": torch.zeros(3, dtype=DT)}), "shape"),
        ((theta, {**state, "step": -1}), "step"),
    ]:
        with pytest.raises(InputError, match=match):
            AdamStart(*start_args)
    with pytest.raises(InputError, match="AdamStart"):
        fit_adam(obj, (x, y), cfg, start=theta)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="shape"):
        fit_adam(obj, (x, y), cfg, start=AdamStart(torch.zeros(5, dtype=DT)))


def test_newton_minimize_batched_equals_one_problem_at_a_time() -> None:
    """Batched damped Newton on K weighted logistic problems: each row reaches tol and equals
    the same problem solved alone, and the exact-Hessian path equals L-BFGS."""
    x, y = _data()
    obj = _logreg(4, 0.05)
    n = x.shape[0]
    weights = torch.stack([loo_weights(n, i) for i in range(3)])  # [3, n]

    def risk(th, w):
        return (obj.losses(th, x, y) * w).mean() + obj.regularizer(th)

    def grad_rows(th, rows):
        return torch.stack([torch.func.grad(risk)(t, weights[r]) for t, r in zip(th, rows)])

    def value_rows(th, rows):
        return torch.stack([risk(t, weights[r]) for t, r in zip(th, rows)])

    def solve_rows(th, g, rows):
        hs = [torch.func.hessian(risk)(t, weights[r]) for t, r in zip(th, rows)]
        return torch.stack([torch.linalg.solve(h, gi) for h, gi in zip(hs, g)])

    fit = newton_minimize(
        grad_rows, torch.zeros(3, 4, dtype=DT), solve=solve_rows, value=value_rows, tol=1e-13
    )
    assert fit.theta.shape == (3, 4) and fit.info.converged
    assert max(fit.info.extra["grad_norms"]) <= 1e-13
    for r in range(3):
        one = fit_newton(
            obj, (x, y), theta0=torch.zeros(4, dtype=DT), weights=weights[r], tol=1e-13
        )
        torch.testing.assert_close(fit.theta[r], one.theta, rtol=1e-10, atol=1e-12)
        ref = fit_lbfgs(obj, (x, y), weights=weights[r], tol=1e-12).theta
        torch.testing.assert_close(one.theta, ref, rtol=1e-8, atol=1e-10)
    # chord steps only (a fixed preconditioner): the same optimum, linear convergence
    h0 = torch.func.hessian(risk)(fit.theta[0], weights[0])
    inv = torch.linalg.inv(h0)
    chord = newton_minimize(
        grad_rows, torch.zeros(3, 4, dtype=DT), chord=lambda g, rows: g @ inv, tol=1e-13
    )
    torch.testing.assert_close(chord.theta, fit.theta, rtol=1e-10, atol=1e-12)
    assert chord.info.extra["chord_steps"] > 0
    with pytest.raises(InputError, match="solve"):
        newton_minimize(grad_rows, torch.zeros(3, 4, dtype=DT))


def _svm_dual_reference(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """max_a mean(a) - |sum a y x|^2 / (2 l2 n^2), 0 <= a <= 1, by scipy; returns w(a)."""
    from scipy.optimize import minimize

    n = len(y)
    yx = y[:, None] * x
    k = yx @ yx.T

    def f(a):
        return -a.mean() + a @ k @ a / (2 * l2 * n * n)

    def df(a):
        return -np.ones(n) / n + k @ a / (l2 * n * n)

    res = minimize(
        f,
        np.full(n, 0.5),
        jac=df,
        bounds=[(0, 1)] * n,
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-13, "maxiter": 10000},
    )
    return (res.x * y) @ x / (l2 * n)


def test_fit_linear_svm_matches_the_dual_qp_and_certifies_itself() -> None:
    g = np.random.RandomState(0)
    x = g.randn(40, 3)
    y = np.where(x[:, 0] + 0.5 * g.randn(40) > 0, 1.0, -1.0)
    l2 = 0.1
    w, info = fit_linear_svm(x, y, l2)
    ref = _svm_dual_reference(x, y, l2)
    np.testing.assert_allclose(w.numpy(), ref, atol=1e-5)
    assert info.extra["duality_gap"] < 1e-12
    assert info.extra["w_error_bound"] < 1e-5

    # primal objective no larger than the reference's
    def primal(v):
        return np.maximum(0, 1 - y * (x @ v)).mean() + 0.5 * l2 * v @ v

    assert primal(w.numpy()) <= primal(ref) + 1e-12
    # labels {0,1} are the same problem; the keep-mask is a subset with C = 1/(n_kept l2)
    w01 = fit_linear_svm(x, (y > 0).astype(int), l2).theta
    torch.testing.assert_close(w01, w)
    keep = np.arange(40) != 5
    torch.testing.assert_close(
        fit_linear_svm(x, y, l2, weights_mask=keep).theta,
        fit_linear_svm(x[keep], y[keep], l2).theta,
    )


def test_fit_linear_svm_gives_the_weights_of_a_linear_svm_model() -> None:
    g = np.random.RandomState(1)
    x = g.randn(30, 2)
    y = np.where(x[:, 1] > 0, 1, -1)
    w = fit_linear_svm(x, y, 0.05).theta
    model = LinearSVM(2, dtype=DT)
    obj = Objective(model, "hinge", l2=0.05)
    obj.load_into_model(w)
    risk = float(obj.risk(w, torch.from_numpy(x), torch.from_numpy(y)))
    for _ in range(20):  # no random perturbation lowers the (convex) primal objective
        v = w + 1e-3 * torch.from_numpy(g.randn(2))
        assert float(obj.risk(v, torch.from_numpy(x), torch.from_numpy(y))) >= risk - 1e-12
    with pytest.raises(InputError, match="both classes"):
        fit_linear_svm(x, np.ones(30), 0.05)


def test_fit_newton_reaches_the_exact_leave_one_out_optimum():
    """Chord-Newton refits (preconditioned by H^-1 at theta-hat) reach ||grad|| <= 1e-12 and the
    same optimum as an independent reference Newton solve on the n-1 points."""
    import inflens
    from inflens.train import fit_newton, loo_weights

    torch.manual_seed(3)
    n, d = 120, 4
    x = torch.randn(n, d, dtype=torch.float64)
    y = (
        torch.rand(n, dtype=torch.float64) < torch.sigmoid(x @ torch.randn(d, dtype=torch.float64))
    ).long()
    model = torch.nn.Linear(d, 1, bias=False).double()
    obj = inflens.Objective(model, "binary_logistic", l2=0.05)
    theta = fit_lbfgs(obj, (x, y), tol=1e-12).theta
    obj.load_into_model(theta)
    obj = inflens.Objective(model, "binary_logistic", l2=0.05)
    inf = inflens.Influence(obj, (x, y), solver="exact", progress=False).fit()
    theta_loo, info = fit_newton(obj, (x, y), inf.solver.solve, obj.theta, loo_weights(n, 7))
    assert info.converged and info.grad_norm <= 1e-12
    # independent reference: plain Newton with the explicit Hessian on the 119 kept points
    keep = torch.arange(n) != 7
    xk, yk = x[keep], 2.0 * y[keep] - 1
    w = obj.theta.clone()
    for _ in range(30):
        s = xk @ w
        g = -(torch.sigmoid(-yk * s) * yk) @ xk / (n - 1) + 0.05 * w
        p = torch.sigmoid(s)
        h = (xk.T * (p * (1 - p))) @ xk / (n - 1) + 0.05 * torch.eye(d, dtype=torch.float64)
        w = w - torch.linalg.solve(h, g)
    assert torch.allclose(theta_loo, w, rtol=0, atol=1e-11)
    assert not torch.allclose(theta_loo, obj.theta, atol=1e-6)  # removing the point did move it


def test_fit_newton_with_a_solve_and_a_chord_preconditioner() -> None:
    """The attack's refit: Newton directions from a caller's solve (here conjugate gradients
    on the objective's HVPs), chord steps with a fixed inverse Hessian from another point where
    they halve the gradient norm; lands on the closed-form Newton optimum."""
    from inflens.solvers._cg_core import conjugate_gradient

    x, y = _data(n=60)
    obj = _logreg(4, 0.05)
    w = torch.linspace(0.5, 2.0, 60, dtype=DT)  # weighted, so the start is far from theta*
    ref = _newton_logreg(x, y, 0.05, w)
    calls = []

    def solve(th: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        hess = torch.func.hessian(lambda t: (obj.losses(t, x, y) * w).mean() + obj.regularizer(t))
        h = hess(th)
        return conjugate_gradient(lambda v, rows: v @ h, g[None], 1e-14, 50).x[0]

    for pre in (None, torch.linalg.inv(torch.eye(4, dtype=DT) * 0.3)):
        calls.clear()
        chord = None if pre is None else (lambda g, p=pre: g @ p)
        fit = fit_newton(obj, (x, y), chord, torch.zeros(4, dtype=DT), w, tol=1e-12, solve=solve)
        assert fit.info.converged and fit.info.grad_norm <= 1e-12
        torch.testing.assert_close(fit.theta, ref, rtol=0, atol=1e-11)
        assert len(calls) == fit.info.extra["newton_steps"] > 0  # solve gives every Newton step
    # a good fixed preconditioner (H^-1 at the optimum) does the work with chord steps only
    h_ref = torch.func.hessian(lambda t: (obj.losses(t, x, y) * w).mean() + obj.regularizer(t))
    pre = torch.linalg.inv(h_ref(ref))
    calls.clear()
    near = ref + 1e-3
    fit = fit_newton(obj, (x, y), lambda g: g @ pre, near, w, tol=1e-12, solve=solve)
    torch.testing.assert_close(fit.theta, ref, rtol=0, atol=1e-11)
    assert fit.info.extra["chord_steps"] > 0 and not calls
