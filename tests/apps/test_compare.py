"""Model comparison (Fig. 4): distances, rank correlation, scores, the RBF SVM builder, plots."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from inflens import Influence, Objective
from inflens.apps.compare import compare_models, pixel_distances, rbf_svm, spearman
from inflens.errors import InputError
from inflens.models import LogisticRegression
from inflens.train import fit_lbfgs

DT = torch.float64


def _data(n: int = 40, m: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n + m, 3, 4, 4, generator=g, dtype=DT) * 2 - 1
    y = (x[:, 0].mean((1, 2)) + 0.2 * torch.randn(n + m, generator=g, dtype=DT) > 0).long()
    return x[:n], y[:n], x[n:], y[n:]


def test_pixel_distances_and_spearman() -> None:
    xtr, _, xte, _ = _data()
    d = pixel_distances(xtr, xte)
    torch.testing.assert_close(d, torch.cdist(xte.reshape(5, -1), xtr.reshape(40, -1)))
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(3, 30)).astype(float)  # with ties
    b = rng.normal(size=(3, 30))
    ref = [spearmanr(a[i], b[i]).statistic for i in range(3)]
    np.testing.assert_allclose(spearman(a, b), ref, rtol=1e-12)


def _lr(x, y):
    obj = Objective(LogisticRegression(x[0].numel(), 1, dtype=DT), "binary_logistic", l2=1e-2)
    theta = fit_lbfgs(obj, (x.reshape(len(x), -1), y), tol=1e-12).theta
    obj.load_into_model(theta)
    return Objective(obj.model, "binary_logistic", l2=1e-2)


def test_compare_models_scores_and_summary(tmp_path) -> None:
    xtr, ytr, xte, yte = _data()
    svm = rbf_svm(xtr, ytr, xte, gamma=0.05)
    inf_svm = Influence(svm.objective, (svm.f_train, ytr), progress=False).fit()
    obj = _lr(xtr, ytr)
    flat_tr, flat_te = xtr.reshape(40, -1), xte.reshape(5, -1)
    inf_lr = Influence(obj, (flat_tr, ytr), progress=False).fit()
    cmp = compare_models(
        {"svm": (inf_svm, (svm.f_test, yte)), "lr": (inf_lr, (flat_te, yte))},
        xtr,
        xte,
        ytr,
        yte,
        test_index=[10, 11, 12, 13, 14],
    )
    ref = inf_lr.predicted_loss_change((flat_te, yte)).numpy()
    np.testing.assert_allclose(cmp.scores["lr"], ref, rtol=1e-12)
    top = cmp.top_helpful("lr", 12, k=3)
    assert top.tolist() == np.argsort(-ref[2])[:3].tolist()
    only1 = cmp.top_helpful("lr", 12, k=3, label=1)
    assert (ytr.numpy()[only1] == 1).all()
    with torch.no_grad():
        pred = (flat_te @ obj.theta > 0).long()
    np.testing.assert_array_equal(cmp.correct["lr"], (pred == yte).numpy())
    summary = cmp.summary(k=3)
    for name in ("svm", "lr"):
        s = summary[name]
        assert -1 <= s["spearman_abs_influence_vs_distance"] <= 1
        assert 0 <= s["influence_mass_nearest"] <= 1
        assert 0 <= s["top_k_other_class"] <= 1 and s["n_test_points"] == 5
    sub = cmp.subset([11, 13])
    assert sub.test_index.tolist() == [11, 13]
    np.testing.assert_array_equal(sub.scores["lr"], cmp.scores["lr"][[1, 3]])
    both = cmp.all_correct()
    ok = cmp.correct["lr"] & cmp.correct["svm"]
    assert both.tolist() == cmp.test_index[ok].tolist()
    one = cmp.test_summary(12, k=3)
    assert [r["index"] for r in one["lr"]["top_helpful"]] == top.tolist()
    full_test = torch.cat([torch.zeros(10, 3, 4, 4, dtype=DT), xte])  # indexed by test_index
    cmp.plot(tmp_path / "cmp.png", 12, images=(xtr, full_test), class_names=["a", "b"])
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    with pytest.raises(InputError, match="not in this comparison"):
        cmp.top_helpful("lr", 3)


def test_rbf_svm_is_a_kernel_machine_with_smooth_hinge_influence() -> None:
    xtr, ytr, xte, yte = _data(n=30)
    svm = rbf_svm(xtr, ytr, xte, gamma=0.2, l2=1e-3, t=1e-3)
    assert svm.objective.loss_name == "smooth_hinge" and svm.objective.loss_fn.t == 1e-3
    torch.testing.assert_close(svm.objective.theta, svm.w)
    assert svm.fit_info["duality_gap"] < 1e-8
    # the decision values are kernel expansions over the training points: f_test w = K c
    k_te = torch.exp(-0.2 * torch.cdist(xte.reshape(5, -1), xtr.reshape(30, -1)) ** 2)
    k_tr = torch.exp(-0.2 * torch.cdist(xtr.reshape(30, -1), xtr.reshape(30, -1)) ** 2)
    c = torch.linalg.solve(svm.f_train.T, svm.w)  # w = L^T c
    torch.testing.assert_close(svm.f_test @ svm.w, k_te @ c, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(svm.f_train @ svm.w, k_tr @ c, rtol=1e-7, atol=1e-8)


def test_compare_models_errors() -> None:
    xtr, ytr, xte, yte = _data()
    obj = _lr(xtr, ytr)
    inf = Influence(obj, (xtr.reshape(40, -1), ytr), progress=False).fit()
    with pytest.raises(InputError, match="empty"):
        compare_models({}, xtr, xte, ytr, yte)
    with pytest.raises(InputError, match="training points"):
        compare_models({"lr": (inf, (xte.reshape(5, -1), yte))}, xtr[:10], xte, ytr[:10], yte)


def test_summary_leaves_out_test_points_without_influence() -> None:
    from inflens.apps.compare import Comparison

    scores = np.array([[0.3, -0.1, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]])
    cmp = Comparison(
        scores={"m": scores},
        correct={"m": np.array([True, True])},
        distance=np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]),
        y_train=np.array([0, 1, 0, 1]),
        y_test=np.array([0, 1]),
        test_index=np.array([0, 1]),
    )
    s = cmp.summary(k=2, near_fraction=0.3)["m"]
    assert s["n_test_points"] == 1 and s["n_without_influence"] == 1
    assert s["top_k_other_class"] == 0.0  # points 0 and 2, both of class 0
    assert s["influence_mass_nearest"] == pytest.approx(0.5)  # nearest 30%: point 0 only
    assert s["top_k_helpful_mean"] == pytest.approx(0.25)
