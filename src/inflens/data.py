"""Training and test data in one shape: a pair of tensors, a ``Dataset`` or a ``DataLoader``.

Everything downstream iterates over *chunks* ``(start, x, y)`` in a fixed order, so that
example ``i`` always means the same training point (row ``i`` of every score matrix).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Union

import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from .errors import InputError

DataLike = Union[tuple[torch.Tensor, torch.Tensor], Sequence[torch.Tensor], Dataset, DataLoader]


def _as_tensor(a: Any, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    try:
        return torch.as_tensor(a)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise InputError(f"{what} must be a tensor or array-like, got {type(a).__name__}") from exc


class Data:
    """An indexable, chunkable view of ``(inputs, targets)`` pairs.

    Args:
        data: ``(X, y)`` tensors with a shared first dimension, a map-style ``Dataset`` whose
            items are ``(x, y)``, or a ``DataLoader`` over such a dataset (its batch size is
            used as the chunk size; it must not shuffle, so that indices stay meaningful).
        name: what to call the data in error messages ("training data", "test data").
    """

    def __init__(self, data: DataLike, name: str = "data") -> None:
        self.name = name
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.dataset: Dataset | None = None
        self.loader_batch_size: int | None = None
        if isinstance(data, DataLoader):
            if not isinstance(data.sampler, SequentialSampler):
                raise InputError(
                    f"the DataLoader for the {name} shuffles or samples "
                    f"({type(data.sampler).__name__}); influence scores are indexed by "
                    "position, so pass a DataLoader with shuffle=False (or the Dataset itself)"
                )
            self.dataset = data.dataset
            self.loader_batch_size = data.batch_size
        elif isinstance(data, Dataset):
            self.dataset = data
        elif isinstance(data, (tuple, list)) and len(data) == 2:
            x = _as_tensor(data[0], f"{name} inputs")
            y = _as_tensor(data[1], f"{name} targets")
            if x.ndim == 0 or y.ndim == 0:
                raise InputError(f"{name} inputs and targets need a leading batch dimension")
            if x.shape[0] != y.shape[0]:
                raise InputError(
                    f"{name} has {x.shape[0]} inputs but {y.shape[0]} targets; "
                    "the first dimensions must match"
                )
            self.x, self.y = x, y
        else:
            raise InputError(
                f"{name} must be a pair (inputs, targets) of tensors, a torch Dataset or a "
                f"DataLoader, got {type(data).__name__}"
            )
        if len(self) == 0:
            raise InputError(f"{name} is empty: at least one example is needed")

    def __len__(self) -> int:
        if self.x is not None:
            return int(self.x.shape[0])
        try:
            return len(self.dataset)  # type: ignore[arg-type]
        except TypeError as exc:
            raise InputError(f"{self.name}: the Dataset must define __len__") from exc

    def _stack(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            xs = torch.stack([_as_tensor(it[0], f"{self.name} inputs") for it in items])
            ys = torch.stack([_as_tensor(it[1], f"{self.name} targets") for it in items])
        except (TypeError, IndexError, RuntimeError) as exc:
            raise InputError(
                f"{self.name}: every Dataset item must be an (input, target) pair of equal "
                f"shapes ({exc})"
            ) from exc
        return xs, ys

    def get(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at ``indices`` as batched tensors."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise InputError(
                f"{self.name} has {n} examples; indices must lie in [0, {n - 1}], "
                f"got indices in [{int(idx.min())}, {int(idx.max())}]"
            )
        if self.x is not None:
            return self.x[idx], self.y[idx]
        return self._stack([self.dataset[int(i)] for i in idx])  # type: ignore[index]

    def chunks(self, chunk_size: int | None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(start, x, y)`` for consecutive chunks covering every example once."""
        n = len(self)
        size = chunk_size or self.loader_batch_size or n
        if self.x is not None:
            for start in range(0, n, size):
                yield start, self.x[start : start + size], self.y[start : start + size]
            return
        loader = DataLoader(self.dataset, batch_size=size, shuffle=False)  # type: ignore[arg-type]
        start = 0
        for batch in loader:
            x, y = batch[0], batch[1]
            yield start, x, y
            start += int(x.shape[0])

    def num_chunks(self, chunk_size: int | None) -> int:
        size = chunk_size or self.loader_batch_size or len(self)
        return -(-len(self) // size)

    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input (without the batch dimension)."""
        x, _ = self.get([0])
        return tuple(x.shape[1:])
