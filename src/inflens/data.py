"""Training and test data in one shape, whatever structure the batches have.

Accepted (``DataLike``):

- ``(inputs, targets)``: ``inputs`` a tensor (or array), a tuple of tensors (passed to the model
  as positional arguments) or a dict of tensors (passed as ``model(**inputs)``), every tensor
  with the examples along its first dimension; ``targets`` a tensor;
- a dict of tensors in the Hugging Face style, ``{"input_ids", "attention_mask", "labels"}``:
  the targets are taken from the ``label_key`` entry (default ``"labels"``), the other keys are
  the model's keyword arguments;
- a map-style ``Dataset`` whose items are ``(input, target)`` pairs (each part a tensor, tuple
  or dict) or Hugging Face style dicts;
- a ``DataLoader`` over such a dataset that does not shuffle and does not drop examples; its
  ``collate_fn`` (e.g. padding to the longest sequence of the batch) and batch size are used.

Everything downstream iterates over *chunks* ``(start, x, y)`` in a fixed order, so that
example ``i`` always means row ``i`` of the training set (row ``i`` of every score matrix).
``x`` is then a tensor, tuple or dict of tensors with a leading batch dimension (a "batch
tree"): :func:`batch_len`, :func:`index_batch`, :func:`to_device` handle all three.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from .errors import InputError

Batch = Union[torch.Tensor, tuple, dict]
DataLike = Union[tuple, Sequence, Mapping, Dataset, DataLoader, "Data"]


# ---------------------------------------------------------------------------- batch trees
def batch_len(x: Batch) -> int:
    """Number of examples in a batch tree (the first dimension of its first tensor)."""
    leaves = [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]
    if not leaves:
        raise InputError("a batch must contain at least one tensor")
    return int(leaves[0].shape[0])


def index_batch(x: Batch, idx: torch.Tensor | slice) -> Batch:
    """The examples ``idx`` of every tensor in a batch tree."""
    return tree_map(lambda t: t[idx] if isinstance(t, torch.Tensor) else t, x)


def to_device(x: Batch, device: torch.device | str) -> Batch:
    """Every tensor of a batch tree on ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, x)


def unsqueeze_batch(x: Batch) -> Batch:
    """A one-example batch from one example's tree (a leading dimension of 1 on every tensor)."""
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, x)


