"""The dog-vs-other animal task shared by Fig. 4 and Fig. 5 (stand-in for the paper's dog/fish).

The paper (PROTOCOL 4.5) used 900 train / 300 test ImageNet images per class (dog, fish) and
frozen Inception v3 features. Here, by default:

- **images**: CIFAR-10 ``dog`` and ``frog`` from ``cifar10_animals/`` (32x32 JPEG, real photos):
  per class the first 900 of ``train/<class>`` and the first 300 of ``test/<class>``, scaled to
  ``[-1, 1]`` and shuffled with ``RandomState(0)`` (train first), as the paper's loader;
  labels dog = 0, frog = 1 (the paper: dog = 0, fish = 1). Frog stands in for fish: CIFAR-10
  has no fish, and frog is, like fish, a non-mammal that does not look like a dog.
- **"Koda" stand-in** for the multi-target attack: 30 held-out dog photos
  (``test/dog`` images 300-329), never used for training anything.
- **feature extractor**: :class:`inflens.features.SmallCNN` trained on every *other* image of the
  zip (bird, cat, dog, frog minus the task and Koda images: 21,570 images, 4-way labels, 8
  epochs), then frozen; cached as safetensors under ``$INFLENS_CACHE/features`` so Fig. 4 and
  Fig. 5 share it. The features are its whole last feature map, 4 x 4 x 64 = 1,024 values
  (the paper: 2,048 pooled Inception features for 1,800 training images).
- **top model**: binary logistic regression without bias on the cached features, l2 = 0.001,
  fitted exactly (float64 Newton to a gradient norm below 1e-12), as the paper's top model.

Users can pass their own image folder (``root/<class>/*.jpg``, e.g. ImageNet dog/fish) and a
pretrained backbone (:func:`inflens.features.pretrained_backbone`) to run the original setting.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from .. import Objective
from ..apps.labels import outputs_to_labels
from ..datasets import cifar
from ..datasets._files import cache_root
from ..features import FeatureModel, cached_feature_cnn, extract_features
from ..models import LogisticRegression
from ..train import fit_newton

F = TypeVar("F", bound=Callable[..., Any])

CLASSES = ("dog", "frog")
ALL_CLASSES = ("bird", "cat", "dog", "frog")
L2 = 0.001
N_KODA = 30
#: SmallCNN readout used for the task's features (see prepare_task).
READOUT = "flatten"


@dataclass
class AnimalTask:
    """Images (float32 NCHW in [-1, 1]), labels, the frozen extractor and the exact top model."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    x_koda: torch.Tensor | None = None
    y_koda: torch.Tensor | None = None
    extractor: nn.Module | None = None
    extractor_info: dict[str, Any] = field(default_factory=dict)
    f_train: torch.Tensor | None = None  # float64 cached features
    f_test: torch.Tensor | None = None
    f_koda: torch.Tensor | None = None
    theta: torch.Tensor | None = None  # float64 top weights
    top_info: dict[str, Any] = field(default_factory=dict)

    def full_model(self, dtype: torch.dtype = torch.float32) -> FeatureModel:
        """extractor + binary LR (the fitted weights), pixels in, one logit out."""
        assert self.extractor is not None and self.theta is not None
        top = LogisticRegression(self.theta.numel(), 1, dtype=dtype)
        with torch.no_grad():
            top.linear.weight.copy_(self.theta.reshape(1, -1).to(dtype))
        return FeatureModel(self.extractor.to(dtype), top)

    def top_objective(self) -> Objective:
        """The float64 top model on features: ``Objective(LR, "binary_logistic", l2)``."""
        assert self.theta is not None
        top = LogisticRegression(self.theta.numel(), 1, dtype=torch.float64)
        with torch.no_grad():
            top.linear.weight.copy_(self.theta.reshape(1, -1))
        return Objective(top, "binary_logistic", l2=L2)


@dataclass(frozen=True)
class ImageSource:
    """Your own images and feature network instead of CIFAR and the SmallCNN (fig4, fig5).

    Attributes:
        image_folder: ``root/<class>/*.jpg`` images (e.g. ImageNet dog and fish); the first
            900 / next 300 per class become train / test.
        classes: the two classes (default ``("dog", "frog")`` for CIFAR).
        backbone: a frozen feature extractor taking [-1, 1] images, e.g.
            ``inflens.features.pretrained_backbone(inception_v3(weights=...), size=299)``;
            default: the SmallCNN trained on the other images.
        size: resize your images to ``size x size`` when reading them.
    """

    image_folder: str | os.PathLike[str] | None = None
    classes: Sequence[str] | None = None
    backbone: nn.Module | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        from ..errors import InputError

        if self.size is not None and int(self.size) < 1:
            raise InputError(f"size must be a positive number of pixels, got {self.size}")
        if self.classes is not None and len(self.classes) != 2:
            raise InputError(f"classes must name exactly two classes, got {self.classes!r}")


