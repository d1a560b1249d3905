"""Region statistics in training loops you already have, and a differentiable region-parsimony regulariser.

Three ways in, from least to most code of your own:

1. One call over a data loader::

       stats = relu_regions.evaluate(model, val_loader)          # -> RegionStats
       print(stats.n_regions(), stats.mean_purity())

2. A hand-written loop: :func:`track` records region keys and the model's predictions while *your* code runs the
   model; you only pass the labels::

       from relu_regions.regions import RegionStats
       from relu_regions.training import track

       stats = RegionStats(n_classes=10)
       model.eval()
       with torch.no_grad(), track(model, stats) as tracker:
           for x, y in val_loader:
               logits = model(x)            # your code, unchanged; hooks record the activation pattern
               loss = F.cross_entropy(logits, y)
               tracker.update(y)            # predictions come from the captured output (or pass y_pred=...)

   The hooks and the recording mode are attached on entry and removed on exit (also after an exception); the
   model's outputs are bit-identical to a run without tracking.

3. Lightning: :class:`relu_regions.integrations.lightning.RegionMonitor`.

The regulariser :func:`parsimony_penalty` is a loss term that pushes region boundaries away from the training
samples (fewer, larger regions around the data); use it in a ``training_step``::

       def training_step(self, batch, batch_idx):
           x, y = batch
           loss = F.cross_entropy(self(x), y)
           loss = loss + 0.01 * parsimony_penalty(self.net, x, gamma=0.1, l1=1e-4, max_samples=16)
           return loss
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from .errors import check_finite, is_int_at_least, is_integer_tensor
from .hook_recording import ForwardPatch
from .recording import LayerSelection, Recording, library_call, record, run_frozen, run_recorded, select_layers
from .state import preserved

Tensor = torch.Tensor

__all__ = ["RegionTracker", "boundary_distances", "default_inputs", "default_labels", "evaluate",
           "parsimony_penalty", "predictions", "track"]

_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "features", "data")
_LABEL_KEYS = ("y", "label", "labels", "target", "targets")


# --- finding inputs and labels in a batch ------------------------------------------------------------------------


def default_inputs(batch: Any) -> Tensor:
    """The model input of a batch: ``batch`` itself if a tensor, ``batch[0]`` of a tuple/list, or the first of
    the keys ``x, input, inputs, image, images, features, data`` of a dict."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for k in _INPUT_KEYS:
            if k in batch and isinstance(batch[k], Tensor):
                return batch[k]
    raise TypeError(f"cannot find the inputs in a batch of type {_describe(batch)}: expected a tensor, a (x, y, ...) "
                    f"tuple or a dict with one of the keys {_INPUT_KEYS}; pass get_inputs=callable(batch) -> tensor")


def default_labels(batch: Any, key: str | None = None) -> Tensor:
    """The targets of a batch: ``batch[1]`` of a tuple/list, ``batch[key]``, or the first of the keys
    ``y, label, labels, target, targets`` of a dict."""
    if key is not None:
        if isinstance(batch, Mapping) and key in batch:
            return batch[key]
        raise KeyError(f"label_key={key!r} is not a key of the batch ({_describe(batch)})")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    if isinstance(batch, Mapping):
        for k in _LABEL_KEYS:
            if k in batch and isinstance(batch[k], Tensor):
                return batch[k]
    raise TypeError(f"cannot find the labels in a batch of type {_describe(batch)}: expected an (x, y, ...) tuple or "
                    f"a dict with one of the keys {_LABEL_KEYS}; pass label_key='...' or get_labels=callable(batch)")


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"dict with keys {list(batch)[:10]}"
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__} of {[type(b).__name__ for b in batch][:6]}"
    return type(batch).__name__


def _check_class_scores(out: Tensor, what: str = "the model's output") -> None:
    """Refuse an output that is not one vector of class scores per sample: ``(B, K)``, or with extra dims of size 1
    (``(B, K, 1, 1)``, ``(B, 1, K)``). A dense prediction ``(B, C, H, W)`` flattened would be read as C·H·W classes
    (accuracy 0 and regions of meaningless labels, without an error)."""
    if out.dim() > 2 and sum(d != 1 for d in out.shape[1:]) > 1:
        shape = ", ".join(map(str, out.shape[1:]))
        raise ValueError(
            f"{what} has shape (B, {shape}): more than one dimension of size > 1 per sample (a dense prediction such "
            "as a segmentation map?), which cannot be read as class scores; region statistics need a (B, K) output "
            "of K class logits. Pass logits_at= naming the module whose output holds the logits, or, if every entry "
            "is a class, flatten the output in a wrapper module (forward returns model(x).flatten(1))")


