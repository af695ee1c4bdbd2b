"""The memory budget: how much one computation may allocate, and refusing before it would not fit.

``Influence(max_memory_gb=...)`` bounds every allocation that grows with ``n``, ``p``, the
sequence length or the vocabulary. Chunk sizes are derived from it (:func:`fit_chunk`); a
computation whose smallest unit cannot fit raises :class:`~inflens.errors.MemoryBudgetError`
naming the budget and what to change (:func:`check_budget`), before anything is allocated, so
that no code path is killed by the kernel for memory.

The default (:func:`default_budget_bytes`) is half of the memory this process may use: the
machine's physical memory, or the address-space limit (``ulimit -v``) when that is lower,
minus what the process already holds.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import MemoryBudgetError

GiB = 2**30


def _physical_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * GiB


def _address_space_left() -> int | None:
    """Bytes left under ``RLIMIT_AS`` (``ulimit -v``), or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - no procfs
        used = 0
    return max(0, int(soft) - used)


def default_budget_bytes() -> int:
    """Half of the memory this process may still use (module docstring)."""
    avail = _physical_bytes()
    left = _address_space_left()
    if left is not None:
        avail = min(avail, left)
    return max(64 * 2**20, avail // 2)


def budget_bytes(max_memory_gb: float | None) -> int:
    """``max_memory_gb`` in bytes, or :func:`default_budget_bytes` for None."""
    if max_memory_gb is None:
        return default_budget_bytes()
    if not float(max_memory_gb) > 0:
        raise ValueError(f"max_memory_gb must be positive, got {max_memory_gb}")
    return int(float(max_memory_gb) * GiB)


def check_budget(nbytes: float, budget: float, what: str, fix: str) -> None:
    """Raise :class:`MemoryBudgetError` when ``nbytes`` exceeds ``budget`` (before allocating)."""
    if nbytes > budget:
        raise MemoryBudgetError(
            f"{what} needs about {nbytes / GiB:.2f} GiB, more than the memory budget of "
            f"{budget / GiB:.2f} GiB (Influence(max_memory_gb=...)); {fix}"
        )


def saved_activation_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for the backward pass of ``forward()`` (its
    activations), measured by running it once under ``saved_tensors_hooks``."""
    total = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:  # parameters and views of one buffer count once
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
        forward()
    return total


def fit_chunk(
    per_chunk: Callable[[int], float], budget: float, cap: int, what: str, fix: str
) -> int:
    """The largest chunk ``b <= cap`` with ``per_chunk(b) <= budget`` (``per_chunk``
    non-decreasing), or :class:`MemoryBudgetError` when even one example does not fit."""
    check_budget(per_chunk(1), budget, f"{what} for one example", fix)
    lo, hi = 1, max(1, cap)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if per_chunk(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def reset_peak_resident() -> None:
    """Restart the kernel's peak resident-memory counter of this process (Linux; elsewhere a
    no-op), so that :func:`peak_resident_mib` measures from here."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_resident_mib() -> float:
    """Peak resident memory of this process (``VmHWM``, MiB) since it started or since the last
    :func:`reset_peak_resident`; ``ru_maxrss`` where ``/proc`` is absent (it may start at the
    parent's peak: Linux carries it over fork + exec, ``VmHWM`` does not)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
