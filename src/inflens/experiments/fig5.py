"""Fig. 5 / Sec. 5.2: training-set attacks on a frozen-feature network (PROTOCOL 4.6).

Stand-in for the paper's dog-vs-fish Inception v3 model (see :mod:`inflens.experiments._animals`):
CIFAR-10 dog vs frog, 900 train / 300 test per class, a frozen SmallCNN (trained on the other
CIFAR images) with an exactly fitted logistic regression on its last feature map
(4 x 4 x 64 = 1,024 values; l2 = 0.001).

**Individual attacks** (the paper: 591 correct test images; 57% flipped with one poisoned
training image, 77% with at most two, all but one with at most ten). For each correctly
classified test image (in a seeded random order; how many were attacked is reported), the
training images are ranked by ``||I_pert,loss||_1`` and the attempts top-1, second alone,
top 2, 3, 5, 10 are tried in order, each up to 100 iterations of 0.02 8-bit levels, inside the
box of +-0.5 levels around the original pixels, refitting the top layer exactly after every
step and stopping when the prediction flips (:class:`inflens.attack.TrainingSetAttack`).

**Multi-target attack** (the paper: one training image against 30 photos of the author's dog,
16 of 30 flipped after 2,000 iterations of 0.005 levels): here 30 held-out CIFAR dog photos
(``test/dog`` 300-329, never used for training anything), the single top-ranked training
image for their mean loss, 2,000 iterations of 0.005 levels, no early stopping.

Because 32x32 images give the attacker 87 times fewer pixels than 299x299 ones (a +-0.5-level
box allows an L2 change of 0.22 here against about 2 in the paper) and a small CNN is far less
sensitive to such changes than Inception v3, the individual attacks are also run with a wider
box (``wide_box_levels``, default +-8 levels, the step scaled so that the box is reached after
25 steps as in the paper) on the same targets; the multi-target attack with that box is
optional (``wide_box_multi``). The full command attacks
every correctly classified test image with the paper's box (the attempts run over all targets
at once with :meth:`inflens.attack.TrainingSetAttack.run_many`; an interrupted run resumes
from its stage files and cached ranking in ``out``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import Objective
from ..apps.attack import (
    PAPER_SCHEDULE,
    AttackConfig,
    PixelBox,
    TrainingSetAttack,
    eight_bit_level,
)
from ..apps.labels import outputs_to_labels, probability_of_label
from ..errors import InputError
from . import _animals

NAME = "fig5"
DESCRIPTION = "Fig 5 / Sec 5.2: training-set attacks on frozen-CNN features + LR (CIFAR dog/frog)"

PAPER = {
    "n_correct": 591,
    "flipped_with_1": 335,
    "fraction_with_1": 0.57,
    "fraction_with_at_most_2": 0.77,
    "flipped_with_at_most_10": 590,
    "multi_target_flipped": 16,
    "multi_target_n": 30,
    "multi_target_acc_before_after": [1.0, 0.467],
    "multi_target_loss_before_after": [0.035, 1.36],
    "multi_target_poisoned_p_correct_before_after": [0.7726, 0.325],
    "multi_pixel_l2_change": 1.88,
    "multi_pixel_mean_centroid_distance": 270.0,
    "multi_feature_l2_change": 11.13,
    "multi_feature_mean_centroid_distance": 12.86,
}


def _class_centroid_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean L2 distance of the points to their own class centroid (flattened)."""
    x = x.reshape(x.shape[0], -1).double()
    d = [
        (x[y == c] - x[y == c].mean(0)).norm(dim=1)
        for c in torch.unique(y)
        if int((y == c).sum()) > 0
    ]
    return float(torch.cat(d).mean())


def _attempt_record(res: Any, n_images: int) -> dict[str, Any]:
    return {
        "n_images": n_images,
        "indices": res.indices.tolist(),
        "iterations": res.iterations,
        "success": res.success,
        "p_true_after": float(res.prob_true_after[0]),
        "pixel_l2": res.delta_l2().tolist(),
        "pixel_linf_levels": res.delta_linf_levels(),
        "feature_l2": res.feature_change.tolist(),
    }


