"""Locating the shared data directory and reading MNIST / Fashion-MNIST from IDX files.

The IDX reader needs only numpy. When ``torchvision`` is importable and the data root has torchvision's
own layout (``root/MNIST/raw/`` or ``root/FashionMNIST/raw/`` with uncompressed files), the torchvision
dataset classes are used instead; otherwise the IDX files are read directly.
"""

from __future__ import annotations

import gzip
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch

from ..errors import is_int_at_least

__all__ = ["DATA_ENV_VAR", "describe_mnist_source", "find_data_root", "idx_shape", "load_mnist", "read_idx"]

DATA_ENV_VAR = "RELU_REGIONS_DATA"

Kind = Literal["mnist", "fashion-mnist"]
Split = Literal["train", "test"]

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_PREFIX = {"train": "train", "test": "t10k"}
_TV_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_PRETTY = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
_FULL_SIZES = (60000, 10000)


def find_data_root() -> Path | None:
    """Locate the shared data directory (the one holding ``mnist/``, ``tabular/``, ...).

    Search order: the ``RELU_REGIONS_DATA`` environment variable, ``<repo root>/../shared/data`` (the repo
    root being the parent of the ``relu_regions`` package directory), then ``./shared/data`` and
    ``../shared/data`` relative to the current working directory.

    Returns
    -------
    pathlib.Path or None
        The first candidate that is an existing directory, or ``None`` if there is none.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            return path.resolve()
        warnings.warn(f"{DATA_ENV_VAR}={env!r} is not a directory; ignoring it", stacklevel=2)
    repo_root = Path(__file__).resolve().parents[2]
    cwd = Path.cwd()
    for cand in (
        repo_root.parent / "shared" / "data",
        cwd / "shared" / "data",
        cwd.parent / "shared" / "data",
    ):
        if cand.is_dir():
            return cand.resolve()
    return None


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_header(f: IO[bytes], path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    magic = f.read(4)
    if len(magic) != 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {magic.hex()})")
    ndim = magic[3]
    dims = np.frombuffer(f.read(4 * ndim), dtype=">u4")
    if len(dims) != ndim:
        raise ValueError(f"{path}: truncated IDX header")
    return np.dtype(_IDX_DTYPES[magic[2]]), tuple(int(d) for d in dims)


def idx_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """Return the array shape stored in an IDX file's header without reading the data."""
    path = Path(path)
    with _open(path) as f:
        return _read_header(f, path)[1]


