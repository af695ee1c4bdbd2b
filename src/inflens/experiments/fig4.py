"""Fig. 4 (Sec. 5.1): which training images an RBF SVM and a network on frozen features rely on.

Stand-in for the paper's ImageNet dog-vs-fish with Inception v3 (not obtainable here; see
:mod:`inflens.experiments._animals`): CIFAR-10 dog vs frog, 900 train / 300 test per class.

- **"deep" model**: a :class:`~inflens.features.SmallCNN` trained on the *other* CIFAR images,
  frozen; binary logistic regression without bias on its last feature map (4 x 4 x 64 = 1,024
  values), l2 = 0.001, fitted exactly (the paper: frozen Inception v3, LR on 2,048 features).
- **"shallow" model**: the paper's RBF SVM (PROTOCOL 4.5): exact Cholesky features of the RBF
  Gram matrix on raw [-1, 1] pixels of [train; test], hinge-trained bias-free linear SVM with
  l2 = 0.001, influence through SmoothHinge(t = 0.001) at the hinge weights.
  ``gamma``: the paper's ``0.05 / n_train`` (n_train = 1,800) was set for 299x299x3 =
  268,203 pixel values; squared pixel distances grow with the number of values, so for
  32x32x3 = 3,072 values it is scaled by 268,203 / 3,072 (keeping ``gamma * ||x - x'||^2`` at
  the paper's scale). The literal value is also reported (its kernel is nearly constant on
  these images).
- **influence**: ``-I_up,loss / n`` of every training image (positive = helpful), exact
  solver, for every test image both models classify correctly (summaries over all of them and
  over those inside the SVM's margin); the figure shows the first frog (the stand-in of the
  paper's fish) in test order that both get right and that lies inside the SVM's margin, as
  the paper's test image did (margin 0.990).

``run(..., config=Fig4Config(image_folder=..., classes=(...), size=299,
backbone=pretrained_backbone(inception)))`` runs the original setting on your own images
with a pretrained network (Python API).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import Influence
from ..apps.compare import compare_models, rbf_svm
from ..errors import InputError
from . import _animals

NAME = "fig4"
DESCRIPTION = (
    "Fig 4: RBF SVM vs frozen-CNN features + LR, influence vs pixel distance (CIFAR dog/frog)"
)

#: Pixel values per image in the paper (299 x 299 x 3) - for the gamma rescaling.
PAPER_DIM = 299 * 299 * 3

PAPER = {
    "inception_test_accuracy": 0.985,
    "rbf_top5_helpful": [0.0182, 0.0183, 0.0205, 0.0215, 0.0224],
    "inception_top5_helpful": [1.57e-4, 2.06e-4, 2.46e-4, 3.86e-4, 3.95e-4],
    "inception_helpful_dog_ranks": [19, 23, 25, 26, 27],
}


#: The paper's training-set size, in its gamma = 0.05 / n_train.
PAPER_N_TRAIN = 1800


def _gamma(n_train: int, dim: int) -> tuple[float, float]:
    """(gamma used, literal paper rule 0.05 / n_train). The used value keeps the paper's
    ``gamma * ||x - x'||^2`` scale: 0.05 / 1800 times 268,203 / dim (the quick subset keeps
    the full run's kernel width rather than widening it with its smaller n)."""
    return 0.05 / PAPER_N_TRAIN * PAPER_DIM / dim, 0.05 / n_train


@dataclass(frozen=True)
class Fig4Config(_animals.ImageSource):
    """Settings of :func:`run` beyond the ones every experiment takes (validated on creation):
    the images and feature network (:class:`~inflens.experiments._animals.ImageSource`) and

    Attributes:
        gamma: RBF width (default: the paper's rule rescaled to the image size, see above).
    """

    gamma: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gamma is not None and not float(self.gamma) > 0:
            raise InputError(f"gamma must be a positive RBF width, got {self.gamma}")