def _individual(
    atk: TrainingSetAttack,
    task: _animals.AnimalTask,
    targets: torch.Tensor,
    ranked: torch.Tensor,
    schedule: tuple[int, float, PixelBox],
    log: Path,
    progress: bool,
) -> list[dict[str, Any]]:
    """The paper's attempt schedule on every target; one JSON line per target in ``log``.

    The schedule runs attempt by attempt over all targets at once
    (:meth:`TrainingSetAttack.run_many`): first every target's top-1 image, then the second
    image alone for the targets not yet flipped, and so on. Each finished attempt is written
    to ``log.stage<j>.jsonl``; an interrupted run started again with the same ``out`` resumes
    after the last finished attempt (the stage files must belong to the same targets).
    ``schedule`` is ``(iterations, step, box)`` of every attempt.
    """
    from tqdm.auto import tqdm

    iterations, step, box = schedule
    t0 = time.perf_counter()
    tl = targets.tolist()
    attempts: dict[int, list[dict[str, Any]]] = {t: [] for t in tl}
    needed: dict[int, int | None] = {t: None for t in tl}
    p_before: dict[int, float] = {}
    pending = list(tl)
    for j, attempt in enumerate(tqdm(PAPER_SCHEDULE, desc="Attempts", disable=not progress)):
        stage = log.with_name(f"{log.stem}.stage{j}.jsonl")
        recs: list[dict[str, Any]] = []
        if stage.exists():
            recs = [json.loads(line) for line in stage.read_text().splitlines() if line]
            if [r["test_index"] for r in recs] != pending:
                raise RuntimeError(
                    f"{stage} belongs to another set of targets; delete it or use another --out"
                )
        elif pending:
            rows = torch.as_tensor([tl.index(t) for t in pending])
            ti = torch.as_tensor(pending)
            results = atk.run_many(
                (task.x_test[ti], task.y_test[ti]),
                ranked[rows][:, list(attempt)],
                iterations=iterations,
                step=step,
                box=box,
            )
            for t, res in zip(pending, results):
                recs.append(
                    {
                        "test_index": t,
                        "p_true_before": float(res.prob_true_before[0]),
                        "seconds": res.seconds,
                        **_attempt_record(res, len(attempt)),
                    }
                )
            tmp = stage.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
            tmp.replace(stage)
        for r in recs:
            t = r["test_index"]
            p_before.setdefault(t, r.pop("p_true_before"))
            attempts[t].append(r)
            if r["success"]:
                needed[t] = len(attempt)
        pending = [t for t in pending if needed[t] is None]
    rows_out: list[dict[str, Any]] = []
    with open(log, "w") as fh:
        for t in tl:
            row = {
                "test_index": t,
                "label": int(task.y_test[t]),
                "p_true_before": p_before[t],
                "needed": needed[t],
                "attempts": [
                    {k: v for k, v in a.items() if k != "test_index"} for a in attempts[t]
                ],
                "seconds": float(sum(a.get("seconds", 0.0) for a in attempts[t])),
            }
            rows_out.append(row)
            fh.write(json.dumps(row) + "\n")
    if progress:
        print(f"  {len(tl)} targets attacked in {time.perf_counter() - t0:.0f} s")
    return rows_out


