"""`inflens reproduce fig6 --quick` and the exact Newton fitter it uses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from inflens import Objective
from inflens.experiments import fig6
from inflens.experiments._logistic import LogisticProblem
from inflens.models import LogisticRegression
from inflens.train import fit_lbfgs, loo_weights


@pytest.mark.parametrize("explicit", [True, False])
def test_newton_matches_fit_lbfgs(explicit: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(0.5 * torch.ones(120, 30, dtype=torch.float64), generator=g)
    y = (x[:, :5].sum(1) > x[:, 5:10].sum(1)).long()
    y[:12] = 1 - y[:12]  # some label noise: not separable
    l2 = 1e-3
    obj = Objective(LogisticRegression(30, 1, dtype=torch.float64), "binary_logistic", l2=l2)
    ref = fit_lbfgs(obj, (x, y), tol=1e-12, max_iter=20000, on_fail="ignore").theta
    problem = LogisticProblem(sp.csr_matrix(x.numpy()), l2, explicit_hessian=explicit)
    theta, info = problem.fit(y.numpy(), tol=1e-11)
    assert info.converged and info.grad_norm <= 1e-11
    # both minimise the same strongly convex risk: ||theta - ref|| <= (|g| + |g_ref|) / l2
    np.testing.assert_allclose(theta, ref.numpy(), atol=1e-6)
    # the gradient norm agrees with autograd through the Objective
    th = torch.from_numpy(theta).requires_grad_(True)
    (gr,) = torch.autograd.grad(obj.risk(th, x, y), th)
    assert float(gr.norm()) == pytest.approx(problem.grad_norm(theta, y.numpy()), abs=1e-12)
    # weighted (leave-one-out) fits agree too
    w = loo_weights(120, 7)
    ref_w = fit_lbfgs(obj, (x, y), weights=w, tol=1e-12, max_iter=20000, on_fail="ignore").theta
    theta_w, _ = problem.fit(y.numpy(), theta0=theta, weights=w.numpy(), tol=1e-11)
    np.testing.assert_allclose(theta_w, ref_w.numpy(), atol=1e-6)


def test_fig6_quick(shared_data: Path, tmp_path: Path) -> None:
    if not (shared_data / "enron1").is_dir():
        pytest.skip("enron1 is not in the shared data")
    m = fig6.run(shared_data, tmp_path, quick=True, progress=False)
    assert (tmp_path / "fig6.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["experiment"] == "fig6" and saved["repeats"] == 2
    assert m["n_train"] == 1000 and m["n_test"] == 1035
    assert m["n_flipped"] == 100 and m["check_counts"] == [50, 100, 150, 200, 250, 300]
    # the two exact forms of x^T H^-1 x agree; every refit converged
    assert m["primal_vs_dual_max_rel_diff"] < 1e-8
    assert m["max_refit_grad_norm"] <= 1e-9
    s = m["summary"]
    assert s["fraction_checked"][1:] == pytest.approx([c / 1000 for c in m["check_counts"]])
    for name, st in s["methods"].items():
        fixed = np.array(st["fraction_fixed"])
        assert fixed[0] == 0 and (np.diff(fixed) >= 0).all() and fixed[-1] <= 1
        assert all(0.5 < a <= 1 for a in st["accuracy"]), name
    # flipping 10% of the labels hurts; any method's first checks find more than chance
    assert m["clean_accuracy"] > m["flipped_accuracy_mean"]
    random_fixed = np.array(s["methods"]["random"]["fraction_fixed"][1:])
    infl_fixed = np.array(s["methods"]["influence"]["fraction_fixed"][1:])
    assert (infl_fixed > random_fixed).all()
    # The paper's ordering, per repeat (paired: same flips, same model), so the seed-to-seed
    # spread cannot hide a reversal. Measured on this quick run (`inflens reproduce all --quick
    # --only fig6`, commit 1f09087), flips fixed out of 100 at 5%..30% checked:
    #   repeat 0: influence 27 41 60 69 77 81, loss 20 35 46 61 68 73, random 3 7 11 18 21 24
    #   repeat 1: influence 27 49 62 71 76 83, loss 21 32 49 61 69 78, random 6 9 14 16 20 25
    # smallest margins: influence - loss 5 flips, loss - random 14 flips.
    raw = m["raw"]
    fixed = {k: np.array(raw[k]["fixed"]) for k in ("influence", "loss", "random")}
    assert (fixed["influence"] > fixed["loss"]).all()
    assert (fixed["loss"] > fixed["random"]).all()
    # Test accuracy: both informed methods beat random in every repeat (smallest margin 0.0106,
    # loss at 5% in repeat 1). Influence > loss holds for the mean over the 2 repeats at every
    # fraction (by 0.0087 0.0116 0.0135 0.0077 0.0034 0.0053) but not in every repeat: at 20%
    # checked, repeat 0 has influence 0.9343 against loss 0.9353, a reversal smaller than the
    # repeat-to-repeat spread (standard errors 0.0014 and 0.0048). So for accuracy only the mean
    # ordering is asserted; the per-repeat ordering is asserted on the flips fixed above.
    acc = {k: np.array(raw[k]["accuracy"]) for k in ("influence", "loss", "random")}
    assert (acc["influence"] > acc["random"]).all() and (acc["loss"] > acc["random"]).all()
    assert (acc["influence"].mean(0) > acc["loss"].mean(0)).all()


def _part(path: Path, seeds: list[int], offset: float) -> None:
    """A fake fig6 metrics.json with recognisable per-repeat values (value = seed + offset)."""
    r = len(seeds)
    vals = [[s + offset] * 6 for s in seeds]
    raw = {
        "flipped_accuracy": [0.5] * r,
        "flipped_test_loss": [1.0] * r,
        **{
            m: {"accuracy": vals, "test_loss": vals, "fixed": [[1] * 6] * r}
            for m in ("influence", "influence_sigma1", "loss", "random")
        },
    }
    path.mkdir()
    (path / "metrics.json").write_text(
        json.dumps(
            {
                "n_train": 100,
                "n_flipped": 10,
                "check_counts": [5, 10, 15, 20, 25, 30],
                "vocabulary_size": 7,
                "clean_accuracy": 0.9,
                "clean_test_loss": 0.2,
                "repeats": r,
                "seeds": seeds,
                "raw": raw,
                "refits": 3,
                "max_refit_grad_norm": 1e-10,
                "primal_vs_dual_max_rel_diff": 1e-12,
                "seconds": 1.0,
            }
        )
    )


def test_merge_takes_each_seed_once(tmp_path: Path) -> None:
    _part(tmp_path / "a", [120, 122, 124], 0.0)
    _part(tmp_path / "b", [124, 126], 1000.0)  # seed 124 is in both: the first part wins
    m = fig6.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert m["repeats"] == 4 and m["seeds"] == [120, 122, 124, 126]
    assert [row[0] for row in m["raw"]["loss"]["accuracy"]] == [120, 122, 124, 1126]
    assert m["summary"]["methods"]["loss"]["fraction_fixed"][1] == pytest.approx(0.1)
    assert (tmp_path / "out" / "fig6.png").is_file()
