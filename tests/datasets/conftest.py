"""Fixtures for the dataset-loader tests: isolated data/cache folders, no network, real data."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

#: The project's real data, ../shared/data relative to the repository root.
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No INFLENS_DATA, a private cache, and only file:// URLs may be opened."""
    monkeypatch.delenv("INFLENS_DATA", raising=False)
    monkeypatch.setenv("INFLENS_CACHE", str(tmp_path / "cache"))
    real_urlopen = urllib.request.urlopen

    def local_only(url, *args, **kwargs):
        target = url if isinstance(url, str) else url.full_url
        if not target.startswith("file:"):
            raise urllib.error.URLError(f"network disabled in tests ({target})")
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", local_only)


def real_dataset_dir(subfolder: str, *files: str) -> Path:
    """The real dataset folder, or skip the test with the reason when it is absent."""
    folder = SHARED_DATA / subfolder
    absent = [f for f in files if not (folder / f).is_file()]
    if absent:
        pytest.skip(f"real data not available: {', '.join(absent)} not in {folder}")
    return folder


@pytest.fixture(scope="session")
def real_data():
    """``real_data("mnist", "file", ...)`` -> the folder, or skip when a file is missing."""
    return real_dataset_dir