def _tally(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    needed = [r["needed"] for r in rows]
    ok = [r for r in rows if r["needed"] is not None]
    with1 = sum(1 for k in needed if k == 1)
    with2 = sum(1 for k in needed if k is not None and k <= 2)
    with10 = sum(1 for k in needed if k is not None and k <= 10)
    first = [r["attempts"][-1] for r in ok]
    single = [a for r in ok for a in r["attempts"][-1:] if a["n_images"] == 1]
    return {
        "n_attacked": n,
        "flipped_with_1": with1,
        "flipped_with_at_most_2": with2,
        "flipped_with_at_most_10": with10,
        "fraction_with_1": with1 / n if n else float("nan"),
        "fraction_with_at_most_2": with2 / n if n else float("nan"),
        "fraction_with_at_most_10": with10 / n if n else float("nan"),
        "needed_histogram": {
            str(k): sum(1 for v in needed if v == k) for k in (1, 2, 3, 5, 10, None)
        },
        "mean_iterations_successful_attempt": float(np.mean([a["iterations"] for a in first]))
        if first
        else float("nan"),
        "median_pixel_l2_single_image_success": float(np.median([a["pixel_l2"][0] for a in single]))
        if single
        else float("nan"),
        "median_feature_l2_single_image_success": float(
            np.median([a["feature_l2"][0] for a in single])
        )
        if single
        else float("nan"),
        "seconds_per_target": float(np.mean([r["seconds"] for r in rows])) if rows else 0.0,
    }


def _multi(
    atk: TrainingSetAttack,
    task: _animals.AnimalTask,
    schedule: tuple[int, float, PixelBox],
    snapshot_every: int,
) -> tuple[dict[str, Any], Any]:
    """One training image against the 30 held-out dogs (PROTOCOL 4.6, "Koda")."""
    assert task.x_koda is not None and task.y_koda is not None
    iterations, step, box = schedule
    tgt = (task.x_koda, task.y_koda)
    order, l1 = atk.rank(tgt)
    i = int(order[0])
    res = atk.run(tgt, [i], iterations=iterations, early_stop=False, step=step, box=box)
    theta0, theta1 = res.theta_original, res.theta
    f_tr = task.f_train
    # the poisoned image itself, before and after (its new features)
    f_new = atk._features(res.x_poisoned)[0]
    y_i = int(task.y_train[i])

    def p_correct(theta: torch.Tensor, f: torch.Tensor) -> float:
        return float(probability_of_label((f @ theta).reshape(1), task.y_train[i : i + 1])[0])

    f_poison = f_tr.clone()
    f_poison[i] = f_new
    train_acc_after = float((outputs_to_labels(f_poison @ theta1) == task.y_train).double().mean())
    pred_other = outputs_to_labels(f_tr @ theta0)
    # confidence ranks: the paper's attacked image was the least confident training point
    conf = probability_of_label(f_tr @ theta0, task.y_train)
    rank_conf = int((conf < conf[i]).sum())
    feats = task.f_train
    centroid_dist_feat = _class_centroid_distance(feats, task.y_train)
    centroid_dist_pix = _class_centroid_distance(task.x_train, task.y_train)
    cls_cent = {c: feats[task.y_train == c].mean(0) for c in (0, 1)}
    snaps = [
        {"iteration": k + 1, **res.history[k]}
        for k in range(snapshot_every - 1, len(res.history), snapshot_every)
    ]
    out = {
        "n_targets": int(res.flipped.numel()),
        "n_initially_correct": int(res.initially_correct.sum()),
        "n_flipped": res.n_flipped,
        "accuracy_before": float(res.initially_correct.double().mean()),
        "accuracy_after": float((~res.flipped).double().mean()),
        "loss_before": res.target_loss_before,
        "loss_after": res.target_loss_after,
        "poisoned_index": i,
        "poisoned_label": task.classes[y_i],
        "poisoned_l1_rank_score": float(l1[0]),
        "poisoned_p_correct_before": p_correct(theta0, f_tr[i]),
        "poisoned_p_correct_after": p_correct(theta1, f_new),
        "poisoned_confidence_rank": rank_conf,
        "lowest_training_confidences": torch.sort(conf).values[:2].tolist(),
        "train_accuracy_before": float((pred_other == task.y_train).double().mean()),
        "train_accuracy_after": train_acc_after,
        "theta_norm_before": float(theta0.norm()),
        "theta_norm_after": float(theta1.norm()),
        "pixel_linf_levels": res.delta_linf_levels(),
        "pixel_l2_change": float(res.delta_l2()[0]),
        "pixel_mean_centroid_distance": centroid_dist_pix,
        "feature_l2_change": float(res.feature_change[0]),
        "feature_mean_centroid_distance": centroid_dist_feat,
        "feature_distance_to_centroids_before": {
            task.classes[c]: float((f_tr[i] - v).norm()) for c, v in cls_cent.items()
        },
        "feature_distance_to_centroids_after": {
            task.classes[c]: float((f_new - v).norm()) for c, v in cls_cent.items()
        },
        "iterations": res.iterations,
        "step_levels": step / eight_bit_level(),
        "snapshots": snaps,
        "seconds": res.seconds,
    }
    return out, res


def _figure(out: Path, task, multi: dict[str, Any], res, tallies: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 6.2))
    grid = fig.add_gridspec(2, 5)

    def show(ax, img, title):
        a = img.detach().cpu().double().numpy().transpose(1, 2, 0)
        ax.imshow(np.clip((a + 1) / 2, 0, 1), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])

    i = multi["poisoned_index"]
    show(
        fig.add_subplot(grid[0, 0]),
        res.x_original[0],
        f"training image #{i}\n({multi['poisoned_label']}), original",
    )
    delta = res.delta[0]
    ax = fig.add_subplot(grid[0, 1])
    amp = delta / max(float(delta.abs().max()), 1e-12)
    show(ax, amp, f"perturbation (scaled)\nL-inf {multi['pixel_linf_levels']:.2f} levels")
    show(fig.add_subplot(grid[0, 2]), res.x_poisoned[0], "poisoned image")
    ax = fig.add_subplot(grid[0, 3:])
    hist = res.history
    ax.plot([h["target_loss"] for h in hist], label="mean target loss")
    ax2 = ax.twinx()
    ax2.plot([h["n_flipped"] for h in hist], color="tab:red", label="targets flipped")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean loss on the 30 held-out dogs")
    ax2.set_ylabel("flipped", color="tab:red")
    ax.set_title(
        f"one poisoned image (box +-{multi['box_levels']:g} levels) vs {multi['n_targets']} "
        f"held-out dogs: {multi['n_flipped']}/{multi['n_initially_correct']} flipped",
        fontsize=9,
    )
    # a few targets, before/after
    p0, p1 = res.prob_true_before, res.prob_true_after
    order = torch.argsort(p0 - p1, descending=True)[:2]
    for c, k in enumerate(order.tolist()):
        show(
            fig.add_subplot(grid[1, c]),
            task.x_koda[k],
            f"held-out dog {k}\np(dog) {float(p0[k]):.2f} -> {float(p1[k]):.2f}",
        )
    ax = fig.add_subplot(grid[1, 2:])
    labels = ["1", "2", "3", "5", "10", "not\nflipped"]
    width = 0.8 / max(len(tallies), 1)
    for c, (name, t) in enumerate(tallies.items()):
        h = t["needed_histogram"]
        vals = [h[k] / max(t["n_attacked"], 1) for k in ("1", "2", "3", "5", "10", "None")]
        ax.bar(np.arange(6) + c * width, vals, width=width, label=f"{name} (n={t['n_attacked']})")
    ax.set_xticks(np.arange(6) + width * (len(tallies) - 1) / 2)
    ax.set_xticklabels(labels)
    ax.set_xlabel("training images perturbed to flip one test prediction")
    ax.set_ylabel("fraction of attacked test images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fig5.png", dpi=90)
    plt.close(fig)


