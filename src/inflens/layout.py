"""One memory layout for every tensor that enters repeated arithmetic.

BLAS libraries (MKL in particular) pick kernels by the operands' strides and by the alignment
of their first element, and different kernels sum in different orders. Two tensors with the
same values can therefore give results that differ in the last bits: an eigenvector matrix
from ``torch.linalg.eigh`` (column-major) against the same matrix read back from a file
(row-major), or a tensor allocated by torch (64-byte aligned) against one read from a
safetensors file (aligned only to its 8-byte offset in the file). Fitted state and vectors
read from disk are put through :func:`canonical` so that a reloaded or resumed computation
runs literally the same arithmetic as the original and gives the same bits.
"""

from __future__ import annotations

import torch


def canonical(t: torch.Tensor) -> torch.Tensor:
    """A row-major contiguous copy of ``t`` in freshly allocated (allocator-aligned) memory."""
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out
