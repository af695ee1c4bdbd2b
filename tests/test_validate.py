"""Leave-one-out harness: exact refits against the influence prediction (Sec. 2, PROTOCOL 3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inflens import Influence, Objective
from inflens.errors import InputError
from inflens.models import LinearSVM, LogisticRegression
from inflens.train import AdamConfig, fit_lbfgs, fit_linear_svm
from inflens.validate import LOOConfig, LOOResult, correlations, leave_one_out, select_indices

DT = torch.float64


def _problem(copies: int = 1, l2: float = 0.1):
    """A tiny strongly convex binary LR; ``copies`` repeats the data (n -> copies * n)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=DT)
    y = (x[:, 0] + 0.8 * torch.randn(30, generator=g, dtype=DT) > 0).long()
    x, y = x.repeat(copies, 1), y.repeat(copies)
    xt = torch.tensor([[0.3, -1.0, 0.5]], dtype=DT)
    yt = torch.tensor([1])
    obj = Objective(LogisticRegression(3, 1, dtype=DT), "binary_logistic", l2=l2)
    fit_lbfgs(obj, (x, y), tol=1e-13, load=True)
    inf = Influence(obj, (x, y), solver="exact", progress=False).fit()
    return inf, (x, y), (xt, yt)


def _exact_loo_change(x, y, xt, yt, i: int, l2: float) -> float:
    """Independent refit: Newton's method with closed forms on the n - 1 points."""
    keep = torch.arange(len(y)) != i
    xs, ys = x[keep], 2.0 * y[keep].to(DT) - 1
    n = len(ys)
    th = torch.zeros(x.shape[1], dtype=DT)
    for _ in range(60):
        s = torch.sigmoid(-ys * (xs @ th))
        g = -(s * ys) @ xs / n + l2 * th
        h = (xs.T * (s * (1 - s))) @ xs / n + l2 * torch.eye(x.shape[1], dtype=DT)
        th = th - torch.linalg.solve(h, g)
    yt_s = 2.0 * float(yt[0]) - 1
    return float(torch.nn.functional.softplus(-yt_s * (xt[0] @ th)))


def test_exact_refit_agrees_with_prediction_to_second_order() -> None:
    """|actual - predicted| is O(1/n^2) while both are O(1/n): repeat the data 4x -> error /16."""
    errs, scale = [], []
    for copies in (1, 4):
        inf, (x, y), test = _problem(copies)
        res = leave_one_out(inf, test, LOOConfig(indices=tuple(range(30)), progress=False))
        assert res.info["max_measurement_error_bound"] < 1e-9  # refits are exact
        assert abs(res.reference_change) < 1e-12
        assert res.pearson > 0.99 and res.spearman > 0.97
        errs.append(float((res.actual - res.predicted).abs().max()))
        scale.append(float(res.actual.abs().max()))
    # first-order terms scale as 1/n (x 1/4), the error as 1/n^2 (x 1/16); measured: the
    # relative error is 0.28 at n = 30 and 0.07 at n = 120
    assert 0.15 < scale[1] / scale[0] < 0.35
    assert errs[1] / errs[0] < 1 / 10
    assert errs[1] < 0.1 * scale[1]


def test_lbfgs_refit_equals_an_independent_newton_refit() -> None:
    inf, (x, y), (xt, yt) = _problem()
    res = leave_one_out(
        inf, (xt, yt), LOOConfig(indices=[0, 5, 17], progress=False, reference=False)
    )
    base = float(torch.nn.functional.softplus(-(xt[0] @ inf.objective.theta)))
    for i, a in zip(res.indices.tolist(), res.actual.tolist()):
        assert abs(a - (_exact_loo_change(x, y, xt, yt, i, 0.1) - base)) < 1e-10
    assert res.actual_vs_reference is None and res.reference_change is None


def test_selection_top_random_given() -> None:
    inf, _, test = _problem()
    pred_all = inf.predicted_loss_change(test)[0]
    top = leave_one_out(inf, test, LOOConfig(k=5, progress=False, reference=False))
    assert top.indices.tolist() == torch.argsort(pred_all.abs(), descending=True)[:5].tolist()
    torch.testing.assert_close(top.predicted, pred_all[top.indices])
    r1 = select_indices(pred_all, 5, "random", seed=1)
    assert r1.tolist() == select_indices(pred_all, 5, "random", seed=1).tolist()
    assert len(set(r1.tolist())) == 5
    given = leave_one_out(inf, test, LOOConfig(indices=[3, 1], progress=False, reference=False))
    assert given.indices.tolist() == [3, 1]
    torch.testing.assert_close(given.predicted, pred_all[[3, 1]])
    with pytest.raises(InputError):
        leave_one_out(inf, test, LOOConfig(select="best", progress=False))
    with pytest.raises(InputError, match="needs indices"):
        LOOConfig(select="given")
    with pytest.raises(InputError, match="retrain"):
        LOOConfig(retrain="sgd")
    with pytest.raises(InputError):
        leave_one_out(inf, test, LOOConfig(indices=[99], progress=False))