@dataclass(frozen=True)
class Fig5Config(_animals.ImageSource):
    """Settings of :func:`run` beyond the ones every experiment takes (validated on creation):
    the images and feature network (:class:`~inflens.experiments._animals.ImageSource`) and

    Attributes:
        max_targets: attack at most this many correctly classified test images (a seeded
            random sample); ``None``: all of them in the full run (the paper's protocol), 2 in
            quick. ``-1``: all.
        wide_box_levels: also attack with a box of this many 8-bit levels (``None``: skip).
        wide_box_targets: individual wide-box attacks on the first this many targets of the
            seeded order (a random sample; ``None``: all, the default).
        wide_box_multi: also run the 2,000-iteration multi-target attack with the wide box
            (about 20 minutes; always in quick mode).
        seed: order in which targets are attacked.
    """

    max_targets: int | None = None
    wide_box_levels: float | None = 8.0
    wide_box_targets: int | None = None
    wide_box_multi: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_targets", "wide_box_targets"):
            v = getattr(self, name)
            if v is not None and int(v) < -1:
                raise InputError(f"{name} must be None, -1 (all) or a count >= 0, got {v}")
        if self.wide_box_levels is not None and not float(self.wide_box_levels) > 0:
            raise InputError(
                f"wide_box_levels must be positive or None, got {self.wide_box_levels}"
            )


