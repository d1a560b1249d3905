"""Tests for relu_regions.datasets (IDX reader, MNIST / Fashion-MNIST loaders, tabular loaders)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from relu_regions import datasets as ds
from relu_regions.datasets import idx as idx_mod
from relu_regions.datasets.tabular import FILES_DIR

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
FASHION_SUBSET_TEST_COUNTS = [107, 105, 111, 93, 115, 87, 97, 95, 95, 95]
VENDORED = ["seeds_dataset.txt", "spambase.csv", "titanic.csv"]
SHA_RE = re.compile(r"([0-9a-f]{64})")


@pytest.fixture(scope="module")
def data_root() -> Path:
    root = ds.find_data_root()
    if root is None or not (root / "mnist").is_dir():
        pytest.skip(f"shared data directory not found (set {ds.DATA_ENV_VAR} or provide ../shared/data)")
    return root


def write_idx(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` as an IDX file (gzip-compressed when the name ends in .gz)."""
    code = {np.dtype("u1"): 0x08, np.dtype("i2"): 0x0B, np.dtype("f4"): 0x0D}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_fake_set(directory: Path, n_train: int, n_test: int, gz: bool = True, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            directory / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        )
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))


# ---------------------------------------------------------------- data root


def test_find_data_root_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ds.DATA_ENV_VAR, str(tmp_path))
    assert ds.find_data_root() == tmp_path.resolve()
    monkeypatch.setenv(ds.DATA_ENV_VAR, str(tmp_path / "missing"))
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="not a directory"):
        root = ds.find_data_root()
    assert root != tmp_path / "missing"


# ---------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("name", ["a.gz", "a"])
@pytest.mark.parametrize("dtype", ["u1", "i2", "f4"])
def test_read_idx_roundtrip(tmp_path: Path, name: str, dtype: str) -> None:
    arr = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    write_idx(tmp_path / name, arr)
    out = ds.read_idx(tmp_path / name)
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3, 5)
    np.testing.assert_array_equal(out, arr)
    np.testing.assert_array_equal(ds.read_idx(tmp_path / name, limit=1), arr[:1])
    assert ds.idx_shape(tmp_path / name) == (2, 3, 5)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        ds.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "ok", np.zeros(10, dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        ds.read_idx(tmp_path / "short")
    # before: "read length must be non-negative" from gzip, or "truncated" for a raw file
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="limit must be None or an int >= 0"):
            ds.read_idx(tmp_path / "ok", limit=bad)
    assert ds.read_idx(tmp_path / "ok", limit=0).shape == (0,)


# ---------------------------------------------------------------- MNIST (real)


def test_mnist_test_split(data_root: Path) -> None:
    X, y = ds.load_mnist("test", root=data_root)
    assert X.shape == (10000, 1, 28, 28) and X.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert float(X.min()) == 0.0 and float(X.max()) == 1.0
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TEST_COUNTS
    raw, _ = ds.load_mnist("test", root=data_root, limit=5, normalize=False)
    assert torch.allclose(raw / 255.0, X[:5])
    assert raw.max() > 1.0 and torch.equal(raw, raw.round())


def test_mnist_train_split(data_root: Path) -> None:
    X, y = ds.load_mnist("train", root=data_root)
    assert X.shape == (60000, 1, 28, 28)
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert 0.0 <= float(X.min()) and float(X.max()) <= 1.0
    assert y[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]  # the well-known first training labels


def test_fashion_mnist_subset(data_root: Path) -> None:
    if not (data_root / "fashion-mnist-subset").is_dir() and not (data_root / "fashion-mnist").is_dir():
        pytest.skip("no Fashion-MNIST in the shared data directory")
    X, y = ds.load_mnist("test", root=data_root, kind="fashion-mnist")
    desc = ds.describe_mnist_source("fashion-mnist", data_root)
    if "subset" not in desc:
        pytest.skip(f"a full Fashion-MNIST is present ({desc}); subset counts do not apply")
    assert desc.startswith("Fashion-MNIST subset (1000/1000) from IDX files at ")
    assert X.shape == (1000, 1, 28, 28) and 0.0 <= float(X.min()) and float(X.max()) <= 1.0
    assert torch.bincount(y, minlength=10).tolist() == FASHION_SUBSET_TEST_COUNTS
    Xtr, ytr = ds.load_mnist("train", root=data_root, kind="fashion-mnist", limit=10)
    assert Xtr.shape == (10, 1, 28, 28) and ytr.shape == (10,)


