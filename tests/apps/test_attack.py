"""Training-set attacks: directions against eq. 5 and actual retraining, boxes, refits, solvers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inflens import Influence, Objective
from inflens.apps.attack import AttackConfig, PixelBox, TrainingSetAttack, eight_bit_level
from inflens.errors import InputError
from inflens.features import FeatureModel, SmallCNN, extract_features
from inflens.models import LogisticRegression
from inflens.solvers import CG
from inflens.train import fit_lbfgs, fit_newton

DT = torch.float64
L2 = 1e-2


def _problem(n: int = 40, m: int = 6, seed: int = 0):
    """A random frozen CNN (float64) on 8x8 images, an exactly fitted binary LR on top."""
    torch.manual_seed(seed)
    net = SmallCNN(features=6, widths=(4, 5)).double().eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n + m, 3, 8, 8, generator=g, dtype=DT) * 2 - 1
    f = extract_features(net, x)
    w_true = torch.randn(6, generator=g, dtype=DT)
    score = (f - f.mean(0)) @ w_true
    y = (score + 0.3 * score.std() * torch.randn(n + m, generator=g, dtype=DT) > 0).long()
    top = LogisticRegression(6, 1, dtype=DT)
    obj_top = Objective(top, "binary_logistic", l2=L2)
    theta = fit_lbfgs(obj_top, (f[:n], y[:n]), tol=1e-12).theta
    obj_top.load_into_model(theta)
    model = FeatureModel(net, top)
    obj = Objective(model, "binary_logistic", l2=L2, params="top.")
    return obj, (x[:n], y[:n]), (x[n:], y[n:])


def _target_loss(model: FeatureModel, x, y) -> float:
    with torch.no_grad():
        s = model(x)
    sign = torch.where(y > 0, 1.0, -1.0).to(s.dtype)
    return float(nn.functional.softplus(-sign * s).mean())


def test_pixel_box() -> None:
    box = PixelBox.eight_bit()
    assert box.radius == pytest.approx(1 / 255) and eight_bit_level() == pytest.approx(2 / 255)
    x0 = torch.tensor([-1.0, 0.0, 1.0, 0.5])
    x = box.project(x0 + torch.tensor([-0.1, 0.1, 0.1, -0.001]), x0)
    torch.testing.assert_close(x, torch.tensor([-1.0, 1 / 255, 1.0, 0.499]))
    assert PixelBox(0.5, None, None).project(torch.tensor([3.0]), torch.tensor([0.0])) == 0.5
    # every pixel keeps its 8-bit value: (x + 1) * 127.5 stays within half a level
    levels = torch.arange(256, dtype=DT)
    x0 = levels / 127.5 - 1
    x = box.project(x0 + 0.3, x0)
    assert float(((x + 1) * 127.5 - levels).abs().max()) <= 0.5 + 1e-9


def test_newton_refit_reaches_the_optimum() -> None:
    """The Newton refit the attack uses (inflens.train's) lands on the L-BFGS optimum."""
    g = torch.Generator().manual_seed(1)
    f = torch.randn(50, 6, generator=g, dtype=DT)
    y = (torch.randn(50, generator=g) > 0).long()
    top = Objective(LogisticRegression(6, 1, dtype=DT), "binary_logistic", l2=L2)
    fit = fit_newton(top, (f, y), theta0=torch.zeros(6, dtype=DT), tol=1e-13)
    grad = torch.func.grad(lambda th: top.risk(th, f, y))(fit.theta)
    assert fit.info.converged and float(grad.norm()) < 1e-12
    assert fit.info.iterations <= 10  # quadratic convergence from zero
    ref = fit_lbfgs(top, (f, y), tol=1e-12).theta
    torch.testing.assert_close(fit.theta, ref, rtol=1e-8, atol=1e-10)


def test_direction_is_eq5_and_matches_actual_retraining() -> None:
    """One tiny signed step: the moved pixels follow sign(I_pert,loss) and the target loss after
    an exact refit rises by (alpha / n) ||I_pert,loss||_1 to first order."""
    obj, train, test = _problem()
    n = train[0].shape[0]
    target = (test[0][:1], test[1][:1])
    alpha = 1e-5
    atk = TrainingSetAttack(obj, train, AttackConfig(step=alpha, box=PixelBox(1.0, None, None)))
    order, l1 = atk.rank(target)
    i = int(order[0])
    res = atk.run(target, [i], iterations=1, early_stop=False)
    # reference I_pert,loss from the generic Influence machinery on the whole model
    inf = Influence(obj, train, solver="exact", progress=False).fit()
    ipert = inf.input_influence(target, [i])[0]
    torch.testing.assert_close(res.delta[0], alpha * torch.sign(ipert), rtol=0, atol=1e-15)
    assert float(ipert.abs().sum()) == pytest.approx(float(l1[0]), rel=1e-8)
    predicted = alpha * float(ipert.abs().sum()) / n
    actual = res.target_loss_after - res.target_loss_before
    assert predicted > 0
    assert actual == pytest.approx(predicted, rel=2e-2)
    # and the reported theta is the exact refit on the poisoned training set
    x_p = train[0].clone()
    x_p[i] = res.x_poisoned[0]
    f_p = extract_features(obj.model.features, x_p)
    top = Objective(LogisticRegression(6, 1, dtype=DT), "binary_logistic", l2=L2)
    ref = fit_lbfgs(top, (f_p, train[1]), tol=1e-12).theta
    torch.testing.assert_close(res.theta, ref, rtol=1e-7, atol=1e-9)


def test_attack_respects_box_raises_loss_and_leaves_caller_untouched() -> None:
    obj, train, test = _problem()
    theta_before = obj.theta.clone()
    params_before = {k: v.clone() for k, v in obj.model.state_dict().items()}
    x_before = train[0].clone()
    target = (test[0][:2], test[1][:2])
    atk = TrainingSetAttack(obj, train, AttackConfig(step=0.5 * eight_bit_level()))
    order, _ = atk.rank(target)
    res = atk.run(target, order[:3], iterations=5, early_stop=False)
    d = res.delta.abs()
    assert float(d.max()) <= 1 / 255 + 1e-12
    assert float(res.x_poisoned.abs().max()) <= 1.0
    assert res.target_loss_after > res.target_loss_before
    assert res.iterations == 5 and len(res.history) == 5
    # the last history entry is the reported end state (AttackResult.record keeps them together)
    assert res.history[-1] == {"target_loss": res.target_loss_after, "n_flipped": res.n_flipped}
    assert res.feature_change is not None and res.feature_change.shape == (3,)
    torch.testing.assert_close(obj.theta, theta_before, rtol=0, atol=0)
    for k, v in obj.model.state_dict().items():  # the caller's model is never written to
        torch.testing.assert_close(v, params_before[k], rtol=0, atol=0)
    torch.testing.assert_close(train[0], x_before, rtol=0, atol=0)
    d_json = res.to_dict()
    assert d_json["indices"] == order[:3].tolist() and d_json["iterations"] == 5


def test_early_stop_when_the_prediction_flips() -> None:
    obj, train, test = _problem()
    pred = (obj.model(test[0]) > 0).long()
    t = int(torch.nonzero(pred == test[1])[0, 0])
    target = (test[0][t : t + 1], test[1][t : t + 1])
    # a generous box, so that a flip is reachable
    atk = TrainingSetAttack(obj, train, AttackConfig(step=0.05, box=PixelBox(1.0)))
    order, _ = atk.rank(target)
    k, results = atk.run_schedule(target, order, iterations=60)
    assert k is not None, "a +-1 box on 8x8 images should flip a random test point"
    last = results[-1]
    assert last.success and bool(last.flipped[0]) and last.iterations < 60
    assert len(last.history) == last.iterations and last.history[-1]["n_flipped"] == 1
    assert float(last.prob_true_after[0]) < 0.5 <= float(last.prob_true_before[0])
    assert all(not r.success for r in results[:-1])
    # the flip is real: the refit model on the poisoned data mispredicts the target
    x_p = train[0].clone()
    x_p[last.indices] = last.x_poisoned
    model = FeatureModel(obj.model.features, LogisticRegression(6, 1, dtype=DT))
    with torch.no_grad():
        model.top.linear.weight.copy_(last.theta.reshape(1, -1))
    assert int(model(target[0]) > 0) != int(target[1][0])


def test_default_solves_equal_plain_cg() -> None:
    """The default (CG preconditioned by the clean exact inverse) against plain CG to 1e-13:
    same ranking, same steps, same refitted theta."""
    obj, train, test = _problem()
    target = (test[0][:3], test[1][:3])
    cfg = AttackConfig(step=0.3 * eight_bit_level(), box=PixelBox(0.05))
    fast = TrainingSetAttack(obj, train, cfg)
    generic = TrainingSetAttack(
        obj, train, AttackConfig(**{**cfg.__dict__, "solver": CG(tol=1e-13)})
    )
    assert fast.describe()["retrain"] == "newton" and generic.describe()["query_solver"] == "cg"
    o1, l1 = fast.rank(target)
    o2, l2_ = generic.rank(target)
    assert o1.tolist() == o2.tolist()
    torch.testing.assert_close(l1, l2_, rtol=1e-6, atol=0)
    r1 = fast.run(target, o1[:2], iterations=4, early_stop=False)
    r2 = generic.run(target, o1[:2], iterations=4, early_stop=False)
    torch.testing.assert_close(r1.x_poisoned, r2.x_poisoned, rtol=0, atol=1e-12)
    torch.testing.assert_close(r1.theta, r2.theta, rtol=1e-7, atol=1e-9)
    assert fast.stats["chord_steps"] > 0  # the cheap chord steps did most of the refitting


def test_whole_model_path_equals_feature_path() -> None:
    """A plain nn.Sequential (no FeatureModel): every refit on the full model, same result."""
    obj, train, test = _problem(n=24)
    target = (test[0][:1], test[1][:1])
    seq = nn.Sequential(obj.model.features, obj.model.top)
    obj_seq = Objective(seq, "binary_logistic", l2=L2, params="1.")
    fast = TrainingSetAttack(obj, train, AttackConfig(step=0.3 * eight_bit_level()))
    slow = TrainingSetAttack(obj_seq, train, AttackConfig(step=0.3 * eight_bit_level(), tol=1e-11))
    assert not slow.fast
    o1, l1 = fast.rank(target)
    o2, l2_ = slow.rank(target)
    assert o1.tolist() == o2.tolist()
    torch.testing.assert_close(l1, l2_, rtol=1e-6, atol=0)
    r1 = fast.run(target, o1[:1], iterations=2, early_stop=False)
    r2 = slow.run(target, o1[:1], iterations=2, early_stop=False)
    torch.testing.assert_close(r1.x_poisoned, r2.x_poisoned, rtol=0, atol=1e-12)
    torch.testing.assert_close(r1.theta, r2.theta, rtol=1e-6, atol=1e-8)


def test_rank_each_jacobian_equals_per_target_ranking() -> None:
    obj, train, test = _problem(n=30)
    atk = TrainingSetAttack(obj, train)
    targets = (test[0][:4], test[1][:4])
    i1, v1 = atk.rank_each(targets, top=5, strategy="jacobian")
    i2, v2 = atk.rank_each(targets, top=5, strategy="per_target")
    assert i1.tolist() == i2.tolist()
    torch.testing.assert_close(v1, v2.double(), rtol=1e-8, atol=0)
    o, l1 = atk.rank((test[0][2:3], test[1][2:3]))
    assert i1[2].tolist() == o[:5].tolist()


def test_input_errors() -> None:
    obj, train, test = _problem(n=12)
    atk = TrainingSetAttack(obj, train)
    target = (test[0][:1], test[1][:1])
    with pytest.raises(InputError, match="empty"):
        atk.run(target, [])
    with pytest.raises(InputError, match="repeats"):
        atk.run(target, [1, 1])
    with pytest.raises(InputError, match="lie in"):
        atk.run(target, [99])
    with pytest.raises(InputError, match="floating point"):
        TrainingSetAttack(obj, (torch.zeros(12, 3, 8, 8, dtype=torch.uint8), train[1]))
    with pytest.raises(InputError, match="retrain"):
        TrainingSetAttack(obj, train, AttackConfig(retrain="sgd"))
    with pytest.raises(InputError, match="damping"):
        AttackConfig(damping=-1.0)
    with pytest.raises(InputError, match="step"):
        AttackConfig(step=0.0)
    with pytest.raises(InputError, match="AttackConfig, got Objective and dict"):
        TrainingSetAttack(obj, train, {"step": 0.1})
    with pytest.raises(InputError, match="at least one target"):
        atk.run_many((test[0][:0], test[1][:0]), torch.zeros(0, 1, dtype=torch.long))
    with pytest.raises(InputError, match="non-empty"):
        atk.run((test[0][:0], test[1][:0]), [1])


def test_run_many_equals_one_run_per_target() -> None:
    """The batched attacks (one matrix product for all of them, poisoned rows corrected per
    attack) are the per-target attacks: same steps, same early stops, same refits."""
    obj, train, test = _problem(n=40, m=6)
    atk = TrainingSetAttack(obj, train, AttackConfig(step=0.05, box=PixelBox(0.4)))
    targets = (test[0], test[1])
    ranked, _ = atk.rank_each(targets, top=3, strategy="per_target")
    for k in (1, 3):
        many = atk.run_many(targets, ranked[:, :k], iterations=25)
        assert len(many) == 6
        for t, res in enumerate(many):
            one = atk.run((test[0][t : t + 1], test[1][t : t + 1]), ranked[t, :k], iterations=25)
            assert (res.iterations, res.success) == (one.iterations, one.success)
            assert res.indices.tolist() == ranked[t, :k].tolist()
            torch.testing.assert_close(res.x_poisoned, one.x_poisoned, rtol=0, atol=1e-12)
            torch.testing.assert_close(res.theta, one.theta, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(res.feature_change, one.feature_change)
            assert res.target_loss_after == pytest.approx(one.target_loss_after, rel=1e-8)
            assert [h["n_flipped"] for h in res.history] == [h["n_flipped"] for h in one.history]
    # some attacks stop early and some run to the end, so the masking is exercised
    assert {r.iterations for r in many} != {25}
    # the exact solver (a fresh factorisation per step) and L-BFGS refits: the same attacks
    exact = TrainingSetAttack(
        obj,
        train,
        AttackConfig(step=0.05, box=PixelBox(0.4), solver="exact", retrain="lbfgs", tol=1e-12),
    )
    few = (targets[0][:2], targets[1][:2])
    for res, ref in zip(exact.run_many(few, ranked[:2, :k], iterations=25), many[:2]):
        assert (res.iterations, res.success) == (ref.iterations, ref.success)
        torch.testing.assert_close(res.x_poisoned, ref.x_poisoned, rtol=0, atol=1e-12)
        torch.testing.assert_close(res.theta, ref.theta, rtol=1e-7, atol=1e-9)
    with pytest.raises(InputError, match="one row per target"):
        atk.run_many(targets, ranked[:3, :1])
    with pytest.raises(InputError, match="repeats"):
        atk.run_many(targets, torch.zeros(6, 2, dtype=torch.long))


def test_run_many_with_another_solver_equals_run() -> None:
    """A caller's solver answers each attack's query on its own; the refits of all attacks
    run together (other matrix shapes, so equal to the refit tolerance, not to the bit)."""
    obj, train, test = _problem(n=24, m=2)
    generic = TrainingSetAttack(
        obj, train, AttackConfig(step=0.05, box=PixelBox(0.2), solver=CG(tol=1e-13))
    )
    ranked, _ = generic.rank_each((test[0], test[1]), top=2, strategy="per_target")
    many = generic.run_many((test[0], test[1]), ranked, iterations=3, early_stop=False)
    for t, res in enumerate(many):
        one = generic.run((test[0][t : t + 1], test[1][t : t + 1]), ranked[t], 3, False)
        torch.testing.assert_close(res.x_poisoned, one.x_poisoned, rtol=0, atol=1e-12)
        torch.testing.assert_close(res.theta, one.theta, rtol=1e-8, atol=1e-10)
