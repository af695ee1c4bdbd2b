"""UCI "Diabetes 130-US hospitals" for the readmission / domain-mismatch study (PROTOCOL 4.7).

Features: the 8 numeric columns used raw, then one-hot dummies of 31 categorical columns with
categories sorted as pandas sorts them; a 2-category column keeps only its second dummy, any
other column keeps all of them. The CSV is read with NA parsing disabled, so ``None`` and ``?``
are ordinary categories, which gives the paper's 127 features (modern pandas defaults give 125).
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._files import ChecksumError, CorruptFileError, RemoteFile, locate, sha256_file

SUBFOLDER = "diabetes130"
URL = "https://archive.ics.uci.edu/static/public/296/diabetes+130-us+hospitals+for+years+1999-2008.zip"
UCI_ZIP = "diabetes+130-us+hospitals+for+years+1999-2008.zip"
SHARED_ZIP = "dataset_diabetes.zip"
CSV_NAME = "diabetic_data.csv"
#: sha256 of the shared zip (shared/data/diabetes130/PROVENANCE.md).
ZIP_SHA256 = "2cc570fc34b09ba1169d94b68c27ce3802dce7dc4ab6082bed833a6c195507a5"
#: sha256 of diabetic_data.csv as in PROVENANCE (CRLF line endings) and of the same bytes with
#: LF line endings; either is accepted, so a UCI zip that differs only in packing passes.
CSV_SHA256 = "0689e7ec031237dc63031b938805c48377748761a3b26acab621567afa24df97"
CSV_SHA256_LF = "da21942c25a10a51a8842907ab01a8530b06232616b17d317441d592a20c4359"
FILES = (RemoteFile((UCI_ZIP, SHARED_ZIP, CSV_NAME), URL, None),)

NUMERIC_COLUMNS = (
    "time_in_hospital",
    "num_lab_procedures",
    "num_procedures",
    "num_medications",
    "number_outpatient",
    "number_emergency",
    "number_inpatient",
    "number_diagnoses",
)
MEDICATION_COLUMNS = (
    "metformin",
    "repaglinide",
    "nateglinide",
    "chlorpropamide",
    "glimepiride",
    "acetohexamide",
    "glipizide",
    "glyburide",
    "tolbutamide",
    "pioglitazone",
    "rosiglitazone",
    "acarbose",
    "miglitol",
    "troglitazone",
    "tolazamide",
    "examide",
    "citoglipton",
    "insulin",
    "glyburide-metformin",
    "glipizide-metformin",
    "glimepiride-pioglitazone",
    "metformin-rosiglitazone",
    "metformin-pioglitazone",
)
CATEGORICAL_COLUMNS = (
    "gender",
    "race",
    "age",
    "discharge_disposition_id",
    "max_glu_serum",
    "A1Cresult",
    *MEDICATION_COLUMNS,
    "change",
    "diabetesMed",
)
LABEL_COLUMN = "readmitted"
CHILD_FEATURE = "age_[0-10)"
N_FEATURES = 127


def _csv_bytes(path: Path) -> bytes:
    """The bytes of diabetic_data.csv from a zip (any folder layout) or a plain CSV file."""
    if not zipfile.is_zipfile(path):
        return path.read_bytes()
    try:
        with zipfile.ZipFile(path) as archive:
            members = [
                m
                for m in archive.namelist()
                if m.rsplit("/", 1)[-1] == CSV_NAME and not m.startswith("__MACOSX")
            ]
            if len(members) != 1:
                raise CorruptFileError(
                    f"{path}: expected one member named {CSV_NAME} (as dataset_diabetes/"
                    f"{CSV_NAME} or at the top level), found {members or 'none'}."
                )
            return archive.read(members[0])
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CorruptFileError(f"{path}: cannot read the zip ({exc}). Download it again.") from exc


def read_diabetes(path: str | os.PathLike[str], verify: bool = True) -> Any:
    """Read ``diabetic_data.csv`` (inside the UCI or the shared zip, or plain) as a DataFrame.

    All 50 columns are read with ``keep_default_na=False``: no value becomes NaN.

    Args:
        path: the zip or CSV file.
        verify: check the CSV's sha256 (PROVENANCE value, CRLF or LF line endings), unless
            the file is the shared zip with its published sha256.

    Returns:
        A ``pandas.DataFrame`` of 101,766 rows for the real data.
    """
    import pandas as pd

    path = Path(path)
    data = _csv_bytes(path)
    if verify and not (path.suffix == ".zip" and sha256_file(path) == ZIP_SHA256):
        actual = hashlib.sha256(data).hexdigest()
        normalised = hashlib.sha256(data.replace(b"\r\n", b"\n")).hexdigest()
        if actual != CSV_SHA256 and normalised != CSV_SHA256_LF:
            raise ChecksumError(
                f"{path}: {CSV_NAME} has sha256 {actual}, expected {CSV_SHA256} (see "
                "shared/data/diabetes130/PROVENANCE.md). The file is corrupt or a different "
                "version; download it again, or pass verify=False to skip this check."
            )
    try:
        return pd.read_csv(io.BytesIO(data), keep_default_na=False, low_memory=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise CorruptFileError(f"{path}: cannot parse {CSV_NAME} ({exc}).") from exc


def hospital_features(df: Any, dtype: Any = np.float64) -> tuple[np.ndarray, list[str]]:
    """Build the 127-column design matrix of the paper from the raw DataFrame.

    Returns:
        ``(x, feature_names)``; numeric columns first, then the dummies named
        ``"<column>_<category>"`` (e.g. ``"age_[0-10)"``, ``"discharge_disposition_id_11"``).
    """
    import pandas as pd

    needed = (*NUMERIC_COLUMNS, *CATEGORICAL_COLUMNS)
    absent = [c for c in needed if c not in df.columns]
    if absent:
        raise CorruptFileError(f"diabetes data lacks the column(s) {absent}; wrong file?")
    blocks = [df.loc[:, list(NUMERIC_COLUMNS)].to_numpy(dtype=dtype)]
    names = list(NUMERIC_COLUMNS)
    for column in CATEGORICAL_COLUMNS:
        values = pd.Categorical(df[column])
        categories = list(values.categories)
        codes = np.asarray(values.codes)
        if (codes < 0).any():
            raise CorruptFileError(f"column {column!r} has missing values; read it with NA off.")
        onehot = codes[:, None] == np.arange(len(categories))[None, :]
        if len(categories) == 2:
            onehot, categories = onehot[:, 1:], categories[1:]
        blocks.append(onehot.astype(dtype))
        names.extend(f"{column}_{c}" for c in categories)
    return np.concatenate(blocks, axis=1), names


def hospital_labels(df: Any) -> np.ndarray:
    """Readmitted within 30 days (``"<30"``) -> 1, otherwise (``">30"``, ``"NO"``) -> 0."""
    return (df[LABEL_COLUMN].astype(str).to_numpy() == "<30").astype(np.int64)


def load_hospital(
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    verify: bool = True,
    dtype: Any = np.float64,
) -> dict[str, Any]:
    """Load the full data set as features and labels (no split).

    Returns:
        ``x`` [101766, 127], ``y`` int64 0/1 and ``feature_names`` (127 strings).
    """
    path = locate("UCI diabetes", SUBFOLDER, FILES, data_dir, download)[UCI_ZIP]
    df = read_diabetes(path, verify=verify)
    x, names = hospital_features(df, dtype)
    if verify and x.shape[1] != N_FEATURES:
        raise CorruptFileError(f"{path}: got {x.shape[1]} features, expected {N_FEATURES}.")
    return {"x": x, "y": hospital_labels(df), "feature_names": names}


def hospital_split(
    data: Mapping[str, Any] | None = None,
    *,
    n_per_class: int = 10_000,
    seed: int = 2,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> dict[str, Any]:
    """The paper's balanced split: 10,000 positives + 10,000 negatives train, the rest test.

    Reproduces the release notebook with ``np.random.RandomState(seed)``: shuffle the
    positive indices, then the negative ones; train = first ``n_per_class`` of each, test =
    the remainder; then shuffle train, then test. For the real data: 20,000 / 81,766.

    Args:
        data: the output of :func:`load_hospital`; loaded when omitted.

    Returns:
        ``x_train``, ``y_train``, ``x_test``, ``y_test``, ``train_index``, ``test_index``
        (rows of the full table) and ``feature_names``.
    """
    if data is None:
        data = load_hospital(data_dir, download)
    y = np.asarray(data["y"])
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if min(len(pos), len(neg)) < n_per_class:
        raise ValueError(
            f"need {n_per_class} examples of each class, have {len(pos)} positives and "
            f"{len(neg)} negatives; lower n_per_class."
        )
    rng = np.random.RandomState(seed)
    rng.shuffle(pos)
    rng.shuffle(neg)
    train = np.concatenate([pos[:n_per_class], neg[:n_per_class]])
    test = np.concatenate([pos[n_per_class:], neg[n_per_class:]])
    rng.shuffle(train)
    rng.shuffle(test)
    x = data["x"]
    return {
        "x_train": x[train],
        "y_train": y[train],
        "x_test": x[test],
        "y_test": y[test],
        "train_index": train,
        "test_index": test,
        "feature_names": list(data["feature_names"]),
    }


def children_mismatch(
    x_train: np.ndarray, y_train: np.ndarray, feature_names: Sequence[str]
) -> np.ndarray:
    """Indices of the training rows kept after inducing the paper's domain mismatch.

    Children are rows with ``age_[0-10) == 1``. Every non-readmitted (label 0) child is removed
    except the last one in training order; for the paper's split this removes 20 of 24
    children and leaves 4, 3 of them readmitted (19,980 rows kept).

    Returns:
        Sorted int64 indices into ``x_train`` of the rows to keep.
    """
    names = list(feature_names)
    if CHILD_FEATURE not in names:
        raise ValueError(f"feature {CHILD_FEATURE!r} not found; pass the hospital feature names.")
    child = np.asarray(x_train)[:, names.index(CHILD_FEATURE)] == 1
    remove = np.flatnonzero(child & (np.asarray(y_train) == 0))[:-1]
    return np.setdiff1d(np.arange(len(y_train)), remove).astype(np.int64)