def float_leaves(x: Batch) -> list[torch.Tensor]:
    """The floating-point tensors of a batch tree."""
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _as_tensor(a: Any, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    try:
        return torch.as_tensor(a)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise InputError(f"{what} must be a tensor or array-like, got {type(a).__name__}") from exc


def _as_tree(a: Any, what: str) -> Batch:
    if isinstance(a, Mapping):
        return {str(k): _as_tensor(v, f"{what}[{k!r}]") for k, v in a.items()}
    if isinstance(a, tuple):
        return tuple(_as_tensor(v, f"{what}[{i}]") for i, v in enumerate(a))
    return _as_tensor(a, what)


class Data:
    """An indexable, chunkable view of ``(inputs, targets)`` examples (module docstring).

    Args:
        data: see the module docstring.
        name: what to call the data in error messages ("training data", "test data").
        label_key: the key of the targets in Hugging Face style dict examples.
    """

    def __init__(self, data: DataLike, name: str = "data", label_key: str = "labels") -> None:
        if isinstance(data, Data):
            data = data.source
        self.source = data
        self.name = name
        self.label_key = label_key
        #: in-memory inputs when they are one plain tensor (fast paths index it directly)
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self._tree: Batch | None = None  # in-memory inputs of any structure
        self.dataset: Dataset | None = None
        self.loader_batch_size: int | None = None
        self.collate_fn: Callable[[list], Any] = default_collate
        if isinstance(data, DataLoader):
            self._from_loader(data)
        elif isinstance(data, IterableDataset):
            raise InputError(self._iterable_message())
        elif isinstance(data, Dataset):
            self.dataset = data
        elif isinstance(data, Mapping):
            self._set_memory(*self._split(dict(data), "the data dict"))
        elif isinstance(data, (tuple, list)) and len(data) == 2:
            self._set_memory(
                _as_tree(data[0], f"{name} inputs"), _as_tensor(data[1], f"{name} targets")
            )
        else:
            raise InputError(
                f"{name} must be a pair (inputs, targets), a dict of tensors with a "
                f"{label_key!r} entry, a torch Dataset or a DataLoader, got {type(data).__name__}"
            )
        if len(self) == 0:
            raise InputError(f"{name} is empty: at least one example is needed")

    # ------------------------------------------------------------------ construction
    def _iterable_message(self) -> str:
        return (
            f"the {self.name} is an IterableDataset, whose length and order are not fixed; "
            "influence scores are indexed by position. Wrap it in a map-style Dataset "
            "(__getitem__ and __len__), e.g. one that reads examples from disk by index"
        )

    def _from_loader(self, loader: DataLoader) -> None:
        if isinstance(loader.dataset, IterableDataset):
            raise InputError(self._iterable_message())
        if not isinstance(loader.sampler, SequentialSampler):
            raise InputError(
                f"the DataLoader for the {self.name} shuffles or samples "
                f"({type(loader.sampler).__name__}); influence scores are indexed by "
                "position, so pass a DataLoader with shuffle=False (or the Dataset itself)"
            )
        if loader.drop_last:
            raise InputError(
                f"the DataLoader for the {self.name} has drop_last=True, which silently leaves "
                "out the last examples; pass drop_last=False (every training point must count)"
            )
        self.dataset = loader.dataset
        self.loader_batch_size = loader.batch_size
        self.collate_fn = loader.collate_fn

    def _set_memory(self, x: Batch, y: torch.Tensor) -> None:
        if y.ndim == 0:
            raise InputError(f"{self.name} targets need a leading batch dimension")
        for t in tree_leaves(x):
            if t.ndim == 0:
                raise InputError(f"{self.name} inputs need a leading batch dimension")
            if t.shape[0] != y.shape[0]:
                raise InputError(
                    f"{self.name} has {t.shape[0]} inputs but {y.shape[0]} targets; "
                    "the first dimensions must match"
                )
        self._tree, self.y = x, y
        if isinstance(x, torch.Tensor):
            self.x = x

    def _split(self, batch: Any, what: str) -> tuple[Batch, torch.Tensor]:
        """``(inputs, targets)`` of a collated batch: a pair, or a dict with ``label_key``."""
        if isinstance(batch, Mapping):
            if self.label_key not in batch:
                raise InputError(
                    f"{self.name}: {what} is a dict without a {self.label_key!r} entry (keys: "
                    f"{', '.join(map(str, batch))}); add the targets under {self.label_key!r} "
                    "(for a causal language model: labels = input_ids with padding set to -100) "
                    "or pass inflens.data.Data(data, label_key=...)"
                )
            inputs = {str(k): v for k, v in batch.items() if k != self.label_key}
            return _as_tree(inputs, f"{self.name} inputs"), _as_tensor(
                batch[self.label_key], f"{self.name} targets"
            )
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            x = batch[0]
            x = tuple(x) if isinstance(x, list) else x
            return _as_tree(x, f"{self.name} inputs"), _as_tensor(batch[1], f"{self.name} targets")
        raise InputError(
            f"{self.name}: every example must be an (input, target) pair or a dict with a "
            f"{self.label_key!r} entry, got {type(batch).__name__}"
        )

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        if self.y is not None:
            return int(self.y.shape[0])
        try:
            return len(self.dataset)  # type: ignore[arg-type]
        except TypeError as exc:
            raise InputError(f"{self.name}: the Dataset must define __len__") from exc

    def _collate(self, items: list) -> tuple[Batch, torch.Tensor]:
        try:
            batch = self.collate_fn(items)
        except (TypeError, IndexError, RuntimeError) as exc:
            raise InputError(
                f"{self.name}: the examples could not be batched ({exc}); examples of different "
                "shapes (e.g. sequences of different lengths) need a DataLoader with a "
                "collate_fn that pads them"
            ) from exc
        return self._split(batch, "a collated batch")

    def get(self, indices: torch.Tensor | Sequence[int]) -> tuple[Batch, torch.Tensor]:
        """The examples at ``indices`` as one batch ``(inputs, targets)``."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise InputError(
                f"{self.name} has {n} examples; indices must lie in [0, {n - 1}], "
                f"got indices in [{int(idx.min())}, {int(idx.max())}]"
            )
        if self.y is not None:
            return index_batch(self._tree, idx), self.y[idx]
        return self._collate([self.dataset[int(i)] for i in idx])  # type: ignore[index]

    def chunks(self, chunk_size: int | None) -> Iterator[tuple[int, Batch, torch.Tensor]]:
        """Yield ``(start, x, y)`` for consecutive chunks covering every example once."""
        n = len(self)
        size = chunk_size or self.loader_batch_size or n
        if self.y is not None:
            for start in range(0, n, size):
                yield (
                    start,
                    index_batch(self._tree, slice(start, start + size)),
                    self.y[start : start + size],
                )
            return
        loader = DataLoader(
            self.dataset,  # type: ignore[arg-type]
            batch_size=size,
            shuffle=False,
            collate_fn=self._collate_checked,
        )
        start = 0
        for x, y in loader:
            yield start, x, y
            start += int(y.shape[0])

    def _collate_checked(self, items: list) -> tuple[Batch, torch.Tensor]:
        return self._collate(items)

    def subset(self, lo: int, hi: int) -> Data:
        """Examples ``[lo, hi)`` as a new :class:`Data` (same collation and label key)."""
        if self.y is not None:
            out = Data((index_batch(self._tree, slice(lo, hi)), self.y[lo:hi]), self.name)
        else:
            from torch.utils.data import Subset

            out = Data(Subset(self.dataset, range(lo, hi)), self.name, self.label_key)  # type: ignore[arg-type]
            out.collate_fn = self.collate_fn
            out.loader_batch_size = self.loader_batch_size
        out.label_key = self.label_key
        return out

    def num_chunks(self, chunk_size: int | None) -> int:
        size = chunk_size or self.loader_batch_size or len(self)
        return -(-len(self) // size)

    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input (without the batch dimension); inputs must be one tensor."""
        x, _ = self.get([0])
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{self.name}: the inputs are a {type(x).__name__}, not one tensor")
        return tuple(x.shape[1:])