def test_callable_retrain_and_checkpoint_resume(tmp_path) -> None:
    inf, (x, y), test = _problem()
    calls = []

    def refit(keep: torch.Tensor, theta0: torch.Tensor):
        calls.append(int((~keep).sum()))
        w = keep.to(DT) * (len(keep) / keep.sum())
        return fit_lbfgs(inf.objective, (x, y), theta0=theta0, weights=w, tol=1e-12).theta, {"x": 1}

    ck = tmp_path / "loo.json"
    a = leave_one_out(inf, test, LOOConfig(k=4, retrain=refit, progress=False, checkpoint=ck))
    assert calls == [0, 1, 1, 1, 1]  # the full-data reference, then one per point
    b = leave_one_out(inf, test, LOOConfig(k=4, retrain=refit, progress=False, checkpoint=ck))
    assert len(calls) == 5  # everything was read back
    torch.testing.assert_close(a.actual, b.actual)
    ref = leave_one_out(inf, test, LOOConfig(k=4, progress=False))
    # the built-in refit stops at its default tol=1e-10: |error| <= |grad L_test| 1e-10 / l2
    torch.testing.assert_close(a.actual, ref.actual, atol=1e-8, rtol=0)
    with pytest.raises(InputError, match="different leave-one-out run"):
        leave_one_out(inf, test, LOOConfig(k=3, retrain=refit, progress=False, checkpoint=ck))


def test_adam_retrain_reports_drift_of_the_continuation() -> None:
    """Full-batch Adam from theta-hat: the continuation barely moves, and the n-1 runs move
    towards the exact leave-one-out optimum."""
    inf, _, test = _problem()
    exact = leave_one_out(inf, test, LOOConfig(k=4, progress=False))
    adam = leave_one_out(
        inf,
        test,
        LOOConfig(
            indices=exact.indices,
            retrain="adam",
            adam=AdamConfig(steps=400, batch_size=30, lr=2e-3),
            progress=False,
        ),
    )
    assert adam.retrain == "adam" and adam.actual_vs_reference is not None
    assert abs(adam.reference_change) < 0.05 * float(exact.actual.abs().max())
    torch.testing.assert_close(
        adam.actual - adam.actual_vs_reference, torch.full((4,), adam.reference_change, dtype=DT)
    )
    assert correlations(adam.actual_vs_reference, exact.actual)["pearson"] > 0.95


def test_svm_refit_with_a_callable_and_hinge_influence() -> None:
    """Fig 3 setting in miniature: hinge-trained weights, exact SVM refits via a callable."""
    g = np.random.RandomState(0)
    x = g.randn(60, 3)
    y = np.where(x[:, 0] + 0.6 * g.randn(60) > 0, 1, -1)
    xt = torch.tensor([[0.2, 1.0, -0.3]], dtype=DT)
    yt = torch.tensor([-1])
    l2 = 0.05
    w = fit_linear_svm(x, y, l2).theta
    obj = Objective(
        LinearSVM(3, dtype=DT),
        "smooth_hinge",
        l2=l2,
        t=0.01,
        measurement=lambda out, tgt: torch.clamp(1 - (2.0 * (tgt > 0) - 1) * out, 0),
    )
    obj.load_into_model(w)
    obj.theta = w.clone()
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    inf = Influence(obj, (X, Y), solver="exact", progress=False).fit()

    def svm(keep, theta0):
        return fit_linear_svm(x, y, l2, weights_mask=keep.numpy())

    res = leave_one_out(inf, (xt, yt), LOOConfig(k=8, retrain=svm, progress=False))
    assert abs(res.reference_change) < 1e-9  # the full-data refit is the same optimum
    assert all(r["duality_gap"] < 1e-12 for r in res.info["refits"])
    assert np.isfinite(res.pearson)


def test_result_plot_and_json(tmp_path) -> None:
    inf, _, test = _problem()
    res = leave_one_out(inf, test, LOOConfig(k=6, progress=False))
    assert isinstance(res, LOOResult)
    path = tmp_path / "loo.png"
    res.plot(path, title="tiny LR")
    assert path.stat().st_size > 1000
    res.plot(tmp_path / "ref.png", against="reference")
    d = json.loads(json.dumps(res.to_dict()))
    assert d["k"] == 6 and len(d["actual"]) == 6 and d["retrain"] == "lbfgs"
    assert d["pearson"] == pytest.approx(res.pearson)