def predictions(logits: Tensor) -> Tensor:
    """Predicted class per sample: argmax over outputs, or ``logit > 0`` for a single output.

    ``logits`` is ``(B, K)`` (extra dimensions of size 1 are fine); an output with more than one dimension of size
    > 1 per sample (a dense prediction) raises ``ValueError``.
    """
    _check_class_scores(logits)
    return _decisions(logits.detach())


def _decisions(output: Tensor) -> Tensor:
    """:func:`predictions` of any output shape, read per sample flat (no check of the shape)."""
    flat = output.reshape(output.shape[0], math.prod(output.shape[1:]))  # (not -1: an empty batch has none to infer)
    if flat.shape[1] == 1:  # a binary classifier's logit (as BCEWithLogitsLoss trains it): an argmax would be 0
        return (flat[:, 0] > 0).long()
    return flat.argmax(1)


# --- tracking in a hand-written loop -------------------------------------------------------------------------------


class RegionTracker:
    """Turns what one :func:`record` block saw into :class:`~relu_regions.regions.RegionStats` updates.

    Created by :func:`track`; call :meth:`update` once per batch after your forward pass. It captures the model's
    input and output (or the output of ``logits_at``) as they pass, so predictions need no extra pass.
    """

    def __init__(self, rec: Recording, stats: Any, capture_module: nn.Module, root: nn.Module):
        self.rec = rec
        self.stats = stats
        self.last_input: Tensor | None = None
        self.last_output: Tensor | None = None
        self.n_updates = 0
        self._depth = 0
        self._pass_io: list[tuple[Tensor | None, Tensor | None]] = []  # (input, output) of each recorded pass

        def through_root(module, inner, args, kwargs):
            if not rec.active:  # a session opened inside the block runs the model: not the batch's forward
                return inner(*args, **kwargs)
            self._depth += 1
            try:
                if self._depth == 1:  # (not the previous pass's: a dict input or output would leave it stale)
                    self.last_input = self.last_output = None
                    if args and isinstance(args[0], Tensor):
                        self.last_input = args[0].detach()
                out = inner(*args, **kwargs)
            finally:
                self._depth -= 1
            if capture_module is module:
                self._capture(out)
            if self._depth == 0:
                self._pass_io.append((self.last_input, self.last_output))
            return out

        def capture(module, inner, args, kwargs):
            out = inner(*args, **kwargs)
            if rec.active:
                self._capture(out)
            return out

        # instance-level forwards, not hooks: hooks would put the model on nn.Module's slow call path (see
        # relu_regions.hook_recording.ForwardPatch)
        self._handles = [ForwardPatch.on(root, through_root)]
        if capture_module is not root:
            self._handles.append(ForwardPatch.on(capture_module, capture))

    def _capture(self, output: Any) -> None:
        if isinstance(output, (tuple, list)):
            output = output[0]
        if isinstance(output, Tensor):
            self.last_output = output.detach()

    def remove(self) -> None:
        for h in reversed(self._handles):
            h.remove()
        self._handles = []

    def take(self, n: int, inputs: Tensor | None = None) -> None:
        """Keep one recorded pass when the passes since the last update are several: the last one whose input is
        ``inputs`` (the batch's own tensor, when given and found), else the last one if the passes hold more than
        ``n`` samples (a step that ran the model twice); all of them when they hold ``n`` samples together (a batch
        run in chunks); raise if no pass matches ``n``."""
        self._keep(self._plan(n, inputs))

    def _keep(self, keep: int | None) -> None:
        """Trim the passes to the one :meth:`_plan` chose (``None``: all of them)."""
        passes = self.rec.passes
        if keep is None or len(passes) == 1:
            return
        if len(self._pass_io) == len(passes):
            self.last_input, self.last_output = self._pass_io[keep]
            self._pass_io[:] = [self._pass_io[keep]]
        passes[:] = [passes[keep]]

    def _plan(self, n: int, inputs: Tensor | None = None) -> int | None:
        """The index of the one pass :meth:`take` keeps for ``n`` labels (None: all of them); raises as it does,
        changes nothing (a rejected batch leaves the recording as it was)."""
        passes = self.rec.passes
        if not passes:
            raise RuntimeError("the model did not run since the last update: nothing was recorded (if your step calls "
                               "a submodule directly, track/monitor that submodule)")
        if inputs is not None and len(passes) > 1 and len(self._pass_io) == len(passes):
            # the step's pass on the batch, not another pass of the step (an augmented copy) or of a callback
            found = [i for i, (x, _) in enumerate(self._pass_io) if x is not None and _same_tensor(x, inputs)]
            if found:
                if _pass_size(passes[found[-1]]) != n:
                    raise ValueError(f"the pass on `inputs` recorded {_pass_size(passes[found[-1]])} samples, but "
                                     f"the labels hold {n}: pass the labels of the batch `inputs` holds")
                return found[-1]
        if len(self.rec) == n:
            return None
        sized = [i for i, p in enumerate(passes) if _pass_size(p) == n]
        if sized:  # the last pass of the batch's size (a new tensor fed to the model, then a pass on a part of it)
            return sized[-1]
        raise ValueError(f"{len(self.rec)} samples were recorded since the last update, but the labels hold "
                         f"{n}; the model ran on inputs that do not match the labels")

    def _predictions(self, keep: int | None = None) -> Tensor:
        """Predicted classes of the pass(es) :meth:`take` keeps (``keep`` from :meth:`_plan`)."""
        passes = self.rec.passes
        in_sync = len(self._pass_io) == len(passes)
        if keep is None and len(passes) > 1:
            # the labels cover several passes (a batch run in chunks, or batches before one update): each one's output
            outs = [out for _, out in self._pass_io] if in_sync else []
            if len(outs) != len(passes) or any(out is None for out in outs):
                raise ValueError(
                    f"the model ran {len(passes)} times since the last update (on {[_pass_size(p) for p in passes]} "
                    f"samples) and the labels cover all of them, but the outputs of those passes were not all "
                    "captured: pass y_pred= (the predictions of every sample), or call update() after each pass")
            return torch.cat([predictions(out) for out in outs])
        out = self._pass_io[keep][1] if keep is not None and in_sync else self.last_output
        if out is None:
            raise RuntimeError("no model output was captured; pass y_pred=")
        return predictions(out)

    def update(self, y_true: Tensor, y_pred: Tensor | None = None, *, inputs: Tensor | None = None,
               contributions: Tensor | None = None, weights: Tensor | None = None) -> None:
        """Add the batch recorded since the last update to the stats, then clear the recording.

        Parameters
        ----------
        y_true : Tensor
            ``(B,)`` (or ``(B, 1)``) class indices of the batch.
        y_pred : Tensor, optional
            ``(B,)`` predicted classes; default: argmax of the captured output (of every pass, when the labels
            cover several passes: a batch run in chunks).
        inputs : Tensor, optional
            ``(B, *input_shape)`` batch inputs: the pass on this tensor is the batch's when the model ran several
            times (see :meth:`take`); passed on to ``RegionStats.update`` (summed per region when the stats keep
            inputs: mean input / average instance).
        contributions, weights : Tensor, optional
            Passed on to ``RegionStats.update`` (``(B, K, *input)`` contributions ``A ⊙ x`` and effective weights
            ``A``; summed per region when the stats keep contributions).

        The batch is checked before the recording is cleared: a rejected batch (``ValueError`` / ``TypeError``)
        leaves the stats, the recording and :attr:`n_updates` as they were.
        """
        check = getattr(self.stats, "_check_batch", None)  # (RegionStats; other stats objects check in update)

        def checked(yt: Tensor, yp: Tensor) -> None:
            if check is not None:
                check(yt.shape[0], yt, yp, inputs=inputs, contributions=contributions, weights=weights)

        # the pass on `inputs` when given (the batch's, not an augmented copy's): its predictions, its regions
        batch, y_true, y_pred, n = self._take_patterns(y_true, y_pred, inputs, checked)
        keys, units = self.stats.batch_keys(batch)
        extra = {} if inputs is None else {"inputs": inputs}  # (other stats objects may take no inputs)
        self.stats.update(keys, y_true, y_pred, contributions=contributions, weights=weights, **extra)
        self.stats.add_unit_counts(units, n)

    def take_batch(self, y_true: Tensor, y_pred: Tensor | None = None, inputs: Tensor | None = None) -> tuple:
        """The batch recorded since the last update, left on its device, then clear the recording.

        Returns ``(keys, unit_counts, y_true, y_pred, n)`` as :meth:`RegionStats.recording_batch` gives them, for
        callers that add batches later in one :meth:`RegionStats.update` (no host synchronisation per batch).
        ``inputs``: as in :meth:`take_patterns`.
        """
        batch, y_true, y_pred, n = self.take_patterns(y_true, y_pred, inputs)
        keys, units = self.stats.batch_keys(batch)
        return keys, units, y_true, y_pred, n

    def take_patterns(self, y_true: Tensor, y_pred: Tensor | None = None, inputs: Tensor | None = None) -> tuple:
        """:meth:`take_batch` without the keys: ``(patterns, y_true, y_pred, n)``, where ``patterns`` (a
        :class:`~relu_regions.regions.BatchPatterns`) gives the keys and unit counts later through
        ``stats.batch_keys(patterns)``. The checks (samples against labels) and the predictions happen now.
        ``inputs``: the batch's input tensor, to pick the pass on it among several (see :meth:`take`)."""
        return self._take_patterns(y_true, y_pred, inputs)

    def _take_patterns(self, y_true: Tensor, y_pred: Tensor | None, inputs: Tensor | None,
                       check: Callable[[Tensor, Tensor], None] | None = None) -> tuple:
        """:meth:`take_patterns`; ``check(y_true, y_pred)`` runs after the predictions, before anything changes."""
        y_true = _class_indices(y_true, "y_true")
        recordable = getattr(self.stats, "_check_recordable", None)
        if recordable is not None:  # before the passes are trimmed: a refused batch leaves the recording as it was
            recordable()
        keep = self._plan(y_true.shape[0], inputs)
        y_pred = self._predictions(keep) if y_pred is None else _class_indices(y_pred, "y_pred")
        if check is not None:
            check(y_true, y_pred)
        self._keep(keep)
        batch = self.stats.batch_patterns(self.rec)
        self.rec.clear()
        self._pass_io.clear()
        self.n_updates += 1
        return batch, y_true, y_pred, batch.n