def _shuffle(n_train: int, n_test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    # as inflens.datasets.cifar.paper_subset / the paper's load_animals.py
    rng = np.random.RandomState(seed)
    tr, te = np.arange(n_train), np.arange(n_test)
    rng.shuffle(tr)
    rng.shuffle(te)
    return tr, te


def load_cifar_task(
    data_dir: str | os.PathLike[str] | None,
    classes: Sequence[str] = CLASSES,
    n_train: int = 900,
    n_test: int = 300,
    n_other: int | None = None,
) -> tuple[AnimalTask, torch.Tensor, torch.Tensor]:
    """The two-class task, the Koda stand-in and the "other" images for the extractor.

    Args:
        n_other: read at most this many images per (split, class) beyond the task's images for
            the extractor (``None``: all of them; the quick mode reads a few hundred).

    Returns:
        ``(task, x_other, y_other)``; ``y_other`` are 4-way labels over ``ALL_CLASSES``.
    """
    classes = list(classes)
    koda_cls = classes[0]
    n_koda = N_KODA if koda_cls == "dog" else 0
    limit_tr = None if n_other is None else n_train + n_other
    limit_te = None if n_other is None else n_test + n_koda + n_other
    raw = cifar.load_cifar_animals(
        ALL_CLASSES, data_dir, n_train_per_class=limit_tr, n_test_per_class=limit_te
    )
    parts: dict[str, dict[str, list[np.ndarray]]] = {}
    for split, n_task in (("train", n_train), ("test", n_test)):
        x_all, y_all = raw[f"x_{split}"], raw[f"y_{split}"]
        got: dict[str, list[np.ndarray]] = {"xo": [], "yo": [], "koda": []}
        task_rows: dict[str, np.ndarray] = {}
        for c, name in enumerate(ALL_CLASSES):
            rows = np.flatnonzero(y_all == c)
            if name in classes:
                task_rows[name] = x_all[rows[:n_task]]
                rows = rows[n_task:]
                if split == "test" and name == koda_cls and n_koda:
                    got["koda"].append(x_all[rows[:n_koda]])
                    rows = rows[n_koda:]
            got["xo"].append(x_all[rows])
            got["yo"].append(np.full(len(rows), c))
        # grouped in the order of `classes`, as inflens.datasets.cifar.paper_subset
        got["x"] = [task_rows[name] for name in classes]
        got["y"] = [np.full(len(task_rows[name]), k) for k, name in enumerate(classes)]
        parts[split] = got
    xtr, ytr = np.concatenate(parts["train"]["x"]), np.concatenate(parts["train"]["y"])
    xte, yte = np.concatenate(parts["test"]["x"]), np.concatenate(parts["test"]["y"])
    x_koda = np.concatenate(parts["test"]["koda"]) if parts["test"]["koda"] else None
    x_other = np.concatenate(parts["train"]["xo"] + parts["test"]["xo"])
    y_other = np.concatenate(parts["train"]["yo"] + parts["test"]["yo"])
    perm_tr, perm_te = _shuffle(len(ytr), len(yte))
    task = AnimalTask(
        x_train=torch.from_numpy(cifar.scale_images(xtr[perm_tr])),
        y_train=torch.from_numpy(ytr[perm_tr]).long(),
        x_test=torch.from_numpy(cifar.scale_images(xte[perm_te])),
        y_test=torch.from_numpy(yte[perm_te]).long(),
        classes=classes,
        x_koda=None if x_koda is None else torch.from_numpy(cifar.scale_images(x_koda)),
        y_koda=None if x_koda is None else torch.zeros(len(x_koda), dtype=torch.long),
    )
    return task, torch.from_numpy(cifar.scale_images(x_other)), torch.from_numpy(y_other).long()


def load_folder_task(
    image_folder: str | os.PathLike[str],
    classes: Sequence[str] | None,
    size: int | None,
    n_train: int = 900,
    n_test: int = 300,
) -> tuple[AnimalTask, torch.Tensor, torch.Tensor]:
    """A user's ``root/<class>/*.jpg`` folder split by the paper's rule (first 900 / next 300).

    Images beyond the first ``n_train + n_test`` of each class are returned as the "other"
    images (labelled by class) for training an extractor when no backbone is given.
    """
    data = cifar.load_image_folder(image_folder, classes, size)
    sub = cifar.folder_subset(data, n_train=n_train, n_test=n_test)
    y = np.asarray(data["y"])
    rest = np.concatenate(
        [np.flatnonzero(y == c)[n_train + n_test :] for c in range(len(data["classes"]))]
    )
    task = AnimalTask(
        x_train=torch.from_numpy(sub["x_train"]),
        y_train=torch.from_numpy(sub["y_train"]).long(),
        x_test=torch.from_numpy(sub["x_test"]),
        y_test=torch.from_numpy(sub["y_test"]).long(),
        classes=list(sub["classes"]),
    )
    x_other = (
        torch.from_numpy(cifar.scale_images(np.asarray(data["x"])[rest])) if len(rest) else None
    )
    y_other = torch.from_numpy(y[rest]).long() if len(rest) else None
    return task, x_other, y_other


def one_thread_when_quick(run: F) -> F:
    """Decorate an experiment's ``run``: one intra-op thread when it is called with
    ``quick=True``, restored afterwards.

    The quick problems are too small to gain from threads, and on a busy machine BLAS threads
    that wait for a core made the quick Fig. 5 run 25 times slower (9.5 min against 23 s).
    """
    sig = inspect.signature(run)

    @functools.wraps(run)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        if not bound.arguments["quick"]:
            return run(*args, **kwargs)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return run(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper  # type: ignore[return-value]


def quick_sizes(quick: bool) -> dict[str, int | None]:
    """Subset sizes: the paper's 900/300 per class, or a small CI subset."""
    if quick:
        return {"n_train": 100, "n_test": 40, "n_other": 200, "epochs": 1}
    return {"n_train": 900, "n_test": 300, "n_other": None, "epochs": 8}


def prepare_task(
    data_dir: str | os.PathLike[str] | None,
    quick: bool = False,
    progress: bool = True,
    *,
    classes: Sequence[str] | None = None,
    image_folder: str | os.PathLike[str] | None = None,
    backbone: nn.Module | None = None,
    size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> AnimalTask:
    """Load the task, get the frozen extractor (backbone or cached CNN) and fit the top LR."""
    sizes = quick_sizes(quick)
    if image_folder is not None:
        task, x_other, y_other = load_folder_task(
            image_folder, classes, size, int(sizes["n_train"]), int(sizes["n_test"])
        )
    else:
        task, x_other, y_other = load_cifar_task(
            data_dir,
            classes or CLASSES,
            int(sizes["n_train"]),
            int(sizes["n_test"]),
            sizes["n_other"],
        )
    if backbone is not None:
        task.extractor = backbone.eval()
        task.extractor_info = {"kind": "user backbone", "class": type(backbone).__name__}
    else:
        if x_other is None or len(x_other) == 0:
            raise ValueError(
                "no images are left to train the feature CNN on: pass a pretrained backbone "
                "(inflens.features.pretrained_backbone) or add more images per class"
            )
        folder = Path(cache_dir) if cache_dir is not None else cache_root() / "features"
        net, info = cached_feature_cnn(
            x_other,
            y_other,
            folder,
            name="animals_cnn_quick" if quick else "animals_cnn",
            progress=progress,
            epochs=int(sizes["epochs"]),
            seed=0,
        )
        # Read out the whole last feature map (4 x 4 x 64 = 1,024 values), not its average
        # (64): with p > about n/2 the top model separates its training set, as the paper's
        # LR on 2,048 Inception features does (train accuracy 1.0), and single training
        # points have the leverage the attacks of Fig. 5 rely on.
        net.readout = READOUT
        task.extractor = net
        task.extractor_info = {
            "kind": "SmallCNN trained on the other images",
            "readout": READOUT,
            **info,
        }
    extractor = task.extractor
    task.f_train = extract_features(extractor, task.x_train, progress=progress).double()
    task.f_test = extract_features(extractor, task.x_test).double()
    if task.x_koda is not None:
        task.f_koda = extract_features(extractor, task.x_koda).double()
    fit_top(task)
    return task


def fit_top(task: AnimalTask) -> None:
    """Exact binary LR without bias on the cached features (float64, gradient norm <= 1e-12)."""
    assert task.f_train is not None
    top = LogisticRegression(task.f_train.shape[1], 1, dtype=torch.float64)
    obj = Objective(top, "binary_logistic", l2=L2)
    # Newton with the exact Hessian from zero (L-BFGS crawls on these nearly separable,
    # p ~ n problems); converges quadratically to a gradient norm below 1e-12
    zeros = torch.zeros(obj.p, dtype=torch.float64)
    fit = fit_newton(obj, (task.f_train, task.y_train), theta0=zeros, tol=1e-12, max_iter=200)
    theta = fit.theta
    grad_norm = float(
        torch.func.grad(lambda th: obj.risk(th, task.f_train, task.y_train))(theta).norm()
    )
    task.theta = theta
    obj.load_into_model(theta)
    with torch.no_grad():
        tr_pred = outputs_to_labels(top(task.f_train))
        te_pred = outputs_to_labels(top(task.f_test))
    task.top_info = {
        "grad_norm": grad_norm,
        "train_accuracy": float((tr_pred == task.y_train).double().mean()),
        "test_accuracy": float((te_pred == task.y_test).double().mean()),
        "test_correct": int((te_pred == task.y_test).sum()),
        "n_test": int(task.y_test.numel()),
        "train_loss_with_reg": float(obj.risk(theta, task.f_train, task.y_train)),
        "test_loss": float(obj.losses(theta, task.f_test, task.y_test).mean()),
        "theta_norm": float(theta.norm()),
    }
