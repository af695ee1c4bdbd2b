"""Dataset loaders for the paper's experiments; every loader returns numpy arrays.

Files are looked up in ``data_dir``, then ``$INFLENS_DATA/<dataset>``, then the cache
``~/.cache/inflens/<dataset>`` (``$INFLENS_CACHE``); see :mod:`inflens.datasets._files`.
The per-dataset modules are :mod:`.mnist`, :mod:`.spam`, :mod:`.hospital` and :mod:`.cifar`.
"""

from . import cifar, hospital, mnist, spam
from ._files import (
    ChecksumError,
    CorruptFileError,
    DatasetNotFoundError,
    fetch,
    sha256_file,
    verify_sha256,
)
from .cifar import (
    folder_subset,
    load_cifar_animals,
    load_image_folder,
    read_animals_zip,
    scale_images,
)
from .cifar import paper_subset as animals_paper_subset
from .hospital import (
    children_mismatch,
    hospital_features,
    hospital_labels,
    hospital_split,
    load_hospital,
    read_diabetes,
)
from .mnist import load_mnist, one_vs_seven, read_idx, small_subset
from .mnist import paper_split as mnist_paper_split
from .spam import bag_of_words, load_enron1, load_spam, preprocess, read_enron, spam_split

__all__ = [
    "ChecksumError",
    "CorruptFileError",
    "DatasetNotFoundError",
    "animals_paper_subset",
    "bag_of_words",
    "children_mismatch",
    "cifar",
    "fetch",
    "folder_subset",
    "hospital",
    "hospital_features",
    "hospital_labels",
    "hospital_split",
    "load_cifar_animals",
    "load_enron1",
    "load_hospital",
    "load_image_folder",
    "load_mnist",
    "load_spam",
    "mnist",
    "mnist_paper_split",
    "one_vs_seven",
    "preprocess",
    "read_animals_zip",
    "read_diabetes",
    "read_enron",
    "read_idx",
    "scale_images",
    "small_subset",
    "spam",
    "spam_split",
    "sha256_file",
    "verify_sha256",
]