def _pass_size(p: Any) -> int:
    """Samples of one recorded pass."""
    return p[0].state.shape[0] if p else p.batch


def _class_indices(y: Any, name: str) -> Tensor:
    """``y`` as a ``(B,)`` vector; refuses more than one value per sample (one-hot labels would be read as B·C
    labels, and the error would blame the model's inputs)."""
    y = torch.as_tensor(y)
    if y.dim() > 1 and math.prod(y.shape[1:]) != 1:
        raise ValueError(f"{name} must hold one class index per sample, shape (B,) or (B, 1); got shape "
                         f"{tuple(y.shape)} (one-hot labels or per-class scores? pass {name}.argmax(1))")
    if not is_integer_tensor(y):  # (refused here, at the batch, not when the stats add the batches up)
        raise TypeError(f"{name} must hold class indices (an integer tensor), got dtype {y.dtype} (float 0./1. "
                        f"targets of a BCE loss? pass {name}.long())")
    return y.reshape(-1)


def _same_tensor(a: Tensor, b: Any) -> bool:
    """Whether ``a`` (a detached view) holds exactly the tensor ``b``: same storage, offset, shape and strides."""
    return (isinstance(b, Tensor) and a.device == b.device and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and (a.numel() == 0 or a.data_ptr() == b.data_ptr()))


