"""``inflens.data.Data``: tensors, Datasets and DataLoaders seen as the same indexed chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from inflens.data import Data
from inflens.errors import InputError


class PairDataset(Dataset):
    """A map-style dataset returning ``(x, y)`` tuples built on the fly."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


@pytest.fixture
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(23, 2, 3, generator=g, dtype=torch.float64), torch.arange(23)


def _all(data: Data, size: int | None) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    starts, xs, ys = [], [], []
    for start, x, y in data.chunks(size):
        starts.append(start)
        xs.append(x)
        ys.append(y)
    return starts, torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("kind", ["tensors", "list", "numpy", "tensordataset", "dataset", "loader"])
@pytest.mark.parametrize("size", [1, 5, None])
def test_every_input_kind_gives_the_same_chunks(kind: str, size: int | None, xy) -> None:
    x, y = xy
    src = {
        "tensors": lambda: (x, y),
        "list": lambda: [x, y],
        "numpy": lambda: (x.numpy(), y.numpy()),
        "tensordataset": lambda: TensorDataset(x, y),
        "dataset": lambda: PairDataset(x, y),
        "loader": lambda: DataLoader(PairDataset(x, y), batch_size=4, shuffle=False),
    }[kind]()
    data = Data(src, "training data")
    assert len(data) == 23
    starts, xs, ys = _all(data, size)
    torch.testing.assert_close(xs, x, rtol=0, atol=0)
    assert torch.equal(ys, y)
    step = size or (4 if kind == "loader" else 23)
    assert starts == list(range(0, 23, step))
    assert data.num_chunks(size) == len(starts)
    gx, gy = data.get([5, 0, 22, -1])
    torch.testing.assert_close(gx, x[[5, 0, 22, -1]], rtol=0, atol=0)
    assert gy.tolist() == [5, 0, 22, 22]
    assert data.sample_shape() == (2, 3)


def test_shuffling_loader_is_refused(xy) -> None:
    x, y = xy
    with pytest.raises(InputError, match="shuffle=False"):
        Data(DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True), "training data")


def test_length_mismatch_is_refused(xy) -> None:
    x, y = xy
    with pytest.raises(InputError, match="23 inputs but 22 targets"):
        Data((x, y[:-1]), "training data")


def test_empty_data_is_refused() -> None:
    with pytest.raises(InputError, match="empty"):
        Data((torch.zeros(0, 3), torch.zeros(0)), "training data")
    with pytest.raises(InputError, match="empty"):
        Data(TensorDataset(torch.zeros(0, 3), torch.zeros(0)), "training data")


def test_bad_containers_are_refused(xy) -> None:
    x, y = xy
    with pytest.raises(InputError, match="pair"):
        Data((x, y, y), "test data")
    with pytest.raises(InputError, match="pair"):
        Data(x, "test data")
    with pytest.raises(InputError, match="leading batch dimension"):
        Data((torch.tensor(1.0), torch.tensor(0)), "test data")
    with pytest.raises(InputError, match="array-like"):
        Data((x, object()), "test data")


def test_out_of_range_indices_are_refused(xy) -> None:
    data = Data(xy, "training data")
    with pytest.raises(InputError, match=r"indices must lie in \[0, 22\]"):
        data.get([0, 23])
    with pytest.raises(InputError, match=r"indices must lie in \[0, 22\]"):
        data.get([-24])


def test_numpy_input_shares_memory(xy) -> None:
    x, _ = xy
    arr = np.ascontiguousarray(x.numpy())
    data = Data((arr, np.arange(23)), "training data")
    assert data.x.dtype == torch.float64 and data.x.data_ptr() == torch.from_numpy(arr).data_ptr()
