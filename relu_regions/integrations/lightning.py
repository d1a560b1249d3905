"""A Lightning callback that monitors activation regions while a model trains.

``Trainer(callbacks=[RegionMonitor(n_classes=10)])`` — no change to the LightningModule. During validation and test
(and, optionally, every N training batches) the callback records the activation pattern of the network inside the
user's own forward pass, accumulates :class:`~relu_regions.regions.RegionStats`, and at epoch end logs scalars
through ``pl_module.log`` (so every logger sees them), under ``"<prefix><stage>/<name>"``:

``n_regions`` (and ``n_regions_<granularity>`` for extra granularities), ``top1_coverage``, ``topC_coverage``,
``mean_purity``, ``confusion_share``, ``accuracy``; for validation also ``train_overlap`` (share of validation samples
whose region was seen on the training batches of the epoch; needs ``train_every_n_batches``); for validation and
test ``boundary_distance_median`` (the lower median -- for an even count the lower of the two middle values, so one
probe input's own distance -- of the exact Euclidean distances from the probe inputs to their region's boundary,
from :func:`relu_regions.geometry.boundary_distance`; every ``probe_every_n_epochs`` recorded validation epochs, and
at test).

The exact distance pushes, per probe input, one tangent per input feature through the dense layers and, through
the convolutional layers before them, one per colour class (input channels × the receptive field's area: 36 for
PyTorch's MNIST example, 324 for the LeNet, instead of 784): ~0.15 s on a 2-core CPU for 16 inputs through the
LeNet, ~0.6 s through the CNN of PyTorch's MNIST example (68k units; ~9% of its 10,000-image validation epoch).
Probe inputs that sit exactly on a boundary (a zero margin with a nonzero gradient, such as the max-pool ties on
MNIST's flat background) are found by one forward-mode pass, which ends at the first layer that proves every input,
and skip the rest: on MNIST every probe image of both CNNs is such a case (the LeNet's first max-pool proves them),
and the probe costs ~0.01 s (LeNet) and ~0.07 s (the example CNN). When it takes longer than
the validation epoch itself, the callback says so once (a ``UserWarning`` naming the times and the options
``probe_size`` / ``probe_every_n_epochs``). On MNIST-like images with flat backgrounds, max-pool windows of equal
values are exact ties, so the distance to the region's boundary is often exactly 0; ``layers=`` restricted to ReLU
layers gives the distance to the nearest ReLU hyperplane (and counts the regions of those layers).

Several validation (or test) data loaders get one set of statistics each, logged like Lightning logs your own
per-loader metrics: ``"<prefix>val/<name>/dataloader_idx_<k>"``, kept as ``monitor.stats["val/dataloader_idx_<k>"]``
(and ``"stage"`` of the history rows). The probe's boundary distance comes with loader 0's metrics. With one loader
the names have no suffix.

How the callback finds things
-----------------------------
- The network: ``module=None`` records the LightningModule itself (its ``forward`` must be what
  ``validation_step`` calls, e.g. ``self(x)``); if your step calls a submodule directly (``self.net(x)``), pass
  ``module="net"``. Predictions are the argmax of that module's output (or of the module named by ``logits_at``;
  ``logit > 0`` for a single output).
- Labels: ``get_labels(batch)`` if given; else ``batch[label_key]`` if given; else ``batch[1]`` of a tuple/list
  batch, or the first of the keys ``y, label, labels, target, targets`` of a dict batch. Anything else raises a
  ``TypeError`` saying so.
- Inputs: ``get_inputs(batch)``, else ``batch[0]`` / the keys ``x, input, inputs, image, images, features,
  data``. The extra pass over a training batch feeds the recorded module what the training step fed it (the step's
  pass on the batch's own input tensor, else its last pass of the batch's size, so a step that reshapes or casts
  the batch, ``self(x.flatten(1))``, works); ``get_inputs(batch)`` only when the step did not call the module.
- The probe is ``probe`` if given, else the first ``probe_size`` items of the first validation data set (so every
  DDP rank and a single process use the same probe); it is fed straight into the recorded module. When the step
  feeds the module inputs of another shape than the data set's items (a reshape in the step), the first
  recorded batch tells, and the probe becomes the first ``probe_size`` inputs the step fed the module (under DDP
  rank 0's, broadcast to the others). A ``probe=`` of another shape than the step's inputs gets a warning at that
  batch. Reading the data set's items leaves the random number generators (torch, ``random``, NumPy) as they
  were, so a randomly augmenting data set draws the same numbers as in a run without the monitor.

State safety: what the monitor attaches goes through handles, and goes when its epoch ends (also on exceptions and at
teardown): exactly what the monitor added, while what your step or another callback changes meanwhile (a hook it
registers, requires_grad, train/eval) stays. How long it stays on depends on the route of
:func:`relu_regions.record`:

- the hook route (every unit an ``nn.ReLU`` / ``nn.MaxPool`` module, no forward hooks of your own when the epoch
  starts; :mod:`relu_regions.hook_recording`): instance-level forwards on the unit modules, from the first recorded
  batch of an epoch to the epoch's end. They see only the recorded module's unit calls; each batch takes the passes
  recorded since the previous one. Opening a recording per batch cost ~0.2 ms of a ~14 ms LeNet batch on a 2-core CPU.
- the function mode (functional units, foreign hooks): from the start of each recorded batch to its end only,
  because the mode sees every torch call while it is on, also Lightning's between the batches.

Which pass is the batch's: among the passes recorded since the previous batch, the last one whose input is the
batch's own input tensor (``get_inputs(batch)``, the same storage and shape), so a step that also runs the model on
an augmented copy, or another callback that runs it, is not counted. When the step feeds the model a new tensor
(``self(x.float())``, a transform inside the step), the last pass of the batch's size is taken.

The extra eval-mode pass on training batches restores the model's flags, hooks and requires_grad. Outputs are
bit-identical. To feed it what the step fed the module, an instance-level forward on the recorded module notes the
inputs of its calls from the start of each recorded training batch to its end (also taken off on exceptions).
Region keys are computed at the end of each batch, which frees its unit states before the next forward (on the
fifteenth session's 2-core CPU, LeNet validation epochs ran ~2.5 points faster than with keys every four batches;
benchmarks/results/callback_overhead.md).

Mixed precision (``precision="bf16-mixed"`` / ``"16-mixed"``): the steps run under autocast, so the regions counted
are those of the autocast forward (pre-activations rounded to the low precision); the extra pass over training
batches runs under the same autocast, and the keys themselves are always computed in full precision. The probe's
boundary distance is exact for the network without autocast. A warning says so once.

Checkpoints: the monitor's state (history, statistics, probe) goes into Lightning checkpoints and comes back with
``trainer.fit(ckpt_path=...)``; ``trainer.validate / test / predict(ckpt_path=...)`` load the weights only (the
monitor keeps its own history and statistics and adds the new rows). A checkpoint saved
at the end of a validation (``ModelCheckpoint``'s default when validation does not run once per epoch) is written
before that epoch's training row is added to the history (at the training epoch's end), so a run resumed from it
lacks that row. A run resumed in the middle of an epoch (where Lightning skips ``on_train_epoch_start``) starts
the epoch's training statistics at its first training batch: they hold the batches trained after the resume.

The training statistics belong to the ``fit`` that recorded them: ``train_overlap`` is logged only by the
validations of that ``fit``, not by a later standalone ``trainer.validate()``.

DDP: with ``strategy="ddp_spawn"`` the processes that train are spawned copies: the monitor object you hold in the
launching process keeps none of their history, statistics or probe after ``fit`` (Lightning returns only the
model's weights), and a later ``trainer.test()`` takes its probe afresh. Read the logged metrics (the logger's
files), or use ``strategy="ddp"``. At epoch end every rank all-gathers the ``state_dict`` of its statistics and
merges them in rank order, so every rank (and so rank 0's loggers) logs exactly what one process would log on the
same samples. Lightning's
``DistributedSampler`` pads the evaluation set with repeated samples when its size is not a multiple of the world
size; those duplicates are counted (as by any metric), so use sizes divisible by the number of processes for
exact equality.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as e:  # pragma: no cover - lightning is an optional dependency
    raise ImportError("relu_regions.integrations.lightning needs Lightning: pip install lightning") from e

from ..errors import is_int_at_least
from ..geometry import boundary_distance
from ..hook_recording import ForwardPatch
from ..keys import UnitCounts
from ..recording import LayerSelection
from ..state import preserved, random_state_kept
from ..training import _class_indices, _same_tensor, default_inputs, default_labels, track

Tensor = torch.Tensor

__all__ = ["RegionMonitor"]

_STAGES = ("train", "validate", "test")
_SLOW_PROBE_SECONDS = 1.0  # below this, a probe is never reported as slow
_SHORT = {"train": "train", "validate": "val", "test": "test"}
# recorded batches whose keys are computed together, one after the other (see _end_batch); fewer when their states
# pass _KEY_BYTES. 1: each batch's keys at its end, which frees its states before the next forward
_KEY_EVERY = 1
_KEY_BYTES = 32 << 20


class RegionMonitor(Callback):
    """Monitor activation regions during training; log region statistics at epoch end.

    Parameters
    ----------
    n_classes : int, optional
        Number of classes; default: the output width of the recorded module (2 for a single logit).
    module : str, optional
        Path of the submodule to record inside the LightningModule (``"net"``); default the LightningModule.
    layers, granularities
        Which piecewise-linear layers define a region, as in :class:`~relu_regions.regions.RegionStats`.
    stages : sequence of {"validate", "test", "train"}
        Where to record. ``"train"`` is added automatically when ``train_every_n_batches`` is set.
    train_every_n_batches : int, optional
        Also record every N-th training batch (one extra eval-mode forward pass of that batch, no gradients).
    every_n_epochs : int
        During ``fit``, record validation in epochs ``n-1, 2n-1, ...`` (like ``check_val_every_n_epoch``); a
        standalone ``trainer.validate()`` and test always.
    probe : Tensor, optional
        Fixed probe inputs for the boundary distance; default the first ``probe_size`` validation items (or the
        first inputs the step feeds the recorded module, when their shape differs: see the module docstring).
    probe_size : int
        Size of the default probe (0 disables the boundary distance). The exact distance costs at most about
        ``probe_size × input features`` forward passes per epoch, much less on CNNs (see the module docstring and
        benchmarks/results/callback_overhead.md).
    probe_every_n_epochs : int
        Compute the boundary distance on every n-th recorded validation epoch (always at test).
    top : int, optional
        C of the top-C coverage; default ``n_classes``.
    get_labels, label_key, get_inputs
        How to find labels and inputs in a batch (see the module docstring).
    logits_at : str, optional
        Path (inside ``module``) of the module whose output holds the logits (before a softmax head).
    strict : bool
        As in :func:`relu_regions.record`: raise on operations that are not piecewise linear.
    compare : bool
        Run :func:`relu_regions.compare.compare` on the probe at test end (and every ``compare_every_n_epochs``
        validation epochs when set) and log its numeric columns; off by default (it is slow).
    compare_every_n_epochs : int, optional
    compare_kwargs : dict, optional
        Extra arguments for ``compare``.
    prefix : str
        Prefix of the logged names.
    purity_threshold : float
        As in ``RegionStats``.

    Attributes
    ----------
    stats : dict
        ``"train"``, ``"val"``, ``"test"`` -> the latest epoch's (merged) RegionStats; with several evaluation data
        loaders ``"val/dataloader_idx_<k>"`` (``"test/..."``) per loader instead.
    history : list of dict
        One row per logged epoch end and stage: ``{"epoch", "step", "stage", <metric>: value}`` (``step``:
        Lightning's ``global_step``, which tells apart several validations of one epoch, ``val_check_interval < 1``).
    comparisons : list
        ``(epoch, stage, result)`` of every comparison run.
    """

    def __init__(self, n_classes: int | None = None, *, module: str | None = None, layers: LayerSelection = None,
                 granularities: dict[str, LayerSelection] | None = None,
                 stages: Sequence[str] = ("validate", "test"), train_every_n_batches: int | None = None,
                 every_n_epochs: int = 1, probe: Tensor | None = None, probe_size: int = 16,
                 probe_every_n_epochs: int = 1, top: int | None = None,
                 get_labels: Callable[[Any], Tensor] | None = None, label_key: str | None = None,
                 get_inputs: Callable[[Any], Tensor] | None = None, logits_at: str | None = None,
                 strict: bool = True, compare: bool = False, compare_every_n_epochs: int | None = None,
                 compare_kwargs: dict | None = None, prefix: str = "regions/", purity_threshold: float = 0.7):
        if not isinstance(stages, (str, Sequence)):
            raise TypeError(f"stages must be a stage or a sequence of stages among {_STAGES}, got {stages!r}")
        stages = [stages] if isinstance(stages, str) else list(stages)
        bad = [s for s in stages if s not in _STAGES]
        if bad:
            raise ValueError(f"stages must be among {_STAGES}, got {bad}")
        # every option is checked here, before training starts, not at the first batch that reads it
        for name, value, least, optional in (
                ("train_every_n_batches", train_every_n_batches, 1, True), ("every_n_epochs", every_n_epochs, 1, False),
                ("probe_every_n_epochs", probe_every_n_epochs, 1, False), ("probe_size", probe_size, 0, False),
                ("n_classes", n_classes, 1, True), ("top", top, 1, True),
                ("compare_every_n_epochs", compare_every_n_epochs, 1, True)):
            if not (optional and value is None) and not is_int_at_least(value, least):
                raise ValueError(f"{name} must be {'None or ' if optional else ''}an int >= {least}, got {value!r}")
        if isinstance(purity_threshold, bool) or not isinstance(purity_threshold, numbers.Real) or \
                not 0.0 <= purity_threshold <= 1.0:
            raise ValueError(f"purity_threshold must be a number in [0, 1], got {purity_threshold!r}")
        if probe is not None and not (isinstance(probe, Tensor) and probe.dim() >= 2 and probe.is_floating_point()
                                      and len(probe) > 0):
            raise ValueError("probe must be None or a non-empty batched floating-point tensor (B, *input_shape), got "
                             f"{tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__}")
        for name, fn in (("get_labels", get_labels), ("get_inputs", get_inputs)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a function of the batch, got {type(fn).__name__}"
                                + (" (for a dict key, pass label_key=...)" if name == "get_labels" else ""))
        for name, value in (("module", module), ("logits_at", logits_at), ("label_key", label_key)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be None or a str, got {type(value).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str (the start of the logged names), got {type(prefix).__name__}")
        if granularities is not None and not isinstance(granularities, dict):
            raise TypeError("granularities must be a dict name -> layer selection, got "
                            f"{type(granularities).__name__}")
        if train_every_n_batches is not None:
            if "train" not in stages:
                stages.append("train")
        elif "train" in stages:
            train_every_n_batches = 1
        self.n_classes = n_classes
        self._n_classes_given = n_classes is not None
        self.module = module
        self.layers = layers
        self.granularities = dict(granularities or {})
        self.stages = stages
        self.train_every_n_batches = train_every_n_batches
        self.every_n_epochs = every_n_epochs
        self.probe = None if probe is None else probe.detach().cpu()
        self._probe_given = probe is not None  # (the user's: never replaced by the inputs the step feeds)
        self.probe_size = probe_size
        self.probe_every_n_epochs = probe_every_n_epochs
        self.top = top
        self.get_labels = get_labels
        self.label_key = label_key
        self.get_inputs = get_inputs or default_inputs
        self.logits_at = logits_at
        self.strict = strict
        self.compare = compare
        self.compare_every_n_epochs = compare_every_n_epochs
        self.compare_kwargs = dict(compare_kwargs or {})
        self.prefix = prefix
        self.purity_threshold = purity_threshold
        self.stats: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.comparisons: list[tuple[int, str, Any]] = []
        self._local: dict[str, Any] = {}  # stage -> this rank's RegionStats of the running epoch
        self._waiting: dict[str, list] = {}  # slot -> recorded batches whose keys are not computed yet
        self._pending: dict[str, list] = {}  # slot -> batches with keys, not yet added to _local (on device)
        self._open: dict[str, Any] = {}  # stage -> (context manager, tracker) of the running batch
        self._n_loaders: dict[str, int] = {}  # stage -> number of its data loaders in the running epoch
        self._active: set[str] = set()
        self._epoch_start: dict[str, float] = {}  # stage -> perf_counter at epoch start (the slow-probe warning)
        self._probe_epochs = 0  # recorded validation epochs seen (probe_every_n_epochs)
        self._warned_slow_probe = False
        self._warned_mixed = False
        self._probes_timed = 0  # the first probe also pays torch's one-time forward-AD set-up: not judged
        self._trainer_fn: str | None = None  # the Trainer function running (setup's stage), None outside one
        self._warned_probe_shape = False
        self._probe_checked = False  # whether this epoch's first recorded batch checked the probe's shape
        self._train_epoch: int | None = None  # the epoch whose training statistics run (None: none in this fit)
        self._spy: tuple[ForwardPatch, list[Tensor]] | None = None  # the module's inputs during a training step

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, module=self.module)

    def _net(self, pl_module: nn.Module) -> nn.Module:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError as e:
            raise ValueError(f"RegionMonitor(module={self.module!r}): no such submodule of "
                             f"{type(pl_module).__name__}") from e

    def _labels(self, batch: Any) -> Tensor:
        # (B,) or (B, 1) class indices; one-hot labels are refused as such (flattened, the error blamed the inputs)
        y = self.get_labels(batch) if self.get_labels is not None else default_labels(batch, self.label_key)
        try:
            return _class_indices(y, "labels")
        except (ValueError, TypeError) as e:
            raise type(e)(f"RegionMonitor: {e}; or pass get_labels= returning them") from None

    def _new_stats(self, n_classes: int) -> Any:
        from ..regions import RegionStats

        return RegionStats(n_classes, layers=self.layers, granularities=self.granularities,
                           purity_threshold=self.purity_threshold)

    def _stats_for(self, stage: str, tracker: Any) -> Any:
        if self._local.get(stage) is None:
            n = self.n_classes
            if n is None:
                out = tracker.last_output
                if out is None:
                    raise RuntimeError("RegionMonitor: no model output captured; pass n_classes=")
                k = out.reshape(out.shape[0], -1).shape[1]
                n = self.n_classes = 2 if k == 1 else k
            self._local[stage] = self._new_stats(n)
        return self._local[stage]

    def _epoch_active(self, trainer: Any, stage: str) -> bool:
        if stage not in self.stages or getattr(trainer, "sanity_checking", False):
            return False
        if stage == "validate" and _fitting(trainer):  # a standalone trainer.validate() is always recorded
            return (trainer.current_epoch + 1) % self.every_n_epochs == 0
        return True

    # ---------------------------------------------------------------------------------------- per batch
    def _begin_batch(self, pl_module: nn.Module, stage: str) -> None:
        held = self._open.get(stage)
        if held is not None and held[1].rec.route == "hooks":
            return  # the hook route's recording stays open until the epoch ends (see _end_batch)
        self._close(stage)
        net = self._net(pl_module)
        cm = track(net, _Deferred(), logits_at=self.logits_at, strict=self.strict)
        self._open[stage] = (cm, cm.__enter__())

    def _slot(self, stage: str, dataloader_idx: int) -> str:
        """Key of one evaluation data loader's statistics: the stage, or ``"<stage>/dataloader_idx_<k>"`` when the
        stage has several loaders (each gets its own statistics, as Lightning logs each loader's metrics)."""
        return stage if self._n_loaders.get(stage, 1) == 1 else f"{stage}/dataloader_idx_{dataloader_idx}"

    def _end_batch(self, stage: str, batch: Any, dataloader_idx: int = 0) -> None:
        if stage not in self._open:
            return
        slot = self._slot(stage, dataloader_idx)
        cm, tracker = self._open[stage]
        if tracker.rec.route != "hooks":
            # the function mode sees every torch call while it is on, also Lightning's and other callbacks' between
            # the batches: off now. The hook route's forward patches see only the recorded module's unit calls; they
            # stay on for the epoch (opening costs ~0.2 ms per batch inside a LeNet epoch on the 2-core build
            # machine), and each batch takes its own passes (tracker.take_patterns clears them).
            del self._open[stage]
            cm.__exit__(None, None, None)
        y = self._labels(batch)
        if not tracker.rec.passes:
            raise RuntimeError(
                f"RegionMonitor: the recorded module ({self.module or 'the LightningModule'}) did not run in this "
                f"{_SHORT[stage]} step; if the step calls a submodule directly (e.g. self.net(x)), pass "
                "RegionMonitor(module='net'). A step that runs the module inside its own relu_regions.record / track "
                "block records it there instead (of nested recordings of one model only the innermost records)")
        tracker.stats = self._stats_for(slot, tracker)
        out = tracker.last_output
        if out is None:
            raise RuntimeError("RegionMonitor: no model output was captured in this step")
        # the checks and predictions now; the keys every _KEY_EVERY batches. Keys at each batch's end (1) against 4
        # batches at a time, LeNet validation epochs on the fifteenth session's build machine: 1.157-1.173x against
        # 1.196-1.199x (paired, 20 rounds each; the states of 4 batches stay allocated through the next forwards),
        # the example CNN level (benchmarks/results/callback_overhead.md). Keys, labels and predictions stay on the
        # device until the epoch ends: no host synchronisation per batch.
        waiting = self._waiting.setdefault(slot, [])
        try:
            inputs = self.get_inputs(batch)  # picks the step's pass on the batch among several (see take_patterns)
        except Exception:  # an exotic batch: the last pass of the batch's size, as before
            inputs = None
        waiting.append(tracker.take_patterns(y.reshape(-1).to(out.device), inputs=inputs))
        if len(waiting) >= _KEY_EVERY or sum(w[0].nbytes for w in waiting) >= _KEY_BYTES:
            self._key(slot)
        if stage != "train" and dataloader_idx == 0 and tracker.last_input is not None:
            self._check_probe_shape(tracker.last_input, stage)  # (before the fallback below: it may start it)
        if (stage != "train" and dataloader_idx == 0 and self.probe is None and self.probe_size
                and tracker.last_input is not None):
            if sum(len(t) for t in self._fallback_probe) < self.probe_size:
                self._fallback_probe.append(tracker.last_input[: self.probe_size].cpu())
        tracker.last_input = tracker.last_output = None  # this batch's, not the next one's

    def _check_probe_shape(self, fed: Tensor, stage: str) -> None:
        """At the epoch's first recorded batch: whether the probe's inputs have the shape of ``fed``, the input the
        step fed the recorded module. The data set's items do not when the step transforms the batch first
        (``self(x.flatten(1))``): the probe becomes the inputs the step feeds the module. The user's ``probe=``
        stays, with a warning now rather than torch's shape error at the epoch's end."""
        if self._probe_checked:
            return
        self._probe_checked = True
        probe = self.probe
        if probe is None or not self.probe_size or probe.shape[1:] == fed.shape[1:]:
            return
        if not self._probe_given:
            self.probe = None  # _end_batch collects the step's inputs from this batch on (the fallback probe)
            return
        if not self._warned_probe_shape:
            self._warned_probe_shape = True
            rank_zero_warn(
                f"RegionMonitor: probe= holds inputs of shape {tuple(probe.shape[1:])}, but the {_SHORT[stage]} step "
                f"feeds the recorded module ({self.module or 'the LightningModule'}) inputs of shape "
                f"{tuple(fed.shape[1:])}; the probe is fed straight into that module, so its boundary distance at "
                "the epoch's end will likely fail. Pass probe= shaped like the step's inputs, or probe_size=0 to "
                "turn the boundary distance off.", category=UserWarning)

    def _key(self, slot: str) -> None:
        """Compute the keys of the slot's waiting batches."""
        stats = self._local[slot]
        pending = self._pending.setdefault(slot, [])
        for batch, y, y_pred, n in self._waiting.pop(slot, []):
            keys, units = stats.batch_keys(batch)
            pending.append((keys, units, y, y_pred, n))

    def _flush(self, slot: str) -> None:
        """Add the batches collected in this epoch to the slot's statistics, in one update."""
        if self._waiting.get(slot):
            self._key(slot)
        items = self._pending.pop(slot, [])
        if not items:
            return
        stats = self._local[slot]
        keys = {name: torch.cat([it[0][name] for it in items]) for name in items[0][0]}
        # the unit counts after update(), which checks the batch first: a rejected one adds nothing; a few sums per
        # block of the keys' products, not a few operations per batch and layer
        stats.update(keys, torch.cat([it[2] for it in items]), torch.cat([it[3] for it in items]))
        stats.add_unit_counts(UnitCounts.total([it[1] for it in items]), sum(it[4] for it in items))

    def _close(self, stage: str | None = None) -> None:
        for s in [stage] if stage else list(self._open):
            if s in self._open:
                cm, _ = self._open.pop(s)
                cm.__exit__(None, None, None)

    # ------------------------------------------------------------------------------------------ epochs
    def setup(self, trainer, pl_module, stage):
        others = [cb for cb in trainer.callbacks if isinstance(cb, RegionMonitor) and cb is not self]
        shared = sorted(set(self.stages) & {s for cb in others for s in cb.stages})
        if shared:  # (two monitors' recordings would take each other's passes)
            raise ValueError(f"several RegionMonitor callbacks record the stage(s) {shared}: use one per stage "
                             "(its granularities= count several layer selections at once)")
        # Lightning restores callbacks from every ckpt_path (after setup): only a fit resumes the monitor's state
        self._trainer_fn = stage
        precision = str(getattr(trainer, "precision", ""))
        if "mixed" in precision and not self._warned_mixed:
            self._warned_mixed = True
            rank_zero_warn(
                f"RegionMonitor: under precision={precision!r} the steps run under autocast, and the regions counted "
                "are those of the autocast forward (pre-activations rounded to the low precision); the extra pass over "
                "training batches runs under the same autocast, so train and validation keys compare. The probe's "
                "boundary distance is exact for the network in full precision (no autocast): near a boundary it may "
                "disagree with the rounded regions.", category=UserWarning)

    def _start_epoch(self, trainer: Any, stage: str) -> None:
        self._unspy()  # (left on only if a training batch ended without on_train_batch_end)
        self._epoch_start[stage] = time.perf_counter()
        if stage == "train":
            self._train_epoch = trainer.current_epoch
        for slot in [k for k in (*self._local, *self._waiting, *self._pending)
                     if k == stage or k.startswith(stage + "/")]:
            self._local.pop(slot, None)
            self._waiting.pop(slot, None)
            self._pending.pop(slot, None)
        loaders = getattr(trainer, {"validate": "num_val_batches", "test": "num_test_batches"}.get(stage, ""), None)
        self._n_loaders[stage] = len(loaders) if isinstance(loaders, (list, tuple)) and loaders else 1
        if self._epoch_active(trainer, stage):
            self._active.add(stage)
            if stage in ("validate", "test"):
                self._fallback_probe: list[Tensor] = []
                self._probe_checked = False
                if self.probe is None and self.probe_size:
                    self.probe = self._probe_from_dataset(trainer, stage)
        else:
            self._active.discard(stage)

    def _probe_from_dataset(self, trainer: Any, stage: str) -> Tensor | None:
        loaders = getattr(trainer, "val_dataloaders" if stage == "validate" else "test_dataloaders", None)
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        ds = getattr(loaders, "dataset", None)
        if ds is None or not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            return None
        from torch.utils.data import default_collate

        # the loader's own collate_fn: it may transform the inputs (normalise, pad), and the probe must be what
        # the model sees
        collate = getattr(loaders, "collate_fn", None) or default_collate
        try:
            # outside the loader: a randomly augmenting data set must not draw from the run's generators here
            with random_state_kept():
                items = [ds[i] for i in range(min(self.probe_size, len(ds)))]
                return self.get_inputs(collate(items)).detach().cpu().clone()
        except Exception:  # an exotic dataset: fall back to the first batches seen (see _end_epoch)
            return None

    def _gather(self, trainer: Any, local: Any) -> Any:
        """Merge the ranks' statistics in rank order (identical on every rank)."""
        import torch.distributed as dist

        world = getattr(trainer, "world_size", 1)
        if world <= 1 or not (dist.is_available() and dist.is_initialized()):
            return local
        from ..regions import RegionStats

        state = None if local is None else _to_cpu(local.state_dict())
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
        merged = None
        for st in states:
            if st is None:
                continue
            s = RegionStats.from_state_dict(st)
            merged = s if merged is None else merged.merge(s)
        return merged

    def _end_epoch(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close(stage)
        if stage not in self._active:
            return
        short = _SHORT[stage]
        n = self._n_loaders.get(stage, 1)
        train = None
        if stage == "validate" and "train" in self._active and _fitting(trainer):  # this fit's training batches
            train = self._gather(trainer, self._local.get("train"))
            if train is not None:
                self.stats["train"] = train
        rows = []  # (name, suffix of the logged names, metrics), one per data loader, in loader order
        for k in range(n):  # the same gathers in the same order on every rank
            suffix = "" if n == 1 else f"/dataloader_idx_{k}"
            slot = stage + suffix
            self._flush(slot)
            merged = self._gather(trainer, self._local.get(slot))
            if merged is None:
                continue
            self.stats[short + suffix] = merged
            metrics = self.metrics(merged)
            if train is not None:
                metrics["train_overlap"] = train.overlap(merged)
            rows.append((short + suffix, suffix, metrics))
        if not rows:
            return
        for key in [k for k in self.stats if (k == short or k.startswith(short + "/"))
                    and k not in {name for name, _, _ in rows}]:
            del self.stats[key]  # an earlier epoch's, under another number of data loaders
        if stage != "train" and self.probe is None and getattr(self, "_fallback_probe", None):
            probe = torch.cat(self._fallback_probe)[: self.probe_size]
            self.probe = trainer.strategy.broadcast(probe, src=0) if trainer.world_size > 1 else probe
        if stage != "train" and self.probe is not None and self.probe_size and self._probe_due(stage):
            t0 = time.perf_counter()
            # the probe comes from the first data loader: its distance is logged with that loader's metrics
            try:
                rows[0][2]["boundary_distance_median"] = self.probe_distance(pl_module)
            except RuntimeError as e:
                if type(e) is not RuntimeError:  # (the package's own errors say what to do already)
                    raise
                raise RuntimeError(self._probe_failed(e)) from e
            self._probes_timed += 1
            if self._probes_timed > 1:
                self._check_probe_time(stage, time.perf_counter() - t0, t0 - self._epoch_start.get(stage, t0))
        for name, suffix, metrics in rows:
            for metric, value in metrics.items():
                pl_module.log(f"{self.prefix}{short}/{metric}{suffix}", float(value), on_epoch=True,
                              sync_dist=True, add_dataloader_idx=False)
            self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "stage": name,
                                 **metrics})
        if self.compare and (stage == "test" or (self.compare_every_n_epochs and stage == "validate" and
                                                  (trainer.current_epoch + 1) % self.compare_every_n_epochs == 0)):
            self._run_compare(trainer, pl_module, short)

    def _probe_failed(self, e: Exception) -> str:
        """The message of torch's error (a shape mismatch, typically) raised by the probe's boundary distance."""
        shape = tuple(self.probe.shape) if self.probe is not None else None
        source = ("probe=" if self._probe_given else
                  "the first probe_size validation items, as get_inputs= takes them out of a batch")
        return (f"RegionMonitor: the boundary distance of the probe (inputs of shape {shape}: {source}) failed in "
                f"the recorded module ({self.module or 'the LightningModule'}): {e}. The probe is fed straight into "
                "that module: pass probe= with inputs as your step feeds them to it, or probe_size=0 to turn the "
                "boundary distance off.")

    def _probe_due(self, stage: str) -> bool:
        if stage == "test":
            return True
        self._probe_epochs += 1
        return (self._probe_epochs - 1) % self.probe_every_n_epochs == 0

    def _check_probe_time(self, stage: str, probe_s: float, epoch_s: float) -> None:
        """Warn once when the probe's boundary distance took longer than the epoch it ends (and over a second)."""
        if self._warned_slow_probe or probe_s <= max(_SLOW_PROBE_SECONDS, epoch_s):
            return
        self._warned_slow_probe = True
        n = len(self.probe) if self.probe is not None else 0
        msg = (f"RegionMonitor: the exact boundary distance of the {n} probe inputs took {probe_s:.1f} s, longer than "
               f"the {_SHORT[stage]} epoch it ends ({epoch_s:.1f} s); it costs up to probe_size x input features "
               "forward passes. Pass a smaller probe_size, probe_every_n_epochs=k, or probe_size=0 to turn it off.")
        rank_zero_warn(msg, category=UserWarning)

    def metrics(self, stats: Any) -> dict[str, float]:
        """The scalars logged for one stage's statistics."""
        top = self.top or stats.n_classes
        out = {"n_regions": float(stats.n_regions())}
        for g in self.granularities:
            out[f"n_regions_{g}"] = float(stats.n_regions(g))
        out.update({"top1_coverage": stats.coverage(1), "topC_coverage": stats.coverage(top),
                    "mean_purity": stats.mean_purity(), "confusion_share": stats.confusion_share(),
                    "accuracy": stats.accuracy})
        return out

    def probe_distance(self, pl_module: nn.Module) -> float:
        """Median exact boundary distance (Euclidean) of the probe inputs to their regions' boundaries.

        Uses :func:`relu_regions.geometry.boundary_distance` (every inequality of the region: ReLU-like units,
        clamps, max-pool argmax comparisons), restricted to the layers that define a region here; inputs whose
        region has no boundary (``inf``) are left out of the median.
        """
        net = self._net(pl_module)
        p = next(net.parameters(), None)
        with torch.inference_mode(False), torch.enable_grad():
            x = self.probe.clone().to(p.device if p is not None else "cpu",
                                      p.dtype if p is not None and p.is_floating_point() else None)
            # only the selected layers' inequalities, and only the distance: inputs proven to sit on a boundary
            # (e.g. max-pool ties on flat backgrounds) cost one forward-mode pass instead of the full computation
            d = boundary_distance(net, x, logits_at=self.logits_at, strict=self.strict, layers=self.layers,
                                  per_layer=False).distance
        d = d[torch.isfinite(d)]
        return float(d.median()) if d.numel() else math.inf

    def _run_compare(self, trainer: Any, pl_module: Any, short: str) -> None:
        from ..compare import compare

        if self.probe is None:
            return
        net = self._net(pl_module)
        with torch.inference_mode(False), torch.enable_grad(), preserved(net):
            p = next(net.parameters(), None)
            x = self.probe.clone().to(p.device if p is not None else "cpu")
            result = compare(net, x, **{"progress": False, **self.compare_kwargs})
        self.comparisons.append((trainer.current_epoch, short, result))
        table = _as_frame(result)
        if table is not None:
            for _, row in table.iterrows():
                method = str(row.iloc[0])
                for col, v in row.iloc[1:].items():
                    if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v)):
                        pl_module.log(f"{self.prefix}{short}/compare/{method}/{col}", float(v), sync_dist=True)
            log_dir = getattr(trainer, "log_dir", None)
            if log_dir and trainer.is_global_zero:
                import os

                os.makedirs(log_dir, exist_ok=True)
                table.to_csv(os.path.join(log_dir, f"region_compare_{short}_epoch{trainer.current_epoch}.csv"),
                             index=False)

    # ---------------------------------------------------------------------------------- Lightning hooks
    def on_validation_epoch_start(self, trainer, pl_module):
        self._start_epoch(trainer, "validate")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if "validate" in self._active and not trainer.sanity_checking:
            self._begin_batch(pl_module, "validate")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._end_batch("validate", batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._end_epoch(trainer, pl_module, "validate")

    def on_test_epoch_start(self, trainer, pl_module):
        self._start_epoch(trainer, "test")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if "test" in self._active:
            self._begin_batch(pl_module, "test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._end_batch("test", batch, dataloader_idx)

    def on_test_epoch_end(self, trainer, pl_module):
        self._end_epoch(trainer, pl_module, "test")

    def on_train_epoch_start(self, trainer, pl_module):
        self._start_epoch(trainer, "train")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._unspy()
        if "train" in self.stages and self._train_epoch != trainer.current_epoch:
            # resumed from a checkpoint saved inside this epoch: Lightning skipped on_train_epoch_start
            self._start_epoch(trainer, "train")
        if "train" in self._active and batch_idx % self.train_every_n_batches == 0:
            self._spy = _spy(self._net(pl_module))  # what the step feeds the module (see on_train_batch_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        fed = self._unspy()
        if "train" not in self._active or batch_idx % self.train_every_n_batches:
            return
        # an extra eval-mode pass: the training forward has dropout / batch statistics, not the model's regions
        net = self._net(pl_module)
        y = self._labels(batch)
        x = self._step_input(fed, batch, y.numel())
        from_step = x is not None
        if not from_step:  # the step did not call the module (nor its forward) with a tensor: the batch's inputs
            x = self.get_inputs(batch)
        # under the precision the validation steps run with (autocast for "*-mixed"): keys of one computation
        step_context = getattr(getattr(trainer, "precision_plugin", None), "val_step_context", contextlib.nullcontext)
        with preserved(net, eval_mode=True), torch.no_grad(), step_context():
            with track(net, _Deferred(), logits_at=self.logits_at, strict=self.strict) as tracker:
                try:
                    net(x)
                except RuntimeError as e:
                    if from_step or type(e) is not RuntimeError:
                        raise
                    raise RuntimeError(
                        f"RegionMonitor: the extra pass over training batches (train_every_n_batches) fed the "
                        f"recorded module ({self.module or 'the LightningModule'}) get_inputs(batch), of shape "
                        f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}, because the training "
                        f"step did not call that module: {e}. Pass module= (the submodule the step calls) or "
                        "get_inputs= (the module's input from a batch).") from e
            tracker.stats = self._stats_for("train", tracker)
            tracker.update(y)

    def _step_input(self, fed: list[Tensor] | None, batch: Any, n: int) -> Tensor | None:
        """The input of the training step's pass on the batch among the module's calls ``fed``: the one on the
        batch's own input tensor, else the last one of ``n`` samples, else the last one; None if none."""
        if not fed:
            return None
        try:
            own = self.get_inputs(batch)
        except Exception:  # an exotic batch: found by its size
            own = None
        for x in reversed(fed):
            if _same_tensor(x, own):
                return x
        return next((x for x in reversed(fed) if x.dim() and x.shape[0] == n), fed[-1])

    def _unspy(self) -> list[Tensor] | None:
        """Take off the training step's input capture (if on); returns the inputs it saw."""
        if self._spy is None:
            return None
        patch, fed = self._spy
        self._spy = None
        patch.remove()
        return fed

    def on_train_epoch_end(self, trainer, pl_module):
        self._unspy()
        self._end_epoch(trainer, pl_module, "train")

    def on_exception(self, trainer, pl_module, exception):
        self._unspy()
        self._close()
        self._waiting.clear()  # the epoch is lost: let its recorded states go
        self._pending.clear()

    def teardown(self, trainer, pl_module, stage):
        self._unspy()
        self._close()
        self._trainer_fn = None
        if stage == "fit":  # the training statistics belong to this fit (not to a later trainer.validate())
            self._active.discard("train")
            self._local.pop("train", None)
            self._train_epoch = None

    # ------------------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        return {"n_classes": self.n_classes, "history": [dict(h) for h in self.history],
                "stats": {k: _to_cpu(v.state_dict()) for k, v in self.stats.items()},
                "probe": None if self.probe is None else self.probe.clone(), "probe_epochs": self._probe_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from a checkpoint. Settings given to this monitor that disagree with the run that wrote it are
        refused (``n_classes``, ``layers``, ``granularities``: the history would mix two definitions); an explicit
        ``probe=`` is kept, with a warning when it differs from the checkpoint's (earlier epochs' boundary
        distances were measured on that one). Before, the checkpoint's silently replaced both.

        Only ``trainer.fit(ckpt_path=...)`` (or a direct call) resumes: Lightning also restores callbacks for
        ``trainer.validate / test / predict(ckpt_path=...)``, which load the checkpoint's weights only; the monitor
        keeps its own history and statistics there (before, ``test(ckpt_path="best")`` after a fit rolled them back
        to the best epoch's)."""
        from ..regions import RegionStats

        if self._trainer_fn not in (None, "fit"):
            return

        n = state_dict["n_classes"]
        if self._n_classes_given and n is not None and n != self.n_classes:
            raise ValueError(f"RegionMonitor: the checkpoint's statistics count {n} classes, but this monitor was "
                             f"built with n_classes={self.n_classes}; resume with the settings of the run that "
                             "wrote it, or start a new run")
        stats = {k: RegionStats.from_state_dict(v) for k, v in state_dict["stats"].items()}
        for k, st in stats.items():
            try:
                self._new_stats(st.n_classes)._check_same_setup(st)
            except ValueError as e:
                raise ValueError(f"RegionMonitor: the checkpoint's '{k}' statistics do not fit this monitor's "
                                 f"settings: {e}; resume with the settings of the run that wrote it") from None
        self.n_classes = n
        self.history = [dict(h) for h in state_dict["history"]]
        self.stats = stats
        saved = state_dict["probe"]
        if not self._probe_given:
            self.probe = None if saved is None else saved.clone()
        elif saved is not None and not (saved.shape == self.probe.shape and torch.equal(saved, self.probe)):
            rank_zero_warn("RegionMonitor: probe= differs from the probe of the checkpoint's run; the boundary "
                           "distances logged from now on are measured on the new one, earlier epochs' on the old",
                           category=UserWarning)
        self._probe_epochs = int(state_dict.get("probe_epochs", 0))  # absent in checkpoints before 0.1.0's option

    # ------------------------------------------------------------------------------------------- plots
    def plot_history(self, metric: str = "n_regions", stages: Sequence[str] = ("val", "train"), ax: Any = None):
        """Plot ``metric`` (default the region count) against the epoch, or against the training step when a
        stage has several rows in one epoch (``val_check_interval < 1``); returns the matplotlib Axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2))
        picked = {stage: [h for h in self.history if h["stage"] == stage and metric in h] for stage in stages}
        by_step = any(len({h["epoch"] for h in rows}) < len(rows) for rows in picked.values()) and all(
            "step" in h for rows in picked.values() for h in rows)  # (rows of checkpoints before 0.1.0 lack it)
        x = "step" if by_step else "epoch"
        for stage, rows in picked.items():
            if rows:
                ax.plot([h[x] for h in rows], [h[metric] for h in rows], marker="o", label=stage)
        ax.set_xlabel("training step" if by_step else "epoch")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(f"{metric.replace('_', ' ')} per {'validation' if by_step else 'epoch'}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        return ax


class _Deferred:
    """Placeholder stats until the first batch tells the number of classes."""

    def recording_batch(self, *a, **k):  # pragma: no cover - replaced before use
        raise RuntimeError("internal: stats not set")


def _spy(module: nn.Module) -> tuple[ForwardPatch, list[Tensor]]:
    """Note the first positional tensor of every outermost call of ``module`` (an instance forward, taken off by
    the handle's ``remove()``, like the recordings')."""
    fed: list[Tensor] = []
    depth = [0]

    def body(mod, inner, args, kwargs):
        if depth[0] == 0 and args and isinstance(args[0], Tensor):
            fed.append(args[0].detach())
        depth[0] += 1
        try:
            return inner(*args, **kwargs)
        finally:
            depth[0] -= 1

    return ForwardPatch.on(module, body), fed


def _fitting(trainer: Any) -> bool:
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return getattr(fn, "value", fn) == "fit"


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _as_frame(result: Any) -> Any:
    """A comparison result as a pandas DataFrame (first column: method), if it looks like one."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover
        return None
    if isinstance(result, pd.DataFrame):
        return result.reset_index() if result.index.name else result
    for attr in ("table", "summary", "frame", "df"):
        v = getattr(result, attr, None)
        v = v() if callable(v) else v
        if isinstance(v, pd.DataFrame):
            return v.reset_index() if v.index.name else v
    return None