@contextmanager
def track(model: nn.Module, stats: Any, *, logits_at: str | None = None,
          strict: bool = True, count_boundary: bool = False) -> Iterator[RegionTracker]:
    """Record region keys and predictions while your own loop runs ``model``; see the module docstring.

    Parameters
    ----------
    model : nn.Module
        The network your loop calls (``model(x)``).
    stats : RegionStats
        Updated by :meth:`RegionTracker.update`; its layers / granularities decide which keys are counted.
    logits_at : str, optional
        Module path whose output holds the logits (e.g. the layer before a softmax head); predictions are taken
        from it and recording stops there.
    strict : bool
        As in :func:`relu_regions.record`.
    count_boundary : bool
        As in :func:`relu_regions.record`; off by default because statistics need only the region keys, and
        counting max-pool ties is most of the recording cost on CNNs.
    """
    capture = model
    if logits_at is not None:
        mods = dict(model.named_modules())
        if logits_at not in mods:
            raise ValueError(f"logits_at='{logits_at}' is not a submodule of the model")
        capture = mods[logits_at]
    # record() and the tracker remove exactly the hooks and forward patches they added on exit (also on exceptions)
    with record(model, strict=strict, logits_at=logits_at, count_boundary=count_boundary) as rec:
        tracker = RegionTracker(rec, stats, capture, model)
        try:
            yield tracker
        finally:
            tracker.remove()


# --- one call --------------------------------------------------------------------------------------------------------


