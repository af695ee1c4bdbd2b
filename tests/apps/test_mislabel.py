"""Label-fixing tools (Sec. 5.4): closed-form self-influence, review orders, the simulation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.func import hessian

from inflens import Influence, InputError, Objective
from inflens.apps.mislabel import (
    LabelFixingConfig,
    LabelFixingResult,
    flip_labels,
    logistic_leverage,
    logistic_self_influence,
    rank_for_review,
    self_influence_scores,
    simulate_label_fixing,
    training_losses,
)
from inflens.models import LogisticRegression
from inflens.train import fit_lbfgs

L2 = 1e-2


def _problem(n: int, p: int, seed: int = 0, sparse_counts: bool = False):
    g = torch.Generator().manual_seed(seed)
    if sparse_counts:  # bag-of-words-like: mostly zeros, small counts
        x = torch.poisson(0.3 * torch.ones(n, p, dtype=torch.float64), generator=g)
    else:
        x = torch.randn(n, p, generator=g, dtype=torch.float64)
    w = torch.randn(p, generator=g, dtype=torch.float64)
    y = ((x @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)) > 0).long()
    obj = Objective(LogisticRegression(p, 1, dtype=torch.float64), "binary_logistic", l2=L2)
    # the closed forms hold at any theta, so the fit need not reach machine precision
    theta = fit_lbfgs(obj, (x, y), tol=1e-10, max_iter=5000, on_fail="ignore", load=True).theta
    return obj, x, y, theta


def _explicit_leverage(x: torch.Tensor, theta: torch.Tensor, l2: float) -> torch.Tensor:
    """Reference: H from torch.func.hessian of the regularised mean risk, explicit inverse."""
    ys = torch.ones(x.shape[0], dtype=x.dtype)  # H does not depend on the labels

    def risk(th: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-ys * (x @ th)).mean() + 0.5 * l2 * th @ th

    h = hessian(risk)(theta)
    return torch.einsum("ij,jk,ik->i", x, torch.linalg.inv(h), x)


@pytest.mark.parametrize("n,p", [(60, 8), (25, 40)])
def test_leverage_primal_dual_match_explicit_hessian(n: int, p: int) -> None:
    _, x, _, theta = _problem(n, p, sparse_counts=True)
    ref = _explicit_leverage(x, theta, L2)
    for method in ("primal", "dual", "auto"):
        q = logistic_leverage(x, theta, L2, method=method)
        torch.testing.assert_close(q, ref, rtol=1e-9, atol=0)
    # scipy.sparse input gives the same numbers
    q_sparse = logistic_leverage(sp.csr_matrix(x.numpy()), theta, L2, method="dual")
    torch.testing.assert_close(q_sparse, ref, rtol=1e-9, atol=0)


def test_closed_form_equals_general_self_influence() -> None:
    obj, x, y, theta = _problem(80, 6)
    inf = Influence(obj, (x, y), solver="exact", progress=False).fit()
    general = self_influence_scores(inf, "sigma2")
    # the general path: grad L_i^T H^-1 grad L_i from autodiff and the explicit Hessian
    torch.testing.assert_close(general, -inf.self_influence(include_l2_gradient=False))
    closed = logistic_self_influence(x, y, theta, L2, variant="sigma2")
    torch.testing.assert_close(closed, general, rtol=1e-9, atol=1e-14)
    # sigma^1 (the 2017 code) = sigma^2 / sigma(-y theta.x)
    sig1 = logistic_self_influence(x, y, theta, L2, variant="sigma1")
    torch.testing.assert_close(self_influence_scores(inf, "sigma1"), sig1, rtol=1e-8, atol=1e-14)
    ys = 2.0 * y.double() - 1
    torch.testing.assert_close(sig1 * torch.sigmoid(-ys * (x @ theta)), closed)


def test_rank_for_review_orders() -> None:
    obj, x, y, theta = _problem(50, 5)
    inf = Influence(obj, (x, y), solver="exact", progress=False).fit()
    losses = torch.nn.functional.softplus(-(2.0 * y.double() - 1) * (x @ theta))
    torch.testing.assert_close(training_losses(obj, (x, y)), losses)
    order = rank_for_review(inf, "loss")
    assert torch.equal(order, torch.argsort(losses, descending=True))
    closed = logistic_self_influence(x, y, theta, L2)
    assert torch.equal(rank_for_review(inf, "influence"), torch.argsort(closed, descending=True))
    rnd = rank_for_review(inf, "random", seed=3)
    assert sorted(rnd.tolist()) == list(range(50))
    assert torch.equal(rnd, rank_for_review(inf, "random", seed=3))
    with pytest.raises(InputError, match="unknown method"):
        rank_for_review(inf, "magic")


def test_sigma1_needs_binary_logistic() -> None:
    x = torch.randn(20, 3, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    obj = Objective(LogisticRegression(3, 2, dtype=torch.float64), "cross_entropy", l2=L2)
    inf = Influence(obj, (x, y), solver="exact", progress=False).fit()
    assert self_influence_scores(inf, "sigma2").shape == (20,)
    with pytest.raises(InputError, match="binary_logistic"):
        self_influence_scores(inf, "sigma1")


def test_flip_labels() -> None:
    rng = np.random.RandomState(0)
    y = torch.tensor([0, 1, 1, 0])
    assert flip_labels(y, np.array([0, 1]), rng).tolist() == [1, 0, 1, 0]
    assert flip_labels(torch.tensor([-1, 1]), np.array([1]), rng).tolist() == [-1, -1]
    y3 = flip_labels(torch.tensor([0, 1, 2, 2]), np.array([0, 3]), rng, num_classes=3)
    assert y3[0] != 0 and y3[3] != 2 and y3[1:3].tolist() == [1, 2]
    with pytest.raises(InputError, match="not binary"):
        flip_labels(torch.tensor([0, 2]), np.array([0]), rng)


def _sim_data(seed: int = 1):
    obj, x, y, _ = _problem(160, 5, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    xt = torch.randn(200, 5, generator=g, dtype=torch.float64)
    # the test labels come from the clean model's own rule, so clean accuracy is high
    return obj, x, y, xt


def test_simulation_ground_truths() -> None:
    obj, x, y, xt = _sim_data()
    theta_clean = fit_lbfgs(obj, (x, y), tol=1e-12, max_iter=5000).theta
    yt = (xt @ theta_clean > 0).long()

    def oracle(o: Objective, train: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (train[1] != y).double()  # knows which labels were flipped

    res = simulate_label_fixing(
        obj,
        (x, y),
        (xt, yt),
        LabelFixingConfig(
            n_flipped=16,
            check_counts=[8, 16, 40, 160],
            methods={
                "oracle": oracle,
                "influence": "influence",
                "loss": "loss",
                "random": "random",
            },
            repeats=2,
            seed=5,
            tol=1e-9,
            max_iter=5000,
            progress=False,
        ),
    )
    assert isinstance(res, LabelFixingResult) and res.repeats == 2
    # the oracle finds min(c, flipped) flips exactly
    assert res.fixed["oracle"].tolist() == [[8, 16, 16, 16]] * 2
    for m in res.methods:
        f = res.fixed[m]
        assert (np.diff(f, axis=1) >= 0).all() and (f <= 16).all()
        # checking every point fixes every flip: the refit is the clean model
        assert (f[:, -1] == 16).all()
        np.testing.assert_allclose(res.test_loss[m][:, -1], res.clean_test_loss, rtol=1e-6)
        np.testing.assert_allclose(res.accuracy[m][:, -1], res.clean_accuracy)
    assert res.clean_accuracy == 1.0  # the test labels are the clean model's predictions
    # fixing all flips after checking 16 points also gives back the clean model
    np.testing.assert_allclose(res.test_loss["oracle"][:, 1], res.clean_test_loss, rtol=1e-6)
    s = res.summary()
    acc = np.concatenate([res.flipped_accuracy[:, None], res.accuracy["loss"]], 1)
    np.testing.assert_allclose(s["methods"]["loss"]["accuracy"], acc.mean(0))
    np.testing.assert_allclose(s["methods"]["loss"]["accuracy_se"], acc.std(0) / np.sqrt(2))
    assert s["fraction_checked"] == [0.0, 8 / 160, 16 / 160, 40 / 160, 1.0]


def test_simulation_influence_beats_random(tmp_path) -> None:
    obj, x, y, xt = _sim_data(seed=2)
    yt = (xt @ fit_lbfgs(obj, (x, y), tol=1e-12, max_iter=5000).theta > 0).long()
    res = simulate_label_fixing(
        obj,
        (x, y),
        (xt, yt),
        LabelFixingConfig(
            flip_fraction=0.1,
            check_fractions=(0.1, 0.2),
            methods=("influence", "random"),
            repeats=3,
            seed=0,
            progress=False,
        ),
    )
    assert res.fixed["influence"].sum() > res.fixed["random"].sum()
    path = res.plot(tmp_path / "fig.png", title="t")
    assert path.stat().st_size > 5_000
    d = res.to_dict()
    assert d["summary"]["repeats"] == 3 and len(d["raw"]["influence"]["fixed"]) == 3


def test_simulation_budget_and_errors() -> None:
    obj, x, y, xt = _sim_data()
    yt = (xt[:, 0] > 0).long()
    res = simulate_label_fixing(
        obj,
        (x, y),
        (xt, yt),
        LabelFixingConfig(
            check_fractions=(0.1,), methods=("loss",), repeats=5, time_budget_s=0.0, progress=False
        ),
    )
    assert res.repeats == 1 and res.info["stopped_early"]
    with pytest.raises(InputError, match="flip_fraction"):
        LabelFixingConfig(flip_fraction=1.5)
    with pytest.raises(InputError, match="between 1 and"):
        simulate_label_fixing(obj, (x, y), (xt, yt), LabelFixingConfig(check_counts=[0]))
    with pytest.raises(InputError, match="unknown method"):
        LabelFixingConfig(methods=("nope",))
    with pytest.raises(InputError, match="repeats"):
        LabelFixingConfig(repeats=0)
