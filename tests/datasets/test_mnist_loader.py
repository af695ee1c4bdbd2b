"""MNIST: IDX reader on tiny fake files, the paper's splits, and real-data counts."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from inflens.datasets import _files, mnist
from inflens.datasets._files import ChecksumError, CorruptFileError, DatasetNotFoundError


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_fake_mnist(folder: Path, n_train: int = 12, n_test: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        (folder / name).write_bytes(gzip.compress(idx_bytes(array)))
    return arrays


def test_read_idx_gz_and_plain(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (tmp_path / "a").write_bytes(idx_bytes(images))
    np.testing.assert_array_equal(mnist.read_idx(tmp_path / "a.gz", 2051), images)
    np.testing.assert_array_equal(mnist.read_idx(tmp_path / "a"), images)


def test_read_idx_other_dtypes(tmp_path: Path) -> None:
    values = np.array([[1.5, -2.0], [3.25, 4.0]], dtype=np.float32)
    (tmp_path / "f").write_bytes(idx_bytes(values, code=0x0D))
    out = mnist.read_idx(tmp_path / "f")
    assert out.dtype == np.float32 and out.dtype.isnative
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x1f\x8bnot really gzip", "broken gzip"),
        (b"PK\x03\x04", "not an IDX file"),
        (struct.pack(">BBBBI", 0, 0, 0x07, 1, 3) + b"abc", "unknown IDX element type"),
        (struct.pack(">BBBBI", 0, 0, 0x08, 1, 10) + b"short", "has 5 bytes of data"),
        (struct.pack(">BBBB", 0, 0, 0x08, 3) + b"\0\0", "truncated IDX header"),
    ],
)
def test_read_idx_corrupt(tmp_path: Path, content: bytes, match: str) -> None:
    (tmp_path / "bad").write_bytes(content)
    with pytest.raises(CorruptFileError, match=match):
        mnist.read_idx(tmp_path / "bad")


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))
    (tmp_path / "t.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="Delete the file"):
        mnist.read_idx(tmp_path / "t.gz")


def test_read_idx_wrong_magic(tmp_path: Path) -> None:
    (tmp_path / "labels").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(CorruptFileError, match="magic number 2049, expected 2051"):
        mnist.read_idx(tmp_path / "labels", expected_magic=2051)


def test_load_mnist_from_inflens_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_fake_mnist(tmp_path / "data" / "mnist")
    monkeypatch.setenv("INFLENS_DATA", str(tmp_path / "data"))
    data = mnist.load_mnist(download=False, verify=False)
    np.testing.assert_array_equal(data["x_train"], arrays["train-images-idx3-ubyte.gz"])
    np.testing.assert_array_equal(data["y_test"], arrays["t10k-labels-idx1-ubyte.gz"])
    assert data["x_train"].dtype == np.uint8 and data["y_train"].dtype == np.int64


def test_load_mnist_rejects_wrong_checksum(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte.gz"):
        mnist.load_mnist(tmp_path, download=False)


def test_load_mnist_downloads_from_file_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = tmp_path / "server"
    arrays = write_fake_mnist(server)
    files = tuple(
        _files.RemoteFile((name,), (server / name).as_uri(), _files.sha256_file(server / name))
        for name in arrays
    )
    monkeypatch.setattr(mnist, "FILES", files)
    data = mnist.load_mnist(verify=False)
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(arrays)
    np.testing.assert_array_equal(data["y_train"], arrays["train-labels-idx1-ubyte.gz"])


def test_load_mnist_offline_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import urllib.error

    def offline(*args: object) -> Path:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(_files, "fetch", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        mnist.load_mnist()
    message = str(info.value)
    for name in mnist.SHA256:
        assert name in message
    assert "INFLENS_DATA" in message and str(tmp_path / "cache" / "mnist") in message


def synthetic(n_train: int = 5100, n_test: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test),
    }


def test_paper_split_takes_first_5000_as_validation() -> None:
    data = synthetic()
    split = mnist.paper_split(data)
    assert split["x_train"].shape == (100, 784) and split["x_valid"].shape == (5000, 784)
    assert split["x_train"].dtype == np.float32
    np.testing.assert_allclose(split["x_train"], data["x_train"][5000:].reshape(100, -1) / 255)
    np.testing.assert_array_equal(split["y_valid"], data["y_train"][:5000])
    assert 0.0 <= split["x_test"].min() and split["x_test"].max() <= 1.0
    square = mnist.paper_split(data, flatten=False, dtype=np.float64)
    assert square["x_test"].shape == (40, 28, 28) and square["x_test"].dtype == np.float64


def test_one_vs_seven_labels_order_and_truncation() -> None:
    y = np.array([7, 1, 3, 1, 7, 7, 0, 1] * 30)
    split = {"x_train": np.arange(len(y))[:, None] * 1.0, "y_train": y}
    split |= {"x_test": split["x_train"][:16], "y_test": y[:16]}
    out = mnist.one_vs_seven(split)
    keep = np.flatnonzero((y == 1) | (y == 7))
    np.testing.assert_array_equal(out["train_index"], keep)
    np.testing.assert_array_equal(out["x_train"][:, 0], keep)
    np.testing.assert_array_equal(out["y_train"], (y[keep] == 1).astype(int))
    assert len(out["y_train"]) == 180
    short = mnist.one_vs_seven(split, truncate=True, signed=True)
    assert len(short["y_train"]) == 100 and len(short["y_test"]) == 0
    assert set(short["y_train"]) == {-1, 1}


def test_small_subset_is_seed0_permutation() -> None:
    split = mnist.paper_split(synthetic(n_train=5000 + 550))
    small = mnist.small_subset(split)
    expected = np.random.RandomState(0).permutation(550)[:55]
    np.testing.assert_array_equal(small["train_index"], expected)
    np.testing.assert_array_equal(small["x_train"], split["x_train"][expected])
    assert small["x_test"] is split["x_test"]


@pytest.fixture(scope="module")
def real_mnist(real_data) -> dict[str, np.ndarray]:
    folder = real_data("mnist", *mnist.SHA256)
    return mnist.load_mnist(folder, download=False)


@pytest.mark.realdata
def test_real_mnist_counts(real_mnist: dict[str, np.ndarray]) -> None:
    assert real_mnist["x_train"].shape == (60000, 28, 28)
    assert real_mnist["x_test"].shape == (10000, 28, 28)
    train_counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test_counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(real_mnist["y_train"]).tolist() == train_counts
    assert np.bincount(real_mnist["y_test"]).tolist() == test_counts
    assert real_mnist["y_train"][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


@pytest.mark.realdata
def test_real_paper_splits(real_mnist: dict[str, np.ndarray]) -> None:
    split = mnist.paper_split(real_mnist)
    assert split["x_train"].shape == (55000, 784) and split["x_valid"].shape == (5000, 784)
    ovs = mnist.one_vs_seven(split)
    assert (len(ovs["y_train"]), len(ovs["y_test"])) == (11894, 2163)
    assert (ovs["y_train"].sum(), ovs["y_test"].sum()) == (6179, 1135)
    short = mnist.one_vs_seven(split, truncate=True)
    assert (len(short["y_train"]), len(short["y_test"])) == (11800, 2100)
    small = mnist.small_subset(split)
    assert small["x_train"].shape == (5500, 784) and len(small["y_test"]) == 10000
