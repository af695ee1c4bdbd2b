"""The peak resident-memory reading that the benchmarks report."""

from __future__ import annotations

import sys

import pytest
import torch

from inflens.memory import peak_resident_mib, reset_peak_resident


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_peak_resident_memory_sees_an_allocation_and_resets() -> None:
    reset_peak_resident()
    before = peak_resident_mib()
    block = torch.ones(256 * 2**20 // 8, dtype=torch.float64)  # 256 MiB, every page written
    during = peak_resident_mib()
    del block
    assert during - before > 200
    reset_peak_resident()  # the counter restarts at the current (smaller) resident size
    assert peak_resident_mib() < during - 200
