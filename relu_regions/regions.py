"""How a network partitions a data set into activation regions: streaming, mergeable statistics.

:class:`RegionStats` consumes batches of region keys (from :meth:`Recording.region_ids` or
:attr:`AffineMap.region_ids`) with true and predicted labels and keeps, per region, only sums and histograms, so its
memory is O(number of regions) — never O(samples × units). Two objects built on disjoint parts of a data set
:meth:`~RegionStats.merge` into exactly the object built on the whole (counts and histograms are integers; sums of
inputs / contributions are float64, equal up to summation order).

Region counts vs. affine-map counts
-----------------------------------
A *region* is a distinct activation pattern. Two different patterns can give the same affine map (for example when
a unit is inactive in a layer whose output is multiplied by zero downstream, or differs only in a dead unit), so
the number of distinct affine maps is at most the number of regions and usually smaller. Pass keys from
:func:`affine_map_keys` under their own granularity name to count maps; do not read region counts as map counts.
Such a name (not a layer selection of the constructor) is registered as :data:`EXTERNAL`: its keys come only from
:meth:`~RegionStats.update`, and :meth:`~RegionStats.update_from_recording` refuses stats that hold one.

Definitions (Re3 paper and the clustering-based-interpretation paper)
---------------------------------------------------------------------
- size: samples in the region; purity: share of its majority *true* class; a region is *confused* when its purity
  is below ``purity_threshold`` (0.7 as in Re3).
- top-k coverage: share of the samples of each class that fall in that class's k largest regions (regions counted
  for the class by their majority true label), averaged over samples — i.e. ``sum_c covered_c / N``.
- overlap(other): share of the samples of ``other`` whose region also occurs in ``self`` (train-vs-test similarity:
  ``train.overlap(test)``); :meth:`similar_regions` gives the region counts (similar = also in self).
- mean contribution profile of region r for class c: mean over its samples of ``A_r[c] ⊙ x`` (Re3 Algorithm 4),
  from the ``contributions`` passed to :meth:`update`.
- cluster table (binary tasks, clustering-based-interpretation paper): support, positive rate, average instance and
  mean effective weights (feature importance) per region.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .errors import is_int_at_least, is_integer_tensor
from .keys import pattern_keys_and_counts
from .recording import LayerSelection, keys_of

Tensor = torch.Tensor

DEFAULT = "full"


class _External:
    """The selection of a granularity whose keys the caller computes (e.g. :func:`affine_map_keys`), not a layer
    selection: a recording cannot give its keys."""

    def __repr__(self) -> str:
        return "EXTERNAL"

    def __reduce__(self) -> str:  # pickle and deepcopy give back the one module-level instance
        return "EXTERNAL"


EXTERNAL = _External()


class BatchPatterns(NamedTuple):
    """One recorded batch's layer patterns, selected per granularity, whose keys are not computed yet
    (:meth:`RegionStats.batch_patterns`, :meth:`RegionStats.batch_keys`)."""

    patterns: dict[str, list]  # granularity name -> its layers' patterns (empty: an affine model)
    n: int  # samples
    device: torch.device | None

    @property
    def nbytes(self) -> int:
        """Bytes of the states held (each state once, also when granularities share a layer)."""
        states = {id(p.state): p.state for pats in self.patterns.values() for p in pats}
        return sum(t.numel() * t.element_size() for t in states.values())


def affine_map_keys(A: Tensor, d: Tensor, decimals: int = 6) -> Tensor:
    """``(B,)`` int64 keys of the affine maps ``(A, d)`` rounded to ``decimals`` (equal maps -> equal keys).

    Rounding makes maps that differ only by floating-point noise count as one; maps that differ by less than
    ``10**-decimals`` but are not equal may merge, and equal maps straddling a rounding edge may split: the count
    is exact only up to that resolution (say so when reporting it).

    Raises ``ValueError`` when an entry is not finite or a rounded entry ``|entry| · 10**decimals`` does not fit
    in int64 (below 2**63): lower ``decimals`` then (its conversion would saturate, giving different maps one key).
    """
    from .keys import _mix

    if isinstance(decimals, bool) or not isinstance(decimals, int):
        raise TypeError(f"decimals must be an int, got {decimals!r}")
    b = A.shape[0]
    # explicit widths, not -1: an empty batch has none to infer
    flat = torch.cat([A.reshape(b, math.prod(A.shape[1:])), d.reshape(b, math.prod(d.shape[1:]))], 1)
    flat = flat.to(torch.float64)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("affine_map_keys: the maps hold non-finite entries (inf / nan)")
    try:
        scale = 10.0 ** decimals
    except OverflowError:
        scale = math.inf
    q = torch.round(flat * scale)
    big = float(q.abs().max()) if q.numel() else 0.0
    if not big < 2.0 ** 63:  # (also inf and nan: 0 · inf)
        raise ValueError(f"affine_map_keys: decimals={decimals} scales the largest entry "
                         f"({float(flat.abs().max()):.6g}) beyond int64; lower decimals")
    q = torch.where(q == 0, torch.zeros_like(q), q)  # -0.0 and 0.0 must hash alike
    words = q.to(torch.int64)
    h = torch.full((b,), 0x1234567, dtype=torch.int64, device=A.device)
    for i in range(words.shape[1]):
        h = _mix(h ^ _mix(words[:, i] + (i + 1) * 0x9E3779B9))
    return h


def _argsort(keys: Tensor, stable: bool = False) -> Tensor:
    """Order that sorts a 1-d int64 tensor (numpy's sort on the CPU; see ``_Table``)."""
    if keys.device.type != "cpu":  # tables loaded onto another device (load_state_dict after a map_location)
        return torch.argsort(keys, stable=stable)
    return torch.from_numpy(np.argsort(keys.numpy(), kind="stable" if stable else None))


def _writable() -> contextlib.AbstractContextManager:
    """Tables are written in place and must hold plain tensors: filled under ``torch.inference_mode`` (Lightning's
    validation loop), they would hold inference tensors, which may not be updated in place outside it; and no
    autograd graph is wanted."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


def _unique(keys: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.unique(keys, return_inverse=True)`` for a 1-d int64 tensor, through numpy on the CPU (see
    ``_Table``)."""
    if keys.device.type != "cpu":
        return torch.unique(keys, return_inverse=True)
    uniq, inv = np.unique(keys.numpy(), return_inverse=True)
    return torch.from_numpy(uniq), torch.from_numpy(inv.reshape(-1).astype(np.int64, copy=False))


def largest_first(sizes: Tensor, keys: Tensor) -> np.ndarray:
    """Row order from the largest region to the smallest, equal sizes by ascending key: the same however the
    samples were batched (rows are in the order regions were first seen)."""
    return np.lexsort((keys.cpu().numpy(), -sizes.cpu().numpy()))


def _argsort_by_class(cls: np.ndarray, size: np.ndarray, own: np.ndarray, n_classes: int) -> np.ndarray:
    """Order of regions by class (ascending), then size and own-class count (both descending)."""
    m = int(own.max(initial=0)) + 1
    top = int(size.max(initial=0)) * m + m  # > every score
    if n_classes * top < 1 << 62:  # one int64 key (exact); else a lexicographic sort
        return np.argsort(cls * top + (top - 1 - (size * m + own)))
    return np.lexsort((-own, -size, cls))


class _Table:
    """Per-region accumulators of one granularity (rows added batch by batch, a batch's new keys ascending).

    Keys are found by binary search (``searchsorted``), not a Python dict: an epoch of 10,000 distinct MNIST regions
    cost ~10 ms in dict lookups and inserts, ~1-2% of a LeNet validation epoch. Sorting goes through numpy
    (``_argsort``, ``_unique``), whose CPU sorts are several times faster than torch's (10,000 int64 on the 2-core
    build machine: argsort ~0.18 ms against ~1.0 ms, unique with inverse ~0.28 ms against ~1.1 ms).

    Updates cost O(batch), not O(regions held): the accumulators live in buffers whose capacity doubles (rows
    ``[:len]`` are in use) and are added to in place, and the sorted index is a stack of sorted runs merged like a
    binary counter (a run is merged into the one below it while that one is no longer than it; O(log regions)
    runs). Rebuilt per batch, 100,000 regions in batches of 32 took 17 s, 20,000 with their inputs 15 s."""

    def __init__(self, n_classes: int):
        self.c = n_classes
        self._n = 0
        with _writable():
            self._keys = torch.zeros(0, dtype=torch.int64)  # (capacity,) by row
            self._count = torch.zeros(0, dtype=torch.int64)
            self._true = torch.zeros(0, n_classes, dtype=torch.int64)
            self._pred = torch.zeros(0, n_classes, dtype=torch.int64)
        self._sums: dict[str, Tensor] = {}  # name -> (capacity, ...) float64
        self._runs: list[tuple[Tensor, Tensor]] = []  # (keys ascending, their rows), longest first

    def __len__(self) -> int:
        return self._n

    # the rows in use (views: callers that hand them out clone them)
    @property
    def keys(self) -> Tensor:
        return self._keys[:self._n]

    @property
    def count(self) -> Tensor:
        return self._count[:self._n]

    @property
    def true(self) -> Tensor:
        return self._true[:self._n]

    @property
    def pred(self) -> Tensor:
        return self._pred[:self._n]

    @property
    def sums(self) -> dict[str, Tensor]:
        return {k: v[:self._n] for k, v in self._sums.items()}

    def find(self, keys: Tensor) -> Tensor:
        """``(n,)`` row of each key, -1 where the table does not hold it."""
        out = torch.full_like(keys, -1)
        for k, r in self._runs:  # (a key is in one run at most)
            k, r = k.to(keys.device), r.to(keys.device)
            pos = torch.searchsorted(k, keys).clamp_(max=k.shape[0] - 1)
            out = torch.where(k[pos] == keys, r[pos], out)
        return out

    def _capacity(self, n: int) -> None:
        """Make room for ``n`` rows (copying the rows in use into buffers of twice the capacity or more)."""
        cap = self._keys.shape[0]
        if n <= cap:
            return
        cap = max(n, 2 * cap, 64)

        def grown(buf: Tensor) -> Tensor:
            out = torch.zeros(cap, *buf.shape[1:], dtype=buf.dtype, device=buf.device)
            out[:self._n] = buf[:self._n]
            return out

        self._keys, self._count, self._true, self._pred = map(grown, (self._keys, self._count, self._true, self._pred))
        self._sums = {k: grown(v) for k, v in self._sums.items()}

    def _grow(self, new_keys: Tensor) -> None:
        """Append rows for ``new_keys`` (distinct, ascending, none held yet)."""
        n, r = new_keys.shape[0], self._n
        self._capacity(r + n)
        self._keys[r:r + n] = new_keys.to(self._keys.device)
        self._n = r + n
        run = (new_keys.to(self._keys.device), torch.arange(r, r + n, device=self._keys.device))
        while self._runs and self._runs[-1][0].shape[0] <= run[0].shape[0]:
            k, rows = self._runs.pop()
            both = torch.cat([k, run[0]])
            order = _argsort(both, stable=True)  # (two sorted runs: a stable sort merges them in linear time)
            run = (both[order], torch.cat([rows, run[1]])[order])
        self._runs.append(run)

    def rows(self, keys: Tensor) -> Tensor:
        """Row of each key; keys not seen before get new rows, in ascending key order."""
        with _writable():
            uniq, inv = _unique(keys)
            if not len(self):  # every key is new (an epoch's single update): rows in ascending key order are `inv`
                self._grow(uniq)
                return inv
            pos = self.find(uniq)
            new = pos < 0
            if bool(new.any()):
                pos[new] = torch.arange(len(self), len(self) + int(new.sum()))
                self._grow(uniq[new])
            return pos[inv]

    def _sum(self, name: str, shape: tuple[int, ...]) -> Tensor:
        if name not in self._sums:
            self._sums[name] = torch.zeros(self._keys.shape[0], *shape, dtype=torch.float64, device=self._keys.device)
        return self._sums[name]

    def add(self, rows: Tensor, y_true: Tensor, y_pred: Tensor, sums: Mapping[str, Tensor]) -> None:
        with _writable():
            rows = rows.to(self._keys.device)
            one = torch.ones_like(rows)
            self._count.index_add_(0, rows, one)
            self._true.view(-1).index_add_(0, rows * self.c + y_true.to(rows.device), one)
            self._pred.view(-1).index_add_(0, rows * self.c + y_pred.to(rows.device), one)
            for name, v in sums.items():
                self._sum(name, tuple(v.shape[1:])).index_add_(0, rows, v.to(rows.device, torch.float64))

    def merge(self, other: _Table) -> None:
        if len(self) and len(other) and set(self._sums) != set(other._sums):
            # sums of one side would be divided by both sides' counts (RegionStats._check_same_setup says which)
            raise ValueError(f"cannot merge tables keeping the sums {sorted(self._sums)} and {sorted(other._sums)}")
        rows = self.rows(other.keys)
        with _writable():
            rows = rows.to(self._keys.device)
            self._count.index_add_(0, rows, other.count.to(rows.device))
            self._true.index_add_(0, rows, other.true.to(rows.device))
            self._pred.index_add_(0, rows, other.pred.to(rows.device))
            for name, v in other.sums.items():
                self._sum(name, tuple(v.shape[1:])).index_add_(0, rows, v.to(rows.device, torch.float64))

    def state(self) -> dict[str, Any]:
        with _writable():
            return {"keys": self.keys.clone(), "count": self.count.clone(),
                    "true": self.true.clone(), "pred": self.pred.clone(),
                    "sums": {k: v.clone() for k, v in self.sums.items()}}

    @classmethod
    def from_state(cls, n_classes: int, st: Mapping[str, Any]) -> _Table:
        t = cls(n_classes)
        with _writable():
            t._keys = st["keys"].to(torch.int64).clone()
            t._n = t._keys.shape[0]
            order = _argsort(t._keys)
            t._runs = [(t._keys[order], order.to(t._keys.device))] if t._n else []
            t._count = st["count"].clone()
            t._true = st["true"].clone()
            t._pred = st["pred"].clone()
            t._sums = {k: v.clone() for k, v in st["sums"].items()}
        return t


class RegionStats:
    """Streaming, mergeable statistics of activation regions over a data set.

    Parameters
    ----------
    n_classes : int
        Number of classes (labels are integers in ``[0, n_classes)``; use 2 for binary tasks).
    layers : selection, optional
        Layers whose joint pattern defines the default granularity ``"full"`` (None = all layers), used by
        :meth:`update_from_recording`.
    granularities : dict name -> selection, optional
        Further granularities, e.g. ``{"last2": slice(-2, None), "fc1": "head.1"}``; each keeps its own table.
        ``"full"`` is always present. :data:`EXTERNAL` declares one whose keys you pass to :meth:`update` (e.g.
        :func:`affine_map_keys`); names first seen in :meth:`update` are registered so.
    keep_inputs : bool
        Keep the per-region sum of inputs (mean input / average instance); memory O(regions × features).
    keep_contributions : bool
        Keep per-region sums of the contributions ``A[c] ⊙ x`` (``(B, K, *input)``) and, when given, of the
        effective weights ``A`` (for the cluster table), for the default granularity only.
    purity_threshold : float
        Regions with purity below this are flagged as confused (0.7 as in Re3).

    Examples
    --------
    >>> stats = RegionStats(n_classes=10)
    >>> with relu_regions.record(model) as rec:
    ...     for x, y in loader:
    ...         stats.update_from_recording(rec, y, model(x).argmax(1))
    ...         rec.clear()
    >>> stats.summary()["regions"].head()
    """

    def __init__(self, n_classes: int, layers: LayerSelection = None,
                 granularities: Mapping[str, LayerSelection] | None = None, keep_inputs: bool = False,
                 keep_contributions: bool = False, purity_threshold: float = 0.7):
        if not is_int_at_least(n_classes, 1):
            raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
        if not 0.0 <= purity_threshold <= 1.0:
            raise ValueError(f"purity_threshold must lie in [0, 1], got {purity_threshold}")
        self.n_classes = n_classes
        self.layers = layers
        self.granularities: dict[str, LayerSelection] = {DEFAULT: layers}
        for name, sel in (granularities or {}).items():
            if name == DEFAULT and sel != layers:
                raise ValueError("granularity 'full' is defined by `layers`; choose another name")
            self.granularities[name] = sel
        self.keep_inputs = keep_inputs
        self.keep_contributions = keep_contributions
        self.purity_threshold = float(purity_threshold)
        self.tables: dict[str, _Table] = {}
        self.n_samples = 0
        self.n_correct = 0
        self.unit_active: dict[str, Tensor] = {}  # layer name -> (units,) int64 active counts
        self.unit_samples: dict[str, int] = {}
        self.top_contributor = None  # (features,) int64: how often each feature is the top contributor

    # ---------------------------------------------------------------------------------------------- updates
    def _table(self, name: str) -> _Table:
        if name not in self.tables:
            self.tables[name] = _Table(self.n_classes)
        return self.tables[name]

    def _labels(self, y: Tensor, what: str, b: int) -> Tensor:
        y = torch.as_tensor(y).detach()
        # the int64 cast below would truncate probabilities or soft labels into classes without a word
        if not is_integer_tensor(y):
            hint = ("pass logits.argmax(1), or (logit > 0).long() for one output" if what == "y_pred"
                    else "pass integer class indices (.long())")
            raise TypeError(f"{what} must hold class indices (an integer tensor), got dtype {y.dtype}: {hint}")
        y = y.reshape(-1).to("cpu", torch.int64)
        if y.numel() != b:
            raise ValueError(f"{what} has {y.numel()} entries for {b} keys")
        if b and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
            raise ValueError(f"{what} must hold class indices in [0, {self.n_classes}); "
                             f"got {int(y.min())}..{int(y.max())}")
        return y

    def _kept_shape(self, name: str) -> tuple[int, ...] | None:
        """Per-region shape of the sums ``name`` kept so far (None: none kept yet)."""
        for t in self.tables.values():
            if name in t.sums:
                return tuple(t.sums[name].shape[1:])
        return None

    def _check_batch(self, b: int, y_true: Tensor, y_pred: Tensor, inputs: Tensor | None = None,
                     contributions: Tensor | None = None, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Check what :meth:`update` takes for a batch of ``b`` samples (shapes only: nothing is copied) and return
        the labels as CPU int64 tensors. Everything is checked before anything is added, so that a rejected batch
        leaves the statistics as they were."""
        yt = self._labels(y_true, "y_true", b)
        yp = self._labels(y_pred, "y_pred", b)
        d_in = None
        if inputs is not None:
            _check_rows(inputs, "inputs", b)
            d_in = math.prod(inputs.shape[1:])
            kept = self._kept_shape("inputs") if self.keep_inputs else None
            if kept is not None and kept != (d_in,):
                raise ValueError(f"inputs hold {d_in} features per sample, the earlier batches {kept[0]}")
        kd = {}
        for name, t in (("contributions", contributions), ("weights", weights)):
            if t is None:
                continue
            kd[name] = _outputs_and_features(t, name, b)
            # (B, *input_shape) of one output would be read as K = input_shape[0] outputs: refused where it shows
            wrong = (f"{kd[name][1]} features per output, inputs {d_in}" if d_in is not None and kd[name][1] != d_in
                     else f"K={kd[name][0]} outputs for n_classes={self.n_classes}" if kd[name][0] > self.n_classes
                     else None)
            if wrong:
                raise ValueError(
                    f"{name} of shape {tuple(t.shape)} hold {wrong}: a tensor of 3 or more dimensions is read as "
                    f"(B, K, *input_shape); for one output of a non-flat input pass (B, 1, *input_shape) "
                    f"({name}.unsqueeze(1))")
            kept = self._kept_shape(name) if self.keep_contributions else None
            if kept is not None and kept != kd[name]:
                raise ValueError(f"{name} hold (outputs, features) = {kd[name]} per sample, the earlier batches {kept}")
        if len(kd) == 2 and kd["contributions"] != kd["weights"]:
            raise ValueError(f"contributions hold (outputs, features) = {kd['contributions']} per sample, weights "
                             f"{kd['weights']}")
        if "contributions" in kd and 1 < kd["contributions"][0] < self.n_classes:
            # the top contributor is read at the predicted class's row: K outputs must be the n_classes classes
            raise ValueError(f"contributions hold K={kd['contributions'][0]} outputs for n_classes={self.n_classes}: "
                             "give all classes' rows (or one output)")
        if self.n_samples:  # a sum kept on some batches only would be divided by every batch's samples
            given = {"inputs": inputs is not None and self.keep_inputs,
                     "contributions": contributions is not None and self.keep_contributions,
                     "weights": weights is not None and self.keep_contributions}
            for name, now in given.items():
                before = self._kept_shape(name) is not None
                if now != before:
                    raise ValueError(f"{name} were {'given' if before else 'not given'} with the earlier batches "
                                     f"and {'are' if now else 'are not'} with this one: per-region means need them "
                                     "with every batch")
        if "contributions" in kd and self.top_contributor is not None and \
                kd["contributions"][1] != self.top_contributor.shape[0]:
            raise ValueError(f"contributions hold {kd['contributions'][1]} features per output, the earlier batches "
                             f"{self.top_contributor.shape[0]}")
        return yt, yp

    def update(self, keys: Tensor | Mapping[str, Tensor], y_true: Tensor, y_pred: Tensor, inputs: Tensor | None = None,
               contributions: Tensor | None = None, weights: Tensor | None = None) -> RegionStats:
        """Add one batch.

        Parameters
        ----------
        keys : Tensor or dict name -> Tensor
            ``(B,)`` int64 region keys of the default granularity, or one ``(B,)`` tensor per granularity name.
        y_true, y_pred : Tensor
            ``(B,)`` integer class indices (for a binary sigmoid model, ``y_pred = (logit > 0).long()``); floating,
            bool and complex tensors are refused (``TypeError``): predictions must be classes, not probabilities.
        inputs : Tensor, optional
            ``(B, *input_shape)``, summed per region when ``keep_inputs``.
        contributions : Tensor, optional
            ``(B, K, *input_shape)`` contributions ``A[k] ⊙ x``, or ``(B, D)`` for one output of a flat input;
            summed per region when ``keep_contributions``; also counts each sample's top contributor (largest
            contribution to its predicted class, or to the single output). A tensor of 3 or more dimensions is
            always read as ``(B, K, *input_shape)``: for one output of a non-flat input pass ``(B, 1,
            *input_shape)`` (``contributions.unsqueeze(1)``; ``(B, *input_shape)`` would be read as ``K =
            input_shape[0]`` outputs, refused when that exceeds ``n_classes``, when ``inputs`` are given or when
            earlier batches fixed the shape).
        weights : Tensor, optional
            ``(B, K, *input_shape)`` (or ``(B, D)``, as ``contributions``) effective weights ``A`` (mean effective
            weights = feature importance of the clustering paper), summed per region when ``keep_contributions``.

        Every tensor's first dimension must be the batch size B. The batch is checked before anything is added
        (a rejected batch changes nothing); an empty batch adds nothing.
        """
        if not isinstance(keys, Mapping):
            keys = {DEFAULT: keys}
        sizes = {k: int(torch.as_tensor(v).numel()) for k, v in keys.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"keys of different granularities have different batch sizes: {sizes}")
        b = next(iter(sizes.values()))
        for name, k in keys.items():
            k = torch.as_tensor(k)
            if not is_integer_tensor(k):  # (truncated to int64 before)
                raise TypeError(f"keys[{name!r}] must hold integer region keys, got {k.dtype}")
        if self.n_samples and b:
            seen = sorted(n for n, t in self.tables.items() if len(t))
            if sorted(keys) != seen:  # coverage and shares divide by every batch's samples
                raise ValueError(f"keys hold the granularities {sorted(keys)}; the earlier batches held {seen}: give "
                                 "the same ones with every batch")
        yt, yp = self._check_batch(b, y_true, y_pred, inputs, contributions, weights)
        if b == 0:
            return self
        for k in keys:  # ad-hoc granularities (e.g. affine-map keys) are kept, as keys no recording can give
            self.granularities.setdefault(k, EXTERNAL)
        sums: dict[str, Tensor] = {}
        if self.keep_inputs and inputs is not None:
            sums["inputs"] = inputs.detach().reshape(b, math.prod(inputs.shape[1:])).cpu()
        if contributions is not None:
            c = contributions.detach().cpu()
            c = c.reshape(b, *_outputs_and_features(c, "contributions", b))
            if self.keep_contributions:
                sums["contributions"] = c
            sel = yp.clamp(max=c.shape[1] - 1) if c.shape[1] > 1 else torch.zeros(b, dtype=torch.int64)
            top = c[torch.arange(b), sel].argmax(1)
            counts = torch.bincount(top, minlength=c.shape[2])
            self.top_contributor = counts if self.top_contributor is None else self.top_contributor + counts
        if self.keep_contributions and weights is not None:
            w = weights.detach().cpu()
            sums["weights"] = w.reshape(b, *_outputs_and_features(w, "weights", b))
        for name, k in keys.items():
            k = torch.as_tensor(k).detach().reshape(-1).to("cpu", torch.int64)
            table = self._table(name)
            table.add(table.rows(k), yt, yp, sums if name == DEFAULT else
                      ({"inputs": sums["inputs"]} if "inputs" in sums else {}))
        self.n_samples += b
        self.n_correct += int((yt == yp).sum())
        return self

    def update_from_recording(self, rec, y_true: Tensor, y_pred: Tensor, inputs: Tensor | None = None,
                              contributions: Tensor | None = None, weights: Tensor | None = None) -> RegionStats:
        """Add the samples of a :class:`~relu_regions.Recording` (all its passes) with keys for every granularity.

        Also counts neuron activation frequencies (Re3 §5.3) of the recorded ReLU-like layers. Call
        ``rec.clear()`` afterwards when streaming.
        """
        keys, units = self.recording_batch(rec)
        # the unit counts after update(), which checks the batch first: a rejected batch adds nothing
        self.update(keys, y_true, y_pred, inputs=inputs, contributions=contributions, weights=weights)
        self.add_unit_counts(units, len(rec))
        return self

    def recording_batch(self, rec) -> tuple[dict[str, Tensor], Mapping[str, Tensor]]:
        """What :meth:`update_from_recording` needs from a recording, left on its device: region keys per
        granularity (``(B,)`` each) and per-unit active counts of the ReLU-like layers. For callers that collect
        batches and add them later in one :meth:`update` (no host synchronisation per batch on a GPU)."""
        return self.batch_keys(self.batch_patterns(rec))

    def _check_recordable(self) -> None:
        """Raise ``ValueError`` when a granularity's keys cannot come from a recording (:data:`EXTERNAL`)."""
        external = [name for name, sel in self.granularities.items() if sel is EXTERNAL]
        if external:
            raise ValueError(f"granularities {external} hold keys passed to update() (e.g. affine_map_keys), which a "
                             "recording cannot give: add every batch with update() and keys of "
                             f"{list(self.granularities)}, or count those keys in separate RegionStats")

    def batch_patterns(self, rec) -> BatchPatterns:
        """The patterns of a recording that each granularity's keys are computed from (selected now; the keys
        later, by :meth:`batch_keys`). The recording may be cleared in between: the patterns keep their states.

        Raises ``ValueError`` when a granularity is :data:`EXTERNAL` (its keys were passed to :meth:`update`)."""
        self._check_recordable()
        return BatchPatterns({name: rec.patterns(sel) for name, sel in self.granularities.items()}, len(rec),
                             rec._device())

    def batch_keys(self, batch: BatchPatterns) -> tuple[dict[str, Tensor], Mapping[str, Tensor]]:
        """:meth:`recording_batch` of patterns taken earlier with :meth:`batch_patterns`."""
        keys: dict[str, Tensor] = {}
        units: Mapping[str, Tensor] = {}
        for name, pats in batch.patterns.items():
            if name != DEFAULT or not pats:  # (an affine model: one region, no units)
                keys[name] = keys_of(pats, batch.n, batch.device)
                continue
            # the default granularity's layers are the counted ones: their keys and counts in one pass
            with torch._C.DisableTorchFunction():  # our own arithmetic, not through an open recording mode
                keys[name], counts = pattern_keys_and_counts(pats)
            # two-state units: bool states, counted above (cut into layers when read, or added up over many batches
            # first: UnitCounts.total)
            units = counts.renamed({i: p.name for i, p in enumerate(pats) if p.kind in ("relu", "leaky_relu", "prelu")})
        return keys, units

    def add_unit_counts(self, units: Mapping[str, Tensor], n_samples: int) -> None:
        """Add per-unit active counts (from :meth:`recording_batch`) observed on ``n_samples`` samples."""
        if not n_samples:  # an empty batch adds nothing
            return
        for name, act in units.items():
            act = act.to("cpu", torch.int64)
            self.unit_active[name] = act if name not in self.unit_active else self.unit_active[name] + act
            self.unit_samples[name] = self.unit_samples.get(name, 0) + n_samples

    def merge(self, other: RegionStats) -> RegionStats:
        """Add the statistics of ``other`` (built on disjoint samples) into ``self``; returns ``self``."""
        if not isinstance(other, RegionStats):
            raise TypeError(f"can only merge RegionStats, got {type(other).__name__}")
        if other is self:  # (the tables add into themselves in place: a copy is added, every count doubled)
            other = RegionStats.from_state_dict(self.state_dict())
        if other.n_classes != self.n_classes:
            raise ValueError(f"n_classes differ: {self.n_classes} vs {other.n_classes}")
        self._check_same_setup(other)
        for name, t in other.tables.items():
            self.granularities.setdefault(name, other.granularities.get(name))
            self._table(name).merge(t)
        for name, v in other.unit_active.items():
            self.unit_active[name] = v.clone() if name not in self.unit_active else self.unit_active[name] + v
            self.unit_samples[name] = self.unit_samples.get(name, 0) + other.unit_samples[name]
        if other.top_contributor is not None:
            self.top_contributor = (other.top_contributor.clone() if self.top_contributor is None
                                    else self.top_contributor + other.top_contributor)
        self.n_samples += other.n_samples
        self.n_correct += other.n_correct
        return self

    def _check_same_setup(self, other: RegionStats) -> None:
        """Raise ``ValueError`` naming the first setting in which ``other`` is configured differently: merged, its
        tables would mix keys of different layers, or sums kept on one side only would be divided by both sides'
        counts. Checked before anything is merged."""
        if _norm_sel(self.layers) != _norm_sel(other.layers):
            raise ValueError(f"cannot merge: layers differ ({self.layers!r} vs {other.layers!r})")
        # (names update() registered for keys passed to it are EXTERNAL: an object without samples -- a shard that
        # saw no batch -- has not registered them yet, and adds nothing to them)
        one_side = [n for n in sorted(set(self.granularities) ^ set(other.granularities))
                    if not (self.granularities.get(n, other.granularities.get(n)) is EXTERNAL
                            and (other if n in self.granularities else self).n_samples == 0)]
        if one_side:
            raise ValueError(f"cannot merge: granularities {one_side} are defined on one side only "
                             f"({list(self.granularities)} vs {list(other.granularities)})")
        for name, sel in self.granularities.items():
            if name not in other.granularities:
                continue
            if _norm_sel(sel) != _norm_sel(other.granularities[name]):
                raise ValueError(f"cannot merge: granularity {name!r} is defined differently "
                                 f"({sel!r} vs {other.granularities[name]!r})")
        for flag in ("keep_inputs", "keep_contributions"):
            if bool(getattr(self, flag)) != bool(getattr(other, flag)):
                raise ValueError(f"cannot merge: {flag} differs ({getattr(self, flag)} vs {getattr(other, flag)})")
        if self.purity_threshold != other.purity_threshold:  # (the merged object's confused regions would depend on
            # which side received the other)
            raise ValueError(f"cannot merge: purity_threshold differs ({self.purity_threshold} vs "
                             f"{other.purity_threshold})")
        if self.n_samples and other.n_samples:  # (an empty side adds nothing, or takes the other's tables as they are)
            mine = sorted(n for n, t in self.tables.items() if len(t))
            theirs = sorted(n for n, t in other.tables.items() if len(t))
            if mine != theirs:  # a table's samples would be those of one side, its shares read as of both
                raise ValueError(f"cannot merge: this object holds tables of the granularities {mine}, the other "
                                 f"{theirs} (batches added with keys for some granularities only): give update() "
                                 "the keys of the same granularities on both sides")
            for name in mine:
                a, b = set(self.tables[name].sums), set(other.tables[name].sums)
                if a != b:  # (update() refuses the same mix within one object)
                    raise ValueError(f"cannot merge: per-region {sorted(a ^ b)} of granularity {name!r} were given "
                                     f"with the batches of one side only ({sorted(a)} vs {sorted(b)}): per-region "
                                     "means would divide one side's sums by both sides' counts; pass inputs= / "
                                     "contributions= / weights= with the batches of both sides, or with neither")
        for name, t in other.tables.items():
            for s, v in t.sums.items():
                mine = self.tables[name].sums.get(s) if name in self.tables else None
                if mine is not None and mine.shape[1:] != v.shape[1:]:
                    raise ValueError(f"cannot merge: per-region {s} of granularity {name!r} have shape "
                                     f"{tuple(mine.shape[1:])} vs {tuple(v.shape[1:])}")
        for name, v in other.unit_active.items():
            if name in self.unit_active and self.unit_active[name].shape != v.shape:
                raise ValueError(f"cannot merge: layer {name!r} has {self.unit_active[name].numel()} units vs "
                                 f"{v.numel()}")
        if self.top_contributor is not None and other.top_contributor is not None and \
                self.top_contributor.shape != other.top_contributor.shape:
            raise ValueError(f"cannot merge: top-contributor counts over {self.top_contributor.numel()} features vs "
                             f"{other.top_contributor.numel()}")

    # ---------------------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and Python values (picklable; for ``all_gather_object`` and checkpoints)."""
        return {
            "n_classes": self.n_classes, "layers": _plain_sel(self.layers),
            "granularities": {k: _plain_sel(v) for k, v in self.granularities.items()},
            "keep_inputs": self.keep_inputs, "keep_contributions": self.keep_contributions,
            "purity_threshold": self.purity_threshold, "n_samples": self.n_samples, "n_correct": self.n_correct,
            "tables": {k: t.state() for k, t in self.tables.items()},
            "unit_active": {k: v.clone() for k, v in self.unit_active.items()},
            "unit_samples": dict(self.unit_samples),
            "top_contributor": None if self.top_contributor is None else self.top_contributor.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> RegionStats:
        """Replace this object's contents with ``state`` (from :meth:`state_dict`); returns ``self``."""
        if int(state["n_classes"]) != self.n_classes:
            raise ValueError(f"state has n_classes={state['n_classes']}, this object {self.n_classes}")
        self.layers = _from_plain_sel(state["layers"])
        self.granularities = {k: _from_plain_sel(v) for k, v in state["granularities"].items()}
        self.keep_inputs = bool(state["keep_inputs"])
        self.keep_contributions = bool(state["keep_contributions"])
        self.purity_threshold = float(state["purity_threshold"])
        self.n_samples = int(state["n_samples"])
        self.n_correct = int(state["n_correct"])
        self.tables = {k: _Table.from_state(self.n_classes, t) for k, t in state["tables"].items()}
        self.unit_active = {k: v.clone() for k, v in state["unit_active"].items()}
        self.unit_samples = dict(state["unit_samples"])
        tc = state["top_contributor"]
        self.top_contributor = None if tc is None else tc.clone()
        return self

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> RegionStats:
        return cls(int(state["n_classes"])).load_state_dict(state)

    # ------------------------------------------------------------------------------------------- queries
    def _get(self, granularity: str) -> _Table:
        if granularity not in self.tables:
            if granularity in self.granularities:
                return _Table(self.n_classes)
            raise KeyError(f"unknown granularity {granularity!r}; known: {list(self.granularities)}")
        return self.tables[granularity]

    def n_regions(self, granularity: str = DEFAULT) -> int:
        """Number of distinct regions (activation patterns) seen at this granularity."""
        return len(self._get(granularity))

    def region_keys(self, granularity: str = DEFAULT) -> Tensor:
        """``(R,)`` region keys in row order (the row order of every per-region tensor): rows are added batch by
        batch, each batch's new regions in ascending key order (not in the order their samples came)."""
        return self._get(granularity).keys.clone()

    def sizes(self, granularity: str = DEFAULT) -> Tensor:
        """``(R,)`` samples per region."""
        return self._get(granularity).count.clone()

    def class_histograms(self, granularity: str = DEFAULT, which: str = "true") -> Tensor:
        """``(R, C)`` true (``which="true"``) or predicted (``"pred"``) class counts per region."""
        t = self._get(granularity)
        if which not in ("true", "pred"):
            raise ValueError(f"which must be 'true' or 'pred', got {which!r}")
        return (t.true if which == "true" else t.pred).clone()

    def purity(self, granularity: str = DEFAULT) -> Tensor:
        """``(R,)`` share of each region's majority true class."""
        t = self._get(granularity)
        return t.true.amax(1).to(torch.float64) / t.count.clamp(min=1).to(torch.float64)

    def majority_class(self, granularity: str = DEFAULT) -> Tensor:
        """``(R,)`` majority true class per region (lowest index on ties)."""
        return self._get(granularity).true.argmax(1)

    def confused(self, granularity: str = DEFAULT) -> Tensor:
        """``(R,)`` bool: purity below ``purity_threshold``."""
        return self.purity(granularity) < self.purity_threshold

    def mean_purity(self, granularity: str = DEFAULT, weighted: bool = False) -> float:
        """Mean purity over regions (``weighted=True``: over samples, i.e. weighted by region size)."""
        t = self._get(granularity)
        if not len(t):
            return float("nan")
        p = self.purity(granularity)
        if weighted:
            return float((p * t.count).sum() / t.count.sum())
        return float(p.mean())

    def confusion_share(self, granularity: str = DEFAULT, weighted: bool = False) -> float:
        """Share of regions flagged confused (``weighted=True``: share of samples in confused regions)."""
        t = self._get(granularity)
        if not len(t):
            return float("nan")
        c = self.confused(granularity)
        if weighted:
            return int(t.count[c].sum()) / int(t.count.sum())  # (exact integers; their tensor quotient is float32)
        return float(c.to(torch.float64).mean())

    def coverage(self, top: int = 1, granularity: str = DEFAULT) -> float:
        """Share of samples lying in their class's ``top`` largest regions.

        Regions are assigned to their majority true class; for each class the ``top`` largest regions are taken
        (equal sizes: more samples of the class first) and the samples of that class inside them are counted (Re3
        "top-1 / top-C coverage").
        """
        if not is_int_at_least(top, 1):  # (1.5 used to act as 2, 0 and negative counts as no region)
            raise ValueError(f"top must be a positive int (regions per class), got {top!r}")
        t = self._get(granularity)
        n = int(t.count.sum())  # this table's samples (equal to n_samples when every batch gave its keys)
        if not len(t) or n == 0:
            return float("nan")
        own, maj = (v.cpu().numpy() for v in t.true.max(1))  # the majority class (lowest on ties) and its count
        count = t.count.cpu().numpy()
        # one sort: by class, and in each class the largest regions first; among regions of equal size the one with
        # more samples of the class, so that the result does not depend on the order in which regions were first
        # seen (batching). Regions equal in both cover the same number of samples, whichever is taken.
        order = _argsort_by_class(maj, count, own, self.n_classes)
        per_class = np.bincount(maj, minlength=self.n_classes)
        rank = np.arange(len(t)) - (np.cumsum(per_class) - per_class)[maj[order]]
        return int(own[order][rank < top].sum()) / n

    def overlap(self, other: RegionStats, granularity: str = DEFAULT) -> float:
        """Share of the samples of ``other`` whose region also occurs in ``self``."""
        t = other._get(granularity)
        if not len(t):
            return float("nan")
        hit = self._get(granularity).find(t.keys) >= 0
        return float(t.count[hit].sum()) / float(t.count.sum())

    def similar_regions(self, other: RegionStats, granularity: str = DEFAULT) -> dict[str, int]:
        """Re3 Table 2: regions of ``other`` that also occur in ``self`` (similar) or not (dissimilar)."""
        keys = other._get(granularity).keys
        similar = int((self._get(granularity).find(keys) >= 0).sum())
        return {"similar": similar, "dissimilar": len(keys) - similar}

    def mean_inputs(self, granularity: str = DEFAULT) -> Tensor:
        """``(R, D)`` mean (flattened) input per region; needs ``keep_inputs=True``."""
        return self._mean(granularity, "inputs", "keep_inputs=True and inputs=")

    def mean_contributions(self) -> Tensor:
        """``(R, K, D)`` mean contribution ``A_r[k] ⊙ x`` per region (Re3 Algorithm 4), default granularity."""
        return self._mean(DEFAULT, "contributions", "keep_contributions=True and contributions=")

    def mean_weights(self) -> Tensor:
        """``(R, K, D)`` mean effective weights per region (feature importance of the clustering paper)."""
        return self._mean(DEFAULT, "weights", "keep_contributions=True and weights=")

    def _mean(self, granularity: str, name: str, hint: str) -> Tensor:
        t = self._get(granularity)
        if name not in t.sums:
            raise RuntimeError(f"no per-region {name} were kept: pass {hint}... to update()")
        s = t.sums[name]
        return s / t.count.clamp(min=1).to(s.dtype).reshape(-1, *([1] * (s.dim() - 1)))

    def activation_frequencies(self) -> dict[str, Tensor]:
        """Per ReLU-like layer, ``(units,)`` share of samples in which each unit is active (Re3 §5.3)."""
        return {k: v.to(torch.float64) / max(1, self.unit_samples[k]) for k, v in self.unit_active.items()}

    def top_contributor_frequencies(self) -> Tensor | None:
        """``(D,)`` share of samples whose largest contribution (to the predicted class) comes from feature i."""
        if self.top_contributor is None:
            return None
        return self.top_contributor.to(torch.float64) / max(1, int(self.top_contributor.sum()))

    @property
    def accuracy(self) -> float:
        return self.n_correct / self.n_samples if self.n_samples else float("nan")

    # ------------------------------------------------------------------------------------------- reports
    def summary(self, granularity: str = DEFAULT, feature_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Tidy pandas tables.

        Returns
        -------
        dict with
            ``"overview"``: one row per granularity (regions, samples, mean purity, confused share, coverage);
            ``"regions"``: one row per region of ``granularity`` (key, size, majority class, purity, confused,
            true/pred counts ``true_<c>`` / ``pred_<c>``), sorted by size;
            ``"clusters"`` (binary tasks with inputs / weights kept): support, positive rate, average instance
            ``x_<feature>`` and mean effective weights ``w_<feature>`` per region.
        """
        import pandas as pd

        rows = []
        for name in self.granularities:
            t = self._get(name)
            rows.append({"granularity": name, "regions": len(t), "samples": int(t.count.sum()),
                         "mean_purity": self.mean_purity(name), "confused_share": self.confusion_share(name),
                         "top1_coverage": self.coverage(1, name),
                         f"top{self.n_classes}_coverage": self.coverage(self.n_classes, name)})
        overview = pd.DataFrame(rows)
        t = self._get(granularity)
        # columns gathered first, one DataFrame at the end (inserted one by one, pandas warns of fragmentation)
        cols: dict[str, Any] = {"key": t.keys.tolist(), "size": t.count.tolist(),
                                "majority": t.true.argmax(1).tolist() if len(t) else [],
                                "purity": self.purity(granularity).tolist(),
                                "confused": self.confused(granularity).tolist()}
        cols.update({f"true_{c}": t.true[:, c].tolist() for c in range(self.n_classes)})
        cols.update({f"pred_{c}": t.pred[:, c].tolist() for c in range(self.n_classes)})
        reg = pd.DataFrame(cols).iloc[largest_first(t.count, t.keys)].reset_index(drop=True)
        out: dict[str, Any] = {"overview": overview, "regions": reg}
        if self.n_classes == 2 and len(t):
            cl_cols: dict[str, Any] = {
                "key": t.keys.tolist(), "support": t.count.tolist(),
                "positive_rate": (t.true[:, 1].to(torch.float64) / t.count.clamp(min=1)).tolist(),
                "predicted_positive_rate": (t.pred[:, 1].to(torch.float64) / t.count.clamp(min=1)).tolist()}
            for name, prefix in (("inputs", "x_"), ("weights", "w_")):
                if name in t.sums and (granularity == DEFAULT or name == "inputs"):
                    m = self._mean(granularity, name, "")
                    m = m.reshape(m.shape[0], -1) if name == "inputs" else m[:, -1]
                    names = list(feature_names) if feature_names is not None else [str(i) for i in
                                                                                     range(m.shape[1])]
                    for i, fn in enumerate(names[: m.shape[1]]):
                        cl_cols[prefix + fn] = m[:, i].tolist()
            out["clusters"] = pd.DataFrame(cl_cols).iloc[largest_first(t.count, t.keys)].reset_index(drop=True)
        return out

    def to_markdown(self, granularity: str = DEFAULT, max_regions: int = 20) -> str:
        """A Markdown report: the overview table and the ``max_regions`` largest regions."""
        if not is_int_at_least(max_regions, 1):  # (pandas' head(-k) would drop the k smallest regions instead)
            raise ValueError(f"max_regions must be a positive int, got {max_regions!r}")
        s = self.summary(granularity)
        parts = [f"RegionStats: {self.n_samples} samples, accuracy {self.accuracy:.4f}", "",
                 markdown_table(s["overview"]), "",
                 f"Largest regions ({granularity}):", "",
                 markdown_table(s["regions"].head(max_regions))]
        return "\n".join(parts)

    def __repr__(self) -> str:
        regs = ", ".join(f"{k}={self.n_regions(k)}" for k in self.granularities)
        return f"RegionStats(samples={self.n_samples}, classes={self.n_classes}, regions: {regs})"


def markdown_table(df, floatfmt: str = ".4g") -> str:
    """A pandas DataFrame as a GitHub Markdown table (no dependency on ``tabulate``)."""

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


def _check_rows(t: Tensor, what: str, b: int) -> None:
    """``t`` holds one row per key: its first dimension is the batch size ``b``."""
    if t.dim() == 0 or t.shape[0] != b:
        raise ValueError(f"{what} of shape {tuple(t.shape)} do not hold one row per key: the first dimension must be "
                         f"the batch size {b}")


def _outputs_and_features(t: Tensor, what: str, b: int) -> tuple[int, int]:
    """``(K, D)`` of ``(B, K, *input_shape)`` contributions / weights, or ``(1, D)`` of ``(B, D)`` ones."""
    _check_rows(t, what, b)
    if t.dim() < 2:
        raise ValueError(f"{what} must be (B, K, *input_shape), or (B, D) for one output; got shape {tuple(t.shape)}")
    if t.dim() == 2:
        return 1, int(t.shape[1])
    return int(t.shape[1]), math.prod(t.shape[2:])


def _norm_sel(sel: LayerSelection) -> Any:
    """A layer selection in one spelling (a name = a list of one name; lists, tuples and saved slices alike)."""
    sel = _from_plain_sel(sel)
    if isinstance(sel, str):
        return [sel]
    if isinstance(sel, (list, tuple)):
        return list(sel)
    return sel


def _plain_sel(sel: LayerSelection) -> Any:
    if sel is EXTERNAL:  # plain values only: state dicts load with torch.load(weights_only=True)
        return {"external": True}
    if isinstance(sel, slice):
        return {"slice": (sel.start, sel.stop, sel.step)}
    if isinstance(sel, (list, tuple)):
        return list(sel)
    return sel


def _from_plain_sel(v: Any) -> LayerSelection:
    if isinstance(v, dict) and "slice" in v:
        return slice(*v["slice"])
    if isinstance(v, dict) and v.get("external"):
        return EXTERNAL
    return v
