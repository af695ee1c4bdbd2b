"""Enron1 spam: tar reader, preprocessing, the seed-0 80/20 split and bag of words."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from inflens.datasets import spam
from inflens.datasets._files import ChecksumError, CorruptFileError

EMAILS = {
    "enron1/spam/0002.2004-01-01.GP.spam.txt": "Subject: cheap pills\r\nbuy cheap pills now !",
    "enron1/spam/0001.2003-12-18.GP.spam.txt": "Subject: win money\r\nyou win money , click",
    "enron1/ham/0010.1999-12-10.farmer.ham.txt": "Subject: meeting\r\nthe meeting is at 10",
    "enron1/ham/0003.1999-12-10.farmer.ham.txt": "Subject: gas nom\r\nplease confirm gas nom",
    "enron1/ham/0007.2000-01-05.farmer.ham.txt": "Subject: caf\xe9\r\nlunch at the caf\xe9",
}


def write_tar(path: Path, emails: dict[str, str] = EMAILS) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, text in [*emails.items(), ("enron1/Summary.txt", "summary")]:
            data = text.encode("latin-1")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        junk = tarfile.TarInfo("enron1/ham/._0003.txt")
        junk.size = 2
        archive.addfile(junk, io.BytesIO(b"\0\1"))
    return path


def test_read_enron_order_labels_and_encoding(tmp_path: Path) -> None:
    data = spam.read_enron(write_tar(tmp_path / "enron1.tar.gz"))
    assert data["names"] == [
        "spam/0001.2003-12-18.GP.spam.txt",
        "spam/0002.2004-01-01.GP.spam.txt",
        "ham/0003.1999-12-10.farmer.ham.txt",
        "ham/0007.2000-01-05.farmer.ham.txt",
        "ham/0010.1999-12-10.farmer.ham.txt",
    ]
    assert data["labels"] == [1, 1, 0, 0, 0]
    assert data["docs"][0].startswith("Subject: win money")
    assert "caf\xe9" in data["docs"][3]


def test_read_enron_content_checksum(tmp_path: Path) -> None:
    with pytest.raises(ChecksumError, match="do not match the published Enron1"):
        spam.read_enron(write_tar(tmp_path / "e.tar.gz"), expected_content_sha256="0" * 64)


def test_read_enron_rejects_other_archives(tmp_path: Path) -> None:
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(CorruptFileError, match="cannot read"):
        spam.read_enron(tmp_path / "bad.tar.gz")
    write_tar(tmp_path / "hamonly.tar.gz", {"x/ham/1.txt": "hello"})
    with pytest.raises(CorruptFileError, match="0 spam and 1 ham"):
        spam.read_enron(tmp_path / "hamonly.tar.gz")


def test_load_enron1_verify(tmp_path: Path) -> None:
    write_tar(tmp_path / "enron1.tar.gz")
    assert len(spam.load_enron1(tmp_path, download=False, verify=False)["docs"]) == 5
    with pytest.raises(ChecksumError):
        spam.load_enron1(tmp_path, download=False)


def test_preprocess_keeps_alphabetic_non_stop_words() -> None:
    text = "Subject: re : the 2 Offers , don ' t miss http www caf\xe9 e-mail hpl2000 foo_bar"
    assert spam.preprocess(text) == "subject offers don t miss http www caf\xe9 e mail foo bar"


def test_spam_split_follows_seed0_permutation() -> None:
    docs = [f"doc{i}" for i in range(11)]
    data = {"docs": docs, "labels": [1] * 4 + [0] * 7, "names": docs}
    split = spam.spam_split(data, clean=False)
    perm = np.random.RandomState(0).permutation(11)
    np.testing.assert_array_equal(split["perm"], perm)
    assert len(split["docs_train"]) == int(0.8 * 11) == 8 and len(split["docs_test"]) == 3
    assert split["docs_train"] == [docs[i] for i in perm[:8]]
    np.testing.assert_array_equal(split["y_test"], (perm[8:] < 4).astype(int))


def test_bag_of_words_fits_on_training_docs_only() -> None:
    train = ["apple banana", "apple cherry", "apple banana banana"]
    test = ["banana durian durian", "apple"]
    x_train, x_test, vocab = spam.bag_of_words(train, test, min_df=2)
    assert vocab == ["apple", "banana"]
    assert x_train.dtype == np.float64 and isinstance(x_train, np.ndarray)
    np.testing.assert_array_equal(x_train, [[1, 1], [1, 0], [1, 2]])
    np.testing.assert_array_equal(x_test, [[0, 1], [1, 0]])


def test_load_spam_end_to_end(tmp_path: Path) -> None:
    write_tar(tmp_path / "enron1.tar.gz")
    out = spam.load_spam(tmp_path, download=False, min_df=1, verify=False)
    assert out["x_train"].shape == (4, len(out["vocabulary"]))
    assert out["x_test"].shape[0] == 1
    assert "pills" in out["vocabulary"]


@pytest.fixture(scope="module")
def real_enron(real_data) -> dict[str, list]:
    return spam.load_enron1(real_data("enron1", "enron1.tar.gz"), download=False)


@pytest.mark.realdata
def test_real_enron_split(real_enron: dict[str, list]) -> None:
    assert len(real_enron["docs"]) == 5172 and sum(real_enron["labels"]) == 1500
    split = spam.spam_split(real_enron)
    assert (len(split["y_train"]), len(split["y_test"])) == (4137, 1035)
    assert split["y_train"].sum() + split["y_test"].sum() == 1500


@pytest.mark.realdata
@pytest.mark.slow
def test_real_bag_of_words(real_data) -> None:
    out = spam.load_spam(real_data("enron1", "enron1.tar.gz"), download=False)
    vocab = len(out["vocabulary"])
    assert out["x_train"].shape == (4137, vocab) and out["x_test"].shape == (1035, vocab)
    assert 5000 < vocab < 8000  # 6,291 with scikit-learn 1.9's stop-word list
    assert (out["x_train"][:, out["vocabulary"].index("subject")] >= 1).all()
    assert (out["x_train"].sum(axis=0) > 0).all()
