"""Figure 1: the components of influence (MNIST 1 vs 7, binary logistic regression).

PROTOCOL 4.1. Binary logistic regression without bias on the MNIST 1s and 7s of the paper's
55,000-image training split (digit 1 -> y = +1, digit 7 -> y = -1; n = 11,894, p = 784),
``R(theta) = (1/n) sum_i log(1 + exp(-y_i theta.x_i)) + (l2/2)||theta||^2`` with ``l2 = 0.01``,
trained to ``||grad R|| <= 1e-10`` in float64. For test image 30 of the 1-vs-7 test set (a 7),
four quantities are computed for every training point, all in the units of ``-I_up,loss``
(i.e. ``n`` times the predicted change of the test loss when the point is removed; positive =
helpful):

- full: ``grad L_test^T H^-1 (grad L_i + l2 theta)`` (exact H, explicit in float64);
- without the train loss: the train gradient replaced by ``-y_i x_i`` (drops
  ``sigma(-y_i theta.x_i)`` and ``l2 theta``);
- without H: ``H^-1 grad L_test`` replaced by ``grad L_test`` (``H = I``);
- without both: ``(-y_i x_i)^T grad L_test = y_i y_test sigma(-y_test theta.x_test) x_i.x_test``.

Panel (a) plots each ablation (x) against the full influence (y), green = same label as the
test image, red = other label. Panel (b) shows the test image and the 5th most harmful
(most negative) training image with the same label. The qualitative claims are checked and
written to ``metrics.json``: without H every same-label point is positive and every other-label
point negative; with H some same-label points are harmful.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import Influence, Objective
from ..datasets import load_mnist, mnist_paper_split, one_vs_seven
from ..models import LogisticRegression
from ..plots import new_figure, save_figure
from ..train import fit_lbfgs

NAME = "fig1"
DESCRIPTION = (
    "Fig 1: components of influence (train loss, H^-1) for binary LR on MNIST 1 vs 7, test image 30"
)

L2 = 0.01
TEST_INDEX = 30
HARMFUL_RANK = 4  # 0-based: the 5th most negative same-label training image
QUICK_N = 2000
#: axis ranges of the release figure (x axes, -I_up,loss units), PROTOCOL 4.1
PAPER_RANGES = {
    "without_train_loss": (-150.0, 200.0),
    "without_H": (-15.0, 20.0),
    "without_both": (-20.0, 25.0),
}


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import stats

    return float(stats.spearmanr(a, b)[0])


def components(
    inf: Influence, x: torch.Tensor, ysigned: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, np.ndarray]:
    """The four variants of Fig. 1 for every training point, in ``-I_up,loss`` units."""
    n = inf.n
    g_test = inf.test_gradients(test)[0]  # grad of the test loss, no regulariser
    s_test = inf.solver.solve(g_test[None])[0]  # H^-1 grad L_test
    bare = -(ysigned[:, None] * x)  # the train gradient without sigma(-y theta.x) and l2 theta
    full = n * inf.predicted_loss_change(test)[0]  # = -I_up,loss
    no_h = -inf.score(g_test[None])[0]  # g_test . (grad L_i + l2 theta)
    out = {
        "full": full,
        "without_train_loss": bare @ s_test,
        "without_H": no_h,
        "without_both": bare @ g_test,
    }
    return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in out.items()}


def _closed_form_full(
    x: np.ndarray, ys: np.ndarray, theta: np.ndarray, xt: np.ndarray, yt: float, l2: float
) -> np.ndarray:
    """PROTOCOL 1.7 with the l2 theta term, from an explicit numpy Hessian (a reference)."""
    from scipy.special import expit

    n, d = x.shape
    m = x @ theta
    w = expit(m) * expit(-m)
    h = (x.T * w) @ x / n + l2 * np.eye(d)
    g_test = -expit(-yt * (xt @ theta)) * yt * xt
    s = np.linalg.solve(h, g_test)
    g_train = -(expit(-ys * m) * ys)[:, None] * x + l2 * theta
    return g_train @ s


def _plot(out: Path, comps: dict[str, np.ndarray], same: np.ndarray) -> Path:
    fig, axes = new_figure(3, 1, (3.6, 3.4))
    labels = {
        "without_train_loss": "Without train loss",
        "without_H": r"Without $H^{-1}$",
        "without_both": "Without both",
    }
    y = comps["full"]
    for ax, key in zip(axes, labels):
        xv = comps[key]
        ax.scatter(xv[~same], y[~same], s=4, c="tab:red", alpha=0.5, lw=0, label="other label (1)")
        ax.scatter(xv[same], y[same], s=4, c="tab:green", alpha=0.5, lw=0, label="same label (7)")
        ax.axhline(0, color="0.7", lw=0.5)
        ax.axvline(0, color="0.7", lw=0.5)
        ax.set_xlabel(labels[key])
        ax.set_title(f"R = {_pearson(xv, y):.2f}", fontsize=9)
    axes[0].set_ylabel(r"Influence ($-\mathcal{I}_{up,loss}$)")
    axes[0].legend(fontsize=7, markerscale=3, loc="upper left")
    return save_figure(fig, out / "fig1_components.png", dpi=90)


def _plot_images(out: Path, test_img: np.ndarray, harmful_img: np.ndarray, value: float) -> Path:
    fig, axes = new_figure(2, 1, (2.2, 2.7))
    for ax, img, title in (
        (axes[0], test_img, "Test image (7)"),
        (axes[1], harmful_img, f"Harmful training image\n(7, influence {value:.1f})"),
    ):
        ax.imshow(img.reshape(28, 28), cmap="gray_r")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, out / "fig1_harmful.png", dpi=90)


def run(data_dir: Path | None, out: Path, quick: bool = False, progress: bool = True) -> dict:
    """Reproduce Fig. 1; writes ``fig1_components.png``, ``fig1_harmful.png``, ``metrics.json``.

    ``quick`` uses the first 2,000 training points (same test image).
    """
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d17 = one_vs_seven(mnist_paper_split(load_mnist(data_dir), dtype=np.float64))
    xtr, ytr = d17["x_train"], d17["y_train"]
    if quick:
        xtr, ytr = xtr[:QUICK_N], ytr[:QUICK_N]
    x = torch.from_numpy(np.ascontiguousarray(xtr))
    y = torch.from_numpy(ytr).long()  # 1 = digit 1, 0 = digit 7
    ys = 2.0 * y.to(torch.float64) - 1
    xt = torch.from_numpy(d17["x_test"][TEST_INDEX : TEST_INDEX + 1])
    yt = torch.from_numpy(d17["y_test"][TEST_INDEX : TEST_INDEX + 1]).long()
    n, d = x.shape
    _log(progress, f"[{NAME}] n={n}, test set {len(d17['y_test'])}, test index {TEST_INDEX}")

    model = LogisticRegression(d, 1, dtype=torch.float64)
    obj = Objective(model, "binary_logistic", l2=L2)
    theta, fit = fit_lbfgs(obj, (x, y), tol=1e-10, max_iter=2000, load=True)
    _log(progress, f"[{NAME}] L-BFGS: {fit.iterations} iterations, |grad| = {fit.grad_norm:.1e}")
    with torch.no_grad():
        margin_test = float((2.0 * yt.double() - 1) * (xt @ theta))
        train_acc = float(((x @ theta > 0).long() == y).double().mean())
        p_test = float(torch.sigmoid(torch.tensor(margin_test)))

    inf = Influence(obj, (x, y), solver="exact", progress=progress).fit()
    comps = components(inf, x, ys, (xt, yt))
    ref = _closed_form_full(x.numpy(), ys.numpy(), theta.numpy(), xt[0].numpy(), -1.0, L2)
    assert int(yt[0]) == 0, "test image 30 of the 1-vs-7 test set should be a 7"
    closed_err = float(np.abs(comps["full"] - ref).max() / np.abs(ref).max())

    same = (y == yt[0]).numpy()
    other = ~same
    full = comps["full"]
    # (b): among same-label training points, the 5th most negative full influence
    same_idx = np.flatnonzero(same)
    order = same_idx[np.argsort(full[same_idx], kind="stable")]
    harmful = int(order[HARMFUL_RANK])

    g_test = inf.test_gradients((xt, yt))[0]
    shift = float(L2 * (g_test @ theta))
    no_h_pure = comps["without_H"] - shift  # g_test . grad L_i, no l2 theta term
    viol = np.concatenate([comps["without_H"][same] <= 0, comps["without_H"][other] >= 0])
    viol_vals = np.concatenate([comps["without_H"][same], comps["without_H"][other]])
    claims = {
        "without_H_same_label_all_positive": bool((comps["without_H"][same] > 0).all()),
        "without_H_other_label_all_negative": bool((comps["without_H"][other] < 0).all()),
        "without_H_violations": int(viol.sum()),
        # the l2 theta term of the train gradient shifts every value by the same constant
        # l2 * grad L_test . theta = -l2 sigma(-m_test) m_test; points with sigma(-y_i theta.x_i)
        # ~ 0 then sit at that constant, on the wrong side of zero by a hair
        "without_H_violations_max_abs": float(np.abs(viol_vals[viol]).max()) if viol.any() else 0.0,
        "without_H_l2_shift": float(shift),
        "without_H_without_l2_term_sign_by_label": bool(
            (no_h_pure[same] > 0).all() and (no_h_pure[other] < 0).all()
        ),
        "without_both_sign_by_label": bool(
            (comps["without_both"][same] > 0).all() and (comps["without_both"][other] < 0).all()
        ),
        "full_some_same_label_harmful": bool((full[same] < 0).any()),
        "full_same_label_harmful_count": int((full[same] < 0).sum()),
        "full_other_label_helpful_count": int((full[other] > 0).sum()),
    }
    ranges = {k: [float(v.min()), float(v.max())] for k, v in comps.items()}
    # "without train loss, many points near y = 0 get large |x|": among the half of the points
    # with the smallest |full|, the largest |x| relative to the largest |full| overall
    small = np.abs(full) <= np.median(np.abs(full))
    metrics: dict[str, Any] = {
        "experiment": NAME,
        "quick": quick,
        "n_train": n,
        "n_test": int(len(d17["y_test"])),
        "p": d,
        "l2": L2,
        "test_index": TEST_INDEX,
        "test_label_digit": 7,
        "test_margin": margin_test,
        "test_p_correct": p_test,  # sigma(y_test theta.x_test)
        "train_accuracy": train_acc,
        "fit": fit.to_dict(),
        "closed_form_max_rel_error": closed_err,
        "ranges": ranges,
        "paper_x_ranges": {k: list(v) for k, v in PAPER_RANGES.items()},
        "pearson_vs_full": {k: _pearson(comps[k], full) for k in PAPER_RANGES},
        "spearman_vs_full": {k: _spearman(comps[k], full) for k in PAPER_RANGES},
        "without_train_loss_max_abs_where_full_small": float(
            np.abs(comps["without_train_loss"][small]).max()
        ),
        "full_max_abs": float(np.abs(full).max()),
        "claims": claims,
        "harmful_example": {
            "train_index": harmful,
            "mnist_train_index": int(d17["train_index"][harmful]) + 5000 if not quick else None,
            "full_influence": float(full[harmful]),
            "rank_among_same_label": HARMFUL_RANK + 1,
        },
        "most_harmful_same_label": [float(v) for v in np.sort(full[same_idx])[:5]],
        "most_helpful": [float(v) for v in np.sort(full)[::-1][:5]],
    }
    _plot(out, comps, same)
    _plot_images(out, xt[0].numpy(), x[harmful].numpy(), float(full[harmful]))
    metrics["seconds"] = time.perf_counter() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _log(progress, f"[{NAME}] claims: {claims}")
    return metrics
