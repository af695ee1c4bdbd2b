"""Side-by-side benchmark of inflens and its peers on three tasks (digits, MNIST, the paper's CNN).

Run from the repository root with the peers' virtualenv (``bash benchmarks/peers/run.sh``):

    python benchmarks/peers/run.py [--task a|b|c] [--out DIR] [--repeats 3] [--methods ...]

Task (a) is described below; tasks (b) and (c) use the same methods and metrics:

- (b) MNIST, 10-class softmax regression without bias (p = 7,840), float64, on the paper's 55,000
  training points, l2 = 0.01 (as ``inflens.experiments.fig2_linear``); trained by L-BFGS (and
  chord-Newton polishing with the oracle's Hessian) to a gradient norm < 1e-10. Test points:
  MNIST test images 8 (test point 0, the one fig2-linear explains) and 0-7, 9. Oracle: the
  closed-form Hessian (torch, float64), Cholesky solve. Actual leave-one-out: exact refits by
  warm-started chord-Newton steps (full-data Hessian's Cholesky factor) to a gradient norm
  < 1e-10 for the top 100 oracle points of test point 0.
- (c) the paper's CNN (``inflens.models.PaperCNN``) on the 10 % MNIST subset (n = 5,500) at the
  theta-tilde of the fig2-cnn run (``runs/fig2-cnn/theta_tilde.safetensors``; theta = the 2,556
  weights, the biases are 0 and frozen and are removed from the model here, l2 = 0.001), in
  float64. Test points: MNIST test image 6558 (test point 0, the fig2-cnn one) and 0-8. Oracle:
  exact influence with the explicit damped Gauss-Newton matrix
  ``J^T Lambda J / n + (l2 + 0.01) I`` built here with torch.func (independently of every
  library). Actual leave-one-out: not retrained here (hours of CPU); the measured changes of
  the 120-step warm-started retraining of ``runs/fig2-cnn-r120/loo_checkpoint.json`` are reused
  (its 100 points are the top 100 of that run's inflens CG prediction). ``--cnn-theta`` takes
  theta-tilde from another file (``cnn_theta.py`` trains it again); without that run, or with
  another theta, the leave-one-out column stays empty and only the oracle is compared.

For every task "matched" sets a peer's damping/regularisation to ``l2 + damping`` (the peers'
losses carry no l2 term), "default" leaves the peer's defaults.

1. Setup (this process): 10-class softmax regression without bias on the 8x8 digits
   (p = 64 * 10 = 640), float64, trained by L-BFGS on mean cross-entropy + (l2/2)||theta||^2
   to a gradient norm < 1e-10. Test points: the first 10 of the held-out split.
2. Oracle ("exact influence"): the Hessian is formed in closed form with numpy, independently
   of every library, ``H = (1/n) sum_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T + l2 I``, and
   ``I_up,loss(z_i, z_test) = -g_test^T H^-1 (g_i + l2 theta)``.
3. Actual leave-one-out retraining: for test point 0, the 100 training points of largest
   |exact influence| are each removed and the model refit (L-BFGS, warm start, same tolerance);
   the actual change of the test loss is compared with each method's scores.
4. Each method runs in its own subprocess (``--worker``) so that its peak memory (max RSS
   minus the RSS after loading the task) is its own; time = median over ``--repeats`` runs of
   fit + scores of the 10 test points against every training point.

Peers' signs and scalings differ (several return ``+g_test^T H^-1 g_i``, helpful = positive);
each method's scores are multiplied by the sign that best aligns them with the oracle, and that
sign is reported. Pearson/Spearman are means over the 10 test points; top-50 overlap is
``|top50(|method|) & top50(|exact|)| / 50`` averaged over test points.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from kron_task import cross_entropy_task
from safetensors.torch import load_file, save_file
from scipy import stats
from torch import nn

from inflens.memory import peak_resident_mib

L2 = 1e-3  # task (a): on the mean loss; the model is trained with it and inflens uses it
N_TEST = 10
TOP = 50
LOO_K = 100

METHODS = [
    "inflens.exact",
    "inflens.cg",
    "inflens.lissa",
    "inflens.arnoldi",
    "pydvl.direct.default",
    "pydvl.direct.matched",
    "pydvl.cg.default",
    "pydvl.cg.matched",
    "pydvl.lissa.default",
    "pydvl.lissa.matched",
    "pydvl.arnoldi.matched",
    "captum.naive.default",
    "captum.naive.matched",
    "dattri.explicit.default",
    "dattri.explicit.matched",
    "dattri.cg.default",
    "dattri.cg.matched",
    "dattri.lissa.default",
    "dattri.lissa.matched",
    "kronfluence.ekfac.default",
    "kronfluence.ekfac.matched",
]
PEERS = METHODS[4:]

# per task: l2 (on the mean loss), damping (inflens; peers' "matched" = l2 + damping), batch size
# of the peers' data loaders (None: all n at once), inflens methods
TASKS: dict[str, dict] = {
    "a": {"name": "digits", "l2": L2, "damping": 0.0, "batch": None, "curvature": "hessian",
          "methods": METHODS, "out": "runs/bench_peers"},
    "b": {"name": "mnist-logreg", "l2": 0.01, "damping": 0.0, "batch": 5000,
          "curvature": "hessian",
          "methods": ["inflens.exact", "inflens.cg", "inflens.pcg", "inflens.pcg-tol1e-1",
                      "inflens.pcg-tol1e-4", "inflens.kfac", "inflens.ekfac", "inflens.lissa",
                      "inflens.arnoldi", *PEERS],
          "out": "runs/bench_peers_b"},
    "c": {"name": "mnist-cnn", "l2": 1e-3, "damping": 0.01, "batch": 1100, "curvature": "ggn",
          "methods": ["inflens.exact", "inflens.cg", "inflens.ekfac", "inflens.ekfac-sampled",
                      "inflens.lissa", "inflens.arnoldi", *PEERS],
          "out": "runs/bench_peers_c"},
}  # fmt: skip
# families whose cost does not fall with regularisation (forming the dense Hessian): when one
# variant times out without finishing a run, the other is not started
SAME_COST = {"pydvl.direct", "dattri.explicit", "captum.naive"}
TEST_B = [8, 0, 1, 2, 3, 4, 5, 6, 7, 9]  # MNIST test indices; 8 = fig2-linear's
TEST_C = [6558, 0, 1, 2, 3, 4, 5, 6, 7, 8]  # 6558 = fig2-cnn's
CNN_THETA = Path("runs/fig2-cnn/theta_tilde.safetensors")
CNN_LOO = Path("runs/fig2-cnn-r120")


# ---------------------------------------------------------------------------- task
def make_model(d: int = 64, c: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(d, c, bias=False)).double()


def build_task(out: Path) -> dict:
    from sklearn.datasets import load_digits

    from inflens import Objective

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n = 1500
    xtr, ytr, xte, yte = x[:n], y[:n], x[n : n + N_TEST], y[n : n + N_TEST]
    model = make_model()
    obj = Objective(model, "cross_entropy", l2=L2)
    theta = fit(obj, xtr, ytr, torch.zeros(obj.p, dtype=torch.float64))
    obj.load_into_model(theta)
    save_file(
        {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte, "theta": theta},
        str(out / "task.safetensors"),
    )
    return {"n": n, "p": obj.p, "l2": L2}


def fit(obj, x, y, theta0: torch.Tensor) -> torch.Tensor:
    """L-BFGS on mean CE + (l2/2)||theta||^2 to a gradient norm < 1e-10 (float64)."""
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1,
        max_iter=2000,
        tolerance_grad=1e-11,
        tolerance_change=0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        r = obj.risk(theta, x, y)
        r.backward()
        return r

    for _ in range(5):
        opt.step(closure)
        if theta.grad.norm() < 1e-10:
            break
    return theta.detach()


def oracle(t: dict) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form Hessian (numpy) -> exact I_up,loss [N_TEST, n] and per-example grads."""
    x, y, xte, yte = (t[k].numpy() for k in ("xtr", "ytr", "xte", "yte"))
    w = t["theta"].numpy().reshape(10, 64)  # row c: weights of class c (nn.Linear layout)
    n, d = x.shape

    def probs(a):
        z = a @ w.T
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def grads(a, lab):
        r = probs(a)
        r[np.arange(len(lab)), lab] -= 1.0
        return np.einsum("ic,id->icd", r, a).reshape(len(lab), -1)

    pr = probs(x)
    h = np.zeros((10, d, 10, d))
    for c in range(10):
        for c2 in range(10):
            a = pr[:, c] * ((c == c2) - pr[:, c2])
            h[c, :, c2, :] = (x * a[:, None]).T @ x / n
    h = h.reshape(10 * d, 10 * d) + L2 * np.eye(10 * d)
    gtr = grads(x, y) + L2 * w.reshape(-1)
    gte = grads(xte, yte)
    return -(np.linalg.solve(h, gte.T).T @ gtr.T), gtr