@library_call
def evaluate(model: nn.Module, dataloader: Any, *, n_classes: int | None = None, layers: LayerSelection = None,
             granularities: dict[str, LayerSelection] | None = None, stats: Any = None,
             get_inputs: Callable[[Any], Tensor] | None = None, get_labels: Callable[[Any], Tensor] | None = None,
             label_key: str | None = None, device: torch.device | str | None = None, logits_at: str | None = None,
             strict: bool = True, contributions: bool = False, max_batches: int | None = None,
             progress: bool | None = None, **stats_kwargs: Any) -> Any:
    """Run ``model`` over a data loader in eval mode and return the region statistics of what it saw.

    Parameters
    ----------
    model : nn.Module
        A piecewise-linear classifier; it runs in eval mode under ``torch.no_grad`` and its flags, hooks and
        requires_grad are restored afterwards.
    dataloader : iterable
        Batches as ``(x, y, ...)`` tuples or dicts (see :func:`default_inputs`, :func:`default_labels`); labels
        are class indices, ``(B,)`` or ``(B, 1)``; inputs must be finite (``ValueError`` otherwise).
    n_classes : int, optional
        Number of classes; default: the model's output width on the first batch (2 for a single logit).
    layers, granularities, **stats_kwargs
        Passed to :class:`~relu_regions.regions.RegionStats` when ``stats`` is not given (``stats_kwargs``:
        ``keep_inputs``, which passes every batch's inputs on, and ``purity_threshold``; ``keep_contributions``
        is set by ``contributions``); refused with ``stats`` (set them on those stats).
    stats : RegionStats, optional
        Accumulate into these stats instead of new ones (``n_classes``, if given, must be theirs).
    get_inputs, get_labels, label_key
        How to find inputs and labels in a batch.
    device : optional
        Move inputs and labels here (default: the device of the model's first parameter).
    logits_at, strict
        As in :func:`relu_regions.record`.
    contributions : bool
        Also pass the exact contributions ``A ⊙ x`` and effective weights ``A`` of every output (the region's affine
        map from :func:`relu_regions.affine_map`) to the stats, which then keep them (``keep_contributions``).
    max_batches : int, optional
        Stop after this many batches (a positive int; None: the whole loader); batch ``max_batches + 1`` is not
        fetched (an iterator passed in goes on from there).
    progress : bool, optional
        Show a tqdm progress bar; default: when the loader has more than 20 batches.

    Returns
    -------
    RegionStats
    """
    from .affine import affine_map

    if max_batches is not None and not is_int_at_least(max_batches, 1):
        raise ValueError(f"max_batches must be None (the whole loader) or a positive int, got {max_batches!r}")
    unknown = sorted(set(stats_kwargs) - {"keep_inputs", "purity_threshold", "keep_contributions"})
    if unknown:
        raise TypeError(f"evaluate got unexpected keyword argument(s) {unknown}; the RegionStats options it passes on "
                        "are keep_inputs and purity_threshold")
    if stats is not None:  # these only configure new stats: with stats= they would be ignored
        ignored = sorted(stats_kwargs) + [name for name, v in (("layers", layers), ("granularities", granularities))
                                          if v is not None]
        if ignored:
            raise ValueError(f"evaluate: {ignored} only configure new RegionStats and would be ignored with "
                             "stats=; set them on the stats you pass")
        kept = bool(getattr(stats, "keep_contributions", contributions))
        if bool(contributions) != kept:
            raise ValueError(f"evaluate: contributions={contributions!r} disagrees with the stats you pass "
                             f"(keep_contributions={kept}): pass contributions={kept}")
        if n_classes is not None and n_classes != getattr(stats, "n_classes", n_classes):
            raise ValueError(f"evaluate: n_classes={n_classes!r} disagrees with the stats you pass "
                             f"(n_classes={stats.n_classes}); leave it out with stats=")
    if "keep_contributions" in stats_kwargs:  # RegionStats gets keep_contributions=contributions
        if bool(stats_kwargs.pop("keep_contributions")) != bool(contributions):
            raise ValueError("keep_contributions is set by contributions=: pass contributions=True to compute the "
                             "contributions and keep them (or neither)")
    get_inputs = get_inputs or default_inputs
    get_labels = get_labels or (lambda b: default_labels(b, label_key))
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    total = max_batches
    try:
        total = min(len(dataloader), max_batches or len(dataloader))
    except TypeError:
        pass
    # (islice stops before fetching batch max_batches + 1: an iterator passed in keeps it, and a loader does no
    # work for a batch that is dropped)
    it: Any = dataloader if max_batches is None else itertools.islice(dataloader, max_batches)
    if progress if progress is not None else (total or 0) > 20:
        from tqdm.auto import tqdm

        it = tqdm(it, total=total, desc="regions", unit="batch")
    with preserved(model, eval_mode=True), torch.no_grad():
        for i, batch in enumerate(it):
            x = get_inputs(batch).to(device)
            y = _class_indices(get_labels(batch), "labels").to(device)
            if x.shape[0] == 0 and y.numel() == 0:  # an empty batch adds nothing (and the model may refuse it)
                continue
            if isinstance(x, Tensor):  # (a NaN sample would be counted in the region of an all-inactive pattern)
                check_finite(x, f"the input of batch {i}", "no activation region contains such an input")
            contrib = y_pred = weights = None
            if contributions:  # outside the recording block: affine_map runs its own recorded passes
                with torch.enable_grad():
                    amap = affine_map(model, x, logits_at=logits_at, strict=strict)
                y_pred = predictions(amap.output)
                weights = amap.A
                contrib = amap.A * x.unsqueeze(1).to(amap.A.dtype)
            # hooks only around the user's forward, one batch at a time
            with track(model, stats, logits_at=logits_at, strict=strict) as tracker:
                model(x)
            if tracker.last_output is not None:  # (before: a (B, 2, H, W) output was read as 2·H·W classes)
                _check_class_scores(tracker.last_output, "the model's output" if logits_at is None
                                    else f"the output of logits_at='{logits_at}'")
            elif y_pred is None:
                raise ValueError("evaluate: no model output was captured (a dict or other non-tensor output): pass "
                                 "logits_at= (the module whose output holds the logits)")
            if stats is None:
                from .regions import RegionStats

                if n_classes is None:  # the width of what predictions are read from (logits_at's output)
                    if tracker.last_output is None:
                        raise ValueError("evaluate: no model output was captured (a dict or other non-tensor "
                                         "output): pass logits_at= (the module whose output holds the logits)")
                    k = tracker.last_output.reshape(x.shape[0], -1).shape[1]
                    n_classes = 2 if k == 1 else k
                stats = tracker.stats = RegionStats(n_classes, layers=layers, granularities=granularities,
                                                    keep_contributions=contributions, **stats_kwargs)
            # the recording outlives the block; computing keys outside it avoids the function mode's overhead
            tracker.update(y, y_pred, inputs=x if getattr(stats, "keep_inputs", False) else None,
                           contributions=contrib, weights=weights)
    if stats is None:
        raise ValueError("the data loader yielded no batches (or only empty ones)")
    return stats


