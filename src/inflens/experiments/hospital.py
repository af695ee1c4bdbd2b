"""Section 5.3: debugging a domain mismatch (hospital readmission, children).

PROTOCOL 4.7. UCI "Diabetes 130-US hospitals": 127 features (8 raw numeric columns and the
one-hot dummies of 31 categorical columns, ``None`` kept as a category), label = readmitted
within 30 days. Balanced training set of 10,000 + 10,000 patients (numpy seed 2), the other
81,766 are the test set. Binary logistic regression without bias,
``R(theta) = (1/n) sum_i log(1 + exp(-y_i theta.x_i)) + (l2/2)||theta||^2``, ``l2 = 1e-4``,
on the raw (unscaled) features, fitted by exact Newton steps to ``||grad R|| <= 1e-10`` (the
original's scikit-learn L-BFGS stopped at its 1,000-iteration cap).

The mismatch: every non-readmitted training child (``age_[0-10)``) is removed except the last
one in training order, leaving 4 children of whom 3 are readmitted; the model is refit. The run
reports the children counts, the test children misclassified before and after, how many
features have a larger ``|coefficient|`` than the child indicator (the baseline), and for a
wrongly classified test child the predicted effect ``-I_up,loss/n`` of removing each training
point on its test loss (positive = helpful) together with the input influence ``I_pert,loss``
of the 4 training children. The original's test index 1742 refers to their row order; here the
analogous point is the misclassified test child whose probability of the correct label dropped
most from the original to the modified model. Every misclassified test child is analysed too,
and the predicted effects of the top points are checked against actual leave-one-out refits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import Influence, Objective
from ..apps.mismatch import compare_coefficients, explain_errors
from ..datasets import children_mismatch, hospital_split, load_hospital
from ..datasets.hospital import CHILD_FEATURE
from ..models import LogisticRegression
from ..plots import new_figure, save_figure
from ._logistic import LogisticProblem

NAME = "hospital"
DESCRIPTION = (
    "Sec 5.3: domain mismatch in hospital readmission (children): influence and input influence"
)

L2 = 1e-4
TOL = 1e-10
#: the release notebook's values (PROTOCOL 4.7, section 7 T21-T25)
PAPER = {
    "n_features": 127,
    "n_train": 20000,
    "n_test": 81766,
    "train_children": 24,
    "train_children_readmitted": 3,
    "train_children_after": 4,
    "n_train_after": 19980,
    "test_children": 137,
    "test_children_misclassified_original": 0,
    "test_children_misclassified_modified": 13,
    "features_larger_than_child": 14,
    "child_coefficient_abs": 0.32,
    "largest_coefficient": ["discharge_disposition_id_11", 3.5],
    "original_train_accuracy": 0.6239,
    "original_test_accuracy": 0.6812,
    "modified_test_accuracy": 0.6813,
    "theta_norm": 4.740,
    "target_test_index": 1742,
    "target_p_correct": [0.737, 0.465],
    "children_effects_readmitted": [-0.1189, -0.1175, -0.0826],
    "children_effect_not_readmitted": 0.0794,
    "next_largest_abs_effects": [0.0029, 0.0025, 0.0014],
    "ratio_range": [28, 41],
    "input_influence_top_feature": "age_[0-10)",
    "input_influence_bottom_feature": "discharge_disposition_id_11",
    "input_influence_magnitudes_code_sign": [1.7e3, -3.2e3],
}
QUICK_TRAIN = 4000


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def _objective(theta: np.ndarray) -> Objective:
    model = LogisticRegression(theta.size, 1, dtype=torch.float64)
    with torch.no_grad():
        model.linear.weight.copy_(torch.from_numpy(theta).view(1, -1))
    return Objective(model, "binary_logistic", l2=L2)


def _p_correct(x: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """``p(y | x) = sigma(y_s theta.x)`` with ``y_s`` in {-1, +1}."""
    ys = np.where(y > 0, 1.0, -1.0)
    return 1.0 / (1.0 + np.exp(-ys * (x @ theta)))


def _loss(x: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray:
    ys = np.where(y > 0, 1.0, -1.0)
    return np.logaddexp(0.0, -ys * (x @ theta))


def _subsample(split: dict[str, Any], n: int) -> dict[str, Any]:
    """Quick mode: the first ``n`` training rows plus every training child (keeps the story)."""
    names = split["feature_names"]
    child = split["x_train"][:, names.index(CHILD_FEATURE)] == 1
    rows = np.union1d(np.arange(n), np.flatnonzero(child))
    return {**split, "x_train": split["x_train"][rows], "y_train": split["y_train"][rows]}


def _bar_effects(
    effects: np.ndarray, is_child: np.ndarray, labels: np.ndarray, path: Path, title: str
) -> Path:
    order = np.argsort(-np.abs(effects))[:20]
    fig, (ax,) = new_figure(1, 1, size=(7.0, 3.2))
    colors = ["tab:red" if is_child[i] else "tab:gray" for i in order]
    ax.bar(np.arange(order.size), effects[order], color=colors)
    ax.set_xticks(np.arange(order.size))
    ax.set_xticklabels(
        [f"{i}{'*' if is_child[i] else ''}\ny={labels[i]}" for i in order], fontsize=5
    )
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("effect of removal on test loss\n(-I_up,loss / n; > 0 helpful)", fontsize=7)
    ax.set_xlabel("training point (* = child, red); top 20 by |effect|", fontsize=7)
    ax.set_title(title, fontsize=8)
    return save_figure(fig, path, dpi=110)


def _bar_features(values: np.ndarray, names: list[str], path: Path, title: str) -> Path:
    order = np.argsort(values)
    pick = np.concatenate([order[-10:][::-1], order[:10][::-1]])
    fig, (ax,) = new_figure(1, 1, size=(7.0, 3.6))
    ax.barh(
        np.arange(pick.size),
        values[pick],
        color=["tab:blue" if values[j] > 0 else "tab:orange" for j in pick],
    )
    ax.set_yticks(np.arange(pick.size))
    ax.set_yticklabels([names[j] for j in pick], fontsize=6)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("-I_pert,loss (gradient of the code's influence w.r.t. the input)", fontsize=7)
    ax.set_title(title, fontsize=8)
    return save_figure(fig, path, dpi=110)


def _capped_sklearn(
    x: np.ndarray,
    y: np.ndarray,
    xm: np.ndarray,
    ym: np.ndarray,
    xt: np.ndarray,
    yt: np.ndarray,
    names: list[str],
    target: int,
) -> dict[str, Any]:
    """Refit both models as the release notebook did: scikit-learn ``LogisticRegression``
    (L-BFGS, ``C = 1/(n l2)``, no intercept, ``tol=1e-8``, ``max_iter=1000``), which stops at the
    iteration cap before converging; then the same children / coefficient / influence numbers.
    """
    import warnings

    from sklearn.linear_model import LogisticRegression as SkLogReg
    from threadpoolctl import threadpool_limits

    child_col = names.index(CHILD_FEATURE)
    child_te = xt[:, child_col] == 1
    res: dict[str, Any] = {}
    thetas = []
    for tag, xx, yy in (("original", x, y), ("modified", xm, ym)):
        clf = SkLogReg(C=1.0 / (len(yy) * L2), fit_intercept=False, tol=1e-8, max_iter=1000)
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")  # the ConvergenceWarning is the point here
            clf.fit(xx, yy)
        th = clf.coef_.reshape(-1).astype(np.float64)
        thetas.append(th)
        wrong = ((xt @ th) > 0).astype(np.int64) != yt
        res[tag] = {
            "iterations": int(clf.n_iter_[0]),
            "grad_norm": LogisticProblem(xx, L2).grad_norm(th, yy),
            "test_accuracy": float(1 - wrong.mean()),
            "test_children_misclassified": int((child_te & wrong).sum()),
            "features_larger_than_child": compare_coefficients(th, names, CHILD_FEATURE)["larger"],
            "child_coefficient": float(th[child_col]),
            "p_correct_target": float(_p_correct(xt[[target]], yt[[target]], th)[0]),
        }
    inf = Influence(
        _objective(thetas[1]),
        (torch.from_numpy(xm), torch.from_numpy(ym)),
        solver="exact",
        progress=False,
    ).fit()
    eff = inf.predicted_loss_change(
        (torch.from_numpy(xt[[target]]), torch.from_numpy(yt[[target]]))
    )[0].numpy()
    child_m = xm[:, child_col] == 1
    order = np.argsort(-np.abs(eff))
    nxt = order[~child_m[order]][0]
    res["modified"]["children_effects"] = [
        [int(i), int(ym[i]), float(eff[i])] for i in np.flatnonzero(child_m)
    ]
    res["modified"]["next_largest_abs_effect"] = float(abs(eff[nxt]))
    res["modified"]["top4_are_the_children"] = bool(child_m[order[:4]].all())
    return res


def run(data_dir: Path | None, out: Path, quick: bool = False, progress: bool = True) -> dict:
    """Reproduce Sec. 5.3; writes two PNGs, ``report.txt`` and ``metrics.json`` into ``out``.

    ``quick`` uses the first 4,000 training patients plus every training child (same test set)
    and skips the leave-one-out check.
    """
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = hospital_split(load_hospital(data_dir))
    if quick:
        split = _subsample(split, QUICK_TRAIN)
    names: list[str] = split["feature_names"]
    x, y = split["x_train"], split["y_train"].astype(np.int64)
    xt, yt = split["x_test"], split["y_test"].astype(np.int64)
    child_col = names.index(CHILD_FEATURE)
    n, d = x.shape
    _log(progress, f"[{NAME}] n_train={n}, n_test={len(yt)}, features={d}")

    # --- original model
    prob_full = LogisticProblem(x, L2)
    theta0, info0 = prob_full.fit(y, tol=TOL)
    _log(
        progress,
        f"[{NAME}] original: {info0.iterations} Newton steps, |grad|={info0.grad_norm:.1e}",
    )
    child_tr = x[:, child_col] == 1
    child_te = xt[:, child_col] == 1

    # --- induce the mismatch and refit
    keep = children_mismatch(x, y, names)
    xm, ym = x[keep], y[keep]
    prob_mod = LogisticProblem(xm, L2)
    theta1, info1 = prob_mod.fit(ym, theta0=theta0, tol=TOL)
    _log(
        progress,
        f"[{NAME}] modified: {info1.iterations} Newton steps, |grad|={info1.grad_norm:.1e}",
    )
    child_m = xm[:, child_col] == 1
    children_idx = np.flatnonzero(child_m)

    def wrong(theta: np.ndarray) -> np.ndarray:
        return ((xt @ theta) > 0).astype(np.int64) != yt

    wrong0, wrong1 = wrong(theta0), wrong(theta1)
    wrong_children = np.flatnonzero(child_te & wrong1)
    coef = compare_coefficients(theta1, names, CHILD_FEATURE)
    coef0 = compare_coefficients(theta0, names, CHILD_FEATURE)

    # --- influence at the modified model
    obj = _objective(theta1)
    xm_t, ym_t = torch.from_numpy(xm), torch.from_numpy(ym)
    inf = Influence(obj, (xm_t, ym_t), solver="exact", progress=progress).fit()
    pc0, pc1 = _p_correct(xt, yt, theta0), _p_correct(xt, yt, theta1)
    metrics: dict[str, Any] = {
        "experiment": NAME,
        "quick": quick,
        "n_features": d,
        "n_train": n,
        "n_test": int(len(yt)),
        "fit_original": {
            "newton_steps": info0.iterations,
            "grad_norm": info0.grad_norm,
            "train_accuracy": float((((x @ theta0) > 0) == (y > 0)).mean()),
            "test_accuracy": float(1 - wrong0.mean()),
            "train_loss": float(_loss(x, y, theta0).mean()),
            "train_risk": float(_loss(x, y, theta0).mean() + 0.5 * L2 * theta0 @ theta0),
            "theta_norm": float(np.linalg.norm(theta0)),
        },
        "fit_modified": {
            "newton_steps": info1.iterations,
            "grad_norm": info1.grad_norm,
            "test_accuracy": float(1 - wrong1.mean()),
        },
        "train_children": int(child_tr.sum()),
        "train_children_readmitted": int(y[child_tr].sum()),
        "n_train_after": int(len(ym)),
        "train_children_after": int(child_m.sum()),
        "train_children_after_readmitted": int(ym[child_m].sum()),
        "test_children": int(child_te.sum()),
        "test_children_readmitted": int(yt[child_te].sum()),
        "test_children_misclassified_original": int((child_te & wrong0).sum()),
        "test_children_misclassified_modified": int(len(wrong_children)),
        "child_coefficient_original": coef0["coefficient"],
        "child_coefficient": coef["coefficient"],
        "features_larger_than_child": coef["larger"],
        "features_larger_than_child_original": coef0["larger"],
        "largest_coefficients": coef["top"][:5],
        "hessian": {k: v for k, v in inf.diagnostics().items() if k != "chunk_size"},
    }
    if len(wrong_children) == 0:
        metrics["note"] = "no test child is misclassified by the modified model"
        metrics["paper"] = PAPER
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        return metrics

    # --- the target test child: the original's test index 1742 when it is a misclassified
    # child here (our split reproduces theirs), else the one whose p(correct) dropped most
    if PAPER["target_test_index"] in wrong_children:
        target, how = PAPER["target_test_index"], "the release notebook's test index"
    else:
        drop = pc0[wrong_children] - pc1[wrong_children]
        target, how = int(wrong_children[np.argmax(drop)]), "largest drop of p(correct)"
    xt_t = torch.from_numpy(xt[[target]])
    yt_t = torch.from_numpy(yt[[target]])
    effects = inf.predicted_loss_change((xt_t, yt_t))[0].numpy()
    order = np.argsort(-np.abs(effects))
    top4 = order[:4]
    non_child = order[~child_m[order]]
    next3 = effects[non_child[:3]]
    child_eff = effects[children_idx]
    ratio = np.abs(child_eff) / np.abs(next3[0])
    metrics["target"] = {
        "test_index": target,
        "chosen_as": how,
        "label": int(yt[target]),
        "p_correct_original": float(pc0[target]),
        "p_correct_modified": float(pc1[target]),
        "top4_are_the_children": bool(set(top4.tolist()) == set(children_idx.tolist())),
        "children": [
            {
                "train_index": int(i),
                "label": int(ym[i]),
                "effect": float(effects[i]),
                "role": "helpful" if effects[i] > 0 else "harmful",
                "ratio_to_next": float(abs(effects[i]) / abs(next3[0])),
            }
            for i in children_idx
        ],
        "next_largest_non_child": [
            {"train_index": int(i), "label": int(ym[i]), "effect": float(effects[i])}
            for i in non_child[:3]
        ],
        "ratio_range": [float(ratio.min()), float(ratio.max())],
        "rank_of_children": [int(np.flatnonzero(order == i)[0]) + 1 for i in children_idx],
    }
    # signs: readmitted children harmful, the non-readmitted child helpful (paper's claim)
    metrics["target"]["signs_as_paper"] = bool(
        all((effects[i] < 0) == (ym[i] == 1) for i in children_idx)
    )

    # --- every misclassified test child, one solve for all of them
    all_eff = inf.predicted_loss_change(
        (torch.from_numpy(xt[wrong_children]), torch.from_numpy(yt[wrong_children]))
    ).numpy()
    per_child = []
    for row, t in zip(all_eff, wrong_children):
        o = np.argsort(-np.abs(row))
        nc = o[~child_m[o]][0]
        per_child.append(
            {
                "test_index": int(t),
                "top4_are_the_children": bool(set(o[:4].tolist()) == set(children_idx.tolist())),
                "min_child_ratio": float(np.abs(row[children_idx]).min() / abs(row[nc])),
                "max_child_ratio": float(np.abs(row[children_idx]).max() / abs(row[nc])),
                "signs_as_paper": bool(all((row[i] < 0) == (ym[i] == 1) for i in children_idx)),
            }
        )
    metrics["all_misclassified_children"] = {
        "count": len(per_child),
        "top4_are_the_children": int(sum(p["top4_are_the_children"] for p in per_child)),
        "signs_as_paper": int(sum(p["signs_as_paper"] for p in per_child)),
        "min_child_ratio_range": [
            min(p["min_child_ratio"] for p in per_child),
            max(p["min_child_ratio"] for p in per_child),
        ],
        "per_point": per_child,
    }

    # --- input influence of the 4 children on the target's test loss
    pert = inf.input_influence((xt_t, yt_t), torch.from_numpy(children_idx)).numpy()
    code_sign = -pert  # the original code's gradient-of-influence = -I_pert,loss (no 1/n)
    kept_negative = children_idx[ym[children_idx] == 0]
    inputs = {}
    for r, i in enumerate(children_idx):
        o = np.argsort(code_sign[r])
        inputs[int(i)] = {
            "label": int(ym[i]),
            "largest_positive": [(names[j], float(code_sign[r, j])) for j in o[::-1][:5]],
            "largest_negative": [(names[j], float(code_sign[r, j])) for j in o[:5]],
            "child_feature_rank_by_abs": int(
                np.flatnonzero(np.argsort(-np.abs(code_sign[r])) == child_col)[0]
            )
            + 1,
        }
    metrics["input_influence_code_sign"] = inputs

    # --- leave-one-out check of the predicted effects (children + next 3), exact refits
    if not quick:
        loo = []
        base = float(_loss(xt[[target]], yt[[target]], theta1)[0])
        for i in [*children_idx.tolist(), *non_child[:3].tolist()]:
            w = np.ones(len(ym)) * len(ym) / (len(ym) - 1)
            w[i] = 0.0  # mean over the n-1 kept points, same l2 (PROTOCOL 3)
            th, info = prob_mod.fit(ym, theta0=theta1, weights=w, tol=TOL)
            actual = float(_loss(xt[[target]], yt[[target]], th)[0]) - base
            loo.append(
                {
                    "train_index": int(i),
                    "predicted": float(effects[i]),
                    "actual": actual,
                    "grad_norm": info.grad_norm,
                }
            )
        pred = np.array([r["predicted"] for r in loo])
        act = np.array([r["actual"] for r in loo])
        metrics["leave_one_out"] = {
            "points": loo,
            "pearson": float(np.corrcoef(pred, act)[0, 1]),
            "max_abs_error": float(np.abs(pred - act).max()),
        }

    # --- the original protocol: scikit-learn L-BFGS capped at 1,000 iterations (not converged)
    if not quick:
        metrics["original_protocol"] = _capped_sklearn(x, y, xm, ym, xt, yt, names, target)

    # --- the library table for all misclassified test children
    report = explain_errors(
        inf,
        (torch.from_numpy(xt), torch.from_numpy(yt)),
        wrong_children,
        k_train=8,
        k_features=4,
        feature_names=names,
        label_names={0: "not", 1: "readm."},
    )
    (out / "report.txt").write_text(report.table() + "\n")
    metrics["explain_errors_top_indices"] = [p["index"] for p in report.points]

    # --- figures
    _bar_effects(
        effects,
        child_m,
        ym,
        out / "hospital_influence.png",
        f"test child {target}: effect of removing each training point",
    )
    r_neg = int(np.flatnonzero(children_idx == kept_negative[-1])[0]) if kept_negative.size else 0
    _bar_features(
        code_sign[r_neg],
        names,
        out / "hospital_input_influence.png",
        f"training child {int(children_idx[r_neg])} (label {int(ym[children_idx[r_neg]])})"
        f": input influence on test child {target}",
    )
    metrics["figures"] = ["hospital_influence.png", "hospital_input_influence.png"]
    metrics["paper"] = PAPER
    metrics["seconds"] = time.perf_counter() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    _log(progress, f"[{NAME}] done in {metrics['seconds']:.0f} s")
    return metrics