def test_default_root_uses_idx_fallback_here(data_root: Path) -> None:
    """Without torchvision (or without its raw/ layout) the IDX reader is what runs."""
    if importlib.util.find_spec("torchvision") is None:
        assert not idx_mod._torchvision_available()
    desc = ds.describe_mnist_source("mnist", data_root)
    assert desc == f"MNIST (60000/10000) from IDX files at {data_root / 'mnist'}"


# ---------------------------------------------------------------- MNIST (synthetic)


def test_missing_files_error_lists_searched_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        ds.load_mnist("test", root=tmp_path, kind="fashion-mnist")
    msg = str(exc.value)
    assert str(tmp_path / "fashion-mnist-subset") in msg and "zalandoresearch" in msg
    with pytest.raises(ValueError):
        ds.load_mnist("valid", root=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ds.load_mnist("test", root=tmp_path, kind="kmnist")  # type: ignore[arg-type]


def test_fashion_prefers_full_set_over_subset(tmp_path: Path) -> None:
    write_fake_set(tmp_path / "fashion-mnist-subset", 4, 3)
    assert ds.describe_mnist_source("fashion-mnist", tmp_path).startswith("Fashion-MNIST subset (4/3)")
    full = tmp_path / "fashion-mnist"
    for prefix, n in (("train", 60000), ("t10k", 10000)):  # only the label headers decide
        write_idx(full / f"{prefix}-labels-idx1-ubyte.gz", np.zeros(n, dtype=np.uint8))
        write_idx(full / f"{prefix}-images-idx3-ubyte.gz", np.zeros((1, 28, 28), dtype=np.uint8))
    assert ds.describe_mnist_source("fashion-mnist", tmp_path) == (
        f"Fashion-MNIST (60000/10000) from IDX files at {full}"
    )


def test_torchvision_layout_dispatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_fake_set(raw, 6, 4, gz=False)

    # torchvision not importable -> the IDX reader reads torchvision's raw/ folder itself.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    assert not idx_mod._torchvision_available()
    assert ds.describe_mnist_source("mnist", tmp_path) == f"MNIST subset (6/4) from IDX files at {raw}"
    X_idx, y_idx = ds.load_mnist("test", root=tmp_path)
    assert X_idx.shape == (4, 1, 28, 28) and y_idx.tolist() == [0, 1, 2, 3]

    # A (fake) torchvision is importable -> its dataset class is used with root=tmp_path.
    calls = []

    class FakeMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            split = "train" if train else "t10k"
            self.data = torch.from_numpy(ds.read_idx(raw / f"{split}-images-idx3-ubyte"))
            self.targets = torch.from_numpy(ds.read_idx(raw / f"{split}-labels-idx1-ubyte")).long()

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(MNIST=FakeMNIST)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    assert "from torchvision.datasets.MNIST at" in ds.describe_mnist_source("mnist", tmp_path)
    X_tv, y_tv = ds.load_mnist("test", root=tmp_path, limit=3)
    assert calls == [(str(tmp_path), False, False)]
    assert torch.equal(X_tv, X_idx[:3])
    assert y_tv.dtype == torch.int64 and y_tv.tolist() == [0, 1, 2]


# ---------------------------------------------------------------- tabular


def _provenance_sums() -> dict[str, str]:
    text = (FILES_DIR / "PROVENANCE.md").read_text()
    return {
        f: SHA_RE.search(line).group(1) for line in text.splitlines() for f in VENDORED if f"`{f}`" in line
    }


def test_vendored_files_match_provenance() -> None:
    sums = _provenance_sums()
    assert sorted(sums) == sorted(VENDORED)
    for f in VENDORED:
        assert hashlib.sha256((FILES_DIR / f).read_bytes()).hexdigest() == sums[f], f


def test_vendored_files_match_shared_readme(data_root: Path) -> None:
    readme = {
        m.group(2): m.group(1)
        for m in re.finditer(r"^([0-9a-f]{64})\s+(\S+)$", (data_root / "README.md").read_text(), re.M)
    }
    for f in VENDORED:
        assert hashlib.sha256((FILES_DIR / f).read_bytes()).hexdigest() == readme[f"tabular/{f}"], f


def _check(d: ds.TabularDataset, n: int, p: int, n_classes: int) -> None:
    assert d.X.shape == (n, p) and d.X.dtype == np.float32
    assert d.y.shape == (n,) and d.y.dtype == np.int64
    assert len(d.feature_names) == p and d.n_classes == n_classes
    assert set(np.unique(d.y)) == set(range(n_classes))
    assert np.isfinite(d.X).all()


@pytest.mark.parametrize(
    ("name", "n", "p", "c"),
    [("iris", 150, 4, 3), ("wine", 178, 13, 3), ("breast_cancer", 569, 30, 2), ("digits", 1797, 64, 10)],
)
def test_sklearn_tabular(name: str, n: int, p: int, c: int) -> None:
    d = ds.load_tabular(name)
    _check(d, n, p, c)
    assert d.name == name and "sklearn" in d.source


def test_seeds() -> None:
    d = ds.load_tabular("seeds")
    _check(d, 210, 7, 3)
    assert np.bincount(d.y).tolist() == [70, 70, 70]
    np.testing.assert_allclose(d.X[0], [15.26, 14.84, 0.871, 5.763, 3.312, 2.221, 5.22], rtol=1e-6)


def test_spambase() -> None:
    d = ds.load_tabular("spambase")
    _check(d, 4601, 57, 2)
    assert int(d.y.sum()) == 1813
    assert d.feature_names[0] == "word_freq_make" and d.feature_names[-1] == "capital_run_length_total"


def test_titanic() -> None:
    d = ds.load_tabular("titanic")
    _check(d, 891, 7, 2)
    assert d.feature_names == ["Age", "Gender", "PClass", "Fare", "Embarked", "Title", "IsAlone"]
    assert int(d.y.sum()) == 342 and d.y.mean() == pytest.approx(0.384, abs=1e-3)
    col = {f: d.X[:, i] for i, f in enumerate(d.feature_names)}
    assert int(col["Gender"].sum()) == 314  # female = 1
    assert sorted(np.unique(col["PClass"]).tolist()) == [1.0, 2.0, 3.0]
    titles = np.bincount(col["Title"].astype(int), minlength=5).tolist()
    assert dict(zip(d.categories["Title"], titles)) == {
        "Mr": 517,
        "Mrs": 126,
        "Miss": 185,
        "Master": 40,
        "Rare": 23,
    }
    embarked = np.bincount(col["Embarked"].astype(int), minlength=3).tolist()
    assert dict(zip(d.categories["Embarked"], embarked)) == {"C": 168, "Q": 77, "S": 646}
    assert int(col["IsAlone"].sum()) == 537
    assert col["Age"][0] == 22.0 and col["Fare"][0] == pytest.approx(7.25)
    # Passenger 6 (Moran, Mr. James) has no age: imputed with the median age of all Mr.
    assert col["Age"][5] == pytest.approx(30.0)


def test_tabular_from_shared_root_matches_vendored(data_root: Path) -> None:
    for name in ("seeds", "titanic"):
        a, b = ds.load_tabular(name), ds.load_tabular(name, root=data_root)
        np.testing.assert_array_equal(a.X, b.X)
        assert b.source.startswith(str(data_root))
    with pytest.raises(ValueError, match="unknown tabular"):
        ds.load_tabular("adult")


def test_stratified_split_and_standardize() -> None:
    d = ds.load_tabular("seeds")
    tr, te = ds.stratified_split(d.X, d.y, test_size=0.2, seed=0)
    assert len(te) == 42 and len(tr) == 168
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(210))
    assert np.bincount(d.y[te]).tolist() == [14, 14, 14]
    tr2, _ = ds.stratified_split(d.X, d.y, seed=0)
    np.testing.assert_array_equal(tr, tr2)
    Xtr, Xte = ds.standardize(d.X[tr], d.X[te])
    assert Xtr.dtype == np.float32
    np.testing.assert_allclose(Xtr.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(Xtr.std(0), 1, atol=1e-5)
    mu, sd = d.X[tr].mean(0), d.X[tr].std(0)
    np.testing.assert_allclose(Xte, (d.X[te] - mu) / sd, rtol=1e-4, atol=1e-5)
    const_tr, const_te = ds.standardize(np.ones((4, 2)), np.full((1, 2), 3.0))
    np.testing.assert_array_equal(const_tr, 0.0)
    np.testing.assert_array_equal(const_te, 2.0)
