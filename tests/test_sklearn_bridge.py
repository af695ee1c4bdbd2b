"""inflens.from_sklearn against independent ground truth: leave-one-out refits of the
scikit-learn estimator itself, closed-form Hessians and gradients of scikit-learn's documented
objectives, and the Sherman-Morrison (hat-matrix) leave-one-out formula for least squares."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.linear_model import (
    LinearRegression,
    LogisticRegression,
    Ridge,
    SGDClassifier,
)
from sklearn.svm import LinearSVC
from sklearn.tree import DecisionTreeClassifier

import inflens
from inflens.errors import InputError

EPS = np.finfo(np.float64).eps


@functools.cache
def _cancer() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    idx = np.random.default_rng(0).permutation(len(y))
    return x[idx], y[idx]


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(0).permutation(len(y))
    return x[idx] / 16.0, y[idx]


def _test_loss(est, x: np.ndarray, label) -> float:
    """Unweighted log-loss of one example under a fitted LogisticRegression."""
    k = int(np.flatnonzero(est.classes_ == label)[0])
    return float(-np.log(est.predict_proba(x[None])[0, k]))


def _refit_without(est, x: np.ndarray, y: np.ndarray, i: int, **params):
    """The estimator refit without row i, warm-started at its solution (tight tol)."""
    keep = np.ones(len(y), bool)
    keep[i] = False
    e = clone(est).set_params(warm_start=True, **params)
    e.coef_, e.intercept_ = est.coef_.copy(), est.intercept_.copy()
    return e.fit(x[keep], y[keep])


def _loo_actual(est, x, y, x_test, y_test, indices, **params) -> np.ndarray:
    base = _test_loss(est, x_test, y_test)
    return np.array(
        [
            _test_loss(_refit_without(est, x, y, int(i), **params), x_test, y_test) - base
            for i in indices
        ]
    )


def _assert_same_scale(pred: np.ndarray, actual: np.ndarray) -> None:
    """Not only correlated but on the same scale: a wrong 1/n, C or factor 2 would move the
    least-squares slope of actual on predicted far from 1 (the first-order prediction runs a
    few percent to ~15 % below the largest actual effects)."""
    slope = float(pred @ actual / (pred @ pred))
    assert 0.8 <= slope <= 1.25, slope


def _hardest(est, x_test, y_test) -> int:
    losses = [_test_loss(est, x_test[j], y_test[j]) for j in range(len(y_test))]
    return int(np.argmax(losses))


# ------------------------------------------------------------------ leave-one-out refits
def test_logistic_binary_matches_sklearn_refits() -> None:
    x, y = _cancer()
    xtr, ytr, xte, yte = x[:300], y[:300], x[300:], y[300:]
    est = LogisticRegression(C=0.1, tol=1e-12, max_iter=10_000).fit(xtr, ytr)
    inf = inflens.from_sklearn(est, xtr, ytr)
    j = _hardest(est, xte, yte)
    pred = inf.predicted_loss_change((xte[j : j + 1], yte[j : j + 1]))[0].numpy()
    top = np.argsort(-np.abs(pred))[:30]
    actual = _loo_actual(est, xtr, ytr, xte[j], yte[j], top)
    assert np.corrcoef(pred[top], actual)[0, 1] >= 0.99
    _assert_same_scale(pred[top], actual)


def test_logistic_multinomial_matches_sklearn_refits() -> None:
    x, y = _digits()
    xtr, ytr, xte, yte = x[:400], y[:400], x[400:600], y[400:600]
    est = LogisticRegression(C=0.2, tol=1e-10, max_iter=10_000).fit(xtr, ytr)
    inf = inflens.from_sklearn(est, xtr, ytr)
    assert inf.objective.p == 10 * 64 + 10
    j = _hardest(est, xte, yte)
    pred = inf.predicted_loss_change((xte[j : j + 1], yte[j : j + 1]))[0].numpy()
    top = np.argsort(-np.abs(pred))[:30]
    actual = _loo_actual(est, xtr, ytr, xte[j], yte[j], top)
    assert np.corrcoef(pred[top], actual)[0, 1] >= 0.99
    _assert_same_scale(pred[top], actual)


def test_mean_risk_convention_predicts_refits_with_rescaled_C() -> None:
    """loo='mean_risk' (the paper's convention) predicts refits with C n/(n-1); its scores
    differ from loo='estimator' by the same constant for every training point."""
    x, y = _cancer()
    xtr, ytr, xte, yte = x[:300], y[:300], x[300:], y[300:]
    n, c = 300, 0.1
    est = LogisticRegression(C=c, tol=1e-12, max_iter=10_000).fit(xtr, ytr)
    test = (xte[:5], yte[:5])
    a = inflens.from_sklearn(est, xtr, ytr).predicted_loss_change(test).numpy()
    b = inflens.from_sklearn(est, xtr, ytr, loo="mean_risk").predicted_loss_change(test).numpy()
    shift = b - a
    np.testing.assert_allclose(shift, shift[:, :1].repeat(n, 1), rtol=1e-9, atol=1e-14)
    j = _hardest(est, xte, yte)
    inf = inflens.from_sklearn(est, xtr, ytr, loo="mean_risk")
    pred = inf.predicted_loss_change((xte[j : j + 1], yte[j : j + 1]))[0].numpy()
    top = np.argsort(-np.abs(pred))[:15]
    actual = _loo_actual(est, xtr, ytr, xte[j], yte[j], top, C=c * n / (n - 1))
    assert np.corrcoef(pred[top], actual)[0, 1] >= 0.99


def test_class_weight_matches_sklearn_refits() -> None:
    """Class weights enter each example's loss: refits of the same estimator (same dict of
    class weights) without each of the top 20 points."""
    x, y = _cancer()
    xtr, ytr, xte, yte = x[:300], y[:300], x[300:], y[300:]
    est = LogisticRegression(C=0.1, class_weight={0: 2.5, 1: 0.6}, tol=1e-12, max_iter=10_000).fit(
        xtr, ytr
    )
    inf = inflens.from_sklearn(est, xtr, ytr)
    j = _hardest(est, xte, yte)
    pred = inf.predicted_loss_change((xte[j : j + 1], yte[j : j + 1]))[0].numpy()
    top = np.argsort(-np.abs(pred))[:20]
    actual = _loo_actual(est, xtr, ytr, xte[j], yte[j], top)
    assert np.corrcoef(pred[top], actual)[0, 1] >= 0.99
    _assert_same_scale(pred[top], actual)
    # the weights matter: ignoring them (class_weight=None at the same theta) changes H and g_i
    plain = clone(est).set_params(class_weight=None)
    plain.coef_, plain.intercept_, plain.classes_ = est.coef_, est.intercept_, est.classes_
    plain.n_features_in_ = est.n_features_in_
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # theta is not plain's optimum
        other = inflens.from_sklearn(plain, xtr, ytr).predicted_loss_change(
            (xte[j : j + 1], yte[j : j + 1])
        )[0]
    assert np.corrcoef(other.numpy()[top], actual)[0, 1] < np.corrcoef(pred[top], actual)[0, 1]


# ------------------------------------------------------------------ the mapping itself
def _closed_form_binary(est, x, y01, sw):
    """Gradient (per example) and Hessian of scikit-learn's objective divided by C n:
    mean_i s_i log(1 + exp(-y_i s_i)) + ||w||^2 / (2 C n), intercept unpenalised."""
    n = len(y01)
    xt = np.hstack([x, np.ones((n, 1))]) if est.fit_intercept else x
    theta = np.concatenate([est.coef_.ravel(), est.intercept_])[: xt.shape[1]]
    p = 1 / (1 + np.exp(-xt @ theta))
    g = (sw * (p - y01))[:, None] * xt  # [n, p]
    lam = np.full(xt.shape[1], 1.0 / (est.C * n))
    if est.fit_intercept:
        lam[-1] = 0.0
    h = (xt * (sw * p * (1 - p))[:, None]).T @ xt / n + np.diag(lam)
    return g, h, lam * theta


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("class_weight", [None, "balanced", {0: 3.0, 1: 0.5}])
def test_binary_mapping_closed_form(fit_intercept: bool, class_weight) -> None:
    """theta = (coef_, intercept_); the mapped risk is stationary at theta (checks C, the
    unpenalised intercept and the class weights); H^-1 g_i equals the closed form."""
    x, y = _cancer()
    xtr, ytr = x[:200], y[:200]
    est = LogisticRegression(
        C=0.3, fit_intercept=fit_intercept, class_weight=class_weight, tol=1e-12, max_iter=10_000
    ).fit(xtr, ytr)
    inf = inflens.from_sklearn(est, xtr, ytr, loo="mean_risk")
    theta = np.concatenate([est.coef_.ravel(), est.intercept_ if fit_intercept else []])
    np.testing.assert_array_equal(inf.objective.theta.numpy(), theta)
    if class_weight is None:
        cw = np.ones(2)
    elif class_weight == "balanced":  # scikit-learn's definition: n / (classes * counts)
        cw = 200 / (2 * np.bincount(ytr))
    else:
        cw = np.array([class_weight[0], class_weight[1]])
    g, h, reg = _closed_form_binary(est, xtr, ytr, cw[ytr])
    scale = np.abs(g).sum(1).mean()
    risk_grad = g.mean(0) + reg
    assert np.abs(risk_grad).max() <= 1e-6 * scale  # scikit-learn's optimum (tol=1e-12)
    train = inf.train_gradients(None).numpy()  # mean_risk: g_i + l2 theta
    np.testing.assert_allclose(train, g + reg, rtol=0, atol=1e3 * EPS * scale)
    assert np.abs(train.mean(0)).max() <= 1e-6 * scale
    np.testing.assert_allclose(inf.risk_gradient().numpy(), risk_grad, atol=1e3 * EPS * scale)
    idx = [0, 7, 19]
    want = -np.linalg.solve(h, (g + reg)[idx].T).T
    got = inf.param_influence(idx).numpy()
    tol = 1e2 * EPS * np.linalg.cond(h) * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    # loo='estimator': the sum-form penalty stays, so g_i = s_i grad l_i (no l2 theta)
    est_inf = inflens.from_sklearn(est, xtr, ytr)
    np.testing.assert_allclose(est_inf.train_gradients(idx).numpy(), g[idx], atol=1e3 * EPS * scale)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_multinomial_mapping_stationary(fit_intercept: bool) -> None:
    x, y = _digits()
    xtr, ytr = x[:150], y[:150]
    est = LogisticRegression(C=2.0, fit_intercept=fit_intercept, tol=1e-12, max_iter=10_000).fit(
        xtr, ytr
    )
    inf = inflens.from_sklearn(est, xtr, ytr, loo="mean_risk")
    theta = np.concatenate([est.coef_.ravel(), est.intercept_ if fit_intercept else []])
    np.testing.assert_array_equal(inf.objective.theta.numpy(), theta)
    assert inf.mapping.l2_coef == pytest.approx(1 / (2.0 * 150), rel=1e-15)
    assert inf.mapping.l2_intercept == 0.0
    train = inf.train_gradients(None).numpy()
    scale = np.abs(train).sum(1).mean()
    assert np.abs(train.mean(0)).max() <= 1e-6 * scale
    # the explicit softmax cross-entropy gradient of one example, from scikit-learn's own
    # predict_proba: (p - e_y) x^T, (p - e_y), plus the penalty on the coefficients only
    i = 11
    p = est.predict_proba(xtr[i : i + 1])[0]
    e = p - np.eye(10)[ytr[i]]
    want = np.outer(e, xtr[i]).ravel() + est.coef_.ravel() / (2.0 * 150)
    if fit_intercept:
        want = np.concatenate([want, e])
    np.testing.assert_allclose(train[i], want, atol=1e-10 * scale)
    # solves are finite and orthogonal to the intercept null direction
    s = inf.s_test((xtr[:3], ytr[:3])).numpy()
    assert np.isfinite(s).all()
    if fit_intercept:
        assert np.abs(s[:, -10:].sum(1)).max() <= 1e-8 * np.abs(s).max()


def test_liblinear_intercept_penalty_and_squared_hinge() -> None:
    """liblinear penalises the intercept through the synthetic feature intercept_scaling:
    l2_intercept = l2 / intercept_scaling^2; the mapped risk is stationary at theta."""
    x, y = _cancer()
    xtr, ytr = x[:200], y[:200]
    for est in (
        LogisticRegression(
            C=0.3, solver="liblinear", intercept_scaling=2.0, tol=1e-12, max_iter=10_000
        ),
        LinearSVC(C=0.3, loss="squared_hinge", intercept_scaling=2.0, tol=1e-12, max_iter=100_000),
    ):
        est.fit(xtr, ytr)
        inf = inflens.from_sklearn(est, xtr, ytr, loo="mean_risk")
        lam = 1 / (0.3 * 200)
        assert inf.mapping.l2_coef == pytest.approx(lam, rel=1e-15)
        assert inf.mapping.l2_intercept == pytest.approx(lam / 4.0, rel=1e-15)
        train = inf.train_gradients(None).numpy()
        scale = np.abs(train).sum(1).mean()
        assert np.abs(train.mean(0)).max() <= 1e-5 * scale, type(est).__name__


def test_hinge_estimators_use_the_smooth_hinge() -> None:
    x, y = _cancer()
    xtr, ytr, xte, yte = x[:200], y[:200], x[200:203], y[200:203]
    svc = LinearSVC(C=0.3, loss="hinge", tol=1e-8, max_iter=100_000).fit(xtr, ytr)
    a = inflens.from_sklearn(svc, xtr, ytr, t=0.01)
    b = inflens.from_sklearn(svc, xtr, ytr, t=0.1)
    assert a.mapping.loss == "smooth_hinge" and a.mapping.t == 0.01
    sa, sb = a.loss_influence((xte, yte)), b.loss_influence((xte, yte))
    assert torch.isfinite(sa).all() and not torch.allclose(sa, sb)
    # the test loss is the smooth hinge of the margin: check one gradient by hand
    m = (2 * yte[0] - 1) * svc.decision_function(xte[:1])[0]
    dl = -(2 * yte[0] - 1) / (1 + np.exp(-(1 - m) / 0.01))
    want = dl * np.concatenate([xte[0], [1.0]])
    np.testing.assert_allclose(a.test_gradients((xte[:1], yte[:1])).numpy()[0], want, rtol=1e-9)
    sgd = SGDClassifier(loss="hinge", alpha=0.01, max_iter=50, tol=None, random_state=0)
    sgd.fit(xtr, ytr)
    inf = inflens.from_sklearn(sgd, xtr, ytr)
    assert inf.mapping.l2_coef == 0.01 and inf.mapping.l2_intercept == 0.0
    assert not inf.mapping.sum_form and inf.mapping.penalty_in_train_gradient
    np.testing.assert_array_equal(
        inf.objective.theta.numpy(), np.concatenate([sgd.coef_.ravel(), sgd.intercept_])
    )


# ------------------------------------------------------------------ least squares
def _ridge_loo(x, y, alpha):
    """Exact leave-one-out parameter shifts of sum (y - Xw - b)^2 + alpha ||w||^2 by
    Sherman-Morrison: theta_-i - theta = -A^-1 x_i e_i / (1 - h_ii)."""
    xt = np.hstack([x, np.ones((len(y), 1))])
    d = np.eye(xt.shape[1])
    d[-1, -1] = 0.0
    a = xt.T @ xt + alpha * d
    theta = np.linalg.solve(a, xt.T @ y)
    e = y - xt @ theta
    ainv_x = np.linalg.solve(a, xt.T)  # [p, n]
    h = (xt * ainv_x.T).sum(1)
    return theta, -(ainv_x * (e / (1 - h))).T, h


@pytest.mark.parametrize("alpha", [3.0, 0.0])
def test_least_squares_vs_hat_matrix_formula(alpha: float) -> None:
    """The influence prediction of the parameter shift is exactly (1 - h_ii) times the actual
    leave-one-out shift (first order of Sherman-Morrison); test-loss changes correlate."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 5))
    y = x @ rng.normal(size=5) + 0.5 + 0.3 * rng.normal(size=80)
    est = (Ridge(alpha=alpha) if alpha else LinearRegression()).fit(x, y)
    theta, shift, h = _ridge_loo(x, y, alpha)
    np.testing.assert_allclose(np.concatenate([est.coef_, [est.intercept_]]), theta, rtol=1e-9)
    inf = inflens.from_sklearn(est, x, y)
    pred = -inf.param_influence(None).numpy() / len(y)
    np.testing.assert_allclose(
        pred, shift * (1 - h)[:, None], rtol=0, atol=1e-10 * np.abs(shift).max()
    )
    for i in (3, 40):  # the formula against scikit-learn's own refit
        keep = np.arange(len(y)) != i
        refit = clone(est).fit(x[keep], y[keep])
        np.testing.assert_allclose(
            np.concatenate([refit.coef_, [refit.intercept_]]) - theta, shift[i], atol=1e-9
        )
    xt_test = np.array([1.0, -2.0, 0.5, 0.0, 1.5])
    y_test = 2.0
    pred_loss = inf.predicted_loss_change((xt_test[None], [y_test]))[0].numpy()
    f = np.append(xt_test, 1.0)
    actual = (y_test - (theta[None] + shift) @ f) ** 2 - (y_test - f @ theta) ** 2
    assert np.corrcoef(pred_loss, actual)[0, 1] >= 0.99