# --- exact boundary distances --------------------------------------------------------------------------------------


_RELU_KINDS = ("relu", "leaky_relu", "prelu")


@library_call
def boundary_distances(model: nn.Module, x: Tensor, layers: LayerSelection = None, *, logits_at: str | None = None,
                       strict: bool = True) -> Tensor:
    """``(B,)`` exact Euclidean distance from each input to the nearest ReLU / clamp hyperplane of its region.

    Inside the region of x every unit's pre-activation is affine, ``z_j(x') = g_j·x' + c_j``, so the distance from
    x to the hyperplane ``z_j = 0`` is ``|z_j(x)| / ‖g_j‖₂`` (for clamps: to ``z_j = lo`` and ``z_j = hi``). The
    region is the intersection of the half-spaces, so the minimum over units is the distance to the region's
    boundary when it contains no max-pool units. Max-pool switching boundaries are *not* included (their
    constraints need full Jacobians); for CNNs with max-pools the value is the distance to the nearest ReLU
    boundary, an upper bound of the distance to the region's boundary. Units with a zero gradient (constant
    pre-activation) never switch and are skipped; ``inf`` when no unit can switch.
    """
    from .affine import preactivation_maps

    maps = preactivation_maps(model, x, layers, reduce=2.0, logits_at=logits_at, strict=strict)
    b = x.shape[0]
    best = torch.full((b,), math.inf, dtype=x.dtype, device=x.device)
    for m in maps.values():
        if m.kind == "maxpool":
            continue
        v = m.value.reshape(b, -1)
        n = m.norm.reshape(b, -1)
        gaps = _gaps(m.kind, v, _clamp_params(model, x, m.name, logits_at) if m.kind == "clamp" else None)
        d = torch.where(n > 0, gaps / n.clamp_min(torch.finfo(n.dtype).tiny), torch.full_like(n, math.inf))
        best = torch.minimum(best, d.amin(1).to(best.dtype))
    return best


def _clamp_params(model, x, name, logits_at):
    with preserved(model, eval_mode=True), torch.no_grad():
        _, pats = run_recorded(model, x[:1], logits_at=logits_at)
    p = next(q for q in pats if q.name == name)
    return p.params.get("lo"), p.params.get("hi")


def _gaps(kind: str, v: Tensor, bounds: tuple | None) -> Tensor:
    """|distance in pre-activation units| to the unit's breakpoint(s)."""
    if kind in _RELU_KINDS:
        return v.abs()
    lo, hi = bounds
    g = torch.full_like(v, math.inf)
    if lo is not None:
        g = torch.minimum(g, (v - lo).abs())
    if hi is not None:
        g = torch.minimum(g, (v - hi).abs())
    return g