def leave_one_out(t: dict, exact: np.ndarray, out: Path) -> dict:
    from inflens import Objective

    model = make_model()
    obj = Objective(model, "cross_entropy", l2=L2)
    xtr, ytr, theta = t["xtr"], t["ytr"], t["theta"]
    xte, yte = t["xte"][:1], t["yte"][:1]
    base = float(obj.losses(theta, xte, yte)[0])
    idx = np.argsort(-np.abs(exact[0]))[:LOO_K]
    actual = []
    for i in idx:
        keep = torch.ones(len(ytr), dtype=torch.bool)
        keep[int(i)] = False
        th = fit(obj, xtr[keep], ytr[keep], theta)
        actual.append(float(obj.losses(th, xte, yte)[0]) - base)
    res = {"indices": idx.tolist(), "actual": actual}
    (out / "loo.json").write_text(json.dumps(res))
    return res


# ---------------------------------------------------------------------------- task (b)
def _mnist_split(data_dir: Path, dtype) -> dict:
    from inflens.datasets import load_mnist, mnist_paper_split

    return mnist_paper_split(load_mnist(data_dir, download=False), dtype=dtype)


def _chol_solve(chol: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``A^-1 rhs`` for rhs ``[K, p]`` with ``A = L L^T``."""
    return torch.cholesky_solve(rhs.T.contiguous(), chol).T


def softmax_hessian(x: torch.Tensor, w: torch.Tensor, l2: float) -> torch.Tensor:
    """Closed form ``(1/n) sum_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T + l2 I``, ``[Cd, Cd]``."""
    n, d = x.shape
    c = w.shape[0]
    pr = torch.softmax(x @ w.T, 1)
    h = torch.empty(c * d, c * d, dtype=x.dtype)
    for a in range(c):
        for b in range(a, c):
            coef = pr[:, a] * ((1.0 if a == b else 0.0) - pr[:, b])
            blk = x.T @ (x * coef[:, None]) / n
            h[a * d : (a + 1) * d, b * d : (b + 1) * d] = blk
            h[b * d : (b + 1) * d, a * d : (a + 1) * d] = blk.T
    h.diagonal().add_(l2)
    return h


def _softmax_grad(x, y1h, w, l2, drop=None):
    """Gradients ``[K, C, d]`` of the mean CE + (l2/2)||W||^2 for K models ``w [K, C, d]``,
    model k without training point ``drop[k]`` (or on all points)."""
    n, d = x.shape
    k, c, _ = w.shape
    r = torch.softmax((x @ w.reshape(k * c, d).T).view(n, k, c), 2) - y1h[:, None, :]
    g = (r.reshape(n, k * c).T @ x).view(k, c, d)
    if drop is None:
        return g / n + l2 * w
    g = g - r[drop, torch.arange(k)][:, :, None] * x[drop][:, None, :]
    return g / (n - 1) + l2 * w


def build_task_b(cfg: dict, out: Path, n_train: int | None, data_dir: Path) -> dict:
    from inflens import Objective

    split = _mnist_split(data_dir, np.float64)
    xtr = torch.from_numpy(split["x_train"][:n_train]).contiguous()
    ytr = torch.from_numpy(split["y_train"][:n_train]).long()
    xte = torch.from_numpy(split["x_test"][TEST_B]).contiguous()
    yte = torch.from_numpy(split["y_test"][TEST_B]).long()
    n, d = xtr.shape
    model = nn.Sequential(nn.Linear(d, 10, bias=False)).double()
    obj = Objective(model, "cross_entropy", l2=cfg["l2"])
    t0 = time.perf_counter()
    theta = fit(obj, xtr, ytr, torch.zeros(obj.p, dtype=torch.float64))
    y1h = nn.functional.one_hot(ytr, 10).double()
    w = theta.view(10, d)
    gn = float(_softmax_grad(xtr, y1h, w[None], cfg["l2"])[0].norm())
    print(f"[b] L-BFGS: ||grad|| = {gn:.2e} ({time.perf_counter() - t0:.0f} s)", flush=True)
    t0 = time.perf_counter()
    h = softmax_hessian(xtr, w, cfg["l2"])
    chol = torch.linalg.cholesky(h)
    polished = 0
    while gn > 1e-11 and polished < 20:  # chord-Newton polish with the Hessian's factor
        g = _softmax_grad(xtr, y1h, w[None], cfg["l2"])[0]
        w = w - _chol_solve(chol, g.reshape(1, -1)).view(10, d)
        gn = float(_softmax_grad(xtr, y1h, w[None], cfg["l2"])[0].norm())
        polished += 1
    if polished:
        h = softmax_hessian(xtr, w, cfg["l2"])  # at the polished theta
        chol = torch.linalg.cholesky(h)
    theta = w.reshape(-1).contiguous()
    print(f"[b] {polished} chord-Newton steps: ||grad|| = {gn:.2e}; Hessian + Cholesky "
          f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    save_file(
        {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte, "theta": theta},
        str(out / "task.safetensors"),
    )
    torch.save({"chol": chol}, out / "oracle_chol.pt")
    return {"n": n, "p": obj.p, "l2": cfg["l2"], "grad_norm": gn, "test_indices": TEST_B}


def oracle_b(t: dict, l2: float, out: Path) -> np.ndarray:
    """Exact I_up,loss [N_TEST, n] with the closed-form Hessian (its Cholesky factor)."""
    chol = torch.load(out / "oracle_chol.pt")["chol"]
    x, y, xte, yte = t["xtr"], t["ytr"], t["xte"], t["yte"]
    n, d = x.shape
    w = t["theta"].view(10, d)
    r = torch.softmax(x @ w.T, 1) - nn.functional.one_hot(y, 10).double()  # [n, C]
    rt = torch.softmax(xte @ w.T, 1) - nn.functional.one_hot(yte, 10).double()
    gte = (rt[:, :, None] * xte[:, None, :]).reshape(len(yte), -1)
    s = _chol_solve(chol, gte).view(len(yte), 10, d)  # H^-1 g_test
    xs = (x @ s.reshape(-1, d).T).view(n, len(yte), 10)  # x_i . s_jc
    dots = torch.einsum("nc,njc->jn", r, xs) + l2 * (s * w).sum((1, 2))[:, None]
    return -dots.numpy()


def leave_one_out_b(t: dict, exact: np.ndarray, l2: float, out: Path, batch: int = 20) -> dict:
    """Exact refits without each of the top-100 points: warm-started chord-Newton steps."""
    chol = torch.load(out / "oracle_chol.pt")["chol"]
    x, y, xte, yte = t["xtr"], t["ytr"], t["xte"][:1], t["yte"][:1]
    n, d = x.shape
    y1h = nn.functional.one_hot(y, 10).double()
    w_hat = t["theta"].view(10, d)

    def test_loss(ws):
        return nn.functional.cross_entropy(ws @ xte[0], yte.expand(len(ws)), reduction="none")

    base = float(test_loss(w_hat[None])[0])
    idx = np.argsort(-np.abs(exact[0]))[:LOO_K]
    actual, steps, gnorms = [], [], []
    for s0 in range(0, len(idx), batch):
        drop = torch.as_tensor(idx[s0 : s0 + batch], dtype=torch.long)
        ws = w_hat.expand(len(drop), 10, d).clone()
        nsteps = 0
        while True:
            g = _softmax_grad(x, y1h, ws, l2, drop)
            gn = g.reshape(len(drop), -1).norm(dim=1)
            if float(gn.max()) <= 1e-10 or nsteps == 100:
                break
            ws -= _chol_solve(chol, g.reshape(len(drop), -1)).view(-1, 10, d)
            nsteps += 1
        actual += (test_loss(ws) - base).tolist()
        steps.append(nsteps)
        gnorms.append(float(gn.max()))
    res = {"indices": idx.tolist(), "actual": actual, "max_grad_norm": max(gnorms),
           "max_steps": max(steps)}  # fmt: skip
    (out / "loo.json").write_text(json.dumps(res))
    return res


# ---------------------------------------------------------------------------- task (c)
def cnn_model(theta: torch.Tensor) -> nn.Module:
    """PaperCNN (float64) with theta = its 2,556 weights; the biases (0, frozen) are removed."""
    from inflens import Objective
    from inflens.models import PaperCNN

    model = PaperCNN(seed=0, dtype=torch.float64)
    Objective(model, "cross_entropy", l2=0.0, params=model.weight_names).load_into_model(
        theta.double()
    )
    for mod in [*model.convs.values(), model.dense]:
        assert float(mod.bias.detach().abs().max()) == 0.0
        mod.bias = None
    return model


def build_task_c(cfg: dict, out: Path, n_train: int | None, data_dir: Path) -> dict:
    from safetensors import safe_open

    from inflens import Objective
    from inflens.datasets import small_subset

    split = _mnist_split(data_dir, np.float32)
    small = small_subset(split, fraction=0.1, seed=0)
    xtr = torch.from_numpy(small["x_train"][:n_train]).double().contiguous()
    ytr = torch.from_numpy(small["y_train"][:n_train]).long()
    xte = torch.from_numpy(split["x_test"][TEST_C]).double().contiguous()
    yte = torch.from_numpy(split["y_test"][TEST_C]).long()
    theta_path = Path(cfg.get("cnn_theta") or CNN_THETA)
    with safe_open(str(theta_path), framework="pt") as f:
        theta = f.get_tensor("theta").double()
    model = cnn_model(theta)
    obj = Objective(model, "cross_entropy", l2=cfg["l2"])
    assert torch.equal(obj.theta, theta)
    with torch.no_grad():
        loss0 = float(obj.losses(theta, xte[:1], yte[:1])[0])
    save_file(
        {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte, "theta": theta},
        str(out / "task.safetensors"),
    )
    return {"n": len(ytr), "p": obj.p, "l2": cfg["l2"], "damping": cfg["damping"],
            "test_indices": TEST_C, "test_loss_0": loss0, "theta_from": str(theta_path)}  # fmt: skip


def oracle_c(t: dict, l2: float, damping: float, chunk: int = 100) -> np.ndarray:
    """Exact influence with the explicit damped Gauss-Newton matrix (torch.func, float64):
    ``A = (1/n) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i + (l2 + damping) I``,
    ``I = -g_test^T A^-1 (g_i + l2 theta)`` with ``g_i = J_i^T (p_i - e_{y_i})``."""
    from torch.func import functional_call, jacrev, vmap

    model = cnn_model(t["theta"])
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)

    def logits(pr, xi):
        return functional_call(model, pr, (xi[None],))[0]

    jac = vmap(jacrev(logits), in_dims=(None, 0))

    def pieces(x, y):
        j = jac(params, x)
        j = torch.cat([j[k].reshape(len(x), 10, -1) for k in names], 2)  # [B, C, p]
        with torch.no_grad():
            pr = torch.softmax(functional_call(model, params, (x,)), 1)
        g = torch.einsum("bc,bcp->bp", pr - nn.functional.one_hot(y, 10).double(), j)
        return j, pr, g

    x, y = t["xtr"], t["ytr"]
    n = len(y)
    p = sum(v.numel() for v in params.values())
    a = torch.zeros(p, p, dtype=torch.float64)
    gtr = torch.empty(n, p, dtype=torch.float64)
    for s in range(0, n, chunk):
        j, pr, g = pieces(x[s : s + chunk], y[s : s + chunk])
        m = pr.sqrt()[:, :, None] * (j - torch.einsum("bc,bcp->bp", pr, j)[:, None, :])
        m = m.reshape(-1, p)
        a += m.T @ m  # sum of J^T (diag(p) - p p^T) J
        gtr[s : s + chunk] = g
    a /= n
    a.diagonal().add_(l2 + damping)
    _, _, gte = pieces(t["xte"], t["yte"])
    chol = torch.linalg.cholesky(a)
    s_test = _chol_solve(chol, gte)
    return -(s_test @ (gtr + l2 * t["theta"]).T).numpy()


def leave_one_out_c(n: int, theta_path: str | None = None) -> dict | None:
    """The measured actual changes of the fig2-cnn 120-step run (reused, not retrained), or
    None where they do not apply: another theta-tilde (``--cnn-theta``) or no such run here."""
    if (theta_path and Path(theta_path) != CNN_THETA) or not CNN_LOO.is_dir():
        print(f"[c] no leave-one-out actuals: {CNN_LOO} is missing or theta-tilde is "
              f"{theta_path}; only the exact damped Gauss-Newton oracle", flush=True)  # fmt: skip
        return None
    ck = json.loads((CNN_LOO / "loo_checkpoint.json").read_text())
    met = json.loads((CNN_LOO / "metrics.json").read_text())
    if ck["config"]["n"] != n:
        return None  # a subset (smoke test): those retrains do not apply
    idx = ck["config"]["indices"]
    base = met["test_loss"]  # test loss at theta-tilde (the paper's definition of actual)
    actual = [ck["done"][str(i)]["value"] - base for i in idx]
    pred = dict(zip(met["loo"]["indices"], met["loo"]["predicted"]))
    return {"indices": idx, "actual": actual, "from": str(CNN_LOO), "steps": ck["config"]["steps"],
            "predicted_there": [pred[i] for i in idx],
            "theta_hat_sha256": ck["config"]["theta_hat_sha256"],
            "inflens_pearson_there": met["pearson_vs_theta_tilde"]}  # fmt: skip


# ---------------------------------------------------------------------------- methods
def _loaded_model(t: dict, cfg: dict) -> nn.Module:
    from inflens import Objective

    if cfg["task"] == "c":
        return cnn_model(t["theta"])
    model = make_model(d=t["xtr"].shape[1])
    Objective(model, "cross_entropy", l2=cfg["l2"]).load_into_model(t["theta"])
    return model


def inflens_solver(algo: str, cfg: dict):
    """The inflens solver of a method name per task (strings = the library's defaults)."""
    from inflens.solvers import CG, EKFAC, KFAC, Arnoldi

    if cfg["task"] == "c" and algo == "cg":
        return CG(tol=cfg.get("cg_tol", 1e-4), max_iter=cfg.get("cg_max_iter"))
    if algo == "arnoldi" and cfg.get("arnoldi_rank") is not None:  # else: the default
        return Arnoldi(rank=cfg["arnoldi_rank"])
    if algo == "pcg":  # CG on the exact Hessian, preconditioned by K-FAC, looser tolerance
        return CG(tol=cfg.get("pcg_tol", 1e-2), preconditioner="kfac")
    if algo in ("kfac-sampled", "ekfac-sampled"):  # one sampled backward pass per chunk
        return (KFAC if algo == "kfac-sampled" else EKFAC)(fisher="sampled")
    if algo.startswith("pcg-tol"):  # the same at a given tolerance: inflens.pcg-tol1e-1
        return CG(tol=float(algo[len("pcg-tol") :]), preconditioner="kfac")
    return algo


def run_method(name: str, t: dict, tmp: Path, cfg: dict) -> torch.Tensor:
    """One fit + scoring of the N_TEST test points against all training points: [N_TEST, n]."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    lib, algo, reg = (name.split(".") + ["default"])[:3]
    xtr, ytr, xte, yte = t["xtr"], t["ytr"], t["xte"], t["yte"]
    n = len(ytr)
    bs = cfg["batch"] or n
    reg_value = cfg["l2"] + cfg["damping"]  # the peers' losses carry no l2 term
    model = _loaded_model(t, cfg)
    p = sum(v.numel() for v in model.parameters())
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=bs)
    matched = reg == "matched"
    if lib == "inflens":
        from inflens import Influence, Objective

        obj = Objective(model, "cross_entropy", l2=cfg["l2"])
        inf = Influence(
            obj,
            (xtr, ytr),
            solver=inflens_solver(algo, cfg),
            damping=cfg["damping"],
            curvature=cfg["curvature"],
            progress=False,
        ).fit()
        return inf.loss_influence((xte, yte))
    if lib == "pydvl":
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import (
            ArnoldiInfluence,
            CgInfluence,
            DirectInfluence,
            LissaInfluence,
        )

        cls = {"direct": DirectInfluence, "cg": CgInfluence, "lissa": LissaInfluence,
               "arnoldi": ArnoldiInfluence}[algo]  # fmt: skip
        # Arnoldi: rank 200 of p (pyDVL's default is 10), at most p
        kw = {"rank": min(200, p)} if algo == "arnoldi" else {}
        inf = cls(model, F.cross_entropy, regularization=reg_value if matched else None, **kw)
        inf = inf.fit(loader)
        # influences() = influence_factors() then influences_from_factors(); the training side
        # in the loader's batches keeps the [n, p] gradients out of memory (same numbers)
        fac = inf.influence_factors(xte, yte)
        return torch.cat(
            [inf.influences_from_factors(fac, xb, yb, mode=InfluenceMode.Up) for xb, yb in loader],
            1,
        )
    if lib == "captum":
        from captum.influence import NaiveInfluenceFunction

        kw = {"projection_dim": p, "hessian_reg": reg_value} if matched else {}
        inf = NaiveInfluenceFunction(
            model,
            loader,
            checkpoint="in-memory",
            checkpoints_load_func=lambda m, path: 1.0,  # the model is already loaded
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            batch_size=bs,
            **kw,
        )
        return inf.influence((xte, yte))
    if lib == "dattri":
        from dattri.algorithm.influence_function import (
            IFAttributorCG,
            IFAttributorExplicit,
            IFAttributorLiSSA,
        )
        from dattri.task import AttributionTask

        def loss_func(params, data):
            xb, yb = data
            xb = xb if xb.ndim == 2 else xb.unsqueeze(0)
            yb = yb if yb.ndim == 1 else yb.unsqueeze(0)
            # dattri's LiSSA casts every data tensor to float32 (lissa_collate_fn): back to the
            # model's dtype and integer labels (float labels would be soft targets)
            xb = xb.to(next(iter(params.values())).dtype)
            yb = yb.long()
            out = torch.func.functional_call(model, params, (xb,))
            return F.cross_entropy(out, yb)

        # one batch of all n points: dattri sums the per-batch inverse-HVPs over the loader's
        # batches (sum_b H_b^-1 v, not H^-1 v), so several batches would change its answer
        loader = DataLoader(TensorDataset(xtr, ytr), batch_size=n)
        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
        cls = {"explicit": IFAttributorExplicit, "cg": IFAttributorCG,
               "lissa": IFAttributorLiSSA}[algo]  # fmt: skip
        kw = {"regularization": reg_value} if matched else {}
        if algo == "lissa":  # fixed point (H + scaling * damping I)^-1 v: damping = reg / 50
            kw = {"damping": reg_value / 50.0} if matched else {}
        attr = cls(task=task, device="cpu", **kw)
        attr.cache(loader)
        test_loader = DataLoader(TensorDataset(xte, yte), batch_size=len(yte))
        return attr.attribute(loader, test_loader).T
    if lib == "kronfluence":
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import ScoreArguments

        task = cross_entropy_task()
        model = prepare_model(model, task)
        an = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=str(tmp))
        an.fit_all_factors(
            "f", TensorDataset(xtr, ytr), per_device_batch_size=bs, overwrite_output_dir=True
        )
        sa = ScoreArguments(damping_factor=reg_value) if matched else ScoreArguments()
        an.compute_pairwise_scores(
            "s",
            "f",
            TensorDataset(xte, yte),
            TensorDataset(xtr, ytr),
            per_device_query_batch_size=len(yte),
            per_device_train_batch_size=bs,
            score_args=sa,
            overwrite_output_dir=True,
        )
        return an.load_pairwise_scores("s")["all_modules"]
    raise ValueError(name)


def worker(name: str, out: Path, repeats: int, budget: float, mem_gb: float) -> None:
    """Runs one method up to ``repeats`` times; results are saved after every run so that a
    timed-out method keeps its finished runs. Another run starts only while the time spent so
    far plus the last run's time stays within ``budget`` seconds."""
    if mem_gb > 0:  # a runaway dense method must not take the shared machine down
        lim = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    torch.set_num_threads(1)
    cfg = json.loads((out / "task.json").read_text())
    t = load_file(str(out / "task.safetensors"))
    base = peak_resident_mib()
    times: list[float] = []
    for r in range(repeats):
        tmp = out / "tmp" / f"{name}-{r}"
        tmp.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        scores = run_method(name, t, tmp, cfg)
        times.append(time.perf_counter() - start)
        save_file(
            {"scores": scores.detach().double().contiguous()}, str(out / f"{name}.safetensors")
        )
        info = {"times": times, "peak_mb": peak_resident_mib() - base}
        (out / f"{name}.json").write_text(json.dumps(info))
        if sum(times) + times[-1] > budget:
            break


# ---------------------------------------------------------------------------- metrics
def metrics(scores: np.ndarray, exact: np.ndarray, loo: dict) -> dict:
    flat_r = np.corrcoef(scores.ravel(), exact.ravel())[0, 1]
    sign = -1.0 if flat_r < 0 else 1.0
    s = sign * scores
    pear = [stats.pearsonr(s[j], exact[j])[0] for j in range(len(s))]
    spear = [stats.spearmanr(s[j], exact[j])[0] for j in range(len(s))]
    over = []
    for j in range(len(s)):
        a = set(np.argsort(-np.abs(s[j]))[:TOP].tolist())
        b = set(np.argsort(-np.abs(exact[j]))[:TOP].tolist())
        over.append(len(a & b) / TOP)
    # predicted change of the test loss on removal: -I_up,loss / n (Pearson is scale-free)
    loo_r = float("nan")
    if loo is not None:
        loo_r = stats.pearsonr(-s[0, loo["indices"]], loo["actual"])[0]
    return {
        "sign": int(sign),
        "pearson": float(np.mean(pear)),
        "spearman": float(np.mean(spear)),
        "top50": float(np.mean(over)),
        "loo_pearson": float(loo_r),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="a")
    ap.add_argument("--out", type=Path, default=None, help="default: runs/bench_peers[_b|_c]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per method (all repeats)")
    ap.add_argument(
        "--repeat-budget",
        type=float,
        default=None,
        help="start another repeat only while time so far + last run <= this (default: timeout/2)",
    )
    ap.add_argument("--n-train", type=int, default=None, help="tasks b, c: first N points only")
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    ap.add_argument("--mem-gb", type=float, default=14.0, help="address-space limit per method")
    ap.add_argument(
        "--cnn-theta",
        default=None,
        help=f"task c: theta-tilde safetensors (default {CNN_THETA}; benchmarks/peers/cnn_theta.py "
        "trains one)",
    )
    ap.add_argument("--cg-tol", type=float, default=1e-4, help="task c: inflens CG tolerance")
    ap.add_argument("--cg-max-iter", type=int, default=10, help="task c: inflens CG iterations")
    ap.add_argument(
        "--arnoldi-rank",
        type=int,
        default=None,
        help="inflens Arnoldi rank (default: Arnoldi()'s rank chosen from the spectrum)",
    )
    ap.add_argument(
        "--pcg-tol", type=float, default=1e-2, help="inflens.pcg: K-FAC-preconditioned CG tolerance"
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the task, oracle and LOO in --out and merge the rows into its results.json",
    )
    ap.add_argument("--print-table", action="store_true", help="print --out's table and exit")
    ap.add_argument(
        "--collect",
        action="store_true",
        help="build the table from the per-method files already in --out (a run stopped before "
        "its end) without running anything; writes results.json",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = {**TASKS[args.task], "task": args.task}
    out = args.out or Path(cfg["out"])
    if args.print_table:
        print(table(json.loads((out / "results.json").read_text())))
        return
    if args.collect:
        collect(args.task, json.loads((out / "task.json").read_text()), out, args.methods)
        return
    out.mkdir(parents=True, exist_ok=True)
    budget = args.repeat_budget if args.repeat_budget is not None else args.timeout / 2
    if args.worker:
        worker(args.worker, out, args.repeats, budget, args.mem_gb)
        return
    torch.set_num_threads(1)
    methods = args.methods or cfg["methods"]
    cfg.update(cnn_theta=args.cnn_theta, cg_tol=args.cg_tol, cg_max_iter=args.cg_max_iter,
               arnoldi_rank=args.arnoldi_rank, pcg_tol=args.pcg_tol)  # fmt: skip
    prev = None
    if args.reuse:  # task, oracle and leave-one-out of an earlier run in --out; merge the rows
        prev = json.loads((out / "results.json").read_text())
        info = {k: v for k, v in prev.items() if k not in ("rows", "oracle_loo_pearson")}
        oracle_loo = prev["oracle_loo_pearson"]
        exact = np.load(out / "oracle.npy")
        if args.task == "c":
            loo = leave_one_out_c(info["n"], cfg.get("cnn_theta"))
        else:
            loo = json.loads((out / "loo.json").read_text())
        # this command's method options (the workers read them; the task itself is reused)
        (out / "task.json").write_text(json.dumps(cfg))
        print(f"reusing the task, oracle and leave-one-out in {out}", flush=True)
    else:
        t0 = time.perf_counter()
        if args.task == "a":
            info = build_task(out)
        elif args.task == "b":
            info = build_task_b(cfg, out, args.n_train, args.data_dir)
        else:
            info = build_task_c(cfg, out, args.n_train, args.data_dir)
        (out / "task.json").write_text(json.dumps(cfg))
        t = load_file(str(out / "task.safetensors"))
        print(f"task {args.task} built in {time.perf_counter() - t0:.0f} s: {info}", flush=True)
        t0 = time.perf_counter()
        if args.task == "a":
            exact, _ = oracle(t)
        elif args.task == "b":
            exact = oracle_b(t, cfg["l2"], out)
        else:
            exact = oracle_c(t, cfg["l2"], cfg["damping"])
        info["oracle_s"] = time.perf_counter() - t0
        np.save(out / "oracle.npy", exact)
        print(f"oracle in {info['oracle_s']:.0f} s", flush=True)
        t0 = time.perf_counter()
        if args.task == "a":
            loo = leave_one_out(t, exact, out)
        elif args.task == "b":
            loo = leave_one_out_b(t, exact, cfg["l2"], out)
        else:
            loo = leave_one_out_c(info["n"], cfg.get("cnn_theta"))
        info["loo_s"] = time.perf_counter() - t0
        # the LOO retrains must agree with the oracle for it to be a fair yardstick
        oracle_loo = float("nan")
        if loo is not None:
            oracle_loo = float(
                stats.pearsonr(exact[0, loo["indices"]] / -info["n"], loo["actual"])[0]
            )
            top = set(np.argsort(-np.abs(exact[0]))[:LOO_K].tolist())
            info["loo_overlap_with_oracle_top100"] = len(top & set(loo["indices"])) / LOO_K
            if "predicted_there" in loo:  # the fig2-cnn run's own (float32 CG) predictions
                info["oracle_vs_predicted_there_pearson"] = float(
                    stats.pearsonr(exact[0, loo["indices"]] / -info["n"], loo["predicted_there"])[0]
                )
            skip = ("indices", "actual", "predicted_there")
            info["loo"] = {k: v for k, v in loo.items() if k not in skip}
        print(f"leave-one-out in {info['loo_s']:.0f} s: oracle vs actual Pearson {oracle_loo:.4f}",
              flush=True)  # fmt: skip
    rows = []
    timed_out: set[str] = set()
    for name in methods:
        family = ".".join(name.split(".")[:2])
        if family in timed_out and family in SAME_COST:
            rows.append({"method": name, "error": f"not run: {family} (same algorithm, other "
                         "regularisation) timed out before finishing one run"})  # fmt: skip
            print(f"{name}: SKIPPED", flush=True)
            continue
        for suffix in (".json", ".safetensors"):
            (out / f"{name}{suffix}").unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--task", args.task, "--out", str(out),
               "--repeats", str(args.repeats), "--repeat-budget", str(budget),
               "--mem-gb", str(args.mem_gb)]  # fmt: skip
        note = None
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [*cmd, "--worker", name],
                capture_output=True,
                text=True,
                env=env,
                timeout=args.timeout,
            )
        except subprocess.TimeoutExpired:
            if not (out / f"{name}.json").exists():
                rows.append({"method": name, "error": f"timeout: no run finished in "
                             f"{args.timeout:.0f} s"})  # fmt: skip
                print(f"{name}: TIMEOUT", flush=True)
                timed_out.add(family)
                continue
            note = f"timeout at {args.timeout:.0f} s during a later repeat"
        else:
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
                if proc.returncode < 0 or "MemoryError" in err or "alloc" in err.lower():
                    err = f"rc {proc.returncode}: {err}"
                rows.append({"method": name, "error": err})
                print(f"{name}: FAILED {err}", flush=True)
                (out / f"{name}.stderr").write_text(proc.stderr[-20000:])
                continue
        w = json.loads((out / f"{name}.json").read_text())
        sc = load_file(str(out / f"{name}.safetensors"))["scores"].numpy()
        if sc.shape != exact.shape or not np.isfinite(sc).all():
            rows.append({"method": name, "error": f"scores of shape {sc.shape}, finite: "
                         f"{bool(np.isfinite(sc).all())}"})  # fmt: skip
            continue
        row = {
            "method": name,
            "time_s": statistics.median(w["times"]),
            "times": w["times"],
            "runs": len(w["times"]),
            "peak_mb": w["peak_mb"],
            "wall_s": time.perf_counter() - start,
            "timeout_s": args.timeout,
        }
        if note:
            row["note"] = note
        row.update(metrics(sc, exact, loo))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if prev is not None:
        merged = {r["method"]: r for r in prev["rows"]}
        merged.update({r["method"]: r for r in rows})
        order = [m for m in cfg["methods"] if m in merged]
        rows = [merged[m] for m in order] + [r for m, r in merged.items() if m not in order]
    result = {"task": cfg["name"], "task_key": args.task, **info, "n_test": N_TEST,
              "oracle_loo_pearson": oracle_loo, "timeout_s": args.timeout, "rows": rows}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(table(result))


def collect(task: str, cfg: dict, out: Path, methods: list[str] | None) -> None:
    """Rows from the per-method files (``NAME.json`` and ``NAME.safetensors``, written by the
    workers after every finished run) of a run in ``out`` that was stopped before its end."""
    t = load_file(str(out / "task.safetensors"))
    exact = np.load(out / "oracle.npy")
    info = {"n": len(t["ytr"]), "p": t["theta"].numel(), "l2": cfg["l2"],
            "damping": cfg["damping"]}  # fmt: skip
    if task == "c":
        loo = leave_one_out_c(info["n"], cfg.get("cnn_theta"))
    else:
        loo = json.loads((out / "loo.json").read_text()) if (out / "loo.json").exists() else None
    oracle_loo = float("nan")
    if loo is not None:
        oracle_loo = float(stats.pearsonr(exact[0, loo["indices"]] / -info["n"], loo["actual"])[0])
    rows = []
    for name in methods or cfg["methods"]:
        if not (out / f"{name}.json").exists():
            rows.append({"method": name, "error": "not run or no run finished before the stop"})
            continue
        w = json.loads((out / f"{name}.json").read_text())
        sc = load_file(str(out / f"{name}.safetensors"))["scores"].numpy()
        row = {"method": name, "time_s": statistics.median(w["times"]), "times": w["times"],
               "runs": len(w["times"]), "peak_mb": w["peak_mb"], "note": "collected"}  # fmt: skip
        row.update(metrics(sc, exact, loo))
        rows.append(row)
    result = {"task": cfg["name"], "task_key": task, **info, "n_test": N_TEST,
              "oracle_loo_pearson": oracle_loo, "rows": rows}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(table(result))


def table(result: dict) -> str:
    lines = [
        f"Task ({result.get('task_key', 'a')}) {result['task']}: n = {result['n']}, "
        f"p = {result['p']}, l2 = {result['l2']}, damping = {result.get('damping', 0.0)}, "
        f"{result['n_test']} test points; oracle vs actual LOO Pearson = "
        f"{result['oracle_loo_pearson']:.3f}",
        "",
        "| method | time (s, median) | runs | peak RSS (MB) | sign | Pearson | Spearman | top-50 "
        "| LOO Pearson (top 100) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            m = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", r["error"])
            if m:  # the per-method address-space limit (--mem-gb) stopped it
                r = {**r, "error": f"out of memory: tried to allocate {int(m[1]) / 2**30:.1f} "
                     "GiB more under the address-space limit"}  # fmt: skip
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['time_s']:.3f} | {r.get('runs', len(r['times']))} | "
            f"{r['peak_mb']:.0f} | {r['sign']:+d} | "
            f"{r['pearson']:.4f} | {r['spearman']:.4f} | {r['top50']:.2f} | "
            f"{r['loo_pearson']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
