"""Debugging wrong predictions (Sec. 5.3): training points and features behind them.

A synthetic domain mismatch: a rare group (indicator feature ``group``) has 4 training points,
3 labelled 1 and 1 labelled 0, while every test point of the group is labelled 0. Ground truth:
exact leave-one-out refits for the point effects, central finite differences of refits for the
feature effects (the input influence is the exact derivative, eq. 5 with H at theta-hat).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inflens import Influence, InputError, Objective
from inflens.apps.mismatch import (
    ErrorReport,
    compare_coefficients,
    explain_errors,
    predictions,
    wrongly_predicted,
)
from inflens.models import LogisticRegression
from inflens.train import fit_lbfgs, loo_weights

L2 = 1e-2
NAMES = ["a", "b", "c", "d", "group"]


def _data():
    g = torch.Generator().manual_seed(0)
    n_major = 300
    x = torch.randn(n_major, 5, generator=g, dtype=torch.float64)
    x[:, 4] = 0.0
    w = torch.tensor([1.5, -1.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    noise = 0.3 * torch.randn(n_major, generator=g, dtype=torch.float64)
    y = ((x @ w + noise) > 0).long()
    grp = 0.3 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    grp[:, 4] = 1.0
    x = torch.cat([x, grp])
    y = torch.cat([y, torch.tensor([1, 1, 1, 0])])
    xt = 0.3 * torch.randn(40, 5, generator=g, dtype=torch.float64)
    xt[:, 4] = 1.0
    yt = torch.zeros(40, dtype=torch.long)
    return x, y, xt, yt


def _fit(x, y, theta0=None, weights=None):
    obj = Objective(LogisticRegression(5, 1, dtype=torch.float64), "binary_logistic", l2=L2)
    theta = fit_lbfgs(
        obj,
        (x, y),
        theta0=theta0,
        weights=weights,
        tol=1e-13,
        max_iter=5000,
        on_fail="ignore",
        load=True,
    ).theta
    return Objective(obj.model, "binary_logistic", l2=L2), theta


@pytest.fixture(scope="module")
def setup():
    x, y, xt, yt = _data()
    obj, theta = _fit(x, y)
    inf = Influence(obj, (x, y), solver="exact", progress=False).fit()
    return x, y, xt, yt, obj, theta, inf


def _mean_test_loss(theta, xt, yt):
    ys = 2.0 * yt.double() - 1
    return float(torch.nn.functional.softplus(-ys * (xt @ theta)).mean())


def test_wrongly_predicted(setup) -> None:
    x, y, xt, yt, obj, theta, _ = setup
    manual = ((xt @ theta > 0).long() != yt).nonzero()[:, 0]
    got = wrongly_predicted(obj, (xt, yt))
    assert torch.equal(got, manual) and got.numel() > 0
    pred, truth = predictions(obj, (x, 2 * y - 1))  # labels in {-1, +1} work too
    assert torch.equal(truth, y) and torch.equal(pred, (x @ theta > 0).long())


def test_explain_errors_matches_leave_one_out(setup) -> None:
    x, y, xt, yt, obj, theta, inf = setup
    report = explain_errors(
        inf, (xt, yt), k_train=6, k_features=3, feature_names=NAMES, label_names=["no", "yes"]
    )
    assert isinstance(report, ErrorReport)
    wrong = wrongly_predicted(obj, (xt, yt))
    assert report.test_indices == wrong.tolist()
    # the story: the 4 group points are the most influential, 3 harmful (label 1) and 1 helpful
    top4 = {p["index"] for p in report.points[:4]}
    assert top4 == {300, 301, 302, 303}
    for p in report.points[:4]:
        assert p["role"] == ("helpful" if p["index"] == 303 else "harmful")
        assert p["label"] == ("no" if p["index"] == 303 else "yes")
    assert abs(report.points[3]["effect"]) > 2 * report.next_effect
    # ground truth: remove each listed point, refit (mean over n - 1, same l2), measure
    base = _mean_test_loss(theta, xt[wrong], yt[wrong])
    pred, actual = [], []
    for p in report.points:
        _, th = _fit(x, y, theta0=theta, weights=loo_weights(len(y), p["index"]))
        pred.append(p["effect"])
        actual.append(_mean_test_loss(th, xt[wrong], yt[wrong]) - base)
    pred, actual = np.array(pred), np.array(actual)
    assert (np.sign(pred) == np.sign(actual)).all()
    assert np.corrcoef(pred, actual)[0, 1] > 0.99
    np.testing.assert_allclose(pred, actual, rtol=0.3)


def test_feature_effects_match_finite_differences(setup) -> None:
    x, y, xt, yt, obj, theta, inf = setup
    wrong = wrongly_predicted(obj, (xt, yt))
    report = explain_errors(inf, (xt, yt), wrong, k_train=2, k_features=5, feature_names=NAMES)
    delta = 1e-4
    for p in report.points:
        for f in p["features"][:2]:
            j = NAMES.index(f["feature"])
            vals = []
            for sign in (1.0, -1.0):
                xp = x.clone()
                xp[p["index"], j] += sign * delta
                _, th = _fit(xp, y, theta0=theta)
                vals.append(_mean_test_loss(th, xt[wrong], yt[wrong]))
            fd = (vals[0] - vals[1]) / (2 * delta)
            assert f["effect_per_unit"] == pytest.approx(fd, rel=1e-4, abs=1e-9)
            assert f["value"] == float(x[p["index"], j])
    # the group indicator drives the group points' influence
    names = [name for name, _ in report.feature_totals]
    assert "group" in names[:2]


def test_report_table_and_frames(setup) -> None:
    _, _, xt, yt, _, _, inf = setup
    report = explain_errors(inf, (xt, yt), [0, 1], k_train=4, k_features=2, feature_names=NAMES)
    text = str(report)
    assert "harmful" in text and "helpful" in text and "group" in text
    for p in report.points:
        assert str(p["index"]) in text
    pts, feats = report.to_frames()
    assert list(pts["index"]) == [p["index"] for p in report.points]
    assert len(feats) == 4 * 2
    d = report.to_dict()
    assert d["test_indices"] == [0, 1] and len(d["points"]) == 4
    no_feats = explain_errors(inf, (xt, yt), [0], k_train=3, k_features=0)
    assert all(p["features"] == [] for p in no_feats.points)


def test_errors(setup) -> None:
    x, y, xt, yt, obj, theta, inf = setup
    right = (xt @ theta > 0).long()
    with pytest.raises(InputError, match="every test point correctly"):
        explain_errors(inf, (xt, right))
    with pytest.raises(InputError, match="empty"):
        explain_errors(inf, (xt, yt), [])
    with pytest.raises(InputError, match="feature_names"):
        explain_errors(inf, (xt, yt), [0], feature_names=["a"])


def test_compare_coefficients() -> None:
    w = torch.tensor([0.5, -2.0, 0.1, 1.0])
    c = compare_coefficients(w, ["p", "q", "r", "s"], "s")
    assert c["larger"] == 1 and c["coefficient"] == 1.0
    assert c["top"][0] == ("q", -2.0)
    with pytest.raises(InputError, match="not among"):
        compare_coefficients(w, ["p", "q", "r", "s"], "t")