@_animals.one_thread_when_quick
def run(
    data_dir: Path | None,
    out: Path,
    quick: bool = False,
    progress: bool = True,
    config: Fig4Config | None = None,
) -> dict[str, Any]:
    """Run Fig. 4; write ``fig4.png`` and ``metrics.json`` to ``out``; return the metrics.

    Args:
        data_dir: folder holding ``cifar10_animals/`` (or the zip itself).
        out: output folder.
        quick: 100 train / 40 test images per class and a feature CNN trained for seconds.
        progress: progress bars.
        config: your own images, classes, feature network and RBF width (:class:`Fig4Config`;
            default: CIFAR dog/frog, the SmallCNN, the rescaled paper rule).
    """
    cfg = Fig4Config() if config is None else config
    if not isinstance(cfg, Fig4Config):
        raise InputError(f"config must be a Fig4Config, got {type(cfg).__name__}")
    image_folder, classes, backbone, size, gamma = (
        cfg.image_folder,
        cfg.classes,
        cfg.backbone,
        cfg.size,
        cfg.gamma,
    )
    t0 = time.perf_counter()
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
    n = task.x_train.shape[0]
    dim = int(task.x_train[0].numel())
    g_scaled, g_literal = _gamma(n, dim)
    g = float(gamma) if gamma is not None else g_scaled

    # the shallow model: RBF SVM on pixels (PROTOCOL 4.5)
    svm = rbf_svm(task.x_train, task.y_train, task.x_test, gamma=g)
    inf_svm = Influence(svm.objective, (svm.f_train, task.y_train), solver="exact", progress=False)
    inf_svm.fit()
    # the deep model: LR on frozen features
    inf_net = Influence(
        task.top_objective(), (task.f_train, task.y_train), solver="exact", progress=False
    ).fit()

    with torch.no_grad():
        pred_svm = (svm.objective.outputs(svm.objective.theta, svm.f_test) > 0).long()
        pred_net = (task.f_test @ task.theta > 0).long()
    both = torch.nonzero((pred_svm == task.y_test) & (pred_net == task.y_test))[:, 0]
    if both.numel() == 0:
        raise RuntimeError("no test image is classified correctly by both models")
    sel = both
    deep = "CNN features + LR" if backbone is None else "pretrained features + LR"
    cmp = compare_models(
        {
            "RBF SVM": (inf_svm, (svm.f_test[sel], task.y_test[sel])),
            deep: (inf_net, (task.f_test[sel], task.y_test[sel])),
        },
        task.x_train,
        task.x_test[sel],
        task.y_train,
        task.y_test[sel],
        test_index=sel.tolist(),
    )
    # The shown image: the first test image of class 1 (the paper's fish) that both get right
    # and that lies inside the SVM's margin (0 < y s < 1; the paper's clownfish: 0.990).
    # Beyond the margin the smooth hinge's gradient is about exp(-(y s - 1) / t) with
    # t = 0.001, so every SVM influence on that image is vanishingly small.
    with torch.no_grad():
        svm_margin = (2 * task.y_test - 1) * svm.objective.outputs(svm.objective.theta, svm.f_test)
    inside = sel[svm_margin[sel] < 1]
    ones = inside[task.y_test[inside] == 1]
    shown = int(ones[0]) if ones.numel() else int(inside[0] if inside.numel() else sel[0])
    cmp.plot(
        out / "fig4.png",
        shown,
        images=(task.x_train, task.x_test),
        class_names=task.classes,
    )

    # kernel statistics: how far from constant the kernel is, with both gammas
    d2 = torch.cdist(
        task.x_train.reshape(n, -1).double(), task.x_train.reshape(n, -1).double()
    ).pow(2)
    off = d2[~torch.eye(n, dtype=torch.bool)]
    median_d2 = float(off.median())
    metrics: dict[str, Any] = {
        "experiment": NAME,
        "quick": quick,
        "classes": task.classes,
        "n_train": n,
        "n_test": int(task.y_test.numel()),
        "feature_extractor": {
            k: v for k, v in task.extractor_info.items() if k not in ("history",)
        },
        "cnn_lr": {**task.top_info, "p": int(task.theta.numel())},
        "rbf_svm": {
            "gamma": g,
            "gamma_literal_paper_rule": g_literal,
            "median_gamma_sqdist": g * median_d2,
            "median_gamma_sqdist_literal": g_literal * median_d2,
            "median_kernel_value": float(np.exp(-g * median_d2)),
            "median_kernel_value_literal": float(np.exp(-g_literal * median_d2)),
            "test_accuracy": float((pred_svm == task.y_test).double().mean()),
            "train_accuracy": float(
                ((svm.f_train @ svm.w > 0).long() == task.y_train).double().mean()
            ),
            "p": int(svm.f_train.shape[1]),
            "fit": {
                k: v
                for k, v in svm.fit_info.items()
                if isinstance(v, (int, float, bool)) and math.isfinite(v)
            },
        },
        "n_both_correct": int(sel.numel()),
        "summary_over_both_correct": cmp.summary(k=5),
        "n_both_correct_inside_svm_margin": int(inside.numel()),
        "summary_inside_svm_margin": cmp.subset(inside).summary(k=5) if inside.numel() else {},
        "shown_test_image": {
            **cmp.test_summary(shown, k=5),
            "rbf_margin": float(svm_margin[shown]),
            "cnn_p_true": float(
                torch.sigmoid((2 * task.y_test[shown] - 1) * (task.f_test[shown] @ task.theta))
            ),
        },
        "paper": PAPER,
        "seconds": time.perf_counter() - t0,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