# --- the region-parsimony regulariser ---------------------------------------------------------------------------------


def _same_preactivations(model: nn.Module, name: str, replayed: Tensor, alone: Tensor, x: Tensor) -> None:
    """Raise ``RuntimeError`` unless the pre-activations at x among the replicas (``replayed[0]`` of the ``(D + 2, B,
    units)`` values on ``[x, 0, e_1, …]``) equal those of the batch x alone, up to rounding (relative to the terms
    ``|z(0)| + Σ_i |∂z/∂x_i|·|x_i|`` they add up from: inputs with a large offset cancel in every unit)."""
    from .affine import _check_close

    jac = (replayed[2:] - replayed[1]).abs()
    terms = torch.einsum("dbu,bd->bu", jac, x.abs().to(jac.dtype)) + replayed[1].abs()
    _check_close(model, replayed[0], alone, terms, lambda i, j, err, bound: (
        f"parsimony_penalty: the pre-activations of layer {name!r} (sample {i}, unit {j}) differ by {err:.3g} (> "
        f"{bound:.3g}) between the batch x and the replicas [x, 0, e_1, …] the penalty runs: the model's forward "
        "mixes the samples of a batch (e.g. statistics over dim 0), and its per-sample distances are not defined"))


@library_call
def parsimony_penalty(model: nn.Module, x: Tensor, *, gamma: float = 0.1, l1: float = 0.0, k: int | None = None,
                      layers: LayerSelection = None, max_samples: int | None = 16, logits_at: str | None = None,
                      strict: bool = True, return_parts: bool = False) -> Tensor | dict[str, Tensor]:
    """A differentiable loss term that penalises region boundaries close to the samples.

    For each sample x and each ReLU-like (or clamp) unit j of the selected layers, the exact Euclidean distance of x
    to the unit's hyperplane within x's region is ``d_j = |z_j(x)| / ‖∇ₓ z_j‖₂`` (see :func:`boundary_distances`).
    The penalty is the hinge of maximum-margin-region training,

        ``hinge = mean_x Σ_j max(0, 1 − d_j / γ)``

    (only the ``k`` largest terms per sample when ``k`` is given), which counts — softly — the hyperplanes that cut
    the γ-ball around x, so minimising it makes the region around each sample larger and the regions fewer. Plus
    ``l1 · mean_x Σ_j relu(z_j)`` over the ReLU-like units, an L1 activity penalty on the positive part of their
    pre-activations (sparse activation patterns): for ReLU units ``|a_j|``, their outputs; for LeakyReLU / PReLU
    units the negative side's outputs are not penalised (clamp units have no L1 term).

    Both terms are differentiable with respect to the parameters: ``z_j`` and the gradients ``∇ₓ z_j`` are computed
    by running the network with its activation pattern frozen on ``[x, 0, e_1, …, e_D]`` (the frozen network is
    affine, so ``∇ₓ z_j · e_i = z_j(e_i) − z_j(0)``) — ordinary autograd, ``D + 2`` replicas of the samples.
    The differences round like the values they subtract: exact to float rounding where the pre-activations at 0 are
    of the size of those at x, but in float32 a model that removes a large input offset in its forward (``x − 1e4``)
    has large ``z_j(0)``, and its distances drift (relative error ~2e-3 at an offset of 1e4, ~8e-2 at 1e6; a
    float64 model, or the offset removed from the data, keeps them exact). :func:`boundary_distances` takes the
    gradients by automatic differentiation and has no such drift.

    Parameters
    ----------
    model : nn.Module
        The network (not a LightningModule wrapper with a loss). It runs in eval mode for this computation
        (BatchNorm running statistics, no dropout); its flags are restored afterwards.
    x : Tensor
        ``(B, *input_shape)`` training inputs, finite (``ValueError`` otherwise).
    gamma : float
        Margin in input units (L2).
    l1 : float
        Weight of the L1 activity term (0 disables it).
    k : int, optional
        Use only the k closest hyperplanes per sample, over all selected layers together (as in MMR training).
    layers : selection, optional
        Which piecewise-linear calls count (default all; max-pools never contribute, see
        :func:`boundary_distances`).
    max_samples : int, optional
        Use only the first this many samples of the batch (cost grows with samples × input features).
    logits_at, strict
        As in :func:`relu_regions.record`.
    return_parts : bool
        Return ``{"total", "hinge", "l1", "min_distance"}`` instead of the total (``"l1"`` unweighted:
        ``mean_x Σ_j relu(z_j)``, 0 when ``l1`` is 0).

    Returns
    -------
    Tensor
        A scalar on x's device and dtype, differentiable with respect to the model's parameters.
    """
    for name, v in (("gamma", gamma), ("l1", l1)):  # (a NaN passed every comparison and gave a NaN loss)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or \
                (name == "gamma" and v == 0):
            raise ValueError(f"{name} must be a finite number {'> 0' if name == 'gamma' else '>= 0'}, got {v!r}")
    for name, v in (("max_samples", max_samples), ("k", k)):
        if v is not None and not is_int_at_least(v, 1):
            raise ValueError(f"{name} must be None or a positive int, got {v!r}")
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point() or len(x) == 0:
        raise ValueError("x must be a non-empty batched floating-point tensor (B, ...)")
    name = "x" if max_samples is None or max_samples >= len(x) else f"x[:{max_samples}]"  # (the samples used)
    x = x.detach()
    if max_samples is not None:
        x = x[:max_samples]
    # (a NaN sample gave a NaN loss, and after backward NaN in every gradient)
    check_finite(x, name, "no activation region contains such an input")
    b, shape = x.shape[0], x.shape[1:]
    n_in = int(x[0].numel())
    # (the user's backward hooks stay on: the penalty is a training loss, and its backward is the user's)
    with preserved(model, eval_mode=True, backward_hooks=True):
        with torch.no_grad():
            _, patterns = run_recorded(model, x, strict=strict, logits_at=logits_at)
        names = set(select_layers([p.name for p in patterns], layers))
        eye = torch.eye(n_in, dtype=x.dtype, device=x.device).reshape(n_in, 1, *shape).expand(n_in, b, *shape)
        z = torch.cat([x, torch.zeros_like(x), eye.reshape(n_in * b, *shape)])
        seen: list[tuple[Any, Tensor]] = []

        def observe(p, t):
            if p.name in names and p.kind != "maxpool":
                seen.append((p, t.clone()))  # (in the graph) before an in-place op of the model changes it

        with torch.enable_grad():
            run_frozen(model, z, patterns, strict=strict, logits_at=logits_at, observe=observe)
        # the replicas' rows must not change the samples' pre-activations: a forward that mixes the rows of a batch
        # (statistics over dim 0) gives other values with [x, 0, e_1, ...] than with x alone, and an affine identity
        # over the replicas cannot show it (the mixed-in term is common to all rows)
        alone: dict[str, Tensor] = {}
        with torch.no_grad():
            run_frozen(model, x, patterns, strict=strict, logits_at=logits_at,
                       observe=lambda p, t: alone.__setitem__(p.name, t.clone()) if p.name in names else None)
    for p, t in seen:
        _same_preactivations(model, p.name, t.detach().reshape(n_in + 2, b, -1), alone[p.name].reshape(b, -1),
                             x.reshape(b, -1))
    hinge = x.new_zeros(())
    act = x.new_zeros(())
    dmin = torch.full((b,), math.inf, dtype=x.dtype, device=x.device)
    terms: list[Tensor] = []  # (with k: every layer's hinge terms, for the k largest per sample over all of them)
    for p, t in seen:
        t = t.reshape(n_in + 2, b, -1)
        val, jac = t[0], t[2:] - t[1]
        norm = torch.linalg.vector_norm(jac, dim=0)
        # only units that do not depend on the input are left out (an exact 0, as boundary_distances does): a cut-off
        # such as 1e-12 carries the input's units (inputs in other units, or rescaled hidden units, lost real units)
        live = norm > 0
        gaps = _gaps(p.kind, val, (p.params.get("lo"), p.params.get("hi")) if p.kind == "clamp" else None)
        dist = gaps / torch.where(live, norm, torch.ones_like(norm))
        h = torch.where(live, torch.relu(1 - dist / gamma), torch.zeros_like(dist))
        if k is None:
            hinge = hinge + h.sum(1).mean()
        else:
            terms.append(h.to(hinge.dtype))
        dmin = torch.minimum(dmin, torch.where(live, dist, torch.full_like(dist, math.inf)).amin(1).detach())
        if l1 and p.kind in _RELU_KINDS:
            act = act + torch.relu(val).sum(1).mean()
    if terms:
        every = torch.cat(terms, 1)
        hinge = hinge + every.topk(min(k, every.shape[1]), dim=1).values.sum(1).mean()
    total = hinge + l1 * act
    if return_parts:
        return {"total": total, "hinge": hinge, "l1": act, "min_distance": dmin}
    return total
