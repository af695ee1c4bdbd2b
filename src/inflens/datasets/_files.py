"""Shared helpers for the dataset loaders: where the files live, downloads, checksums.

Search order for a dataset's files (for example MNIST, whose subfolder is ``mnist``):

1. an explicit ``data_dir`` argument: the files directly in ``data_dir`` or in
   ``data_dir/<subfolder>`` (so both ``shared/data/mnist`` and ``shared/data`` work);
2. the environment variable ``INFLENS_DATA``: a folder holding the per-dataset subfolders
   ``mnist/``, ``enron1/``, ``diabetes130/``, ``cifar10_animals/`` (the layout of the
   project's ``shared/data``);
3. the cache ``~/.cache/inflens/<subfolder>`` (the root can be moved with ``INFLENS_CACHE``).

Missing files are downloaded (when allowed) into ``data_dir`` if one was given, else into the
cache. Nothing is ever written into ``INFLENS_DATA``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InflensError

ENV_DATA = "INFLENS_DATA"
ENV_CACHE = "INFLENS_CACHE"

_CHUNK = 1 << 20


class DatasetNotFoundError(InflensError, FileNotFoundError):
    """A dataset file is neither on disk nor downloadable; the message says how to fix it."""


class ChecksumError(InflensError, ValueError):
    """A file's sha256 differs from the published value (corrupt or a different version)."""


class CorruptFileError(InflensError, ValueError):
    """A data file exists but cannot be parsed (truncated, wrong format, wrong contents)."""


@dataclass(frozen=True)
class RemoteFile:
    """One file a loader needs.

    Attributes:
        names: accepted file names, searched in order; the first is the name a download gets.
        url: where to download it from, or ``None`` when no canonical download exists.
        sha256: expected sha256 of the downloaded bytes, or ``None`` when the loader verifies
            the contents itself after reading (the published archive differs from the copy
            whose checksum we know).
        note: extra advice for the error message when the file cannot be found, e.g. where
            to get a file that has no download URL.
    """

    names: tuple[str, ...]
    url: str | None = None
    sha256: str | None = None
    note: str | None = None

    @property
    def name(self) -> str:
        return self.names[0]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike[str], expected: str) -> None:
    """Raise :class:`ChecksumError` unless the file's sha256 equals ``expected``."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ChecksumError(
            f"sha256 mismatch for {path}: expected {expected.lower()}, got {actual}. "
            "The file is corrupt, truncated or a different version. Delete it and download it "
            "again, or point data_dir / INFLENS_DATA at a verified copy (the expected values "
            "are listed in the dataset's PROVENANCE.md). Pass verify=False to skip this check."
        )


def cache_root() -> Path:
    """The download cache root: ``$INFLENS_CACHE`` or ``~/.cache/inflens``."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "inflens"


def search_dirs(subfolder: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The folders searched for a dataset's files, highest priority first."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        return [root, root / subfolder]
    dirs: list[Path] = []
    env = os.environ.get(ENV_DATA)
    if env:
        dirs.append(Path(env).expanduser() / subfolder)
    dirs.append(cache_root() / subfolder)
    return dirs


def download_dir(subfolder: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where missing files are downloaded: ``data_dir`` if given, else the cache."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return cache_root() / subfolder


def fetch(
    url: str, dest: str | os.PathLike[str], sha256: str | None, timeout: float = 60.0
) -> Path:
    """Download ``url`` to ``dest`` atomically and verify its sha256.

    The bytes go to a temporary file next to ``dest``, are hashed while streaming, and the file
    is renamed onto ``dest`` only when the digest matches (``sha256=None`` skips the check).
    ``file://`` URLs work too.

    Raises:
        DatasetNotFoundError: the URL cannot be reached (no network, HTTP error, bad path).
        ChecksumError: the download's sha256 differs from ``sha256``; nothing is written.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while chunk := resp.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DatasetNotFoundError(
                f"could not download {url} to {dest}: {reason}. Without network access, copy "
                f"the file there yourself, pass data_dir=<folder with the files>, or set "
                f"{ENV_DATA} to a folder with the per-dataset subfolders."
            ) from exc
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256.lower():
            raise ChecksumError(
                f"sha256 mismatch for the download of {url}: expected {sha256.lower()}, got "
                f"{actual}. The file was not saved. The mirror may serve a different version; "
                "try again later or place a verified copy in data_dir / INFLENS_DATA."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _find(file: RemoteFile, dirs: Sequence[Path]) -> Path | None:
    for folder in dirs:
        for name in file.names:
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def _fix_hint(subfolder: str, downloadable: bool) -> str:
    hint = (
        f"How to fix: pass data_dir=<folder containing the files>, or set {ENV_DATA} to a folder "
        f"with a '{subfolder}/' subfolder (the layout of the project's shared/data)"
    )
    return hint + (", or run with network access and download=True." if downloadable else ".")


def locate(
    dataset: str,
    subfolder: str,
    files: Sequence[RemoteFile],
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> dict[str, Path]:
    """Find every file of a dataset, downloading the missing ones when allowed.

    Returns:
        A mapping from each file's primary name (``RemoteFile.name``) to its path on disk.

    Raises:
        DatasetNotFoundError: a file is missing and cannot be downloaded; the message lists the
            missing files, the folders searched and how to fix it.
    """
    dirs = search_dirs(subfolder, data_dir)
    found: dict[str, Path] = {}
    missing: list[RemoteFile] = []
    for file in files:
        path = _find(file, dirs)
        if path is None:
            missing.append(file)
        else:
            found[file.name] = path
    if not missing:
        return found

    problems: list[str] = []
    if not download:
        problems.append("download=False, so nothing was downloaded.")
    else:
        target = download_dir(subfolder, data_dir)
        for file in list(missing):
            if file.url is None:
                problems.append(f"{file.name} has no download URL.")
                continue
            try:
                found[file.name] = fetch(file.url, target / file.name, file.sha256)
            except (urllib.error.URLError, OSError) as exc:
                cause = exc.__cause__ if isinstance(exc, DatasetNotFoundError) else exc
                reason = getattr(cause, "reason", cause)
                problems.append(
                    f"Downloading {file.url} failed ({reason}); no further download was tried."
                )
                break  # offline or blocked: do not wait for a timeout per file
            else:
                missing.remove(file)
    if not missing:
        return found

    names = ", ".join(" or ".join(f.names) for f in missing)
    looked = ", ".join(str(d) for d in dirs)
    notes = [f.note for f in missing if f.note]
    raise DatasetNotFoundError(
        f"{dataset}: missing file(s): {names}. Looked in: {looked}. "
        + " ".join([*problems, *notes, _fix_hint(subfolder, any(f.url for f in missing))])
    )
