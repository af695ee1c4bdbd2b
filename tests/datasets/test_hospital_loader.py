"""UCI diabetes: CSV in either zip layout, the 127-feature encoding, the seed-2 split, children."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from inflens.datasets import hospital
from inflens.datasets._files import ChecksumError, CorruptFileError

N = 12


def fake_table() -> dict[str, list]:
    cycle = lambda values: [values[i % len(values)] for i in range(N)]  # noqa: E731
    table: dict[str, list] = {"encounter_id": list(range(N)), "weight": ["?"] * N}
    for k, column in enumerate(hospital.NUMERIC_COLUMNS):
        table[column] = [k * 10 + i for i in range(N)]
    table |= {
        "gender": cycle(["Female", "Male"]),
        "race": cycle(["?", "Caucasian", "AfricanAmerican"]),
        "age": cycle(["[70-80)", "[0-10)", "[10-20)"]),
        "discharge_disposition_id": cycle([1, 3, 11, 2]),
        "max_glu_serum": cycle(["None", ">200", "Norm"]),
        "A1Cresult": cycle(["None", ">7"]),
    }
    for column in hospital.MEDICATION_COLUMNS:
        table[column] = ["No"] * N
    table["metformin"] = cycle(["No", "Steady"])
    table["insulin"] = cycle(["No", "Up", "Down", "Steady"])
    table |= {
        "change": cycle(["No", "Ch"]),
        "diabetesMed": cycle(["Yes", "No"]),
        "readmitted": cycle(["NO", "<30", ">30"]),
    }
    return table


def csv_bytes(table: dict[str, list]) -> bytes:
    lines = [",".join(table)] + [",".join(str(v[i]) for v in table.values()) for i in range(N)]
    return ("\r\n".join(lines) + "\r\n").encode()


def write_zip(path: Path, member: str) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, csv_bytes(fake_table()))
        archive.writestr("__MACOSX/dataset_diabetes/._diabetic_data.csv", b"\0junk")
    return path


@pytest.mark.parametrize("member", ["dataset_diabetes/diabetic_data.csv", "diabetic_data.csv"])
def test_read_diabetes_zip_layouts(tmp_path: Path, member: str) -> None:
    df = hospital.read_diabetes(write_zip(tmp_path / "d.zip", member), verify=False)
    assert df.shape == (N, len(fake_table()))
    assert df["max_glu_serum"].iloc[0] == "None" and df["race"].iloc[0] == "?"  # not NaN


def test_read_diabetes_plain_csv_and_checksum(tmp_path: Path) -> None:
    (tmp_path / "diabetic_data.csv").write_bytes(csv_bytes(fake_table()))
    assert len(hospital.read_diabetes(tmp_path / "diabetic_data.csv", verify=False)) == N
    with pytest.raises(ChecksumError, match="PROVENANCE"):
        hospital.read_diabetes(tmp_path / "diabetic_data.csv")


def test_read_diabetes_zip_without_csv(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as archive:
        archive.writestr("other.csv", b"a,b\n")
    with pytest.raises(CorruptFileError, match="diabetic_data.csv"):
        hospital.read_diabetes(tmp_path / "x.zip", verify=False)


def test_features_encoding() -> None:
    import pandas as pd

    df = pd.DataFrame(fake_table())
    x, names = hospital.hospital_features(df)
    assert x.shape == (N, len(names)) and x.dtype == np.float64
    # 8 numeric + gender 1 + race 3 + age 3 + discharge 4 + glu 3 + A1C 1 + metformin 1
    # + insulin 4 + 21 one-category medications + change 1 + diabetesMed 1
    assert len(names) == 51
    assert names[:8] == list(hospital.NUMERIC_COLUMNS)
    assert names[8:12] == ["gender_Male", "race_?", "race_AfricanAmerican", "race_Caucasian"]
    assert names[12:15] == ["age_[0-10)", "age_[10-20)", "age_[70-80)"]
    assert names[15:19] == [f"discharge_disposition_id_{i}" for i in (1, 2, 3, 11)]
    assert "max_glu_serum_None" in names and "A1Cresult_None" in names
    assert "A1Cresult_>7" not in names  # two categories: the first is dropped
    assert "examide_No" in names and (x[:, names.index("examide_No")] == 1).all()
    np.testing.assert_array_equal(x[:, names.index("age_[0-10)")], [0, 1, 0] * 4)
    np.testing.assert_array_equal(x[:, 1], df["num_lab_procedures"])
    np.testing.assert_array_equal(hospital.hospital_labels(df), [0, 1, 0] * 4)


def test_load_hospital_from_inflens_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "data" / "diabetes130"
    folder.mkdir(parents=True)
    write_zip(folder / hospital.UCI_ZIP, "diabetic_data.csv")
    monkeypatch.setenv("INFLENS_DATA", str(tmp_path / "data"))
    data = hospital.load_hospital(download=False, verify=False)
    assert data["x"].shape == (N, 51) and data["y"].sum() == 4


def test_split_is_balanced_and_reproduces_seed2() -> None:
    y = np.array([1] * 30 + [0] * 50)
    x = np.arange(80)[:, None] * np.ones((1, 3))
    out = hospital.hospital_split(
        {"x": x, "y": y, "feature_names": ["a", "b", "c"]}, n_per_class=10
    )
    rng = np.random.RandomState(2)
    pos, neg = np.arange(30), np.arange(30, 80)
    rng.shuffle(pos)
    rng.shuffle(neg)
    train = np.concatenate([pos[:10], neg[:10]])
    rng.shuffle(train)
    np.testing.assert_array_equal(out["train_index"], train)
    assert out["y_train"].sum() == 10 and len(out["y_test"]) == 60
    assert sorted(np.concatenate([out["train_index"], out["test_index"]])) == list(range(80))
    np.testing.assert_array_equal(out["x_test"][:, 0], out["test_index"])
    with pytest.raises(ValueError, match="lower n_per_class"):
        hospital.hospital_split({"x": x, "y": y, "feature_names": []}, n_per_class=31)


def test_children_mismatch_keeps_last_non_readmitted_child() -> None:
    names = ["time_in_hospital", "age_[0-10)"]
    child = np.array([0, 1, 1, 0, 1, 1, 0, 1])
    y = np.array([0, 0, 1, 0, 0, 1, 1, 0])
    keep = hospital.children_mismatch(np.c_[np.zeros(8), child], y, names)
    np.testing.assert_array_equal(keep, [0, 2, 3, 5, 6, 7])  # children 1 and 4 removed
    with pytest.raises(ValueError, match="age_"):
        hospital.children_mismatch(np.zeros((8, 2)), y, ["a", "b"])


@pytest.fixture(scope="module")
def real_split(real_data) -> dict:
    folder = real_data("diabetes130", hospital.SHARED_ZIP)
    data = hospital.load_hospital(folder, download=False)
    return hospital.hospital_split(data)


@pytest.mark.realdata
def test_real_features_and_split(real_split: dict) -> None:
    names = real_split["feature_names"]
    assert len(names) == 127 and names.index("age_[0-10)") == 17
    assert "max_glu_serum_None" in names and "discharge_disposition_id_11" in names
    assert real_split["x_train"].shape == (20000, 127)
    assert real_split["x_test"].shape == (81766, 127)
    assert real_split["y_train"].sum() == 10000 and real_split["y_test"].sum() == 11357 - 10000


@pytest.mark.realdata
def test_real_children_counts(real_split: dict) -> None:
    col = real_split["feature_names"].index("age_[0-10)")
    child_train = real_split["x_train"][:, col] == 1
    child_test = real_split["x_test"][:, col] == 1
    assert child_train.sum() == 24 and real_split["y_train"][child_train].sum() == 3
    assert child_test.sum() == 137 and real_split["y_test"][child_test].sum() == 0
    assert child_test[1742]  # the paper's test point is a child
    keep = hospital.children_mismatch(
        real_split["x_train"], real_split["y_train"], real_split["feature_names"]
    )
    assert len(keep) == 19980
    kept_children = np.flatnonzero(child_train[keep])
    assert len(kept_children) == 4 and real_split["y_train"][keep][kept_children].sum() == 3
    non_readmitted = kept_children[real_split["y_train"][keep][kept_children] == 0]
    assert non_readmitted.tolist() == [19590]  # the paper's non-readmitted training child