@_animals.one_thread_when_quick
def run(
    data_dir: Path | None,
    out: Path,
    quick: bool = False,
    progress: bool = True,
    config: Fig5Config | None = None,
) -> dict[str, Any]:
    """Run Fig. 5; write ``fig5.png``, ``metrics.json`` and per-target logs to ``out``.

    ``data_dir, out, quick, progress`` as every experiment; ``config`` (:class:`Fig5Config`)
    the images, the network, the targets and the wide box (default: the paper's protocol).
    """
    cfg = Fig5Config() if config is None else config
    if not isinstance(cfg, Fig5Config):
        raise InputError(f"config must be a Fig5Config, got {type(cfg).__name__}")
    image_folder, classes, backbone, size = cfg.image_folder, cfg.classes, cfg.backbone, cfg.size
    max_targets, seed = cfg.max_targets, cfg.seed
    wide_box_levels, wide_box_targets = cfg.wide_box_levels, cfg.wide_box_targets
    wide_box_multi = cfg.wide_box_multi
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = _animals.prepare_task(
        data_dir,
        quick,
        progress,
        classes=classes,
        image_folder=image_folder,
        backbone=backbone,
        size=size,
    )
    model = task.full_model(torch.float32)
    obj = Objective(model, "binary_logistic", l2=_animals.L2, params="top.")
    level = eight_bit_level()
    iterations = 10 if quick else 100
    atk = TrainingSetAttack(obj, (task.x_train, task.y_train), AttackConfig(progress=False))

    pred = outputs_to_labels(task.f_test @ atk.theta0)
    correct = torch.nonzero(pred == task.y_test)[:, 0]
    gen = torch.Generator().manual_seed(seed)
    order = correct[torch.randperm(correct.numel(), generator=gen)]
    if max_targets is None:
        max_targets = 2 if quick else -1
    if max_targets >= 0:
        order = order[:max_targets]
    t_rank = time.perf_counter()
    cache = out / "ranking.npz"
    ranked = None
    if cache.exists():  # resume: the ranking of an interrupted run with the same targets
        with np.load(cache, allow_pickle=False) as z:
            if np.array_equal(z["targets"], order.numpy()):
                ranked = torch.from_numpy(z["ranked"])
    if ranked is None:
        ranked, l1 = atk.rank_each(
            (task.x_test[order], task.y_test[order]), top=10, strategy="per_target"
        )
        np.savez(cache, targets=order.numpy(), ranked=ranked.numpy(), l1=l1.numpy())
    rank_seconds = time.perf_counter() - t_rank

    settings = {"paper box +-0.5 levels": (0.5, 0.02)}
    if wide_box_levels:
        settings[f"wide box +-{wide_box_levels:g} levels"] = (
            float(wide_box_levels),
            0.02 * float(wide_box_levels) / 0.5,
        )
    tallies: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {}
    for c, (name, (box_levels, step_levels)) in enumerate(settings.items()):
        n_c = order.numel()
        if c > 0 and wide_box_targets is not None and wide_box_targets >= 0:
            n_c = min(n_c, int(wide_box_targets))
        rows = _individual(
            atk,
            task,
            order[:n_c],
            ranked[:n_c],
            (iterations, step_levels * level, PixelBox.eight_bit(levels=box_levels)),
            out / f"individual_{c}.jsonl",
            progress,
        )
        tallies[name] = {
            "box_levels": box_levels,
            "step_levels": step_levels,
            "iterations": iterations,
            **_tally(rows),
        }
        details[name] = f"individual_{c}.jsonl"

    multi: dict[str, Any] = {}
    if task.x_koda is not None:  # the held-out dogs exist for the CIFAR task only
        shown = None
        for c, (name, (box_levels, _)) in enumerate(settings.items()):
            if c > 0 and not (wide_box_multi or quick):
                continue
            multi[name], res = _multi(
                atk,
                task,
                (
                    100 if quick else 2000,
                    0.005 * box_levels / 0.5 * level,
                    PixelBox.eight_bit(levels=box_levels),
                ),
                snapshot_every=25 if quick else 500,
            )
            multi[name]["box_levels"] = box_levels
            shown = (multi[name], res)
        _figure(out, task, shown[0], shown[1], tallies)
    metrics = {
        "experiment": NAME,
        "quick": quick,
        "classes": task.classes,
        "n_train": int(task.y_train.numel()),
        "n_test": int(task.y_test.numel()),
        "top_model": task.top_info,
        "feature_extractor": {k: v for k, v in task.extractor_info.items() if k != "history"},
        "n_correct_test": int(correct.numel()),
        "target_order_seed": seed,
        "ranking_seconds": rank_seconds,
        "individual": tallies,
        "individual_logs": details,
        "multi_target": multi,
        "attack": atk.describe(),
        "paper": PAPER,
        "seconds": time.perf_counter() - t_start,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
