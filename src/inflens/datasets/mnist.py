"""MNIST: the IDX reader, the full data set and the paper's splits (PROTOCOL 4.1-4.4).

The paper used TensorFlow's loader: the first 5,000 of the 60,000 training images are the
validation set and the remaining 55,000 are the training set; pixels are divided by 255.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._files import CorruptFileError, RemoteFile, locate, verify_sha256

SUBFOLDER = "mnist"
BASE_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

#: file name -> sha256 (from shared/data/mnist/PROVENANCE.md; byte-identical to the originals)
SHA256 = {
    "train-images-idx3-ubyte.gz": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
}
FILES = tuple(
    RemoteFile((name, name[: -len(".gz")]), BASE_URL + name, sha) for name, sha in SHA256.items()
)

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
VALIDATION_SIZE = 5000

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain) into a numpy array.

    Args:
        path: the file; gzip is detected from its first bytes, not from the name.
        expected_magic: if given, the 32-bit magic number the file must start with
            (2051 for MNIST images, 2049 for labels).

    Returns:
        The array with the shape stored in the header, in native byte order.

    Raises:
        CorruptFileError: the file is not valid IDX (bad gzip stream, bad header, wrong length).
    """
    hint = "Delete the file and download it again (or point data_dir at a good copy)."
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise CorruptFileError(f"{path}: broken gzip stream ({exc}). {hint}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise CorruptFileError(f"{path}: not an IDX file (bad magic number). {hint}")
    magic = struct.unpack(">I", raw[:4])[0]
    if expected_magic is not None and magic != expected_magic:
        raise CorruptFileError(
            f"{path}: magic number {magic}, expected {expected_magic}. Wrong file? {hint}"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise CorruptFileError(f"{path}: unknown IDX element type 0x{code:02x}. {hint}")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise CorruptFileError(f"{path}: truncated IDX header. {hint}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise CorruptFileError(
            f"{path}: header says shape {dims} ({expected} bytes of data) but the file has "
            f"{len(raw) - header} bytes of data. {hint}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None, download: bool = True, verify: bool = True
) -> dict[str, np.ndarray]:
    """Load the full MNIST set.

    Args:
        data_dir: folder with the four ``*-idx?-ubyte[.gz]`` files (or with an ``mnist/``
            subfolder); default: ``$INFLENS_DATA/mnist``, then the cache.
        download: fetch missing files from the torchvision mirror.
        verify: check the sha256 of the ``.gz`` files against PROVENANCE.

    Returns:
        ``x_train`` uint8 [60000, 28, 28], ``y_train`` int64 [60000], ``x_test`` uint8
        [10000, 28, 28], ``y_test`` int64 [10000].
    """
    paths = locate("MNIST", SUBFOLDER, FILES, data_dir, download)
    if verify:
        for name, path in paths.items():
            if path.name == name:  # the published checksums are those of the .gz files
                verify_sha256(path, SHA256[name])
    out: dict[str, np.ndarray] = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"], IMAGES_MAGIC)
        labels = read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"], LABELS_MAGIC)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise CorruptFileError(
                f"MNIST {split}: images {images.shape} and labels {labels.shape} do not match."
            )
        out[f"x_{split}"] = images.astype(np.uint8, copy=False)
        out[f"y_{split}"] = labels.astype(np.int64)
    return out


def paper_split(
    data: Mapping[str, np.ndarray] | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    flatten: bool = True,
    dtype: Any = np.float32,
) -> dict[str, np.ndarray]:
    """TensorFlow's split used by the paper: train = train[5000:], validation = train[:5000].

    Args:
        data: the output of :func:`load_mnist`; loaded when omitted.
        data_dir, download: passed to :func:`load_mnist` when ``data`` is omitted.
        flatten: return images as [N, 784] (else [N, 28, 28]).
        dtype: float type of the pixels, which are divided by 255 into [0, 1].

    Returns:
        ``x_train`` [55000, ...], ``y_train``, ``x_valid`` [5000, ...], ``y_valid``,
        ``x_test`` [10000, ...], ``y_test``.
    """
    if data is None:
        data = load_mnist(data_dir, download)

    def pixels(x: np.ndarray) -> np.ndarray:
        x = x.astype(dtype) / np.asarray(255, dtype=dtype)
        return x.reshape(len(x), -1) if flatten else x

    x_train, y_train = data["x_train"], data["y_train"]
    return {
        "x_train": pixels(x_train[VALIDATION_SIZE:]),
        "y_train": np.asarray(y_train[VALIDATION_SIZE:]),
        "x_valid": pixels(x_train[:VALIDATION_SIZE]),
        "y_valid": np.asarray(y_train[:VALIDATION_SIZE]),
        "x_test": pixels(data["x_test"]),
        "y_test": np.asarray(data["y_test"]),
    }


def one_vs_seven(
    split: Mapping[str, np.ndarray] | None = None,
    *,
    truncate: bool = False,
    signed: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> dict[str, np.ndarray]:
    """The 1-vs-7 binary task of Figs 1 and 3 (PROTOCOL 4.1, 4.4).

    Keeps digits 1 and 7 of the 55,000/10,000 split in their original order; digit 1 gets
    label 1 and digit 7 label 0 (``signed=True``: +1 and -1). Untruncated sizes are 11,894
    train / 2,163 test. ``truncate=True`` keeps the first multiple of 100 of each set
    (11,800 / 2,100), as in Fig 3.

    Args:
        split: the output of :func:`paper_split`; computed (flattened, float32) when omitted.

    Returns:
        ``x_train``, ``y_train``, ``x_test``, ``y_test`` and ``train_index`` / ``test_index``,
        the positions of the kept rows in the 55,000 / 10,000 sets.
    """
    if split is None:
        split = paper_split(data_dir=data_dir, download=download)
    out: dict[str, np.ndarray] = {}
    for part in ("train", "test"):
        y = np.asarray(split[f"y_{part}"])
        index = np.flatnonzero((y == 1) | (y == 7))
        if truncate:
            index = index[: len(index) // 100 * 100]
        label = (y[index] == 1).astype(np.int64)
        out[f"x_{part}"] = split[f"x_{part}"][index]
        out[f"y_{part}"] = 2 * label - 1 if signed else label
        out[f"{part}_index"] = index
    return out


def small_subset(
    split: Mapping[str, np.ndarray] | None = None,
    *,
    fraction: float = 0.1,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> dict[str, np.ndarray]:
    """The "small MNIST" of the CNN experiment (PROTOCOL 4.3).

    A ``np.random.RandomState(seed)`` permutation of the 55,000 training points, first
    ``int(55000 * fraction)`` kept (5,500 for the paper's seed 0 and 10%). The validation and
    test sets are returned unchanged.

    Args:
        split: the output of :func:`paper_split`; computed (flattened, float32) when omitted.

    Returns:
        The keys of :func:`paper_split`, with ``x_train``/``y_train`` reduced, plus
        ``train_index`` (positions in the 55,000).
    """
    if split is None:
        split = paper_split(data_dir=data_dir, download=download)
    n = len(split["y_train"])
    perm = np.random.RandomState(seed).permutation(n)
    index = perm[: int(n * fraction)]
    out = dict(split)
    out["x_train"] = split["x_train"][index]
    out["y_train"] = np.asarray(split["y_train"])[index]
    out["train_index"] = index
    return out
