"""Data sets for tests, benchmarks, notebooks and the CLI.

- :func:`load_mnist` / :func:`describe_mnist_source`: MNIST and Fashion-MNIST from IDX files (or torchvision).
- :func:`load_tabular`: Iris, Wine, Breast cancer, Digits, Seeds, Spambase, Titanic as numpy arrays.
- :func:`find_data_root`: the shared data directory (``$RELU_REGIONS_DATA``, ``<repo>/../shared/data``, ...).
"""

from .idx import DATA_ENV_VAR, describe_mnist_source, find_data_root, idx_shape, load_mnist, read_idx
from .tabular import TABULAR_NAMES, TabularDataset, load_tabular, standardize, stratified_split

__all__ = [
    "DATA_ENV_VAR",
    "TABULAR_NAMES",
    "TabularDataset",
    "describe_mnist_source",
    "find_data_root",
    "idx_shape",
    "load_mnist",
    "load_tabular",
    "read_idx",
    "standardize",
    "stratified_split",
]
