"""Shared fixtures: the real-data folder and the small problems of ``tests/cases.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:  # so that test modules in subfolders can `import cases`
    sys.path.insert(0, str(_TESTS))

import dataclasses  # noqa: E402

from cases import CASES, Fitted, backends_claiming, fitted  # noqa: E402

#: The project's real data: ../shared/data next to the repository.
SHARED_DATA = _TESTS.parent.parent / "shared" / "data"

# tiny problems: threads only add overhead on the shared machine
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ``shared/data`` folder next to the repository, or skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} does not exist")
    return SHARED_DATA


@pytest.fixture(
    params=[(c.name, b) for c in CASES for b in backends_claiming(c.name)],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def case(request: pytest.FixtureRequest) -> Fitted:
    """Every small problem of ``cases.CASES``, fitted to its exact minimum (float64), once for
    every derivatives backend that claims it (``case.backend``: tests pass it to Objective)."""
    name, backend = request.param
    return dataclasses.replace(fitted(name), backend=backend)
