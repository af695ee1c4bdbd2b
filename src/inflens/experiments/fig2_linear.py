"""Figure 2, left and middle: influence on a 10-class logistic regression vs leave-one-out.

PROTOCOL 4.2. Multinomial logistic regression without bias on the 55,000 MNIST training images
(p = 7,840), ``R(W) = (1/n) sum_i CE(W x_i, y_i) + (l2/2) ||W||^2`` with ``l2 = 0.01``,
trained to a gradient norm ~1e-12 in float64. For MNIST test image 8 the predicted change of its
test loss when training point ``i`` is removed,

    ``pred_i = -I_up,loss(z_i, z_test) / n = grad L(z_test)^T H^-1 (grad L(z_i) + l2 W) / n``

(positive = removing the point raises the test loss, i.e. it helped), is computed with CG (the
paper's "exact" panel) and with LiSSA (depth 5000, 10 repeats, scale 25, batch 1, seed 17; the
"approx" panel). The 500 training points with the largest ``|pred_i|`` under CG are each removed
and the model refit exactly, minimising ``(1/(n-1)) sum_{j != i} CE_j + (l2/2) ||W||^2``;
``actual_i = L(z_test, W_-i) - L(z_test, W_hat)``. LiSSA is evaluated on the same 500 points.

Exact refits are made cheap by the explicit float64 Hessian (formed in closed form,
``H = (1/n) sum_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T + l2 I``, checked against the
library's Hessian-vector products): each refit starts at ``W_hat`` and takes chord-Newton steps
``W <- W - H^-1 grad R_-i(W)`` (linear convergence with rate ~ ||H^-1 h_i|| / n), batched over
many refits so that each pass over the data is one wide matrix product. The same Cholesky factor
gives a direct ``H^-1`` reference for the CG and LiSSA solutions.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import Influence, Objective
from ..datasets import load_mnist, mnist_paper_split
from ..models import LogisticRegression
from ..plots import ScatterStyle, new_figure, save_figure, scatter_predicted_actual
from ..solvers import CG, LiSSA
from ..train import FitInfo, LBFGSConfig, fit_lbfgs, newton_minimize

NAME = "fig2-linear"
DESCRIPTION = (
    "Fig 2 left/mid: 10-class logistic regression on MNIST (n=55,000, p=7,840), CG and LiSSA "
    "influence vs 500 exact leave-one-out refits (test image 8)"
)

L2 = 0.01
TEST_INDEX = 8
CLASSES = 10


@dataclass(frozen=True)
class Settings:
    """What one run does (``FULL`` = the paper's protocol, ``QUICK`` = a CI smoke test)."""

    n_train: int | None  # None: all 55,000 training images, else the first n_train
    k: int  # training points removed and refit (largest |pred| under CG)
    lissa_depth: int
    lissa_repeats: int
    lissa_scale: float = 25.0
    lissa_batch: int = 1
    lissa_seed: int = 17
    cg_tol: float = 1e-10  # relative residual of the CG solve
    fit_tol: float = 1e-12  # gradient norm of W_hat
    refit_tol: float = 1e-11  # gradient norm of every leave-one-out refit
    refit_batch: int = 25  # refits advanced together (one wide matmul per pass)
    refit_max_iter: int = 100


FULL = Settings(n_train=None, k=500, lissa_depth=5000, lissa_repeats=10)
QUICK = Settings(n_train=2000, k=20, lissa_depth=300, lissa_repeats=2)


# ---------------------------------------------------------------------------- closed forms
# W is [C, d] (the layout of nn.Linear(d, C).weight, flattened row-major into theta).
def _probs(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x @ w.T, dim=1)


def _ce(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy ``[B]`` of logits ``x W^T``."""
    return torch.nn.functional.cross_entropy(x @ w.T, y, reduction="none")


def multinomial_hessian(x: torch.Tensor, w: torch.Tensor, l2: float) -> torch.Tensor:
    """``[Cd, Cd]``: ``(1/n) sum_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T + l2 I`` (float64).

    Block ``(a, b)`` is ``X^T diag(p_a (delta_ab - p_b)) X / n``; one pass per class pair.
    """
    n, d = x.shape
    c = w.shape[0]
    p = _probs(x, w)
    h = torch.empty(c * d, c * d, dtype=x.dtype)
    for a in range(c):
        for b in range(a, c):
            coef = p[:, a] * ((1.0 if a == b else 0.0) - p[:, b])
            blk = (x.T @ (x * coef[:, None])) / n
            h[a * d : (a + 1) * d, b * d : (b + 1) * d] = blk
            if b != a:
                h[b * d : (b + 1) * d, a * d : (a + 1) * d] = blk.T
    h.diagonal().add_(l2)
    return h


def risk_gradients(
    x: torch.Tensor,
    y1h: torch.Tensor,
    ws: torch.Tensor,
    drop: torch.Tensor | None,
    l2: float,
) -> torch.Tensor:
    """Gradients ``[K, C, d]`` of ``(1/m) sum_{j kept} CE_j + (l2/2)||W_k||^2`` for K models.

    ``drop[k]`` is the training point left out of model k (``m = n - 1``), or ``drop=None`` for
    the full data (``m = n``). All K models share one ``[n, K*C]`` matrix product per pass.
    """
    n, d = x.shape
    k, c, _ = ws.shape
    logits = (x @ ws.reshape(k * c, d).T).view(n, k, c)
    r = torch.softmax(logits, dim=2) - y1h[:, None, :]  # dCE/dlogits, [n, K, C]
    g = (r.reshape(n, k * c).T @ x).view(k, c, d)
    if drop is None:
        return g / n + l2 * ws
    r_drop = r[drop, torch.arange(k)]  # [K, C]
    g = g - r_drop[:, :, None] * x[drop][:, None, :]
    return g / (n - 1) + l2 * ws


def _chol_solve(chol: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``H^-1 rhs`` for rhs ``[K, p]`` with ``H = L L^T`` (two triangular solves)."""
    z = torch.linalg.solve_triangular(chol, rhs.T, upper=False)
    return torch.linalg.solve_triangular(chol.T, z, upper=True).T


def _chord_newton(
    x: torch.Tensor,
    y1h: torch.Tensor,
    w0: torch.Tensor,
    chol: torch.Tensor,
    drop: torch.Tensor | None,
    tol: float,
    max_iter: int,
) -> tuple[torch.Tensor, FitInfo]:
    """Chord-Newton ``W <- W - H^-1 grad R(W)`` (:func:`inflens.train.newton_minimize`, every
    step taken) from ``w0 [K, C, d]``, on the full risk (``drop=None``) or without
    ``drop[k]`` for problem ``k``; returns the ``[K, C, d]`` result and the fit's info."""
    k, c, d = w0.shape

    def grad(th: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ws = th.view(-1, c, d)
        return risk_gradients(x, y1h, ws, None if drop is None else drop[rows], L2).flatten(1)

    fit = newton_minimize(
        grad,
        w0.reshape(k, c * d),
        chord=lambda g, rows: _chol_solve(chol, g),
        tol=tol,
        max_iter=max_iter,
        chord_rate=math.inf,  # H at W_hat is close enough: take every chord step
    )
    return fit.theta.view(k, c, d), fit.info


def loo_refits(
    x: torch.Tensor,
    y1h: torch.Tensor,
    w_hat: torch.Tensor,
    indices: np.ndarray,
    chol: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor],
    settings: Settings,
    progress: bool = True,
) -> dict[str, Any]:
    """Exact leave-one-out refits; returns test losses on ``test = (x_test [1, d], y_test
    [1])``, iterations and error estimates.

    Each refit minimises ``(1/(n-1)) sum_{j != i} CE_j + (l2/2)||W||^2`` from ``W_hat`` by
    chord-Newton steps with the full-data Hessian at ``W_hat`` until ``||grad|| <= refit_tol``.
    ``err_est`` is the first-order change of the test loss that one more step would make,
    ``grad L_test(W)^T H^-1 grad R_-i(W)``: the size of the remaining optimisation error.
    """
    c, d = w_hat.shape
    p = c * d
    x_test, y_test = test
    idx_all = torch.as_tensor(indices, dtype=torch.long)
    test_loss = np.zeros(len(indices))
    iters = np.zeros(len(indices), dtype=np.int64)
    gnorm = np.zeros(len(indices))
    err_est = np.zeros(len(indices))
    y_test1h = torch.nn.functional.one_hot(y_test, c).to(x.dtype)
    t0 = time.perf_counter()
    for s in range(0, len(indices), settings.refit_batch):
        drop = idx_all[s : s + settings.refit_batch]
        kb = drop.numel()
        w0 = w_hat.expand(kb, c, d)
        ws, info = _chord_newton(
            x, y1h, w0, chol, drop, settings.refit_tol, settings.refit_max_iter
        )
        it = torch.as_tensor(info.extra["iterations"])
        gn = torch.as_tensor(info.extra["grad_norms"], dtype=x.dtype)
        g = risk_gradients(x, y1h, ws, drop, L2)
        # what one more chord step would change in the test loss (the remaining error)
        step = _chol_solve(chol, g.reshape(kb, p)).view(kb, c, d)
        r_t = _probs(x_test, ws.reshape(kb * c, d)).view(kb, c) - y_test1h  # [K, C]
        g_test = r_t[:, :, None] * x_test[0][None, None, :]  # [K, C, d]
        err_est[s : s + kb] = (-(g_test * step).sum((1, 2))).abs().numpy()
        logits = (ws @ x_test[0]).view(kb, c)
        test_loss[s : s + kb] = torch.nn.functional.cross_entropy(
            logits, y_test.expand(kb), reduction="none"
        ).numpy()
        iters[s : s + kb] = it.numpy()
        gnorm[s : s + kb] = gn.numpy()
        if progress:
            done = s + kb
            el = time.perf_counter() - t0
            print(
                f"  refits {done}/{len(indices)}: max steps {int(it.max())}, "
                f"max ||grad|| {float(gn.max()):.1e}, {el:.0f} s",
                flush=True,
            )
    return {
        "test_loss": test_loss,
        "iterations": iters,
        "grad_norm": gnorm,
        "err_est": err_est,
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------- statistics
def agreement(actual: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman R, least-squares slope (with intercept and through 0) of pred on actual."""
    from scipy.stats import pearsonr, spearmanr

    a = np.asarray(actual, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    slope, intercept = np.polyfit(a, p, 1)
    return {
        "pearson": float(pearsonr(a, p)[0]),
        "spearman": float(spearmanr(a, p)[0]),
        "slope": float(slope),
        "intercept": float(intercept),
        "slope_through_origin": float((a @ p) / (a @ a)),
        "max_abs_error": float(np.abs(p - a).max()),
    }


def _top_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Fraction of the k largest-|.| entries of ``a`` that are among those of ``b``."""
    ta = set(np.argsort(-np.abs(a))[:k].tolist())
    tb = set(np.argsort(-np.abs(b))[:k].tolist())
    return len(ta & tb) / k


def figures(metrics: dict[str, Any], out: Path) -> list[str]:
    """Draw the scatter plots of a finished run from its metrics (``loo`` arrays) into ``out``.

    ``fig2_linear.png``: the paper's two panels, CG ("exact") and LiSSA ("approx"), predicted
    against actual change of the test loss; ``fig2_linear_lissa_r1.png``: LiSSA with one repeat.
    """
    loo = metrics["loo"]
    actual = np.asarray(loo["actual"])
    reps = metrics["settings"]["lissa_repeats"]
    panels = [
        (
            "fig2_linear.png",
            [
                ("Linear (exact): CG", "predicted_cg"),
                (f"Linear (approx): LiSSA r={reps}", "predicted_lissa"),
            ],
        ),
        ("fig2_linear_lissa_r1.png", [("LiSSA r=1", "predicted_lissa_r1")]),
    ]
    names = []
    for name, cols in panels:
        fig, axes = new_figure(len(cols), 1, (3.8, 3.8))
        preds = [np.asarray(loo[key]) for _, key in cols]
        lim = 1.08 * max(float(np.abs(actual).max()), *(float(np.abs(q).max()) for q in preds))
        for ax, (title, _), pred in zip(axes, cols, preds):
            st = agreement(actual, pred)
            scatter_predicted_actual(
                actual,
                pred,
                ax=ax,
                style=ScatterStyle(
                    title=title,
                    annotate=False,
                    limit=lim,
                    xlabel="Actual diff in test loss",
                    ylabel="Predicted diff in test loss",
                ),
            )
            ax.text(
                0.03,
                0.97,
                f"R = {st['pearson']:.4f}\nslope = {st['slope']:.3f}\nn = {len(actual)}",
                transform=ax.transAxes,
                va="top",
                fontsize=8,
            )
        save_figure(fig, out / name, dpi=80)
        names.append(name)
    return names


# ---------------------------------------------------------------------------- the experiment
def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def run(
    data_dir: Path | None,
    out: Path,
    quick: bool = False,
    progress: bool = True,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Run the Fig. 2 (left/middle) reproduction; writes ``fig2_linear.png`` and ``metrics.json``.

    Args:
        data_dir: folder with MNIST (``mnist/`` subfolder or the IDX files); see
            :func:`inflens.datasets.load_mnist`.
        out: output folder.
        quick: the CI smoke test (``QUICK``: 2,000 training points, 30 refits, short LiSSA).
        progress: print progress.
        settings: override ``FULL`` / ``QUICK``.
    """
    t_start = time.perf_counter()
    cfg = settings or (QUICK if quick else FULL)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    split = mnist_paper_split(load_mnist(data_dir), dtype=np.float64)
    split.pop("x_valid")
    x = torch.from_numpy(split["x_train"])
    y = torch.from_numpy(split["y_train"]).long()
    if cfg.n_train is not None:
        x, y = x[: cfg.n_train].contiguous(), y[: cfg.n_train].contiguous()
    n, d = x.shape
    x_test = torch.from_numpy(split["x_test"][TEST_INDEX : TEST_INDEX + 1])
    y_test = torch.from_numpy(split["y_test"][TEST_INDEX : TEST_INDEX + 1]).long()
    y1h = torch.nn.functional.one_hot(y, CLASSES).to(torch.float64)
    test = (x_test, y_test)
    _log(progress, f"[{NAME}] n={n}, d={d}, p={CLASSES * d}, l2={L2}, test index {TEST_INDEX}")

    # ---- train W_hat: L-BFGS, then chord-Newton polish with the explicit Hessian
    t = time.perf_counter()
    model = LogisticRegression(d, CLASSES, dtype=torch.float64)
    obj = Objective(model, "cross_entropy", l2=L2)
    theta0, info = fit_lbfgs(obj, (x, y), config=LBFGSConfig(1e-9, 3000, on_fail="ignore"))
    w0 = theta0.view(CLASSES, d)
    timings["lbfgs"] = time.perf_counter() - t
    _log(progress, f"  L-BFGS: {info.iterations} it, ||grad|| {info.grad_norm:.2e}")
    t = time.perf_counter()
    hess = multinomial_hessian(x, w0, L2)
    timings["hessian"] = time.perf_counter() - t
    chol = torch.linalg.cholesky(hess)
    w_hat, polish = _chord_newton(x, y1h, w0[None], chol, None, cfg.fit_tol, 50)
    w_hat, fit_gnorm, polish_steps = w_hat[0], polish.grad_norm, polish.iterations
    moved = float((w_hat - w0).norm())
    if moved > 1e-8 * float(w_hat.norm()):  # H must be taken at W_hat itself
        hess = multinomial_hessian(x, w_hat, L2)
        chol = torch.linalg.cholesky(hess)
    timings["train_total"] = time.perf_counter() - t_start
    _log(progress, f"  polish: {polish_steps} steps, ||grad|| {fit_gnorm:.2e}, moved {moved:.1e}")

    obj.load_into_model(w_hat.reshape(-1))
    obj = Objective(model, "cross_entropy", l2=L2)
    with torch.no_grad():
        train_acc = float((_probs(x, w_hat).argmax(1) == y).double().mean())
        x_all_test = torch.from_numpy(split["x_test"])
        test_acc = float(
            (_probs(x_all_test, w_hat).argmax(1) == torch.from_numpy(split["y_test"]))
            .double()
            .mean()
        )
        p_test = _probs(x_test, w_hat)[0]
        loss_test = float(_ce(x_test, y_test, w_hat)[0])

    # ---- CG influence over all training points (the paper's "exact" panel)
    t = time.perf_counter()
    inf_cg = Influence(
        obj, (x, y), solver=CG(tol=cfg.cg_tol, max_iter=2000), progress=progress
    ).fit()
    # the closed-form Hessian must be the library's Hessian (same layout, same objective)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(obj.p, generator=gen, dtype=torch.float64)
    hv_lib = inf_cg.curvature_.matvec(v)
    hess_check = float((hess @ v - hv_lib).norm() / hv_lib.norm())
    del hess  # 0.5 GB at p = 7,840; the Cholesky factor is all that is needed from here
    s_cg = inf_cg.s_test(test)
    pred_cg = (-inf_cg.score(s_cg) / n)[0].numpy()
    timings["cg"] = time.perf_counter() - t
    cg_diag = inf_cg.diagnostics()

    # direct reference: s_test and pred from the Cholesky factor and closed-form gradients
    g_test = (p_test - torch.nn.functional.one_hot(y_test[0], CLASSES))[:, None] * x_test[0]
    s_exact = _chol_solve(chol, g_test.reshape(1, -1))[0]
    s_mat = s_exact.view(CLASSES, d)
    with torch.no_grad():
        r = _probs(x, w_hat) - y1h  # [n, C]
        pred_exact = (((r * (x @ s_mat.T)).sum(1) + L2 * (s_mat * w_hat).sum()) / n).numpy()
    rel_s_cg = float((s_cg[0] - s_exact).norm() / s_exact.norm())
    _log(
        progress,
        f"  CG: {max(cg_diag['iterations'])} it, rel. error vs direct solve {rel_s_cg:.1e}, "
        f"Hessian check {hess_check:.1e}, {timings['cg']:.0f} s",
    )

    order = np.argsort(-np.abs(pred_cg), kind="stable")
    top = order[: cfg.k]

    # ---- LiSSA on the same points (the paper's "approx" panel), and with r = 1 (Sec. 4.1)
    lissa_runs: dict[str, dict[str, Any]] = {}
    for key, reps in (("lissa", cfg.lissa_repeats), ("lissa_r1", 1)):
        t = time.perf_counter()
        solver = LiSSA(
            depth=cfg.lissa_depth,
            repeats=reps,
            scale=cfg.lissa_scale,
            damping=0.0,
            batch_size=cfg.lissa_batch,
            seed=cfg.lissa_seed,
        )
        inf_l = Influence(obj, (x, y), solver=solver, progress=progress).fit()
        s_l = inf_l.s_test(test)
        pred_all = (-inf_l.score(s_l) / n)[0].numpy()
        lissa_runs[key] = {
            "repeats": reps,
            "pred_all": pred_all,
            "rel_error_s_test": float((s_l[0] - s_exact).norm() / s_exact.norm()),
            "seconds": time.perf_counter() - t,
        }
        _log(
            progress,
            f"  LiSSA r={reps}: rel. error of s_test {lissa_runs[key]['rel_error_s_test']:.3f}, "
            f"{lissa_runs[key]['seconds']:.0f} s",
        )

    # ---- exact leave-one-out refits
    base = float(_ce(x_test, y_test, w_hat)[0])
    loo = loo_refits(x, y1h, w_hat, top, chol, test, cfg, progress)
    actual = loo["test_loss"] - base
    timings["refits"] = loo["seconds"]

    pc, pl, pl1, pe = (
        pred_cg[top],
        lissa_runs["lissa"]["pred_all"][top],
        lissa_runs["lissa_r1"]["pred_all"][top],
        pred_exact[top],
    )
    st_cg, st_l, st_l1, st_e = (agreement(actual, q) for q in (pc, pl, pl1, pe))
    timings["total"] = time.perf_counter() - t_start

    k50 = min(50, cfg.k)
    metrics: dict[str, Any] = {
        "experiment": NAME,
        "settings": asdict(cfg),
        "n_train": n,
        "p": obj.p,
        "l2": L2,
        "test_index": TEST_INDEX,
        "test_label": int(y_test[0]),
        "test_predicted_label": int(p_test.argmax()),
        "test_loss": loss_test,
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "fit": {
            "lbfgs_iterations": info.iterations,
            "lbfgs_grad_norm": info.grad_norm,
            "polish_steps": polish_steps,
            "grad_norm": fit_gnorm,
            "objective": float(_ce(x, y, w_hat).mean() + 0.5 * L2 * (w_hat * w_hat).sum()),
        },
        "hessian_vs_library_hvp_rel_error": hess_check,
        "cg": {
            "iterations": max(cg_diag["iterations"]),
            "relative_residual": max(cg_diag["relative_residuals"]),
            "rel_error_s_test_vs_direct": rel_s_cg,
            "max_abs_pred_diff_vs_direct": float(np.abs(pred_cg - pred_exact).max()),
            "seconds": timings["cg"],
        },
        "lissa": {
            k_: {
                "repeats": v_["repeats"],
                "depth": cfg.lissa_depth,
                "rel_error_s_test_vs_direct": v_["rel_error_s_test"],
                "pearson_vs_cg_all_train": float(np.corrcoef(v_["pred_all"], pred_cg)[0, 1]),
                f"top{cfg.k}_overlap_with_cg": _top_overlap(v_["pred_all"], pred_cg, cfg.k),
                f"top{k50}_overlap_with_cg": _top_overlap(v_["pred_all"], pred_cg, k50),
                "seconds": v_["seconds"],
            }
            for k_, v_ in lissa_runs.items()
        },
        "agreement": {"cg": st_cg, "lissa": st_l, "lissa_r1": st_l1, "direct": st_e},
        "refits": {
            "k": cfg.k,
            "max_grad_norm": float(loo["grad_norm"].max()),
            "max_test_loss_error_estimate": float(loo["err_est"].max()),
            "min_abs_actual": float(np.abs(actual).min()),
            "iterations_mean": float(loo["iterations"].mean()),
            "iterations_max": int(loo["iterations"].max()),
            "seconds": loo["seconds"],
        },
        "loo": {
            "indices": top.tolist(),
            "actual": actual.tolist(),
            "predicted_cg": pc.tolist(),
            "predicted_lissa": pl.tolist(),
            "predicted_lissa_r1": pl1.tolist(),
            "predicted_direct": pe.tolist(),
        },
        "seconds": timings,
    }
    metrics["figures"] = figures(metrics, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _log(
        progress,
        f"[{NAME}] Pearson R: CG {st_cg['pearson']:.4f} (slope {st_cg['slope']:.3f}), "
        f"LiSSA {st_l['pearson']:.4f} (slope {st_l['slope']:.3f}), LiSSA r=1 "
        f"{st_l1['pearson']:.4f}; {timings['total']:.0f} s",
    )
    return metrics
