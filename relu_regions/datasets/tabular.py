"""Small tabular classification data sets, returned as numpy arrays.

Seeds, Spambase and Titanic are vendored in ``relu_regions/datasets/files`` (see ``PROVENANCE.md``), so they
load from an installed package without the shared data directory. Iris, Wine, Breast cancer and Digits come
from scikit-learn's bundled loaders (scikit-learn is needed only for those and for :func:`stratified_split`).
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["TABULAR_NAMES", "TabularDataset", "load_tabular", "standardize", "stratified_split"]

FILES_DIR = Path(__file__).resolve().parent / "files"
TABULAR_NAMES = ("iris", "wine", "breast_cancer", "digits", "seeds", "spambase", "titanic")
_FILENAMES = {"seeds": "seeds_dataset.txt", "spambase": "spambase.csv", "titanic": "titanic.csv"}
_SKLEARN = {
    "iris": "load_iris",
    "wine": "load_wine",
    "breast_cancer": "load_breast_cancer",
    "digits": "load_digits",
}

SEEDS_FEATURES = [
    "area",
    "perimeter",
    "compactness",
    "kernel_length",
    "kernel_width",
    "asymmetry_coefficient",
    "kernel_groove_length",
]
TITANIC_FEATURES = ["Age", "Gender", "PClass", "Fare", "Embarked", "Title", "IsAlone"]
TITANIC_TITLES = ["Mr", "Mrs", "Miss", "Master", "Rare"]
TITANIC_EMBARKED = ["C", "Q", "S"]
_TITLE_ALIASES = {"Mlle": "Miss", "Ms": "Miss", "Mme": "Mrs"}


@dataclass
class TabularDataset:
    """A tabular classification data set.

    Attributes
    ----------
    X : numpy.ndarray
        float32 features, shape ``(n_samples, n_features)``.
    y : numpy.ndarray
        int64 class labels ``0..C-1``, shape ``(n_samples,)``.
    feature_names, class_names : list of str
        Column and class names (``class_names[k]`` names label ``k``).
    name : str
        Data set name as passed to :func:`load_tabular`.
    source : str
        Where the data came from (file path or scikit-learn loader).
    categories : dict
        For integer-coded categorical features: feature name -> category names, indexed by code.
    """

    X: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    class_names: list[str]
    name: str
    source: str
    categories: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


def _data_file(name: str, root: str | os.PathLike[str] | None) -> Path:
    filename = _FILENAMES[name]
    if root is None:
        return FILES_DIR / filename
    root = Path(root)
    for cand in (root / "tabular" / filename, root / filename):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"{filename} not found in {root / 'tabular'} or {root}")


def _load_sklearn(name: str) -> TabularDataset:
    try:
        import sklearn.datasets
    except ImportError as e:  # pragma: no cover - sklearn is an optional extra
        raise ImportError(f"load_tabular({name!r}) needs scikit-learn (pip install scikit-learn)") from e
    bunch = getattr(sklearn.datasets, _SKLEARN[name])()
    return TabularDataset(
        X=np.asarray(bunch.data, dtype=np.float32),
        y=np.asarray(bunch.target, dtype=np.int64),
        feature_names=[str(f) for f in bunch.feature_names],
        class_names=[str(c) for c in bunch.target_names],
        name=name,
        source=f"scikit-learn sklearn.datasets.{_SKLEARN[name]}()",
    )


def _load_seeds(path: Path) -> TabularDataset:
    # Some rows contain doubled tabs: split on any run of whitespace.
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    data = np.array(rows, dtype=np.float64)
    if data.shape[1] != 8:
        raise ValueError(f"{path}: expected 8 columns, got {data.shape[1]}")
    return TabularDataset(
        X=data[:, :7].astype(np.float32),
        y=data[:, 7].astype(np.int64) - 1,
        feature_names=list(SEEDS_FEATURES),
        class_names=["Kama", "Rosa", "Canadian"],
        name="seeds",
        source=str(path),
    )


def _load_spambase(path: Path) -> TabularDataset:
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    return TabularDataset(
        X=data[:, :-1].astype(np.float32),
        y=data[:, -1].astype(np.int64),
        feature_names=header[:-1],
        class_names=["not_spam", "spam"],
        name="spambase",
        source=str(path),
    )


def _title(name: str) -> str:
    """Grouped title from a Kaggle name such as ``"Braund, Mr. Owen Harris"``."""
    m = re.search(r",\s*([^.]+)\.", name)
    title = m.group(1).strip() if m else ""
    title = _TITLE_ALIASES.get(title, title)
    return title if title in TITANIC_TITLES else "Rare"


def _load_titanic(path: Path) -> TabularDataset:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def num(v: str) -> float:
        return float(v) if v.strip() else np.nan

    titles = [_title(r["name"]) for r in rows]
    age = np.array([num(r["age"]) for r in rows])
    fare = np.array([num(r["fare"]) for r in rows])
    title_arr = np.array(titles)
    for t in TITANIC_TITLES:  # impute age with the median age of passengers with the same title
        sel = title_arr == t
        if sel.any():
            known = age[sel & ~np.isnan(age)]
            age[sel & np.isnan(age)] = np.median(known) if known.size else np.nanmedian(age)
    fare[np.isnan(fare)] = np.nanmedian(fare)
    embarked = [r["embarked"].strip() for r in rows]
    mode = Counter(e for e in embarked if e).most_common(1)[0][0]
    embarked = [e or mode for e in embarked]
    X = np.column_stack(
        [
            age,
            [1.0 if r["sex"].strip() == "female" else 0.0 for r in rows],
            [float(r["pclass"]) for r in rows],
            fare,
            [float(TITANIC_EMBARKED.index(e)) for e in embarked],
            [float(TITANIC_TITLES.index(t)) for t in titles],
            [float(int(r["sibsp"]) + int(r["parch"]) == 0) for r in rows],
        ]
    )
    return TabularDataset(
        X=X.astype(np.float32),
        y=np.array([int(r["survived"]) for r in rows], dtype=np.int64),
        feature_names=list(TITANIC_FEATURES),
        class_names=["died", "survived"],
        name="titanic",
        source=str(path),
        categories={
            "Gender": ["male", "female"],
            "Embarked": list(TITANIC_EMBARKED),
            "Title": list(TITANIC_TITLES),
        },
    )


def load_tabular(name: str, root: str | os.PathLike[str] | None = None) -> TabularDataset:
    """Load a tabular classification data set.

    Parameters
    ----------
    name
        One of ``"iris"``, ``"wine"``, ``"breast_cancer"``, ``"digits"`` (scikit-learn bundled),
        ``"seeds"`` (UCI Seeds: 210 x 7, labels 1..3 mapped to 0..2), ``"spambase"`` (UCI Spambase:
        4601 x 57, 1 = spam) or ``"titanic"`` (Kaggle train set, 891 passengers; see Notes).
    root
        Directory holding the raw files (in ``root/tabular/`` or ``root/``); ``None`` uses the copies
        vendored with the package. Ignored for the scikit-learn data sets.

    Returns
    -------
    TabularDataset

    Notes
    -----
    Titanic features are ``Age, Gender, PClass, Fare, Embarked, Title, IsAlone``: Age missing values are
    imputed with the median age of the passenger's title group (computed on all 891 rows); Gender is
    0 = male, 1 = female; Embarked is coded C=0, Q=1, S=2 with the two missing ports set to the mode (S);
    Title is Mr=0, Mrs=1, Miss=2, Master=3, Rare=4 (Mlle/Ms -> Miss, Mme -> Mrs, others -> Rare);
    IsAlone = 1 when ``sibsp + parch == 0``. The target is ``survived``.
    """
    if name in _SKLEARN:
        return _load_sklearn(name)
    loaders = {"seeds": _load_seeds, "spambase": _load_spambase, "titanic": _load_titanic}
    if name not in loaders:
        raise ValueError(f"unknown tabular data set {name!r}; choose from {', '.join(TABULAR_NAMES)}")
    return loaders[name](_data_file(name, root))


def stratified_split(
    X: np.ndarray, y: np.ndarray, test_size: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test split of sample indices.

    Parameters
    ----------
    X
        Features (only its length is used).
    y
        Class labels used for stratification.
    test_size
        Fraction of samples in the test set.
    seed
        Random seed.

    Returns
    -------
    train_idx, test_idx : numpy.ndarray
        Disjoint int64 index arrays covering ``range(len(X))``.
    """
    from sklearn.model_selection import train_test_split

    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    idx = np.arange(len(y), dtype=np.int64)
    train_idx, test_idx = train_test_split(idx, test_size=test_size, random_state=seed, stratify=y)
    return train_idx, test_idx


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale features to zero mean and unit variance using statistics of ``train`` only.

    Constant training columns are centred but not scaled.

    Parameters
    ----------
    train, test
        Arrays of shape ``(n, d)``.

    Returns
    -------
    train_std, test_std : numpy.ndarray
        Standardized copies, in the dtype of ``train`` when it is floating point (else float64).
    """
    dtype = train.dtype if np.issubdtype(train.dtype, np.floating) else np.float64
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return ((train - mean) / std).astype(dtype), ((test - mean) / std).astype(dtype)
