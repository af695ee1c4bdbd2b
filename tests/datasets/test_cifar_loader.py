"""CIFAR animals zip, user image folders, and the paper-style [-1, 1] NCHW subset."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inflens.datasets import cifar
from inflens.datasets._files import ChecksumError, DatasetNotFoundError

COLORS = {"bird": (250, 10, 10), "cat": (10, 250, 10), "dog": (10, 10, 250)}


def image_bytes(color: tuple[int, int, int], size: tuple[int, int] = (32, 32), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def write_zip(path: Path, n_train: int = 4, n_test: int = 2) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for split, n in (("train", n_train), ("test", n_test)):
            for cls, color in COLORS.items():
                for i in range(n):
                    # brightness encodes the index, to check the order
                    shade = tuple(c if c > 100 else 20 * i for c in color)
                    archive.writestr(f"{split}/{cls}/{i:04d}.jpg", image_bytes(shade))
    return path


def test_read_animals_zip(tmp_path: Path) -> None:
    out = cifar.read_animals_zip(write_zip(tmp_path / "a.zip"), ["dog", "bird"])
    assert out["x_train"].shape == (8, 32, 32, 3) and out["x_train"].dtype == np.uint8
    assert out["x_test"].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(out["y_train"], [0, 0, 0, 0, 1, 1, 1, 1])
    assert out["classes"] == ["dog", "bird"]
    dog_blue = out["x_train"][:4, :, :, 2].mean(axis=(1, 2))
    bird_red = out["x_train"][4:, :, :, 0].mean(axis=(1, 2))
    assert (dog_blue > 200).all() and (bird_red > 200).all()
    red_channel_of_dogs = out["x_train"][:4, :, :, 0].mean(axis=(1, 2))
    assert np.all(np.diff(red_channel_of_dogs) > 10)  # file order 0000, 0001, ...
    limited = cifar.read_animals_zip(tmp_path / "a.zip", ["cat"], n_train_per_class=3)
    assert limited["x_train"].shape[0] == 3 and limited["x_test"].shape[0] == 2


def test_read_animals_zip_errors(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "a.zip")
    with pytest.raises(
        ValueError, match=r"no class \['fish'\]; available: \['bird', 'cat', 'dog'\]"
    ):
        cifar.read_animals_zip(path, ["dog", "fish"])
    with pytest.raises(ValueError, match="4 images, 5 requested"):
        cifar.read_animals_zip(path, ["dog"], n_train_per_class=5)


def test_load_cifar_animals_missing_zip_explains(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        cifar.load_cifar_animals(["dog", "cat"], tmp_path)
    message = str(info.value)
    assert cifar.ZIP_NAME in message and "shared/data/cifar10_animals" in message
    assert "load_image_folder" in message and "INFLENS_DATA" in message


def test_load_cifar_animals_checksum(tmp_path: Path) -> None:
    write_zip(tmp_path / cifar.ZIP_NAME)
    with pytest.raises(ChecksumError):
        cifar.load_cifar_animals(["dog", "cat"], tmp_path)
    assert cifar.load_cifar_animals(["dog", "cat"], tmp_path, verify=False)["x_train"].shape[0] == 8


def make_folder(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> Path:
    for cls, shapes in sizes.items():
        (root / cls).mkdir(parents=True)
        for i, shape in enumerate(shapes):
            fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
            (root / cls / f"{cls}_{i * 5}.{ext}").write_bytes(image_bytes(COLORS[cls], shape, fmt))
        (root / cls / "notes.txt").write_text("ignored")
    return root


def test_load_image_folder(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", {"dog": [(8, 8)] * 3, "cat": [(8, 8)] * 2})
    out = cifar.load_image_folder(root)
    assert out["classes"] == ["cat", "dog"] and out["x"].shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(out["y"], [0, 0, 1, 1, 1])
    assert [Path(p).name for p in out["paths"][2:]] == ["dog_0.jpg", "dog_5.png", "dog_10.jpg"]
    picked = cifar.load_image_folder(root, classes=["dog"], size=4)
    assert picked["x"].shape == (3, 4, 4, 3) and set(picked["y"]) == {0}


def test_load_image_folder_mixed_sizes_need_resize(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", {"dog": [(8, 8), (10, 6)], "cat": [(8, 8)]})
    with pytest.raises(ValueError, match="pass size"):
        cifar.load_image_folder(root)
    out = cifar.load_image_folder(root, size=(12, 6), resample="bilinear")
    assert out["x"].shape == (3, 6, 12, 3)
    with pytest.raises(FileNotFoundError, match="root/<class>"):
        cifar.load_image_folder(tmp_path / "missing")


def test_scale_images_range_and_layout() -> None:
    x = np.zeros((2, 4, 5, 3), np.uint8)
    x[0, :, :, 1] = 255
    scaled = cifar.scale_images(x)
    assert scaled.shape == (2, 3, 4, 5) and scaled.dtype == np.float32
    assert scaled[0, 1].min() == 1.0 and scaled[0, 0].max() == -1.0
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        cifar.scale_images(np.zeros((4, 5, 3), np.uint8))


def test_paper_subset_from_zip(tmp_path: Path) -> None:
    write_zip(tmp_path / cifar.ZIP_NAME)
    out = cifar.paper_subset(["dog", "cat"], tmp_path, n_train=3, n_test=1, verify=False)
    assert out["x_train"].shape == (6, 3, 32, 32) and out["x_test"].shape == (2, 3, 32, 32)
    rng = np.random.RandomState(0)
    expected_train = np.arange(6)
    rng.shuffle(expected_train)
    np.testing.assert_array_equal(out["train_perm"], expected_train)
    np.testing.assert_array_equal(out["y_train"], expected_train // 3)
    plain = cifar.paper_subset(
        ["dog", "cat"], tmp_path, n_train=3, n_test=1, shuffle=False, verify=False
    )
    np.testing.assert_array_equal(plain["y_train"], [0, 0, 0, 1, 1, 1])


def test_folder_subset_first_then_next(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", {"dog": [(8, 8)] * 5, "cat": [(8, 8)] * 4})
    data = cifar.load_image_folder(root, classes=["dog", "cat"])
    out = cifar.folder_subset(data, n_train=2, n_test=2, shuffle=False)
    assert out["x_train"].shape == (4, 3, 8, 8)
    np.testing.assert_array_equal(out["y_train"], [0, 0, 1, 1])
    np.testing.assert_array_equal(out["y_test"], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="'cat' has 4 images"):
        cifar.folder_subset(data, n_train=3, n_test=2)


@pytest.mark.realdata
def test_real_paper_subset(real_data) -> None:
    folder = real_data("cifar10_animals", cifar.ZIP_NAME)
    out = cifar.paper_subset(["dog", "cat"], folder)
    assert out["x_train"].shape == (1800, 3, 32, 32) and out["x_test"].shape == (600, 3, 32, 32)
    assert np.bincount(out["y_train"]).tolist() == [900, 900]
    assert np.bincount(out["y_test"]).tolist() == [300, 300]
    assert out["x_train"].min() >= -1.0 and out["x_train"].max() <= 1.0


@pytest.mark.realdata
@pytest.mark.slow
def test_real_all_four_classes(real_data) -> None:
    folder = real_data("cifar10_animals", cifar.ZIP_NAME)
    out = cifar.load_cifar_animals(list(cifar.CLASSES), folder)
    assert out["x_train"].shape == (20000, 32, 32, 3) and out["x_test"].shape == (4000, 32, 32, 3)
    assert np.bincount(out["y_train"]).tolist() == [5000] * 4
