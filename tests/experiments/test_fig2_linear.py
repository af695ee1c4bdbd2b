"""Fig. 2 (left/middle) reproduction: its closed forms against autograd, and the quick run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

from inflens.experiments import fig2_linear as f2

DT = torch.float64


def _problem(n: int = 40, d: int = 5, c: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    w = 0.5 * torch.randn(c, d, generator=g, dtype=DT)
    return x, y, w


def _risk(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Mean cross-entropy of logits x W^T plus (l2/2)||W||^2, written out directly."""
    logp = torch.log_softmax(x @ w.T, dim=1)
    return -logp.gather(1, y[:, None])[:, 0].mean() + 0.5 * l2 * (w * w).sum()


def test_multinomial_hessian_equals_autograd_hessian():
    x, y, w = _problem()
    l2 = 0.01
    c, d = w.shape
    ref = hessian(lambda v: _risk(v.view(c, d), x, y, l2))(w.reshape(-1))
    got = f2.multinomial_hessian(x, w, l2)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-14)


def test_risk_gradients_full_and_leave_one_out():
    x, y, w = _problem()
    l2 = 0.01
    y1h = F.one_hot(y, w.shape[0]).to(DT)
    ws = torch.stack([w, 2 * w, -w])
    drop = torch.tensor([0, 7, 39])
    got = f2.risk_gradients(x, y1h, ws, drop, l2)
    full = f2.risk_gradients(x, y1h, ws, None, l2)
    keep_all = torch.ones(len(y), dtype=torch.bool)
    for k in range(3):
        wk = ws[k].clone().requires_grad_(True)
        (ref_full,) = torch.autograd.grad(_risk(wk, x, y, l2), wk)
        keep = keep_all.clone()
        keep[drop[k]] = False
        (ref_loo,) = torch.autograd.grad(_risk(wk, x[keep], y[keep], l2), wk)
        assert torch.allclose(full[k], ref_full, atol=1e-14)
        assert torch.allclose(got[k], ref_loo, atol=1e-14)


def test_loo_refits_reach_the_leave_one_out_optimum():
    """Chord-Newton refits agree with an independent Newton solve on the n-1 points."""
    x, y, w0 = _problem(n=60, d=4, c=3, seed=1)
    l2 = 0.01
    c, d = w0.shape
    y1h = F.one_hot(y, c).to(DT)
    w = w0.clone()
    for _ in range(12):  # full-data optimum by Newton's method with the autograd Hessian
        flat = w.reshape(-1).requires_grad_(True)
        (g,) = torch.autograd.grad(_risk(flat.view(c, d), x, y, l2), flat)
        h = hessian(lambda v: _risk(v.view(c, d), x, y, l2))(w.reshape(-1))
        w = (w.reshape(-1) - torch.linalg.solve(h, g)).view(c, d).detach()
    chol = torch.linalg.cholesky(f2.multinomial_hessian(x, w, l2))
    settings = f2.Settings(n_train=None, k=3, lissa_depth=1, lissa_repeats=1, refit_batch=2)
    idx = np.array([3, 10, 59])
    x_t, y_t = x[:1] + 0.1, y[:1]
    res = f2.loo_refits(x, y1h, w, idx, chol, (x_t, y_t), settings, progress=False)
    base = float(F.cross_entropy(x_t @ w.T, y_t))
    assert res["grad_norm"].max() <= settings.refit_tol
    for j, i in enumerate(idx):
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[i] = False
        wi = w.clone()
        for _ in range(12):
            flat = wi.reshape(-1).requires_grad_(True)
            (g,) = torch.autograd.grad(_risk(flat.view(c, d), x[keep], y[keep], l2), flat)
            h = hessian(lambda v, keep=keep: _risk(v.view(c, d), x[keep], y[keep], l2))(
                wi.reshape(-1)
            )
            wi = (wi.reshape(-1) - torch.linalg.solve(h, g)).view(c, d).detach()
        ref_loss = float(F.cross_entropy(x_t @ wi.T, y_t))
        # ||grad|| <= 1e-11 and l2 = 0.01 bound the parameter error by 1e-9
        assert res["test_loss"][j] == pytest.approx(ref_loss, abs=1e-8)
        assert abs(ref_loss - base) > 1e-4  # the effect measured is far larger


def test_agreement_statistics():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    st = f2.agreement(a, 2 * a + 1)
    assert st["pearson"] == pytest.approx(1.0)
    assert st["slope"] == pytest.approx(2.0)
    assert st["intercept"] == pytest.approx(1.0)


@pytest.mark.realdata
@pytest.mark.filterwarnings("ignore:LiSSA is far from converged")  # quick: depth 300 only
def test_quick_run_on_mnist(shared_data: Path, tmp_path: Path):
    if not (shared_data / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not available in {shared_data / 'mnist'}")
    m = f2.run(shared_data, tmp_path, quick=True, progress=False)
    assert (tmp_path / "fig2_linear.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["agreement"]["cg"]["pearson"] == pytest.approx(m["agreement"]["cg"]["pearson"])
    assert m["n_train"] == f2.QUICK.n_train and m["p"] == 7840
    # the closed-form Hessian is the library's Hessian; CG solves the system it should
    assert m["hessian_vs_library_hvp_rel_error"] < 1e-10
    assert m["cg"]["rel_error_s_test_vs_direct"] < 1e-6
    assert m["fit"]["grad_norm"] < 1e-10
    # the refits are exact to far below the size of the effects they measure
    assert m["refits"]["max_grad_norm"] <= f2.QUICK.refit_tol
    assert m["refits"]["max_test_loss_error_estimate"] < 1e-3 * m["refits"]["min_abs_actual"]
    assert len(m["loo"]["actual"]) == f2.QUICK.k
    # influence predicts leave-one-out retraining (R is ~0.99 even on this small subsample)
    assert m["agreement"]["cg"]["pearson"] > 0.95
    assert m["agreement"]["lissa"]["pearson"] > 0.8
