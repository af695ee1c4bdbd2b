"""``inflens demo``: explain a misclassified handwritten digit through its training data.

scikit-learn's digits (1,797 8x8 images, shipped with scikit-learn), 10-class logistic regression
without bias in float64 (p = 640, l2 = 0.01), trained to a gradient norm of 1e-10. For one
misclassified test digit, the influence of every training image is computed with the Exact solver
and with LiSSA; the 40 most influential points (by |predicted change|) are then removed one at a
time and the model refit exactly, to check the predictions against actual retraining.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import Influence, Objective
from ..solvers import LiSSA
from ..train import fit_lbfgs, fit_newton, loo_weights
from ..validate import LOOConfig, leave_one_out

L2 = 0.01


def load_digits_split(seed: int = 0):
    """Digits scaled to [0, 1], a stratified 75/25 split (1,347 train / 450 test), float64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.data.astype(np.float64) / 16.0
    xtr, xte, ytr, yte = train_test_split(
        x, d.target, test_size=0.25, random_state=seed, stratify=d.target
    )
    return (
        torch.from_numpy(xtr),
        torch.from_numpy(ytr).long(),
        torch.from_numpy(xte),
        torch.from_numpy(yte).long(),
    )


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def _plot_most_influential(out: Path, test_image, test_title: str, xtr, ytr, order, exact) -> None:
    """The test digit, then the 3 most helpful and the 3 most harmful training digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    helpful = order[:3]  # most positive predicted change = most helpful
    harmful = order[::-1][:3]
    fig, axes = plt.subplots(1, 7, figsize=(12, 2.3))
    axes[0].imshow(test_image.reshape(8, 8), cmap="gray_r")
    axes[0].set_title(test_title, fontsize=8)
    for ax, i, kind in zip(
        axes[1:], list(helpful) + list(harmful), ["helpful"] * 3 + ["harmful"] * 3
    ):
        ax.imshow(xtr[i].reshape(8, 8), cmap="gray_r")
        ax.set_title(f"{kind} #{i}\nlabel {ytr[i]}\n{exact[i]:+.2e}", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "most_influential.png", dpi=110)
    plt.close(fig)


def _plot_predicted_vs_actual(out: Path, loo, lissa_pred) -> None:
    """Predicted (exact and LiSSA) against actual leave-one-out changes of the test loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    lim = 1.1 * max(np.abs(loo.actual).max(), np.abs(loo.predicted).max(), 1e-12)
    ax.plot([-lim, lim], [-lim, lim], color="gray", lw=1, label="y = x")
    ax.scatter(loo.actual, loo.predicted, s=14, label=f"exact (R={loo.pearson:.4f})")
    ax.scatter(
        loo.actual,
        lissa_pred,
        s=10,
        marker="x",
        label=f"LiSSA (R={_pearson(loo.actual, lissa_pred):.4f})",
    )
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("actual change in test loss (retrained without z_i)")
    ax.set_ylabel("predicted change (-I_up,loss / n)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "predicted_vs_actual.png", dpi=110)
    plt.close(fig)


def run_demo(out: Path = Path("inflens-demo"), n_loo: int = 40, seed: int = 0, progress=True):
    """Run the demo, print its table and write figures and ``metrics.json`` into ``out``."""
    t0 = time.perf_counter()
    # the demo's problem is tiny (p = 640): intra-op threads only add synchronisation cost,
    # which dominates badly on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(out, n_loo, seed, progress, t0)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, n_loo: int, seed: int, progress: bool, t0: float) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits_split(seed)
    n, d = xtr.shape
    model = nn.Linear(d, 10, bias=False).double()
    nn.init.zeros_(model.weight)
    obj = Objective(model, "cross_entropy", l2=L2)
    theta = fit_lbfgs(obj, (xtr, ytr), tol=1e-8).theta
    obj.load_into_model(theta)
    obj = Objective(model, "cross_entropy", l2=L2)
    # polish to ||grad|| <= 1e-12 with Newton steps (the exact Hessian as preconditioner)
    pre = Influence(obj, (xtr, ytr), solver="exact", progress=False).fit()
    theta, fit_info = fit_newton(obj, (xtr, ytr), pre.solver.solve, tol=1e-12)
    obj.load_into_model(theta)
    obj = Objective(model, "cross_entropy", l2=L2)
    with torch.no_grad():
        pred = model(xte).argmax(1)
        train_acc = float((model(xtr).argmax(1) == ytr).double().mean())
    test_acc = float((pred == yte).double().mean())
    wrong = (pred != yte).nonzero()[:, 0]
    if wrong.numel() == 0:
        raise RuntimeError("the demo model classifies every test digit correctly")
    # the misclassified digit with the highest test loss: the most striking one to explain
    with torch.no_grad():
        test_losses = obj.losses(obj.theta, xte[wrong], yte[wrong])
    test_idx = int(wrong[int(test_losses.argmax())])
    test = (xte[test_idx : test_idx + 1], yte[test_idx : test_idx + 1])

    t1 = time.perf_counter()
    exact = Influence(obj, (xtr, ytr), solver="exact", progress=progress).fit()
    pred_exact = exact.predicted_loss_change(test)[0]
    t_exact = time.perf_counter() - t1
    t1 = time.perf_counter()
    lissa_solver = LiSSA(depth=1000, repeats=4, scale=None, batch_size=32, seed=seed)
    lissa = Influence(obj, (xtr, ytr), solver=lissa_solver, progress=progress).fit()
    pred_lissa = lissa.predicted_loss_change(test)[0]
    t_lissa = time.perf_counter() - t1

    t1 = time.perf_counter()

    def refit(keep: torch.Tensor, theta0: torch.Tensor):
        # exact leave-one-out refit: mean loss over the n - 1 kept points + the same l2,
        # minimised to ||grad|| <= 1e-12 (chord-Newton steps preconditioned by H^-1 at theta-hat)
        return fit_newton(obj, (xtr, ytr), exact.solver.solve, theta0, loo_weights(n, ~keep))

    loo = leave_one_out(
        exact, test, LOOConfig(k=n_loo, select="top", retrain=refit, progress=progress)
    )
    t_loo = time.perf_counter() - t1
    idx = np.asarray(loo.indices)
    lissa_on_loo = pred_lissa.numpy()[idx]
    r_lissa = _pearson(loo.actual, lissa_on_loo)
    r_exact_lissa_all = _pearson(pred_exact.numpy(), pred_lissa.numpy())

    pe = pred_exact.numpy()
    order = np.argsort(-pe)  # descending: most helpful first
    actual_by_idx = dict(zip(idx.tolist(), np.asarray(loo.actual).tolist()))
    xtr_np, ytr_np, xte_np, yte_np = xtr.numpy(), ytr.numpy(), xte.numpy(), yte.numpy()

    lines = [
        f"inflens demo: 10-class logistic regression on scikit-learn digits "
        f"(n_train={n}, p={obj.p}, l2={L2}, float64)",
        f"train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f}; "
        f"explaining test digit #{test_idx}: true label {int(yte[test_idx])}, "
        f"predicted {int(pred[test_idx])}, test loss {float(obj.losses(obj.theta, *test)[0]):.4f}",
        "predicted change = change of the test loss if the point were removed and the model "
        "retrained (-I_up,loss/n); positive = the point helped, negative = it hurt.",
        "",
        f"{'':8s}{'train idx':>10s}{'label':>7s}{'predicted':>13s}{'LiSSA':>13s}{'actual (LOO)':>15s}",
    ]

    def row(kind: str, i: int) -> str:
        act = actual_by_idx.get(int(i))
        act_s = f"{act:+.3e}" if act is not None else "-"
        return (
            f"{kind:8s}{int(i):>10d}{int(ytr[i]):>7d}{pe[i]:>+13.3e}"
            f"{float(pred_lissa[i]):>+13.3e}{act_s:>15s}"
        )

    lines += [row("helpful", i) for i in order[:5]]
    lines += [row("harmful", i) for i in order[::-1][:5]]
    lines += [
        "",
        f"leave-one-out check on the {len(idx)} most influential points (exact refits):",
        f"  Pearson R, exact influence vs actual: {loo.pearson:.4f}  (Spearman {loo.spearman:.4f})",
        f"  Pearson R, LiSSA influence vs actual: {r_lissa:.4f}",
        f"  Pearson R, LiSSA vs exact over all {n} training points: {r_exact_lissa_all:.4f}",
        f"  time: exact influence {t_exact:.2f} s, LiSSA {t_lissa:.2f} s, "
        f"{len(idx)} refits {t_loo:.2f} s, total {time.perf_counter() - t0:.1f} s",
    ]
    print("\n".join(lines))
    title = f"test #{test_idx}\nlabel {yte_np[test_idx]}, pred {int(pred[test_idx])}"
    _plot_most_influential(out, xte_np[test_idx], title, xtr_np, ytr_np, order, pe)
    _plot_predicted_vs_actual(out, loo, lissa_on_loo)
    metrics = {
        "n_train": n,
        "p": obj.p,
        "l2": L2,
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "test_index": test_idx,
        "test_label": int(yte[test_idx]),
        "predicted_label": int(pred[test_idx]),
        "loo_indices": idx.tolist(),
        "loo_actual": np.asarray(loo.actual).tolist(),
        "loo_predicted_exact": np.asarray(loo.predicted).tolist(),
        "loo_predicted_lissa": lissa_on_loo.tolist(),
        "pearson_exact": loo.pearson,
        "spearman_exact": loo.spearman,
        "pearson_lissa": r_lissa,
        "pearson_lissa_vs_exact_all": r_exact_lissa_all,
        "most_helpful": [int(i) for i in order[:5]],
        "most_harmful": [int(i) for i in order[::-1][:5]],
        "lissa": lissa.diagnostics(),
        "exact": exact.diagnostics(),
        "seconds": {
            "exact": t_exact,
            "lissa": t_lissa,
            "loo": t_loo,
            "total": time.perf_counter() - t0,
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    print(f"figures and metrics.json written to {out}/")
    return metrics