def _check_limit(limit: int | None) -> None:
    if limit is not None and not is_int_at_least(limit, 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")


def read_idx(path: str | os.PathLike[str], limit: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed if the name ends in ``.gz``, raw otherwise).

    Parameters
    ----------
    path
        File to read, e.g. ``train-images-idx3-ubyte.gz``.
    limit
        Read only the first ``limit`` items along the first axis (``None``: all).

    Returns
    -------
    numpy.ndarray
        Array with the shape given by the header, in native byte order (``uint8`` for MNIST).

    Raises
    ------
    ValueError
        If the magic number is invalid, the file is shorter than its header says, or its gzip stream is damaged.
    """
    _check_limit(limit)
    path = Path(path)
    try:
        with _open(path) as f:
            dtype, shape = _read_header(f, path)
            if limit is not None and shape:
                shape = (min(limit, shape[0]), *shape[1:])
            count = int(np.prod(shape))
            buf = f.read(count * dtype.itemsize)
    except (EOFError, gzip.BadGzipFile) as e:  # a cut or damaged .gz: gzip's words name no file
        raise ValueError(f"{path}: damaged gzip file ({type(e).__name__}: {e})") from e
    if len(buf) != count * dtype.itemsize:
        raise ValueError(f"{path}: expected {count} items of {dtype}, file is truncated")
    return np.frombuffer(buf, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


@dataclass(frozen=True)
class _Source:
    backend: Literal["torchvision", "idx"]
    directory: Path  # torchvision: the root passed to the dataset class; idx: the folder with the files
    sizes: tuple[int, int]  # (train, test) item counts from the label headers

    def files(self, split: Split) -> tuple[Path, Path]:
        files = _idx_files(self.directory, split)
        if files is None:
            raise FileNotFoundError(f"IDX files for split {split!r} missing in {self.directory}")
        return files


def _idx_files(directory: Path, split: Split) -> tuple[Path, Path] | None:
    """Image and label files for ``split`` in ``directory`` (``.gz`` or raw), or None if incomplete."""
    found = []
    for what in ("images-idx3", "labels-idx1"):
        stem = directory / f"{_PREFIX[split]}-{what}-ubyte"
        path = next((p for p in (stem.with_name(stem.name + ".gz"), stem) if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def _sizes(directory: Path) -> tuple[int, int] | None:
    """(train, test) item counts from the label headers, or None if any of the four files is missing."""
    train, test = _idx_files(directory, "train"), _idx_files(directory, "test")
    if train is None or test is None:
        return None
    return idx_shape(train[1])[0], idx_shape(test[1])[0]


def _torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # not installed, or a broken / ABI-incompatible install
        return False
    return True


def _candidates(kind: Kind, root: Path) -> list[Path]:
    tv_raw = root / _TV_CLASS[kind] / "raw"
    if kind == "mnist":
        return [tv_raw, root / "mnist", root]
    return [tv_raw, root / "fashion-mnist", root / "fashion-mnist-subset", root]


def _resolve(kind: Kind, root: str | os.PathLike[str] | None) -> _Source:
    if kind not in _TV_CLASS:
        raise ValueError(f"kind must be 'mnist' or 'fashion-mnist', got {kind!r}")
    base = Path(root) if root is not None else find_data_root()
    if base is None:
        raise FileNotFoundError(
            f"No data directory found for {_PRETTY[kind]}: set {DATA_ENV_VAR} or pass root=. Searched "
            f"${DATA_ENV_VAR}, <repo>/../shared/data, ./shared/data and ../shared/data."
        )
    tv_raw = base / _TV_CLASS[kind] / "raw"
    tv_names = [f"{p}-{w}-ubyte" for p in _PREFIX.values() for w in ("images-idx3", "labels-idx1")]
    if all((tv_raw / n).is_file() for n in tv_names) and _torchvision_available():
        sizes = (idx_shape(tv_raw / tv_names[1])[0], idx_shape(tv_raw / tv_names[3])[0])
        return _Source("torchvision", base, sizes)
    found = [(d, sizes) for d in _candidates(kind, base) if (sizes := _sizes(d)) is not None]
    if not found:
        searched = ", ".join(str(d) for d in _candidates(kind, base))
        url = {
            "mnist": "http://yann.lecun.com/exdb/mnist/",
            "fashion-mnist": "https://github.com/zalandoresearch/fashion-mnist",
        }[kind]
        raise FileNotFoundError(
            f"{_PRETTY[kind]} IDX files not found. Searched: {searched}. Expected "
            "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and "
            "t10k-labels-idx1-ubyte[.gz] "
            f"(download from {url}, or via torchvision.datasets.{_TV_CLASS[kind]}(root, download=True) on a "
            f"connected machine) and point {DATA_ENV_VAR} or root= at their parent directory."
        )
    # Prefer a complete data set over a subset; otherwise keep the search order.
    full = [f for f in found if f[1] >= _FULL_SIZES]
    directory, sizes = (full or found)[0]
    return _Source("idx", directory, sizes)


def describe_mnist_source(kind: Kind = "mnist", root: str | os.PathLike[str] | None = None) -> str:
    """Describe where :func:`load_mnist` would read ``kind`` from, for logs and reports.

    Parameters
    ----------
    kind
        ``"mnist"`` or ``"fashion-mnist"``.
    root
        Data root; ``None`` uses :func:`find_data_root`.

    Returns
    -------
    str
        E.g. ``"Fashion-MNIST subset (1000/1000) from IDX files at /.../fashion-mnist-subset"``.

    Raises
    ------
    FileNotFoundError
        If no usable files are found.
    """
    src = _resolve(kind, root)
    subset = "" if src.sizes >= _FULL_SIZES else " subset"
    how = "torchvision.datasets." + _TV_CLASS[kind] if src.backend == "torchvision" else "IDX files"
    return f"{_PRETTY[kind]}{subset} ({src.sizes[0]}/{src.sizes[1]}) from {how} at {src.directory}"


def load_mnist(
    split: Split = "train",
    root: str | os.PathLike[str] | None = None,
    kind: Kind = "mnist",
    limit: int | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST or Fashion-MNIST as tensors.

    Parameters
    ----------
    split
        ``"train"`` or ``"test"``.
    root
        Data root; ``None`` uses :func:`find_data_root`. Files are looked for in torchvision's layout
        (``root/MNIST/raw``, ``root/FashionMNIST/raw``), then ``root/mnist`` (MNIST) or
        ``root/fashion-mnist`` / ``root/fashion-mnist-subset`` (Fashion-MNIST; a full set wins over the
        subset), then ``root`` itself.
    kind
        ``"mnist"`` or ``"fashion-mnist"``.
    limit
        Keep only the first ``limit`` examples.
    normalize
        Scale pixels to ``[0, 1]``; if False they stay in ``[0, 255]`` (still float32).

    Returns
    -------
    images : torch.Tensor
        float32, shape ``(N, 1, 28, 28)``.
    labels : torch.Tensor
        int64, shape ``(N,)``, values 0..9.

    Raises
    ------
    FileNotFoundError
        With the searched paths and download hints, when no files are found.
    """
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _check_limit(limit)
    src = _resolve(kind, root)
    if src.backend == "torchvision":
        import torchvision

        ds = getattr(torchvision.datasets, _TV_CLASS[kind])(
            str(src.directory), train=split == "train", download=False
        )
        images, labels = torch.as_tensor(ds.data[:limit]), torch.as_tensor(ds.targets[:limit])
    else:
        img_path, lbl_path = src.files(split)
        images = torch.from_numpy(read_idx(img_path, limit))
        labels = torch.from_numpy(read_idx(lbl_path, limit))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels in {src.directory}")
    x = images.to(torch.float32).unsqueeze(1)
    if normalize:
        x = x / 255.0
    return x.contiguous(), labels.to(torch.int64)
