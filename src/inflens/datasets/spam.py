"""Enron1 spam (Metsis et al. 2006): reader, the paper's split and bag-of-words (PROTOCOL 4.8).

Tokenisation differs from the paper on purpose. The paper kept spaCy lemmas of alphabetic,
in-vocabulary, non-stop-word tokens; modern small spaCy models mark every token out of
vocabulary, and spaCy is not a dependency here. :func:`preprocess` instead splits the text at
whitespace and punctuation (the corpus is already tokenised and lower-cased), keeps the purely
alphabetic tokens (``str.isalpha``), lower-cases them and drops scikit-learn's English
stop-word list. There is no lemmatisation, so the vocabulary differs from the paper's.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._files import ChecksumError, CorruptFileError, RemoteFile, locate, sha256_file

SUBFOLDER = "enron1"
URL = "http://nlp.cs.aueb.gr/software_and_datasets/Enron-Spam/preprocessed/enron1.tar.gz"
#: sha256 of the shared copy of enron1.tar.gz (shared/data/enron1/PROVENANCE.md). That archive
#: was repacked, so a fresh download from AUEB may differ byte-wise; the messages are then
#: checked with CONTENT_SHA256 instead.
ARCHIVE_SHA256 = "fc85a8d3fa5e9845a7ee572de3e92ae057f7c2be06171818539ef0983da89ad8"
#: sha256 over the sorted messages, each hashed as b"<ham|spam>/<file name>\0<text>\0" with
#: CRLF turned into LF (computed from the shared copy).
CONTENT_SHA256 = "b0f64aa1f9150c642a9d762a06762d93ee73add9575513c066ad98521430f031"
FILES = (RemoteFile(("enron1.tar.gz",), URL, None),)

N_SPAM, N_HAM = 1500, 3672

_TOKEN = re.compile(r"[^\W_]+")  # runs of letters/digits; punctuation and "_" separate tokens


def _content_digest(names: Sequence[str], raw: Sequence[bytes]) -> str:
    digest = hashlib.sha256()
    for name, data in sorted(zip(names, raw, strict=True)):
        digest.update(name.encode() + b"\0" + data.replace(b"\r\n", b"\n") + b"\0")
    return digest.hexdigest()


def read_enron(
    path: str | os.PathLike[str], expected_content_sha256: str | None = None
) -> dict[str, list]:
    """Read an Enron-Spam tarball (``<top>/spam/*.txt`` and ``<top>/ham/*.txt``).

    Messages are decoded as latin-1 and ordered spam first, then ham, each group by sorted file
    name (the paper used directory-listing order, which is not deterministic).

    Args:
        path: the ``.tar.gz`` file.
        expected_content_sha256: if given, the messages must hash to this value (see
            ``CONTENT_SHA256``), which is independent of the archive's packing and line endings.

    Returns:
        ``docs`` (list of str), ``labels`` (list of int, spam = 1, ham = 0) and ``names``
        (``"spam/<file>"`` or ``"ham/<file>"``).
    """
    groups: dict[str, list[tuple[str, bytes]]] = {"spam": [], "ham": []}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive.getmembers():
                parts = member.name.split("/")
                if (
                    member.isfile()
                    and len(parts) >= 2
                    and parts[-2] in groups
                    and not parts[-1].startswith("._")  # macOS resource forks
                ):
                    handle = archive.extractfile(member)
                    if handle is not None:
                        groups[parts[-2]].append((parts[-1], handle.read()))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CorruptFileError(
            f"{path}: cannot read the tar archive ({exc}). Delete it and download it again."
        ) from exc
    if not groups["spam"] or not groups["ham"]:
        raise CorruptFileError(
            f"{path}: expected folders spam/ and ham/ with .txt messages, found "
            f"{len(groups['spam'])} spam and {len(groups['ham'])} ham files."
        )
    names: list[str] = []
    raw: list[bytes] = []
    labels: list[int] = []
    for group, label in (("spam", 1), ("ham", 0)):
        for file_name, data in sorted(groups[group]):
            names.append(f"{group}/{file_name}")
            raw.append(data)
            labels.append(label)
    if expected_content_sha256 is not None:
        actual = _content_digest(names, raw)
        if actual != expected_content_sha256:
            raise ChecksumError(
                f"{path}: the messages do not match the published Enron1 corpus (content sha256 "
                f"{actual}, expected {expected_content_sha256}; {len(names)} messages, "
                f"{sum(labels)} spam, expected {N_SPAM + N_HAM} and {N_SPAM}). Use the AUEB "
                "preprocessed enron1.tar.gz or the project's shared copy; verify=False skips."
            )
    return {"docs": [d.decode("latin-1") for d in raw], "labels": labels, "names": names}


def load_enron1(
    data_dir: str | os.PathLike[str] | None = None, download: bool = True, verify: bool = True
) -> dict[str, list]:
    """Locate (or download) ``enron1.tar.gz`` and read it with :func:`read_enron`.

    With ``verify=True`` the archive must either have the shared copy's sha256 or contain
    exactly the published 5,172 messages (content checksum).
    """
    path = locate("Enron1 spam", SUBFOLDER, FILES, data_dir, download)["enron1.tar.gz"]
    expected = None
    if verify and sha256_file(path) != ARCHIVE_SHA256:
        expected = CONTENT_SHA256
    return read_enron(path, expected)


def preprocess(doc: str) -> str:
    """Keep the lower-cased alphabetic tokens that are not English stop words.

    Tokens are the runs of letters and digits between whitespace and punctuation (so
    ``"Subject:"`` gives ``subject`` and ``"e-mail"`` gives ``e``, ``mail``); a token with a
    digit (``"hpl2000"``) is dropped, as spaCy's ``is_alpha`` would drop it. This replaces the
    paper's spaCy pipeline (see the module docstring); stop words are scikit-learn's
    ``ENGLISH_STOP_WORDS``.
    """
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    tokens = _TOKEN.findall(doc.lower())
    return " ".join(t for t in tokens if t.isalpha() and t not in ENGLISH_STOP_WORDS)


def spam_split(
    data: Mapping[str, Sequence] | None = None,
    *,
    seed: int = 0,
    train_fraction: float = 0.8,
    clean: bool = True,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> dict[str, Any]:
    """The paper's shuffle and 80/20 split: 4,137 train / 1,035 test for Enron1.

    The documents (spam then ham) are reordered by ``np.random.RandomState(seed).permutation``,
    which equals the paper's ``np.random.seed(0); np.random.shuffle(pairs)``; the first
    ``int(train_fraction * n)`` are the training set, the rest the test set.

    Args:
        data: the output of :func:`load_enron1` / :func:`read_enron`; loaded when omitted.
        clean: apply :func:`preprocess` to every document.

    Returns:
        ``docs_train``, ``y_train`` (int64), ``docs_test``, ``y_test``, ``names_train``,
        ``names_test`` and ``perm`` (row i of the shuffled set is document ``perm[i]``).
    """
    if data is None:
        data = load_enron1(data_dir, download)
    docs = list(data["docs"])
    if clean:
        docs = [preprocess(d) for d in docs]
    labels = np.asarray(data["labels"], dtype=np.int64)
    names = list(data.get("names", [str(i) for i in range(len(docs))]))
    n = len(docs)
    perm = np.random.RandomState(seed).permutation(n)
    n_train = int(train_fraction * n)
    train, test = perm[:n_train], perm[n_train:]
    return {
        "docs_train": [docs[i] for i in train],
        "y_train": labels[train],
        "docs_test": [docs[i] for i in test],
        "y_test": labels[test],
        "names_train": [names[i] for i in train],
        "names_test": [names[i] for i in test],
        "perm": perm,
    }


def bag_of_words(
    train_docs: Sequence[str], test_docs: Sequence[str], min_df: int = 5
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Raw term counts with ``CountVectorizer(min_df=min_df)`` fitted on the training docs only.

    Returns:
        ``(x_train, x_test, vocabulary)``: dense float64 count matrices and the word of each
        column.
    """
    from sklearn.feature_extraction.text import CountVectorizer

    vectorizer = CountVectorizer(min_df=min_df)
    x_train = vectorizer.fit_transform(train_docs).astype(np.float64).toarray()
    x_test = vectorizer.transform(test_docs).astype(np.float64).toarray()
    return x_train, x_test, [str(w) for w in vectorizer.get_feature_names_out()]


def load_spam(
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    min_df: int = 5,
    verify: bool = True,
) -> dict[str, Any]:
    """Enron1 ready for the Fig 6 experiment: split, preprocessed, bag of words.

    Returns:
        The keys of :func:`spam_split` plus ``x_train``, ``x_test`` (dense float64 counts) and
        ``vocabulary``.
    """
    split = spam_split(load_enron1(data_dir, download, verify))
    x_train, x_test, vocabulary = bag_of_words(split["docs_train"], split["docs_test"], min_df)
    return {**split, "x_train": x_train, "x_test": x_test, "vocabulary": vocabulary}