def test_linear_regression_singular_is_refused_unless_damped() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 3))
    x = np.hstack([x, x[:, :1] * 2.0])  # collinear column
    y = rng.normal(size=40)
    est = LinearRegression().fit(x, y)
    with pytest.raises(InputError, match="singular.*damping"):
        inflens.from_sklearn(est, x, y)
    inf = inflens.from_sklearn(est, x, y, damping=1e-3)
    assert torch.isfinite(inf.loss_influence((x[:2], y[:2]))).all()


# ------------------------------------------------------------------ labels and inputs
def test_labels_not_0_1_and_query_types() -> None:
    x, y = _cancer()
    xtr, ytr, xte, yte = x[:150], y[:150], x[150:160], y[150:160]
    base = LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000)
    ref = inflens.from_sklearn(clone(base).fit(xtr, ytr), xtr, ytr).loss_influence((xte, yte))
    for labels in (np.array([3, 7]), np.array(["benign", "malignant"])):
        # 0 -> the smaller label, as scikit-learn sorts classes_
        ytr_l, yte_l = labels[ytr], labels[yte]
        est = clone(base).fit(xtr, ytr_l)
        inf = inflens.from_sklearn(est, xtr, ytr_l)
        assert inf.mapping.classes == tuple(labels.tolist())
        np.testing.assert_allclose(inf.loss_influence((xte, yte_l)).numpy(), ref.numpy(), rtol=1e-6)
        with pytest.raises(InputError, match="not one of the estimator's classes"):
            inf.loss_influence((xte[:1], ["unknown"] if labels.dtype.kind == "U" else [5]))
    est = clone(base).fit(xtr, ytr)
    inf = inflens.from_sklearn(est, torch.from_numpy(xtr), torch.from_numpy(ytr))
    a = inf.loss_influence((torch.from_numpy(xte), torch.from_numpy(yte)))
    b = inf.loss_influence((xte.tolist(), yte.tolist()))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, ref, rtol=1e-12, atol=0)
    assert inf.self_influence().shape == (150,)
    assert inf.label_influence((xte[:2], yte[:2]), [0, 1], 1 - ytr[:2]).shape == (2, 2)
    with pytest.raises(InputError, match="features"):
        inf.loss_influence((xte[:, :5], yte))


