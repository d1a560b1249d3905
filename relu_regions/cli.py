"""The ``relu-regions`` command: ``demo``, ``analyze`` and ``compare``.

Run ``relu-regions --help`` (or ``python -m relu_regions.cli --help``). Every error the user can fix (bad
argument, missing file, unsupported layer, data that does not fit the model) ends the command with one line on
stderr and exit status 2; nothing is written unless the whole report was produced.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

__all__ = ["LoadedData", "build_parser", "load_data", "load_model", "main", "train_demo_model"]

EXIT_USAGE = 2
DEFAULT_OUT = "relu_regions_report"


class CLIError(Exception):
    """An error reported to the user as one line, exit status 2."""


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedData:
    """Inputs, labels and names for the report."""

    X: torch.Tensor
    y: torch.Tensor
    description: str
    class_names: list[str] | None = None
    feature_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _reshape(X: torch.Tensor, shape: Sequence[int] | None, what: str) -> torch.Tensor:
    if not shape:
        return X
    per = int(np.prod(shape))
    if X[0].numel() != per:
        raise CLIError(f"--input-shape {','.join(map(str, shape))} needs {per} values per sample but {what} has "
                       f"{X[0].numel()}")
    return X.reshape(X.shape[0], *shape)


def load_data(spec: str, *, split: str = "test", root: str | None = None, limit: int | None = None,
              input_shape: Sequence[int] | None = None) -> LoadedData:
    """Load the data named by ``spec``.

    Parameters
    ----------
    spec : str
        ``mnist`` or ``fashion-mnist`` (via :func:`relu_regions.datasets.load_mnist`; torchvision's files or the
        shared IDX files), a ``.npz`` file with arrays ``X`` and ``y``, a ``.csv`` file whose last column is the
        integer label (a header row is detected), or a directory of images ``DIR/<class>/<image>`` (PNG/JPEG read
        with Pillow, all the same size).
    split : {"test", "train"}
        For mnist / fashion-mnist.
    root : str, optional
        Data root for mnist / fashion-mnist.
    limit : int, optional
        Keep the first ``limit`` samples.
    input_shape : sequence of int, optional
        Reshape each sample (e.g. ``1,28,28`` for flat rows fed to a CNN).
    """
    if spec in ("mnist", "fashion-mnist"):
        from .datasets import describe_mnist_source, load_mnist

        try:
            X, y = load_mnist(split, root=root, kind=spec, limit=limit)
            desc = describe_mnist_source(spec, root=root)
        except FileNotFoundError as e:
            raise CLIError(f"--data {spec}: {str(e).splitlines()[0]}") from e
        except (EOFError, OSError, ValueError) as e:  # a cut .gz, a damaged IDX header
            raise CLIError(f"--data {spec}: its files (root {root or 'default'}) cannot be read "
                           f"({type(e).__name__}: {str(e)[:160]})") from e
        _check_finite_rows(X.numpy(), spec)
        names = _FASHION if spec == "fashion-mnist" else [str(i) for i in range(10)]
        return LoadedData(_reshape(X, input_shape, spec), y, f"{desc} ({split} split, {len(y)} images)", names)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CLIError(f"--data {spec}: no such file or directory (expected mnist, fashion-mnist, a .npz/.csv "
                       f"file or an image folder)")
    if path.is_dir():
        X, y, names = _image_folder(path)
    elif path.suffix.lower() == ".npz":
        try:
            z = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise CLIError(f"--data {path}: not a readable .npz archive ({type(e).__name__}: {str(e)[:120]}); save "
                           "it with numpy.savez(path, X=..., y=...)") from e
        if not isinstance(z, np.lib.npyio.NpzFile):  # a .npy array saved under a .npz name
            raise CLIError(f"--data {path}: a single array, not an .npz archive with arrays 'X' and 'y' (save it "
                           "with numpy.savez(path, X=..., y=...))")
        with z:
            missing = [k for k in ("X", "y") if k not in z.files]
            if missing:
                raise CLIError(f"--data {path}: the .npz file needs arrays 'X' and 'y'; it has {z.files}")
            try:
                X, y = z["X"], z["y"]
            except ValueError as e:  # object arrays (allow_pickle=False)
                raise CLIError(f"--data {path}: X and y must be numeric arrays ({e})") from e
        names = None
    elif path.suffix.lower() == ".csv":
        X, y = _csv(path)
        names = None
    else:
        raise CLIError(f"--data {path}: unsupported file type '{path.suffix}' (use .npz with X/y, .csv with the "
                       "label in the last column, or an image folder)")
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim < 2 or len(X) != len(y):
        raise CLIError(f"--data {path}: X must be (N, ...) with one label per row; got X {X.shape}, y {y.shape}")
    if not np.issubdtype(X.dtype, np.number) or not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise CLIError(f"--data {path}: X must be numeric and y integer class labels; got {X.dtype}, {y.dtype}")
    if limit is not None:
        X, y = X[:limit], y[:limit]
    if len(X) == 0:
        raise CLIError(f"--data {path}: no samples")
    _check_finite_rows(X, str(path))
    Xt = torch.as_tensor(X, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    if (yt < 0).any():
        raise CLIError(f"--data {path}: labels must be 0..C-1; found {int(yt.min())}")
    feature_names = None
    extra = {}
    if path.suffix.lower() == ".csv":
        header = _csv_header(path)
        if header:
            feature_names = header[:-1]
    return LoadedData(_reshape(Xt, input_shape, str(path)), yt, f"{path} ({len(yt)} samples)", names, feature_names,
                      extra)


def _check_finite_rows(X: np.ndarray, where: str) -> None:
    """A NaN / infinite sample has no activation region: counted, it was a region and a prediction of NaN logits."""
    bad = ~np.isfinite(np.asarray(X, dtype=np.float64)).reshape(len(X), -1).all(1)
    if bad.any():
        raise CLIError(f"--data {where}: {int(bad.sum())} sample(s) hold NaN or infinite values (first: row "
                       f"{int(np.argmax(bad))}); drop or impute them first")


_FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _csv_header(path: Path) -> list[str] | None:
    with open(path, encoding="utf-8-sig") as f:  # (-sig: Excel's "CSV UTF-8" starts with a byte-order mark)
        first = f.readline().strip().split(",")
    if [v.strip() for v in first] == [str(i) for i in range(len(first))]:
        return None if len(first) < 2 else first  # pandas' header of unnamed columns, "0,1,...": not a sample
    try:
        [float(v) for v in first]
        return None
    except ValueError:
        return [c.strip() for c in first]


def _csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    skip = 1 if _csv_header(path) else 0
    try:
        data = np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.float64, ndmin=2, encoding="utf-8-sig")
    except ValueError as e:
        raise CLIError(f"--data {path}: could not read numeric CSV ({e})") from e
    if data.shape[1] < 2:
        raise CLIError(f"--data {path}: need at least one feature column and a label column")
    y = data[:, -1]
    if not np.all(np.mod(y, 1) == 0):
        raise CLIError(f"--data {path}: the last column must hold integer class labels")
    return data[:, :-1].astype(np.float32), y.astype(np.int64)


def _image_folder(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        from PIL import Image
    except ImportError as e:
        raise CLIError("--data <image folder> needs Pillow (pip install pillow)") from e
    # as torchvision's ImageFolder: class folders sorted by name (as strings: "10" before "2"), here without hidden
    # ones (a ".ipynb_checkpoints" folder became class 0 and shifted every label)
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise CLIError(f"--data {path}: an image folder must hold one sub-folder per class (DIR/<class>/<image>)")
    images, labels, size, mode = [], [], None, None
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm"}
    files = [(c, f) for c in classes for f in sorted((path / c).iterdir()) if f.suffix.lower() in exts]
    if not files:
        raise CLIError(f"--data {path}: no images (.png/.jpg/...) found in its class sub-folders")
    with Image.open(files[0][1]) as im0:
        mode = "L" if im0.mode in ("L", "1", "I", "I;16", "P") else "RGB"
    for c, f in files:
        try:
            with Image.open(f) as im:
                if im.mode in ("I;16", "I;16B", "I;16L", "I") and mode == "L":  # 16-bit: convert("L") clipped to 0/1
                    arr = np.asarray(im, dtype=np.float32) / 65535.0
                else:
                    arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        except OSError as e:  # (PIL's UnidentifiedImageError, truncated files)
            raise CLIError(f"--data {path}: cannot read image {f} ({type(e).__name__}: {e})") from e
        if size is None:
            size = arr.shape
        elif arr.shape != size:
            raise CLIError(f"--data {path}: images differ in size ({f} is {arr.shape[:2]}, expected {size[:2]}); "
                           "resize them first")
        images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        labels.append(classes.index(c))
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------

_REFUSE_PICKLE = ("refusing to load {path}: it is not a plain state_dict / tensor checkpoint (loading it with "
                  "weights_only=True failed: {err}). Unpickling arbitrary objects can run arbitrary code. Save "
                  "`model.state_dict()` with torch.save and pass --class module:Class, or save the model with "
                  "torch.export.save.")


def _import_class(spec: str) -> type:
    if ":" not in spec:
        raise CLIError(f"--class {spec!r} must look like 'package.module:ClassName'")
    mod_name, _, attr = spec.partition(":")
    added = os.getcwd() not in sys.path and "" not in sys.path
    if added:  # like `python -m`, modules in the working directory can be found
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise CLIError(f"--class {spec}: cannot import module '{mod_name}' ({e})") from e
    finally:
        if added:
            sys.path.remove(os.getcwd())
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"--class {spec}: module '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"--class {spec}: '{attr}' is not a class or factory function")
    return obj


# where checkpoints keep the model's weights: Lightning's, and PyTorch's tutorial "general checkpoint"
_WEIGHT_KEYS = ("state_dict", "model_state_dict")


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _WEIGHT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        if isinstance(obj, dict) and obj:
            bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            tables = [str(k) for k, v in obj.items() if isinstance(v, dict)]
            hint = (f"; its entries {tables[:5]} hold dicts: save the model's state_dict() alone, or under "
                    f"'model_state_dict'" if tables else "")
            raise CLIError(f"--model {path}: expected a state_dict (a dict of tensors); got a dict whose entries "
                           f"{bad[:5]} are not tensors{hint}")
        raise CLIError(f"--model {path}: expected a state_dict (a dict of tensors); got {type(obj).__name__}")
    return obj


def _fit_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, spec: str) -> None:
    want = set(model.state_dict())
    if set(sd) != want:
        # Lightning checkpoints prefix every key with the attribute holding the model (e.g. "model.")
        prefixes = {k.split(".", 1)[0] for k in sd}
        if len(prefixes) == 1 and all("." in k for k in sd):
            stripped = {k.split(".", 1)[1]: v for k, v in sd.items()}
            if set(stripped) == want:
                sd = stripped
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:400]
        raise CLIError(f"--model {path} does not fit --class {spec}: {first}") from e


# aten ops whose torch / functional counterparts take the same arguments; the function mode of the engine sees
# the counterparts (it cannot see aten calls), so an exported graph is rewritten to use them.
_ATEN_TO_TORCH_NAMES = {
    "relu": "F.relu", "relu_": "F.relu_", "leaky_relu": "F.leaky_relu", "hardtanh": "F.hardtanh",
    "hardtanh_": "F.hardtanh_", "prelu": "F.prelu", "max_pool1d": "F.max_pool1d", "max_pool2d": "F.max_pool2d",
    "max_pool2d_with_indices": "F.max_pool2d_with_indices", "adaptive_max_pool2d": "F.adaptive_max_pool2d",
    "avg_pool1d": "F.avg_pool1d", "avg_pool2d": "F.avg_pool2d", "adaptive_avg_pool2d": "F.adaptive_avg_pool2d",
    "conv1d": "F.conv1d", "conv2d": "F.conv2d", "linear": "F.linear", "clamp": "torch.clamp",
    "clamp_min": "torch.clamp_min", "clamp_max": "torch.clamp_max", "flatten": "torch.flatten",
    "view": "torch.reshape", "_unsafe_view": "torch.reshape", "reshape": "torch.reshape", "permute": "torch.permute",
    "t": "torch.t", "transpose": "torch.transpose", "add": "torch.add", "sub": "torch.sub", "mul": "torch.mul",
    "div": "torch.div", "addmm": "torch.addmm", "mm": "torch.mm", "matmul": "torch.matmul", "cat": "torch.cat",
    "mean": "torch.mean", "sum": "torch.sum", "squeeze": "torch.squeeze", "unsqueeze": "torch.unsqueeze",
    "contiguous": "torch.Tensor.contiguous", "clone": "torch.clone", "neg": "torch.neg", "sigmoid": "torch.sigmoid",
    "tanh": "torch.tanh", "softmax": "torch.softmax", "_softmax": "torch.softmax",
    "log_softmax": "torch.log_softmax", "_log_softmax": "torch.log_softmax", "gelu": "F.gelu",
    "pad": "F.pad", "constant_pad_nd": "F.pad", "expand": "torch.Tensor.expand", "getitem": None,
}


def _identity_dropout(x, *args, **kwargs):
    return x


def _bn_no_training(x, weight, bias, running_mean, running_var, momentum, eps):
    import torch.nn.functional as F

    return (F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps),)


def _bn_aten(x, weight, bias, running_mean, running_var, training, momentum, eps, *args):
    import torch.nn.functional as F

    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def _exported_to_module(ep: Any, path: Path) -> nn.Module:
    """Rewrite an ExportedProgram's aten graph into torch-level calls the recorder can observe."""
    import torch.fx
    import torch.nn.functional as F

    gm = ep.module()  # a fresh copy of the graph module: rewriting it leaves `ep` intact
    graph = gm.graph
    special = {"dropout": _identity_dropout, "native_dropout": None, "_native_batch_norm_legit_no_training":
               _bn_no_training, "batch_norm": _bn_aten}
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = node.target.overloadpacket.__name__
        if name in special and special[name] is not None:
            node.target = special[name]
            continue
        target = _ATEN_TO_TORCH_NAMES.get(name)
        if target is None:
            raise CLIError(f"--model {path}: the exported program uses aten.{name}, which relu-regions cannot map "
                           "to a PyTorch call it observes; pass a state_dict and --class module:Class instead")
        scope, _, attr = target.rpartition(".")
        node.target = getattr({"F": F, "torch": torch, "torch.Tensor": torch.Tensor}[scope], attr)
    new = torch.fx.GraphModule(gm, graph)
    new.eval()
    return new


