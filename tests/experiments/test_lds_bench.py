"""The LDS benchmark's batched trainers against one-model-at-a-time references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inflens import Influence, Objective
from inflens.errors import InputError
from inflens.evaluation import ObjectiveRetrain, subset_masks
from inflens.experiments import lds_bench as lb
from inflens.solvers import Exact
from inflens.train import fit_newton

L2 = 0.05


def _softmax_problem(n=60, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    xt = torch.randn(7, d, generator=g, dtype=torch.float64)
    yt = torch.randint(0, c, (7,), generator=g)
    model = nn.Linear(d, c, bias=False).double()
    obj = Objective(model, "cross_entropy", l2=L2)
    theta, info = fit_newton(obj, (x, y), tol=1e-12)
    assert info.converged
    obj.load_into_model(theta)
    return Objective(model, "cross_entropy", l2=L2), (x, y), (xt, yt)


def test_batched_softmax_refit_equals_the_per_subset_objective_refit() -> None:
    obj, train, test = _softmax_problem()
    pre = Influence(obj, train, solver=Exact(method="cholesky"), progress=False).fit()
    refit = lb.SoftmaxRefit(*train, *test, obj.theta, L2, pre.solver.solve, tol=1e-10)
    keeps = subset_masks(60, 0.5, 5)
    got = refit(keeps, torch.zeros(5, dtype=torch.long))
    one = ObjectiveRetrain(obj, train, test, method="newton", tol=1e-10)
    want = torch.stack([one(k) for k in keeps])
    # both stop at ||grad|| <= 1e-10 of an l2-strongly-convex risk: ||theta - theta*|| <=
    # 1e-10 / l2 each, and a test loss moves by at most ||x|| sqrt(2) times that
    bound = 2 * 1e-10 / L2 * float(test[0].norm(dim=1).max()) * 2**0.5
    assert got.shape == (5, 7)
    assert float((got - want).abs().max()) <= bound
    assert max(refit.last.grad_norms) <= 1e-10 and refit.last.cg_iterations > 0
    # the subsets really differ: the refit is not returning theta-hat's losses
    assert float((want - want.mean(0)).abs().max()) > 1e-3
    with pytest.raises(InputError, match="keeps must be"):
        refit(torch.ones(2, 59, dtype=torch.bool))


def test_stacked_mlp_training_equals_training_each_model_alone() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 784, generator=g)
    y = torch.randint(0, 10, (120,), generator=g)
    keeps = subset_masks(120, 0.5, 3)
    cfg = lb.MLPTrainConfig(epochs=2, batch_size=16)
    together, ckpts = lb.train_mlps(x, y, keeps, [5, 6, 7], cfg, checkpoint_epochs=(1,))
    alone, _ = lb.train_mlps(x, y, keeps[1:2], [6], cfg)
    assert len(ckpts) == 1 and ckpts[0]["fc1.weight"].shape == (3, 128, 784)
    for k, v in together.items():
        # float32 products of a different batch shape may round differently
        torch.testing.assert_close(v[1], alone[k][0], atol=1e-5, rtol=1e-5)
    # the models differ (seeds and subsets), and training moved them from the initialisation
    assert not torch.allclose(together["fc3.weight"][0], together["fc3.weight"][1])
    init = lb._init_params([6], cfg.dropout)
    assert not torch.allclose(init["fc3.weight"][0], alone["fc3.weight"][0])
    # model k is MnistMLP built after manual_seed(seeds[k]), so its forward pass is the same
    net = lb.MnistMLP().eval()
    net.load_state_dict({k: v[0] for k, v in alone.items()})
    retrain = lb.MLPRetrain(x, y, x[:9], y[:9], cfg)
    losses = retrain(keeps[1:2], torch.tensor([6]))
    want = nn.functional.cross_entropy(net(x[:9]), y[:9], reduction="none")
    torch.testing.assert_close(losses[0], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="same number of points"):
        lb.train_mlps(x, y, torch.stack([keeps[0], torch.ones(120, dtype=torch.bool)]), [0, 1])


def test_benchmark_configs_know_each_benchmarks_methods(tmp_path, capsys) -> None:
    assert lb.BenchmarkConfig("lds-mnist-mlp", methods=("trak", "kfac")).methods
    with pytest.raises(InputError, match="unknown methods"):
        lb.BenchmarkConfig("lds-mnist-mlp", methods=("exact",))
    with pytest.raises(InputError, match="unknown methods"):
        lb.BenchmarkConfig("lds-mnist-lr", methods=("trak",))
    from inflens.cli import main

    args = ["benchmark", "lds-mnist-mlp", "--data-dir", str(tmp_path / "none"), "--quiet"]
    assert main(args + ["--out", str(tmp_path / "o")]) == 0
    assert "skipped: MNIST is not available" in capsys.readouterr().err


def test_tolerance_check_counts_the_pairs_a_refit_error_could_swap() -> None:
    # eps_t = sqrt(2) ||x_t|| tol / l2 = sqrt(2) * 1 * 1e-4 / 0.01 = 0.01414
    outputs = torch.tensor([[0.0, 0.0], [0.02, 0.5], [0.05, 1.0], [0.3, 1.5]], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    chk = lb.tolerance_check(outputs, x, 1e-4)
    assert chk["loss_error_bound"] == pytest.approx(2**0.5 * 1e-2)
    # test point 0: gaps 0.02 (< 0.0283), 0.03, 0.25; test point 1: none
    assert (chk["adjacent_pairs"], chk["pairs_within_bound"]) == (6, 1)
    assert chk["mean_lds_change_bound"] == pytest.approx(12 / 15 / 2)
    assert chk["median_smallest_gap"] == pytest.approx((0.02 + 0.5) / 2)