def test_label_influence_matches_refit_with_flipped_label() -> None:
    x, y = _cancer()
    xtr, ytr, xte, yte = x[:300], y[:300], x[300:], y[300:]
    est = LogisticRegression(C=0.1, tol=1e-12, max_iter=10_000).fit(xtr, ytr)
    inf = inflens.from_sklearn(est, xtr, ytr)
    j = _hardest(est, xte, yte)
    idx = np.argsort(
        -np.abs(inf.predicted_loss_change((xte[j : j + 1], yte[j : j + 1]))[0].numpy())
    )[:10]
    pred = inf.label_influence((xte[j : j + 1], yte[j : j + 1]), idx, 1 - ytr[idx])[0].numpy() / 300
    base = _test_loss(est, xte[j], yte[j])
    actual = []
    for i in idx:
        yy = ytr.copy()
        yy[i] = 1 - yy[i]
        e = clone(est).set_params(warm_start=True)
        e.coef_, e.intercept_ = est.coef_.copy(), est.intercept_.copy()
        actual.append(_test_loss(e.fit(xtr, yy), xte[j], yte[j]) - base)
    assert np.corrcoef(pred, actual)[0, 1] >= 0.99


# ------------------------------------------------------------------ refusals
def test_refuses_what_it_cannot_map() -> None:
    x, y = _cancer()
    xtr, ytr = x[:100], y[:100]
    xd, yd = _digits()
    cases = [
        (DecisionTreeClassifier(max_depth=2).fit(xtr, ytr), xtr, ytr, "cannot map"),
        (LogisticRegression(), xtr, ytr, "not fitted"),
        (LogisticRegression(l1_ratio=1.0, solver="liblinear").fit(xtr, ytr), xtr, ytr, "penalty"),
        (LogisticRegression(C=np.inf).fit(xtr, ytr), xtr, ytr, "penalty"),
        (LinearSVC().fit(xd[:100], yd[:100]), xd[:100], yd[:100], "binary"),
        (SGDClassifier(loss="log_loss").fit(xtr, ytr), xtr, ytr, "hinge"),
        (Ridge().fit(xtr, np.c_[ytr, ytr]), xtr, np.c_[ytr, ytr], "multi-output"),
    ]
    for est, xx, yy, msg in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(InputError, match=msg) as info:
                inflens.from_sklearn(est, xx, yy)
        if msg in ("cannot map", "binary", "hinge", "multi-output"):
            assert "LogisticRegression" in str(info.value) and "Ridge" in str(info.value)
    est = LogisticRegression().fit(xtr, ytr)
    with pytest.raises(InputError, match="K-FAC"):
        inflens.from_sklearn(est, xtr, ytr, solver="kfac")
    with pytest.raises(InputError, match="unknown option"):
        inflens.from_sklearn(est, xtr, ytr, l2=0.1)
    with pytest.raises(InputError, match="features"):
        inflens.from_sklearn(est, xtr[:, :5], ytr)
    with pytest.raises(InputError, match="temperature"):
        inflens.from_sklearn(est, xtr, ytr, t=0.0)


def test_warns_when_the_estimator_did_not_converge() -> None:
    x, y = _cancer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's ConvergenceWarning
        est = LogisticRegression(C=10.0, max_iter=2).fit(x[:200], y[:200])
    with pytest.warns(inflens.InflensWarning, match="not at the optimum"):
        inflens.from_sklearn(est, x[:200], y[:200])
