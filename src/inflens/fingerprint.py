"""SHA-256 fingerprints of tensors, settings, data and models: one implementation for every cache.

A fingerprint says whether something on disk was made from the same inputs: a cached feature
extractor (:mod:`inflens.features`), a leave-one-out checkpoint (:mod:`inflens.validate`), a
trained network of an experiment, a saved influence artifact. Every tensor is hashed with its
name, shape and dtype and its exact bytes (viewed as ``uint8``, so any dtype works, bfloat16
included); settings are hashed as canonical JSON (sorted keys).

This module sits at the bottom of the layers: it imports :mod:`inflens.data` only and takes
an objective by duck typing (``unflatten``, ``theta``, ``frozen``, ``model``, ``loss_name``,
``l2``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from .data import Data, DataLike

__all__ = [
    "data_fingerprint",
    "hash_tensor",
    "json_fingerprint",
    "model_fingerprint",
    "tensors_fingerprint",
]


def hash_tensor(h: Any, name: str, t: torch.Tensor) -> None:
    """Feed ``name``, shape, dtype and the exact bytes of ``t`` into the hash object ``h``."""
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _hash_tree(h: Any, name: str, x: Any) -> None:
    """Hash every tensor of a batch tree (tensor, tuple/list or dict), with its key path."""
    if isinstance(x, torch.Tensor):
        hash_tensor(h, name, x)
    elif isinstance(x, dict):
        for k in sorted(x):
            _hash_tree(h, f"{name}.{k}", x[k])
    else:
        for i, v in enumerate(x):
            _hash_tree(h, f"{name}.{i}", v)


def _json_bytes(config: Any) -> bytes:
    return json.dumps(config, sort_keys=True, default=str).encode()


def tensors_fingerprint(*tensors: torch.Tensor, config: Any = None, length: int = 64) -> str:
    """SHA-256 (hex, first ``length`` characters) of the tensors in order, and of ``config``
    (any JSON-serialisable settings) when given."""
    h = hashlib.sha256()
    if config is not None:
        h.update(b"config|" + _json_bytes(config))
    for i, t in enumerate(tensors):
        hash_tensor(h, str(i), torch.as_tensor(t))
    return h.hexdigest()[:length]


def json_fingerprint(config: Any, length: int = 64) -> str:
    """SHA-256 (hex, first ``length`` characters) of canonical JSON of ``config``."""
    return hashlib.sha256(_json_bytes(config)).hexdigest()[:length]


def model_fingerprint(objective: Any) -> str:
    """SHA-256 of theta (names, shapes, bytes), frozen parameters and buffers, loss and l2
    (a scalar by its repr, a per-parameter ``[p]`` l2 by its bytes)."""
    diag = objective.l2_diag
    l2 = "per-parameter" if diag is not None else repr(objective.l2)
    h = hashlib.sha256()
    h.update(f"{type(objective.model).__qualname__}|{objective.loss_name}|{l2}|".encode())
    for name, t in objective.unflatten(objective.theta).items():
        hash_tensor(h, "theta:" + name, t)
    for name in sorted(objective.frozen):
        hash_tensor(h, "frozen:" + name, objective.frozen[name])
    if diag is not None:
        hash_tensor(h, "l2_diag", diag)
    return h.hexdigest()


def data_fingerprint(data: Data | DataLike, chunk_size: int = 4096) -> str:
    """SHA-256 of every input and target, in order (one pass for a ``Dataset``)."""
    data = data if isinstance(data, Data) else Data(data)
    h = hashlib.sha256()
    h.update(f"n={len(data)}|".encode())
    if data.x is not None:
        _hash_tree(h, "x", data.x)
        hash_tensor(h, "y", data.y)
        return h.hexdigest()
    for _, x, y in data.chunks(chunk_size):
        _hash_tree(h, "x", x)
        hash_tensor(h, "y", y)
    return h.hexdigest()