@dataclass
class LoadedModel:
    """A model ready for analysis, and how it was loaded."""

    model: nn.Module
    description: str
    reference: Any = None  # for exported programs: the original module, to check the rewrite
    input_shape: tuple | None = None  # for exported programs: the input's shape, None for dynamic dimensions


def load_model(path: str | os.PathLike[str], class_spec: str | None = None,
               class_kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """Load a model for ``analyze`` / ``compare``.

    Parameters
    ----------
    path : path
        A ``torch.export.save`` program (``.pt2``), or a state_dict / Lightning checkpoint (loaded with
        ``weights_only=True``) together with ``class_spec``.
    class_spec : str, optional
        ``package.module:ClassName`` (or a factory function) building the architecture for a state_dict.
    class_kwargs : dict, optional
        Keyword arguments for the class.

    Raises
    ------
    CLIError
        For missing files, pickled whole models (refused), TorchScript (not observable) and mismatching
        checkpoints, with what to do instead.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CLIError(f"--model {p}: no such file")
    if class_spec is not None:
        cls = _import_class(class_spec)
        names = _zip_names(p)
        if _is_torchscript(names):  # (before torch.load, which would print its own warning about it on the terminal)
            raise CLIError(_TORCHSCRIPT.format(path=p))
        if _is_exported(names):
            raise CLIError(f"--model {p} is a torch.export program: it carries its own architecture; leave out "
                           f"--class {class_spec}")
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            if names is None and not _legacy_torch_save(p):  # (torch's own words for other files: "KeyError: 101")
                raise CLIError(f"--model {p}: not a PyTorch file (expected a state_dict saved with torch.save for "
                               f"--class {class_spec})") from e
            raise CLIError(_REFUSE_PICKLE.format(path=p, err=" ".join(str(e).split())[:160])) from e
        sd = _state_dict_of(obj, p)
        try:
            model = cls(**(class_kwargs or {}))
        except TypeError as e:
            raise CLIError(f"--class {class_spec}: could not build it ({e}); pass constructor arguments with "
                           "--class-kwargs '{\"name\": value}'") from e
        if not isinstance(model, nn.Module):
            raise CLIError(f"--class {class_spec} built a {type(model).__name__}, not a torch.nn.Module")
        _fit_state_dict(model, sd, p, class_spec)
        return LoadedModel(model.eval(), f"{class_spec} with weights from {p}")
    # no class: an exported program, or explain what is needed. The file's kind is read from its zip listing
    # before anything is loaded: torch.export.load logs a traceback of ~20 lines on stderr for any other file
    names = _zip_names(p)
    if _is_torchscript(names):
        raise CLIError(_TORCHSCRIPT.format(path=p))
    if not _is_exported(names) and _is_pickle_archive(names):  # a torch.save file
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CLIError(_REFUSE_PICKLE.format(path=p, err=" ".join(str(e).split())[:160])) from e
        if isinstance(obj, dict):
            raise CLIError(f"--model {p} holds a state_dict: also pass --class package.module:ClassName to build "
                           "the architecture")
        raise CLIError(f"--model {p}: not a torch.export program nor a state_dict ({type(obj).__name__})")
    if names is not None:  # an exported program (or another layout of one: let torch.export judge)
        with _torch_export_log_caught() as logged:
            try:
                with open(p, "rb") as f:  # (a path not ending in .pt2 would log a warning)
                    ep = torch.export.load(f)
            except Exception as e:
                if not _is_exported(names):
                    raise CLIError(f"--model {p}: a zip archive that is neither a torch.export program nor a "
                                   "state_dict saved with torch.save") from e
                msg = _logged_error(logged) or " ".join(str(e).split())[:300]
                raise CLIError(f"--model {p} looks like a torch.export program but could not be loaded ({msg}); "
                               "export it again with this version of torch, or pass a state_dict and --class "
                               "module:Class") from e
        model = _exported_to_module(ep, p)
        return LoadedModel(model, f"torch.export program {p}", ep.module(), _exported_input_shape(ep))
    raise CLIError(f"--model {p}: not a PyTorch file (expected a torch.export .pt2 program, or a state_dict saved "
                   "with torch.save plus --class)")


_TORCHSCRIPT = ("--model {path} is TorchScript: its forward runs inside the TorchScript interpreter, where "
                "relu-regions cannot observe activations. Save the model with torch.export.save (dynamic batch "
                "dimension) or save its state_dict and pass --class module:Class.")


def _zip_names(p: Path) -> list[str] | None:
    """The names in the zip archive ``p`` (``torch.save``, ``torch.export.save`` and TorchScript files all are
    zips), None when it is not one."""
    try:
        with zipfile.ZipFile(p) as z:
            return z.namelist()
    except zipfile.BadZipFile:
        return None


def _legacy_torch_save(p: Path) -> bool:
    """Whether ``p`` starts like a pickle (torch.save's pre-zip format begins with a pickled magic number)."""
    with open(p, "rb") as f:
        return f.read(1) == b"\x80"


def _is_exported(names: list[str] | None) -> bool:
    """Whether a zip listing is a ``torch.export.save`` archive's (an ``archive_format`` record and a ``models/``
    folder; a ``torch.save`` file has ``data.pkl``)."""
    return bool(names) and any(n.endswith("/archive_format") for n in names) and any("/models/" in n for n in names)


@contextlib.contextmanager
def _torch_export_log_caught():
    """Catch what torch.export logs during a load (a warning and a traceback per failure, on top of the exception)
    instead of printing it; yields the list of log records. The loggers' handlers are put back afterwards."""
    caught: list[logging.LogRecord] = []
    catcher = logging.Handler()
    catcher.emit = caught.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch.export.pt2_archive._package")]
    saved = [(lg.handlers, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [catcher], False
    try:
        yield caught
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved):
            lg.handlers, lg.propagate = handlers, propagate


def _logged_error(records: list[logging.LogRecord]) -> str:
    """The last exception torch.export logged (its own exception only says to read the log)."""
    for r in reversed(records):
        if r.exc_info and r.exc_info[1] is not None:
            return " ".join(str(r.exc_info[1]).split())[:300]
    return ""


def _exported_input_shape(ep: Any) -> tuple | None:
    """The shape of the exported program's one user input, an entry ``None`` where it is dynamic; None when the
    program has several inputs or no recorded shape."""
    try:
        names = list(ep.graph_signature.user_inputs)
        nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        if len(names) != 1 or names[0] not in nodes:
            return None
        val = nodes[names[0]].meta.get("val")
        if val is None or not hasattr(val, "shape"):
            return None
        return tuple(d if isinstance(d, int) else None for d in val.shape)
    except Exception:  # an unexpected program layout: the probe falls back to the guard's message
        return None


def _is_pickle_archive(names: list[str] | None) -> bool:
    """Whether a zip listing is a ``torch.save`` archive's (it holds a ``data.pkl`` record)."""
    return bool(names) and any(n.endswith("/data.pkl") or n == "data.pkl" for n in names)


def _is_torchscript(names: list[str] | None) -> bool:
    """Whether a zip listing is a TorchScript archive's."""
    return bool(names) and any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _check_exported_sample_shape(want: tuple | None, got: tuple) -> None:
    """Refuse data whose per-sample shape differs from an exported program's fixed one, saying so (before, any
    guard failure was put down to the batch dimension)."""
    if want is None:
        return
    per = want[1:]
    if len(per) == len(got) and all(w is None or w == g for w, g in zip(per, got)):
        return
    shape = "(" + ", ".join("?" if w is None else str(w) for w in per) + ("," if len(per) == 1 else "") + ")"
    got_n = int(np.prod(got)) if got else 1
    msg = (f"the data's samples have shape {got} ({got_n} values) but the exported program takes samples of "
           f"shape {shape}")
    if all(w is not None for w in per):
        need = int(np.prod(per)) if per else 1
        msg += f" ({need} values)"
        if need == got_n:
            raise CLIError(f"{msg}; reshape them with --input-shape {','.join(map(str, per))}")
        raise CLIError(f"{msg}: the data does not fit this model (--input-shape only reshapes samples into the "
                       f"same number of values, {got_n} here)")
    raise CLIError(f"{msg}; reshape them with --input-shape")


def _probe(loaded: LoadedModel, data: LoadedData, logits_at: str | None) -> int:
    """Check that the data fits the model and that the model is supported; return the number of outputs."""
    from .errors import ReluRegionsError
    from .recording import run_recorded
    from .state import preserved

    model = loaded.model
    x = data.X[:2]
    _check_exported_sample_shape(loaded.input_shape, tuple(data.X.shape[1:]))
    try:
        with preserved(model, eval_mode=True), torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        msg = " ".join(str(e).split())[:300]
        raise CLIError(f"the data (samples of shape {tuple(data.X.shape[1:])}) does not fit the model: {msg}. "
                       "Use --input-shape to reshape flat rows, e.g. --input-shape 1,28,28") from e
    except AssertionError as e:  # guards of an exported program (fixed shapes)
        msg = " ".join(str(e).split())[:300]
        if loaded.input_shape is not None and loaded.input_shape[0] is None:  # (the batch is dynamic already)
            raise CLIError(f"the data (samples of shape {tuple(data.X.shape[1:])}) violates the exported "
                           f"program's shape guard ({msg}); use --input-shape to reshape the samples, or export "
                           "the program with the shapes of your data") from e
        raise CLIError(f"the data (samples of shape {tuple(data.X.shape[1:])}) violates the exported program's "
                       f"shape guard ({msg}); export with a dynamic batch dimension, e.g. "
                       "dynamic_shapes=({0: torch.export.Dim('batch')},)") from e
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise CLIError(f"the model must return logits of shape (N, classes); it returned "
                       f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if loaded.reference is not None:
        ref = loaded.reference(x)
        if not torch.allclose(out, ref, rtol=1e-5, atol=1e-5):
            raise CLIError("the exported program could not be rewritten faithfully for relu-regions (outputs "
                           "differ); pass a state_dict and --class module:Class instead")
    try:
        with preserved(model, eval_mode=True), torch.no_grad():
            run_recorded(model, x, logits_at=logits_at)
    except ReluRegionsError as e:
        raise CLIError(" ".join(str(e).split())) from e
    n_out = out.shape[1]
    if n_out == 1:  # (checked before the analysis; the report refuses it too)
        from .report import SINGLE_LOGIT

        raise CLIError(SINGLE_LOGIT)
    if int(data.y.max()) >= n_out:
        raise CLIError(f"the labels go up to {int(data.y.max())} but the model has only {n_out} outputs")
    if data.class_names is not None and len(data.class_names) != n_out and logits_at is None:
        # (the labels of a --limit subset need not show every class)
        raise CLIError(f"the data has {len(data.class_names)} classes but the model gives {n_out} outputs")
    return n_out


# --------------------------------------------------------------------------------------------------------------
# Demo model
# --------------------------------------------------------------------------------------------------------------


def train_model(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 3e-3,
                batch_size: int = 64, seed: int = 0, progress: bool = True, desc: str = "training") -> list[float]:
    """Plain Adam training with cross-entropy (deterministic for a given seed); returns the loss per epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    it = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, unit="epoch")
    model.train()
    for _ in it:
        perm = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(y))
        if progress:
            it.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def digits_data(seed: int = 0) -> tuple[LoadedData, LoadedData]:
    """scikit-learn's 8×8 digits as ``(N, 1, 8, 8)`` images in [0, 1], split 80/20 (stratified, seeded)."""
    from .datasets import load_tabular, stratified_split

    ds = load_tabular("digits")
    X = torch.as_tensor(ds.X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.as_tensor(ds.y)
    tr, te = stratified_split(ds.X, ds.y, test_size=0.2, seed=seed)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    names = [str(c) for c in ds.class_names]
    return (LoadedData(X[tr], y[tr], f"{ds.source}, train split ({len(tr)} images)", names),
            LoadedData(X[te], y[te], f"{ds.source}, held-out split ({len(te)} images)", names))


def train_demo_model(seed: int = 0, quick: bool = False, progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Train :class:`relu_regions.models.SmallCNN` on the 8×8 digits; returns the model and a training summary."""
    from .models import SmallCNN

    torch.manual_seed(seed)
    train, _ = digits_data(seed)
    model = SmallCNN()
    epochs = 1 if quick else 25
    if quick:  # smoke tests: a few optimisation steps are enough
        train = LoadedData(train.X[:400], train.y[:400], train.description, train.class_names)
    t0 = time.perf_counter()
    losses = train_model(model, train.X, train.y, epochs=epochs, seed=seed, progress=progress,
                         desc="training SmallCNN on 8x8 digits")
    with torch.no_grad():
        train_acc = float((model(train.X).argmax(1) == train.y).double().mean())
    return model, {"epochs": epochs, "final loss": round(losses[-1], 4), "train accuracy": round(train_acc, 4),
                   "training time": f"{time.perf_counter() - t0:.1f} s"}


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------


def _write_report(model, data: LoadedData, args, title: str, meta: dict[str, Any]) -> Path:
    import warnings

    from .report import build_report

    with warnings.catch_warnings():
        # Captum's advisory warnings (e.g. "multiple inputs for KernelShap") are noise for a report run
        warnings.filterwarnings("ignore", module=r"captum(\.|$)")
        warnings.filterwarnings("ignore", message=r"Input Tensor \d+ did not already require gradients")
        report = build_report(model, data.X, data.y, title=title, class_names=data.class_names,
                              feature_names=data.feature_names, meta=meta, n_explain=args.explain, seed=args.seed,
                              logits_at=getattr(args, "logits_at", None), progress=not args.no_progress,
                              quick=args.quick)
    out = report.write(args.out)
    acc = report.results["accuracy"]
    regions = report.results.get("regions", {}).get("full network")
    print(f"accuracy {acc:.4f} on {report.results['n_samples']} samples; "
          f"{regions if regions is not None else 'n/a'} activation regions (full network)")
    missing = [s.title for s in report.sections if not s.available]
    if missing:
        print(f"sections not available yet: {', '.join(missing)}")
    print(f"report written to {out / 'index.html'} (and summary.md)")
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    from .report import check_out_dir

    check_out_dir(args.out)  # (before the training, not after it)
    torch.manual_seed(args.seed)
    model, info = train_demo_model(seed=args.seed, quick=args.quick, progress=not args.no_progress)
    _, test = digits_data(args.seed)
    if args.quick:  # smoke-test size
        test = LoadedData(test.X[:120], test.y[:120], test.description.replace("360 images", "first 120 images"),
                          test.class_names)
    meta = {"model": "relu_regions.models.SmallCNN (Conv-ReLU-MaxPool, Conv-ReLU, Linear-ReLU-Linear)",
            "data": test.description, "training": ", ".join(f"{k} {v}" for k, v in info.items()),
            "seed": args.seed}
    _write_report(model, test, args, "relu-regions demo: SmallCNN on scikit-learn 8×8 digits", meta)
    return 0


def _parse_shape(s: str | None) -> tuple[int, ...] | None:
    if not s:
        return None
    try:
        shape = tuple(int(v) for v in s.replace("x", ",").split(",") if v.strip())
    except ValueError as e:
        raise CLIError(f"--input-shape {s!r}: expected comma-separated integers like 1,28,28") from e
    if not shape or any(v <= 0 for v in shape):
        raise CLIError(f"--input-shape {s!r}: expected positive integers like 1,28,28")
    return shape


def _load_inputs(args) -> tuple[LoadedModel, LoadedData]:
    kwargs = None
    if args.class_kwargs:
        try:
            kwargs = json.loads(args.class_kwargs)
        except json.JSONDecodeError as e:
            raise CLIError(f"--class-kwargs is not valid JSON: {e}") from e
        if not isinstance(kwargs, dict):
            raise CLIError("--class-kwargs must be a JSON object, e.g. '{\"n_classes\": 10}'")
    if args.limit is not None and args.limit <= 0:
        raise CLIError("--limit must be positive")
    loaded = load_model(args.model, args.model_class, kwargs)
    if getattr(args, "logits_at", None) and loaded.reference is not None:
        # (export inlines module calls: a module name survives as a holder of parameters, never called, and the run
        # then failed asking for the --logits-at it had been given)
        raise CLIError("--logits-at: a torch.export program has no module calls to stop at (export inlines them); "
                       "export the model without its output activation (softmax / sigmoid head), or pass its "
                       "state_dict with --class and --logits-at")
    data = load_data(args.data, split=args.split, root=args.data_root, limit=args.limit,
                     input_shape=_parse_shape(args.input_shape))
    _probe(loaded, data, getattr(args, "logits_at", None))
    return loaded, data


def cmd_analyze(args: argparse.Namespace) -> int:
    from .report import check_out_dir

    check_out_dir(args.out)  # (before the analysis, not after it)
    loaded, data = _load_inputs(args)
    meta = {"model": loaded.description, "data": data.description, "seed": args.seed}
    _write_report(loaded.model, data, args, "relu-regions analysis", meta)
    return 0


_METHOD_ALIASES = {"ig": "IntegratedGradients", "ixg": "InputXGradient", "shap": "KernelShap",
                   "kernel_shap": "KernelShap", "kernelshap": "KernelShap", "gradient_shap": "GradientShap",
                   "deeplift": "DeepLift", "lime": "Lime", "lrp": "LRP", "saliency": "Saliency", "re3": "Re3",
                   "input_x_gradient": "InputXGradient", "integrated_gradients": "IntegratedGradients"}


def _method_names(spec: str, known: Sequence[str]) -> list[str]:
    """Case-insensitive method names with short aliases (ig, shap, lrp, ...)."""
    by_lower = {k.lower(): k for k in known}
    out = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        key = name.lower()
        canon = by_lower.get(key) or _METHOD_ALIASES.get(key)
        if canon is None or (known and canon not in known):
            raise CLIError(f"--methods: unknown method {name!r}; choose from {', '.join(known)} "
                           "(aliases: ig, shap, lrp, ...)")
        out.append(canon)
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        compare = importlib.import_module("relu_regions.compare")
    except ImportError as e:
        raise CLIError(f"compare is not available: relu_regions.compare is missing ({e})") from e
    if getattr(args, "logits_at", None):  # (Captum's peers explain the model's output, as compare() does)
        raise CLIError("--logits-at: compare explains the model's own output with Re3 and the Captum methods, so "
                       "that output must be the logits; run it on a model that returns them (analyze takes "
                       "--logits-at and leaves the comparison out)")
    if args.out and Path(args.out).is_dir():  # (checked before the comparison runs)
        raise CLIError(f"--out {args.out}: is a directory; give the path of the Markdown file to write")
    if args.out and not Path(args.out).parent.is_dir():
        raise CLIError(f"--out {args.out}: parent directory does not exist")
    # (method names checked before a model is trained or loaded)
    methods = _method_names(args.methods, getattr(compare, "ALL_METHODS", ())) if args.methods else None
    if args.model is None:
        # (without --model the demo network and its digits run: options of a user's model and data would be ignored)
        given = [flag for flag, value in (("--data", args.data), ("--class", args.model_class),
                                          ("--class-kwargs", args.class_kwargs), ("--data-root", args.data_root),
                                          ("--limit", args.limit), ("--input-shape", args.input_shape),
                                          ("--split", None if args.split == "test" else args.split))
                 if value is not None]
        if given:
            raise CLIError(f"{', '.join(given)} need --model: without it compare runs the demo network on the digits "
                           "data and would ignore them")
        model, _ = train_demo_model(seed=args.seed, quick=args.quick, progress=not args.no_progress)
        _, data = digits_data(args.seed)
    else:
        if args.data is None:
            raise CLIError("--data is required with --model")
        loaded, data = _load_inputs(args)
        model = loaded.model
    n = min(args.samples, len(data.y))
    X = data.X[:n]
    with torch.no_grad():
        target = model(X).argmax(1)
    kwargs: dict[str, Any] = {"methods": methods} if methods else {}
    if args.quick:
        kwargs.update(n_seeds=2, ig_steps=8, n_steps=5, infidelity_samples=2)
    # (the sampling peers and the infidelity estimate draw from --seed; the table labels what is not exact)
    result = compare.compare(model, X, target=target, progress=not args.no_progress, seed=args.seed, **kwargs)
    table = result.to_markdown() if hasattr(result, "to_markdown") else str(result)
    print(table)
    if args.out:
        out = Path(args.out)
        if not out.parent.is_dir():
            raise CLIError(f"--out {out}: parent directory does not exist")
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(table + "\n", encoding="utf-8")
        os.replace(tmp, out)
        print(f"table written to {out}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    """argparse type of a count (argparse turns the ValueError into its one-line usage error, exit 2)."""
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v

_DESCRIPTION = """\
Exact, deterministic explanations of piecewise-linear (ReLU) PyTorch classifiers from their activation regions.
Inside the region that contains an input x the network is an affine map f(x) = A·x + d; relu-regions finds A and
d exactly, counts regions, and compares its exact attributions with the usual approximations.
"""

_EPILOG = """\
examples:
  relu-regions demo                              # train a small CNN on 8x8 digits, write ./relu_regions_report/
  relu-regions analyze --model lenet.pt --class relu_regions.models:LeNet --data mnist --limit 2000
  relu-regions analyze --model net.pt2 --data data.npz --out my_report
  relu-regions compare --methods ig,deeplift,kernel_shap --samples 16

Errors you can fix (bad arguments, missing files, unsupported layers, data that does not fit the model) print one
line on stderr and exit with status 2; a report directory is written only when complete.
"""


def _common(p: argparse.ArgumentParser, report: bool = True) -> None:
    g = p.add_argument_group("common options")
    if report:
        g.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                       help="report directory (index.html, summary.md, figures/); replaced only if it holds a "
                            "previous report (default: ./%(default)s)")
        g.add_argument("--explain", type=_positive_int, default=None, metavar="N",
                       help="samples for the exact Re3 contributions (default: all analysed samples)")
    g.add_argument("--seed", type=int, default=0, help="seed for the demo model's training, sample subsets and the "
                   "sampling attribution methods (default: 0)")
    g.add_argument("--quick", action="store_true", help="tiny settings for smoke tests (a few seconds)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _model_data(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=required, metavar="FILE",
                   help="a torch.export program (.pt2, dynamic batch dimension) or a state_dict / Lightning "
                        "checkpoint saved with torch.save (needs --class); loaded with weights_only=True")
    g.add_argument("--class", dest="model_class", metavar="MODULE:CLASS",
                   help="architecture for a state_dict, e.g. relu_regions.models:LeNet")
    g.add_argument("--class-kwargs", metavar="JSON", help="constructor arguments for --class as a JSON object")
    g.add_argument("--data", required=required, metavar="SPEC",
                   help="mnist | fashion-mnist | FILE.npz (arrays X, y) | FILE.csv (last column = label) | "
                        "image folder DIR/<class>/<image>")
    g.add_argument("--split", choices=("test", "train"), default="test", help="split for mnist / fashion-mnist")
    g.add_argument("--data-root", metavar="DIR", help="data root for mnist / fashion-mnist (default: shared data)")
    g.add_argument("--limit", type=int, metavar="N", help="analyse only the first N samples")
    g.add_argument("--input-shape", metavar="C,H,W", help="reshape every sample, e.g. 1,28,28 for flat rows")
    g.add_argument("--logits-at", metavar="MODULE",
                   help="module path producing the logits when the model ends in softmax/sigmoid")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``relu-regions`` command."""
    from . import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="relu-regions", description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"relu-regions {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="train a small CNN on scikit-learn's 8x8 digits and write a report",
                          description="Train relu_regions.models.SmallCNN on scikit-learn's 8x8 digits (bundled, "
                                      "no download), analyse the held-out 20% and write a self-contained report "
                                      "(about a minute on a laptop CPU).", formatter_class=fmt)
    _common(demo)
    demo.set_defaults(func=cmd_demo)

    an = sub.add_parser("analyze", help="analyse your model on your data and write a report",
                        description="Analyse a piecewise-linear classifier: accuracy, activation regions, exact "
                                    "Re3 contributions, attribution comparison, validity and boundary distances.",
                        epilog="example: relu-regions analyze --model lenet.pt --class relu_regions.models:LeNet "
                               "--data mnist --limit 2000", formatter_class=fmt)
    _model_data(an, required=True)
    _common(an)
    an.set_defaults(func=cmd_analyze)

    cp = sub.add_parser("compare", help="compare exact Re3 attributions with Captum methods (table)",
                        description="Run the attribution comparison harness (relu_regions.compare). Without "
                                    "--model, the demo's SmallCNN on 8x8 digits is trained and used.",
                        formatter_class=fmt)
    _model_data(cp, required=False)
    cp.add_argument("--methods", metavar="LIST", help="comma-separated methods (default: the harness's default)")
    cp.add_argument("--samples", type=_positive_int, default=32, metavar="N",
                    help="samples to explain (default: 32)")
    cp.add_argument("--out", metavar="FILE.md", help="also write the table as Markdown")
    _common(cp, report=False)
    cp.set_defaults(func=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``relu-regions`` console script; returns the exit status."""
    from .errors import ReluRegionsError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("relu-regions: interrupted; nothing written", file=sys.stderr)
        return 130
    except (CLIError, ReluRegionsError, FileNotFoundError, FileExistsError, ValueError) as e:
        if args.debug:
            raise
        msg = " ".join(str(e).split())
        print(f"relu-regions {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # an unexpected failure: still one line, with a way to get the traceback
        if args.debug:
            raise
        msg = " ".join(str(e).split())[:500]
        print(f"relu-regions {args.command}: error: {type(e).__name__}: {msg} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
