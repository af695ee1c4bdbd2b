"""Folder resolution, downloads (file:// only), checksums and the offline error."""

from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path

import pytest

from inflens.datasets import _files
from inflens.datasets._files import (
    ChecksumError,
    DatasetNotFoundError,
    RemoteFile,
    fetch,
    locate,
    search_dirs,
    verify_sha256,
)

PAYLOAD = b"influence functions\n" * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "server" / "blob.bin"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path


def test_verify_sha256_accepts_match_and_reports_mismatch(source: Path) -> None:
    verify_sha256(source, PAYLOAD_SHA)
    verify_sha256(source, PAYLOAD_SHA.upper())
    with pytest.raises(ChecksumError) as info:
        verify_sha256(source, "0" * 64)
    message = str(info.value)
    assert str(source) in message and "0" * 64 in message and PAYLOAD_SHA in message
    assert "verify=False" in message


def test_fetch_file_url_is_atomic_and_verified(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "blob.bin"
    assert fetch(source.as_uri(), dest, PAYLOAD_SHA) == dest
    assert dest.read_bytes() == PAYLOAD
    assert [p.name for p in dest.parent.iterdir()] == ["blob.bin"]  # no temp file left


def test_fetch_wrong_checksum_writes_nothing(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "blob.bin"
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        fetch(source.as_uri(), dest, "f" * 64)
    assert list(dest.parent.iterdir()) == []


def test_fetch_unreachable_raises_dataset_not_found(tmp_path: Path) -> None:
    missing = (tmp_path / "nowhere.bin").as_uri()
    with pytest.raises(DatasetNotFoundError, match="could not download"):
        fetch(missing, tmp_path / "out" / "x.bin", None)
    with pytest.raises(DatasetNotFoundError, match="INFLENS_DATA"):
        fetch("https://example.invalid/x.bin", tmp_path / "out" / "x.bin", None)
    assert list((tmp_path / "out").iterdir()) == []


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFLENS_DATA", str(tmp_path / "shared"))
    monkeypatch.setenv("INFLENS_CACHE", str(tmp_path / "cache"))
    assert search_dirs("mnist") == [tmp_path / "shared" / "mnist", tmp_path / "cache" / "mnist"]
    assert search_dirs("mnist", tmp_path / "mine") == [
        tmp_path / "mine",
        tmp_path / "mine" / "mnist",
    ]
    monkeypatch.delenv("INFLENS_DATA")
    assert search_dirs("mnist") == [tmp_path / "cache" / "mnist"]


def test_default_cache_is_under_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("INFLENS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert search_dirs("enron1") == [tmp_path / ".cache" / "inflens" / "enron1"]


def _put(folder: Path, name: str = "a.bin", content: bytes = PAYLOAD) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    return folder / name


def test_locate_priority(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [RemoteFile(("a.bin",))]
    shared = _put(tmp_path / "shared" / "ds")
    cached = _put(tmp_path / "cache" / "ds")
    explicit = _put(tmp_path / "mine" / "ds")
    monkeypatch.setenv("INFLENS_DATA", str(tmp_path / "shared"))
    assert locate("DS", "ds", files)["a.bin"] == shared
    assert locate("DS", "ds", files, data_dir=tmp_path / "mine")["a.bin"] == explicit
    assert locate("DS", "ds", files, data_dir=tmp_path / "mine" / "ds")["a.bin"] == explicit
    monkeypatch.delenv("INFLENS_DATA")
    assert locate("DS", "ds", files)["a.bin"] == cached


def test_locate_accepts_alternative_names(tmp_path: Path) -> None:
    path = _put(tmp_path / "d", "b.csv")
    found = locate("DS", "ds", [RemoteFile(("a.zip", "b.csv"))], data_dir=tmp_path / "d")
    assert found == {"a.zip": path}


def test_locate_downloads_missing_into_cache(source: Path, tmp_path: Path) -> None:
    files = [RemoteFile(("blob.bin",), source.as_uri(), PAYLOAD_SHA)]
    found = locate("DS", "ds", files)
    assert found["blob.bin"] == tmp_path / "cache" / "ds" / "blob.bin"
    assert found["blob.bin"].read_bytes() == PAYLOAD


def test_offline_error_names_missing_files_and_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(url: str, dest: Path, sha256: str | None) -> Path:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(_files, "fetch", offline)
    monkeypatch.setenv("INFLENS_DATA", str(tmp_path / "shared"))
    _put(tmp_path / "shared" / "ds", "have.bin")
    files = [
        RemoteFile(("have.bin",), "https://example.org/have.bin"),
        RemoteFile(("one.gz",), "https://example.org/one.gz"),
        RemoteFile(("two.gz",), "https://example.org/two.gz"),
    ]
    with pytest.raises(DatasetNotFoundError) as info:
        locate("Toy", "ds", files)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert (
        "one.gz" in message
        and "two.gz" in message
        and "have.bin" not in message.split("Looked in")[0]
    )
    assert str(tmp_path / "shared" / "ds") in message and str(tmp_path / "cache" / "ds") in message
    assert "INFLENS_DATA" in message and "data_dir" in message
    assert "name resolution" in message


def test_download_false_never_fetches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> Path:
        raise AssertionError("fetch must not be called")

    monkeypatch.setattr(_files, "fetch", boom)
    with pytest.raises(DatasetNotFoundError, match="download=False"):
        locate("Toy", "ds", [RemoteFile(("x.gz",), "https://example.org/x.gz")], download=False)


def test_download_checksum_error_propagates(source: Path) -> None:
    files = [RemoteFile(("blob.bin",), source.as_uri(), "0" * 64)]
    with pytest.raises(ChecksumError):
        locate("DS", "ds", files)
