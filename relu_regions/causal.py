"""Hidden-unit structure: interventions, average causal effects, unit clusters and lesions.

The pipeline (for any network, piecewise linear or not):

1. :func:`intervene` — ``do(x_i = α)`` on an input / latent coordinate (``site="input"``) or on hidden units (the
   output of the module at ``site``), through a forward (pre-)hook that lives only inside the ``with`` block.
2. :func:`ace` — the average causal effect ``ACE(α) = E[y | do(x_i = α)] − mean_α' E[y | do(x_i = α')]`` on every
   observed hidden unit and on the output, Monte-Carlo over the other inputs (``n_samples`` rows of the data).
3. :func:`activation_profiles` / :func:`ace_profiles` and :func:`cluster_units` — group hidden units whose
   profiles agree (affinity propagation on Spearman similarity, as in the thesis; k-means as an option);
   :func:`cluster_importance` ranks clusters, :func:`cluster_intersection` crosses two clusterings.
4. :func:`lesion` / :func:`lesion_table` / :func:`lesion_grid` — zero a unit cluster and measure what changes.

Every call leaves the model exactly as it was (parameters, buffers, hooks, train/eval flags, requires_grad),
also after an exception: hooks are removed through their handles and :func:`relu_regions.state.preserved`
restores the rest. The context managers (:func:`intervene`, :func:`lesion`) remove only their own hook: what the
user's code changes inside the block stays changed.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import check_finite, is_int_at_least, is_integer_tensor
from .state import preserved
from .training import _decisions

Tensor = torch.Tensor
Units = int | Sequence[int] | Tensor

__all__ = [
    "ACEResult",
    "UnitClusters",
    "ace",
    "ace_profiles",
    "activation_profiles",
    "cluster_importance",
    "cluster_intersection",
    "cluster_units",
    "collect",
    "intervene",
    "lesion",
    "lesion_grid",
    "lesion_table",
]


def _module(model: nn.Module, site: str, what: str = "site") -> nn.Module:
    """The module at ``site``; ``what`` names the argument in the error (``"site"``, or a list of observed
    layers, which cannot be ``"input"``)."""
    try:
        return model.get_submodule(site)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        some = f"{names[:20]}{' ...' if len(names) > 20 else ''}"
        if what == "site":
            raise ValueError(f"site {site!r} is not a module path of the model; choose 'input' or one of "
                             f"{some}") from None
        hint = (" ('input' is a site to intervene on, not a layer to observe: the input is the data you pass)"
                if site == "input" else "")
        raise ValueError(f"{what} holds {site!r}, which is not a module path of the model{hint}; observe module "
                         f"paths such as {some}") from None


def _output_tensor(out: Any, what: str) -> Tensor:
    """A model's output tensor; a tuple or list output (``(logits, aux)``) is read through its first element, as
    :func:`~relu_regions.affine_map` reads it."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"{what} returned {type(out).__name__}; expected a tensor, or a tuple / list whose first "
                        "element is one")
    return out


def _units(units: Units) -> Tensor:
    """Flat unit indices as a ``(k,)`` int64 tensor, or a ``(n,)`` bool mask over the site's units (checked against
    the site's size when it runs)."""
    t = torch.as_tensor(units).reshape(-1)
    if t.numel() == 0:
        raise ValueError("units is empty")
    if t.dtype == torch.bool:
        if not bool(t.any()):
            raise ValueError("units is a mask that selects no unit")
        return t
    if not is_integer_tensor(t):
        raise TypeError(f"units must be integer indices or a bool mask, not {t.dtype}")
    t = t.long()
    if int(t.min()) < 0:
        raise ValueError(f"unit index {int(t.min())} is negative; units are flat indices 0 .. n_units - 1 into "
                         "the per-sample tensor at the site")
    return t


def _set(t: Tensor, units: Tensor, value: Any, site: str, what: str = "value") -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"site {site!r} holds {type(t).__name__}, not a tensor")
    flat = t.reshape(t.shape[0], -1)
    n = flat.shape[1]
    if units.dtype == torch.bool:
        if units.numel() != n:
            raise ValueError(f"units is a bool mask of {units.numel()} entries; site {site!r} has {n} units per "
                             "sample")
        units = units.nonzero().reshape(-1)
    elif int(units.max()) >= n:
        raise ValueError(f"unit index {int(units.max())} out of range for site {site!r} with {n} units")
    flat = flat.clone()
    # (a Python float stays float64 here: 1.7 is reported as 1.7, not as its float32 rounding)
    given = (value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))).to(flat.device)
    v = given.to(flat.dtype)
    if not (flat.is_floating_point() or flat.is_complex()):
        # the cast would truncate 1.7 to 1 (or wrap 300 into uint8) and set another value than the one reported
        exact = v.to(given.dtype) == given
        if not bool(exact.all()):
            bad, became = (given[~exact].reshape(-1)[0].item(), v[~exact].reshape(-1)[0].item()) if given.dim() \
                else (given.item(), v.item())
            raise ValueError(f"{what} {bad!r} cannot be set at site {site!r}, which holds {flat.dtype} values (it "
                             f"would become {became!r}); give values of that dtype (integral, in its range) at an "
                             "integer site")
    k = units.numel()
    if v.dim() == 1 and v.numel() not in (1, k):
        raise ValueError(f"value holds {v.numel()} values for {k} unit(s) at site {site!r}: give a scalar, one value "
                         "per unit, or an (N, 1) / (N, units) tensor of one value per sample")
    if v.dim() == 2 and (v.shape[0] != flat.shape[0] or v.shape[1] not in (1, k)):
        raise ValueError(f"value of shape {tuple(v.shape)} does not fit site {site!r}'s batch of {flat.shape[0]} "
                         f"sample(s) x {k} unit(s): per-sample values are (N, 1) or (N, units), N the batch the "
                         "model is called with")
    if v.dim() > 2:
        raise ValueError(f"value must be a scalar, 1-D (per unit) or 2-D (per sample); got shape {tuple(v.shape)}")
    flat[:, units.to(flat.device)] = v
    return flat.reshape(t.shape)


@contextmanager
def intervene(model: nn.Module, site: str, units: Units, value: float | Tensor) -> Iterator[nn.Module]:
    """``do(units = value)`` while the block runs.

    Parameters
    ----------
    model : nn.Module
    site : str
        ``"input"`` for the model's first input (positional, or by the keyword of ``forward``'s first
        parameter), or a module path whose output holds the units (e.g. ``"decoder.3"`` for the ReLU of a hidden
        layer). A module that runs more than once per forward of the model (one ``nn.ReLU`` reused) is refused
        (a ``ValueError`` at its second call), as :func:`collect` refuses it.
    units : int, sequence of int or Tensor
        Flat indices (0 .. n_units - 1) into the per-sample tensor at the site, or a bool mask over its n_units.
    value : float or Tensor
        The value set: a scalar, ``(units,)`` one value per unit, or ``(N, 1)`` / ``(N, units)`` per sample of
        the batch the model is called with. At an integer site (token ids as input) only values of its dtype are
        taken: 1.7 is refused, not truncated.
    """
    with _intervention(model, site, units, value, "value") as m:
        yield m


def _first_parameter(model: nn.Module) -> str | None:
    """Name of the first parameter of ``model.forward`` that can be passed by keyword (None if there is none)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    for p in params:
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            return p.name
        if p.kind is not inspect.Parameter.POSITIONAL_ONLY:
            return None
    return None


def _version(t: Tensor) -> int | None:
    """The tensor's version counter (None for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _wrote(module: nn.Module, t: Tensor, version: int | None) -> bool:
    """Whether ``module`` wrote into its input ``t`` during the call (its version counter moved; without one, the
    module's own ``inplace`` flag)."""
    now = _version(t)
    if version is not None and now is not None:
        return now != version
    return bool(getattr(module, "inplace", False))


@contextmanager
def _intervention(model: nn.Module, site: str, units: Units, value: Any, what: str) -> Iterator[nn.Module]:
    """:func:`intervene`, with ``what`` naming the value in errors (``"alphas"`` for :func:`ace`)."""
    u = _units(units)
    # no `preserved` here: the user's code runs inside the block and keeps what it changes; only our hooks go
    handles = []
    try:
        if site == "input":
            first = _first_parameter(model)

            def pre(module, args, kwargs):
                if args:
                    return (_set(args[0], u, value, site, what), *args[1:]), kwargs
                if first is not None and first in kwargs:  # model(x=...): the same first input, by keyword
                    return args, {**kwargs, first: _set(kwargs[first], u, value, site, what)}
                raise TypeError(f"site='input' sets the model's first input (positional, or the keyword "
                                f"{first!r}); the model was called with neither (keywords {sorted(kwargs)})")

            handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            mod = _module(model, site)
            # a module that runs twice per forward (one nn.ReLU reused) would be set at every call: refused, as
            # collect() refuses to observe it; calls outside a forward of the model (the user calling the
            # submodule directly) are each intervened on
            state = {"in_forward": False, "calls": 0, "version": None}

            def enter(module, args):
                state["in_forward"], state["calls"] = True, 0

            def before(module, args):
                state["version"] = _version(args[0]) if args and isinstance(args[0], Tensor) else None

            def leave(module, args, output):
                state["in_forward"] = False

            def post(module, args, output):
                if state["in_forward"]:
                    state["calls"] += 1
                    if state["calls"] > 1:
                        raise ValueError(
                            f"module {site!r} ran more than once in one forward of the model (one module used at "
                            "several places): do() would set its units at every call; intervene on a module that "
                            "runs once per forward")
                new = _set(output, u, value, site, what)
                if (args and output is args[0] and isinstance(output, Tensor)
                        and _wrote(module, output, state["version"])):
                    # an in-place module (nn.ReLU(inplace=True)): the forward may go on with the tensor it wrote
                    # (self.act(h); return self.fc(h)), not with the returned one: the value goes into that tensor.
                    # (A module that hands its input back unchanged -- nn.Identity, an eval-mode Dropout, Flatten of
                    # a 2-D input -- did not write it: its output is a new tensor, and the input, which a skip path or
                    # the caller's data may hold, stays as it was)
                    if output.requires_grad and torch.is_grad_enabled():
                        raise ValueError(
                            f"site {site!r} is an in-place module on a tensor that requires grad: do() must write "
                            "into it, which autograd refuses; intervene under torch.no_grad(), or make the module "
                            "not in-place")
                    output.copy_(new.reshape(output.shape))
                    return output
                return new

            handles.append(mod.register_forward_pre_hook(before))
            handles.append(mod.register_forward_hook(post))
            handles.append(model.register_forward_pre_hook(enter))
            handles.append(model.register_forward_hook(leave, always_call=True))
        yield model
    finally:
        for h in handles:
            h.remove()


@contextmanager
def lesion(model: nn.Module, site: str, units: Units, value: float = 0.0) -> Iterator[nn.Module]:
    """Zero (or clamp to ``value``) the given hidden units while the block runs; see :func:`intervene`."""
    with intervene(model, site, units, value) as m:
        yield m


def _batches(n: int, size: int) -> list[slice]:
    if not is_int_at_least(size, 1):
        raise ValueError(f"batch_size must be a positive int, got {size!r}")
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _layer_names(layers: str | Sequence[str]) -> tuple[str, ...]:
    """Module paths to observe; one string is one path (not its letters). ``"output"`` names the model's output in
    every result, so a module of that path cannot be told apart from it."""
    names = (layers,) if isinstance(layers, str) else tuple(layers)
    if "output" in names:
        raise ValueError("'output' is the key of the model's output in the results; a module at the path 'output' "
                         "would share it. Observe a module inside it, or the model's output itself (always there)")
    return names


def collect(model: nn.Module, x: Tensor, layers: str | Sequence[str] = (), batch_size: int = 1024) -> dict[str, Tensor]:
    """Run ``model`` on ``x`` (eval mode, no grad) and return ``{layer: (N, units)} | {"output": (N, K)}``.

    Each layer's output is copied when its module returns (a later in-place operation, ``nn.ReLU(inplace=True)`` or
    ``out += identity``, does not change it). A module that runs more than once per forward (one ``nn.ReLU``
    reused at several places) is refused: its calls cannot be told apart. A model that returns a tuple or list
    (``(logits, aux)``) reports its first element as ``"output"``, as :func:`~relu_regions.affine_map` explains it.
    """
    layers = _layer_names(layers)
    if not isinstance(x, Tensor) or x.dim() == 0 or len(x) == 0:
        raise ValueError(f"x must be a non-empty batch of model inputs, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    mods = {name: _module(model, name, "layers") for name in layers}
    batches = _batches(len(x), batch_size)
    store: dict[str, list[Tensor]] = {name: [] for name in layers}
    store["output"] = []
    with preserved(model, eval_mode=True), torch.no_grad():
        handles = []
        try:
            def keep(name: str, out: Any) -> None:
                if not isinstance(out, Tensor):
                    raise TypeError(f"module {name!r} returns {type(out).__name__}, not a tensor; observe a module "
                                    "that returns one")
                store[name].append(out.detach().reshape(out.shape[0], -1).clone())

            for name, m in mods.items():
                handles.append(m.register_forward_hook(lambda mod, a, out, name=name: keep(name, out)))
            for i, sl in enumerate(batches):
                out = _output_tensor(model(x[sl]), "the model")
                store["output"].append(out.detach().reshape(out.shape[0], -1))
                for name in layers:
                    if len(store[name]) != i + 1:
                        raise ValueError(
                            f"module {name!r} ran {len(store[name]) - i} times in one forward of the model (0: not "
                            "on its path; more: one module used at several places), so its outputs cannot be told "
                            "apart; observe a module that runs once per forward")
        finally:
            for h in handles:
                h.remove()
    return {k: torch.cat(v) for k, v in store.items()}


@dataclass
class ACEResult:
    """Average causal effects of ``do(site[unit] = α)``.

    Attributes
    ----------
    alphas : Tensor
        ``(A,)`` intervention values.
    expectation : dict of str -> Tensor
        ``(A, units)`` Monte-Carlo estimate of ``E[y | do(α)]`` per observed layer and ``"output"``.
    effect : dict of str -> Tensor
        ``(A, units)`` ``ACE(α) = E[y | do(α)] − mean over the α grid`` (the baseline).
    n_samples : int
        Monte-Carlo samples per α (the estimate is exact when they are the whole data set).
    """

    site: str
    unit: int
    alphas: Tensor
    expectation: dict[str, Tensor]
    effect: dict[str, Tensor]
    n_samples: int

    def __repr__(self) -> str:
        return (f"ACEResult(site={self.site!r}, unit={self.unit}, {len(self.alphas)} values of α, layers "
                f"{list(self.effect)}: a Monte-Carlo estimate over {self.n_samples} samples, exact when they are the "
                "whole data set)")

    def heatmaps(self, layer: str = "output", shape: Sequence[int] | None = None) -> Tensor:
        """``(A, *shape)`` ACE of ``layer`` reshaped (e.g. to ``(28, 28)`` for image outputs)."""
        e = self.effect[layer]
        return e.reshape(len(self.alphas), *shape) if shape is not None else e

    def plot(self, layer: str = "output", shape: Sequence[int] = (28, 28), ax_width: float = 1.6):
        """Matplotlib figure: one heatmap per α on a shared symmetric colour scale."""
        import matplotlib.pyplot as plt

        maps = self.heatmaps(layer, shape).cpu().numpy()
        v = float(np.abs(maps).max()) or 1.0
        fig, axes = plt.subplots(1, len(maps), figsize=(ax_width * len(maps), ax_width + 0.4), squeeze=False)
        for ax, m, a in zip(axes[0], maps, self.alphas.tolist()):
            im = ax.imshow(m, cmap="RdBu_r", vmin=-v, vmax=v)
            ax.set_title(f"α={a:.2g}", fontsize=8)
            ax.axis("off")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
        fig.suptitle(f"ACE on {layer} of do({self.site}[{self.unit}] = α), {self.n_samples} MC samples", fontsize=9)
        return fig


def _unit_index(unit: Any) -> int:
    """One unit's flat index (a Python, numpy or 0-d tensor integer; not a bool)."""
    if isinstance(unit, (bool, np.bool_)) or (isinstance(unit, Tensor) and unit.dtype == torch.bool):
        raise TypeError(f"unit must be one integer index, got {unit!r}")
    try:
        index = operator.index(unit)
    except TypeError:
        raise TypeError(f"unit must be one integer index, got {unit!r}") from None
    if index < 0:
        raise ValueError(f"unit index {index} is negative; units are flat indices 0 .. n_units - 1")
    return index


def _draw(data: Tensor, n_samples: int | None, seed: int) -> Tensor:
    if n_samples is None or n_samples >= len(data):
        return data
    gen = torch.Generator().manual_seed(seed)
    return data[torch.randperm(len(data), generator=gen)[:n_samples].to(data.device)]


def ace(model: nn.Module, data: Tensor, site: str, unit: int, alphas: Sequence[float] | Tensor,
        observe: Sequence[str] = (), n_samples: int | None = 256, seed: int = 0,
        batch_size: int = 1024, progress: bool = False) -> ACEResult:
    """Average causal effect of ``do(site[unit] = α)`` on the observed hidden layers and the output.

    Parameters
    ----------
    model : nn.Module
    data : Tensor
        ``(N, ...)`` model inputs; the Monte-Carlo distribution of the other inputs (and, for a hidden site,
        of everything upstream).
    site, unit
        What is intervened on (see :func:`intervene`).
    alphas : sequence of float
        The intervention grid (finite values; integral ones at an integer site); the baseline is the mean of
        ``E[y | do(α)]`` over it.
    observe : sequence of str
        Module paths whose outputs are hidden units to report (``"output"`` is always reported).
    n_samples : int or None
        Monte-Carlo samples drawn without replacement from ``data`` (``None``: all of it, exact expectation).
    seed : int
        Seed of that draw (a private generator: the global random state is left alone); the same samples are used
        for every ``α``.
    batch_size : int
        Samples per forward pass of the model.
    progress : bool
        Show a progress bar over ``alphas`` (tqdm).
    """
    unit = _unit_index(unit)
    if n_samples is not None and not is_int_at_least(n_samples, 1):
        raise ValueError(f"n_samples must be None or a positive int, got {n_samples!r}")
    observe = _layer_names(observe)
    for name in observe:
        _module(model, name, "observe")
    alphas = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    if alphas.numel() < 2:
        raise ValueError("alphas needs at least two values (the baseline is their mean)")
    # one nan or inf would make the baseline, and so every effect, NaN
    check_finite(alphas, "alphas", "the baseline is the mean over the grid; give finite intervention values")
    xs = _draw(data, n_samples, seed)
    sums: dict[str, list[Tensor]] = {}
    it = alphas.tolist()
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"ACE do({site}[{unit}])")
    for a in it:
        with _intervention(model, site, unit, a, "alphas value"):
            res = collect(model, xs, observe, batch_size)
        for k, v in res.items():
            sums.setdefault(k, []).append(v.double().mean(0))
    expectation = {k: torch.stack(v) for k, v in sums.items()}
    effect = {k: v - v.mean(0, keepdim=True) for k, v in expectation.items()}
    return ACEResult(site, unit, alphas, expectation, effect, len(xs))


def ace_profiles(model: nn.Module, data: Tensor, site: str, units: Sequence[int], alphas: Sequence[float],
                 layer: str, n_samples: int | None = 256, seed: int = 0, progress: bool = False) -> Tensor:
    """``(n_hidden_units, len(units) * A)``: each hidden unit's ACE curves for each intervened unit.

    ``progress`` shows a progress bar over ``units`` (tqdm): one :func:`ace` per unit, ``A`` interventions each
    (120 LeNet units at 10 values: ~13 s on a 2-core CPU)."""
    units = list(units)
    it = units
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(units, desc=f"ACE profiles do({site}[...])")
    parts = [ace(model, data, site, u, alphas, [layer], n_samples, seed).effect[layer].T for u in it]
    return torch.cat(parts, 1)


def activation_profiles(model: nn.Module, data: Tensor, layer: str, batch_size: int = 1024) -> Tensor:
    """``(n_units, N)``: each hidden unit's activations over the data."""
    _module(model, layer, "layer")
    return collect(model, data, [layer], batch_size)[layer].T.double()


@dataclass
class UnitClusters:
    """A clustering of hidden units.

    Attributes
    ----------
    labels : np.ndarray
        ``(n_units,)`` cluster of each unit; ``-1`` for constant (dead) units, whose rank correlation is undefined.
    similarity : np.ndarray
        ``(n_units, n_units)`` Spearman correlation of the profiles (NaN for dead units).
    method : str
    """

    labels: np.ndarray
    similarity: np.ndarray
    method: str

    @property
    def n_clusters(self) -> int:
        return len(set(self.labels.tolist()) - {-1})

    def groups(self) -> dict[int, list[int]]:
        """``{cluster: [unit indices]}`` (dead units under ``-1``)."""
        out: dict[int, list[int]] = {}
        for i, lab in enumerate(self.labels.tolist()):
            out.setdefault(lab, []).append(i)
        return dict(sorted(out.items()))


def _spearman(profiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.stats import rankdata

    ranks = rankdata(profiles, axis=1)
    ranks = ranks - ranks.mean(1, keepdims=True)
    norm = np.linalg.norm(ranks, axis=1)
    live = norm > 0
    sim = np.full((len(profiles), len(profiles)), np.nan)
    r = ranks[live] / norm[live, None]
    sim[np.ix_(live, live)] = np.clip(r @ r.T, -1.0, 1.0)
    return sim, live


def cluster_units(profiles: Tensor | np.ndarray, method: str = "affinity", n_clusters: int | None = None,
                  preference: float | None = None, random_state: int = 0) -> UnitClusters:
    """Cluster units by their profiles (rows).

    Parameters
    ----------
    profiles : array ``(n_units, n_features)``
        From :func:`activation_profiles` or :func:`ace_profiles`.
    method : {"affinity", "kmeans"}
        Affinity propagation on the Spearman similarity (the number of clusters is found; ``preference`` as in
        scikit-learn, default the median similarity) or k-means with ``n_clusters`` on the rank-standardised
        profiles (so both see the same, monotone-invariant information); at most as many clusters as live units
        (dead units, whose profile is constant, get the label -1).
    n_clusters : int, optional
        Number of clusters for ``method="kmeans"`` (required there; capped at the number of live units); unused by
        ``"affinity"``.
    preference : float, optional
        Affinity propagation's preference of every unit to be an exemplar (lower: fewer clusters); default the
        median similarity. Unused by ``"kmeans"``.
    random_state : int
        Seed of scikit-learn's affinity propagation or k-means.
    """
    from sklearn.cluster import AffinityPropagation, KMeans

    p = profiles.detach().cpu().double().numpy() if isinstance(profiles, Tensor) else np.asarray(profiles, float)
    if p.ndim != 2:
        raise ValueError(f"profiles must be 2-D (units, features); got shape {p.shape}")
    bad = int((~np.isfinite(p)).sum())
    if bad:  # (a NaN row has no ranks: it would be labelled -1, "dead", without a word)
        raise ValueError(f"profiles hold {bad} non-finite value(s) (nan or inf)")
    sim, live = _spearman(p)
    labels = np.full(len(p), -1, dtype=np.int64)
    n_live = int(live.sum())
    if n_live == 0:
        return UnitClusters(labels, sim, method)
    s = sim[np.ix_(live, live)]
    if method == "affinity":
        if n_live == 1:
            labels[live] = 0
        else:
            ap = AffinityPropagation(affinity="precomputed", preference=preference, random_state=random_state,
                                     max_iter=1000, convergence_iter=50)
            labels[live] = ap.fit_predict(s)
    elif method == "kmeans":
        if not is_int_at_least(n_clusters, 1):
            raise ValueError(f"method='kmeans' needs n_clusters, a positive int; got {n_clusters!r}")
        from scipy.stats import rankdata

        r = rankdata(p[live], axis=1)
        r = r - r.mean(1, keepdims=True)
        r /= np.linalg.norm(r, axis=1, keepdims=True)
        labels[live] = KMeans(min(n_clusters, n_live), n_init=10, random_state=random_state).fit_predict(r)
    else:
        raise ValueError(f"method must be 'affinity' or 'kmeans', got {method!r}")
    return UnitClusters(labels, sim, method)


def cluster_importance(clusters: UnitClusters, unit_scores: Tensor | np.ndarray):
    """DataFrame of clusters ranked by the mean of ``unit_scores`` (e.g. mean |ACE| per unit), largest first."""
    import pandas as pd

    s = np.asarray(unit_scores.detach().cpu() if isinstance(unit_scores, Tensor) else unit_scores, float)
    if s.shape != clusters.labels.shape:
        raise ValueError(f"unit_scores must hold one score per clustered unit, shape {clusters.labels.shape}; got "
                         f"{s.shape}")
    rows = [{"cluster": c, "n_units": len(u), "importance": float(s[u].mean()), "units": u}
            for c, u in clusters.groups().items()]
    return pd.DataFrame(rows).sort_values("importance", ascending=False).reset_index(drop=True)


def cluster_intersection(a: UnitClusters, b: UnitClusters):
    """Contingency table (pandas) of two clusterings of the same units: rows ``a``, columns ``b``."""
    import pandas as pd

    if len(a.labels) != len(b.labels):
        raise ValueError(f"clusterings cover {len(a.labels)} and {len(b.labels)} units")
    return pd.crosstab(pd.Series(a.labels, name=a.method), pd.Series(b.labels, name=b.method))


def _metric(metric: str | Callable, output: Tensor, target: Tensor | None) -> float:
    if callable(metric):
        return float(metric(output, target))
    if metric not in ("accuracy", "mse"):
        raise ValueError(f"metric must be 'accuracy', 'mse' or a callable, got {metric!r}")
    if target is None:
        raise ValueError(f"metric {metric!r} needs a target")
    target = torch.as_tensor(target).to(output.device)
    n = len(output)
    if metric == "accuracy":
        if not is_integer_tensor(target):  # float labels would never equal a class index: accuracy 0, silently
            raise TypeError(f"metric 'accuracy' needs target to hold class indices (an integer tensor), got dtype "
                            f"{target.dtype}: pass integer labels (.long()), or use metric='mse' or a callable")
        if target.numel() != n:  # (N, 1) labels against (N,) predictions broadcast to (N, N)
            raise ValueError(f"metric 'accuracy' needs one label per sample ({n}); target has shape "
                             f"{tuple(target.shape)}")
        k = output[0].numel() if n else 0
        classes = 2 if k == 1 else k  # one output: a binary logit, classes 0 / 1
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= classes:
            how = "a single output is read as a binary logit (class 1 where it is > 0)" if k == 1 else \
                f"the model has {k} outputs"
            raise ValueError(f"metric 'accuracy' needs target to hold class indices in [0, {classes}) ({how}); got "
                             f"{lo}..{hi}")
        return float((_decisions(output) == target.reshape(-1)).double().mean())
    # one target per sample, of the output's per-sample size: (N, 1, 28, 28) images for an (N, 784) reconstruction
    # are fine, a transposed (K, N) target (same element count) is not
    if target.dim() == 0 or target.shape[0] != n or target.numel() != output.numel():
        raise ValueError(f"metric 'mse' needs target to hold one reference output per sample: shape (N={n}, ...) "
                         f"with {output[0].numel() if n else 0} values per sample, like the output "
                         f"{tuple(output.shape)}; got {tuple(target.shape)}")
    return float(((output - target.reshape(output.shape).to(output)) ** 2).double().mean())


def _group_units(groups: Mapping[Any, Units] | UnitClusters) -> dict[Any, tuple[Units, int]]:
    """name -> (units, how many units they select), checked before anything runs."""
    if isinstance(groups, UnitClusters):
        groups = {f"cluster {c}": u for c, u in groups.groups().items()}
    if not isinstance(groups, Mapping):
        raise TypeError(f"groups must be a mapping name -> unit indices (e.g. {{'a': [0, 1], 'b': [2]}}) or "
                        f"UnitClusters, got {type(groups).__name__}; for a list of groups pass "
                        "dict(enumerate(groups))")
    out = {}
    for name, units in groups.items():
        u = _units(units)
        out[name] = (units, int(u.sum()) if u.dtype == torch.bool else int(u.unique().numel()))
    return out


def lesion_table(model: nn.Module, data: Tensor, site: str, groups: Mapping[Any, Sequence[int]] | UnitClusters,
                 target: Tensor | None = None, metric: str | Callable = "accuracy", batch_size: int = 1024):
    """Effect of zeroing each unit group at ``site`` on the outputs and on a metric.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode without gradients; its training flag is restored afterwards.
    data : Tensor
        ``(N, ...)`` model inputs the outputs and the metric are computed on.
    site : str
        ``"input"`` or the module path whose output holds the units (see :func:`intervene`).
    groups : mapping name -> unit indices, or UnitClusters (each cluster, dead units included as ``-1``)
    target : Tensor, optional
        ``(N,)`` integer class labels for ``"accuracy"``, or ``(N, ...)`` reference outputs for ``"mse"`` of the
        output's per-sample size (e.g. the input images for an autoencoder's reconstruction error).
    metric : "accuracy", "mse" or callable(output, target) -> float
        ``"accuracy"`` compares the predicted class, the argmax over each sample's outputs, with the labels; a
        model with a single output (a binary classifier's logit) predicts class 1 where that output is > 0.
        A callable gets the output in the model's own shape (the first element of a tuple output).
    batch_size : int
        Samples per forward pass of the model.

    Returns
    -------
    pandas.DataFrame
        One row for the intact model and one per group: units, metric, change vs intact, mean |Δoutput|,
        share of changed predicted classes, ``changed_argmax`` (with ``metric="accuracy"``; the sign of a single
        logit, as for the accuracy).
    """
    import pandas as pd

    groups = _group_units(groups)
    intact = collect(model, data, (), batch_size)["output"]
    base = _metric(metric, intact.reshape(len(data), *_out_shape(model, data)), target)
    rows = [{"lesion": "none", "units": 0, "metric": base, "change": 0.0, "mean_abs_output_change": 0.0,
             "changed_argmax": 0.0}]
    for name, (units, n_units) in groups.items():
        with lesion(model, site, units):
            out = collect(model, data, (), batch_size)["output"]
        m = _metric(metric, out.reshape(len(data), *_out_shape(model, data)), target)
        rows.append({"lesion": str(name), "units": n_units, "metric": m, "change": m - base,
                     "mean_abs_output_change": float((out - intact).abs().double().mean()),
                     "changed_argmax": float((_decisions(out) != _decisions(intact)).double().mean())})
    df = pd.DataFrame(rows)
    if metric != "accuracy":  # argmax changes only mean something for classifiers
        df = df.drop(columns="changed_argmax")
    return df


def _out_shape(model: nn.Module, data: Tensor) -> tuple[int, ...]:
    with preserved(model, eval_mode=True), torch.no_grad():
        return tuple(_output_tensor(model(data[:1]), "the model").shape[1:])


def lesion_grid(model: nn.Module, x: Tensor, site: str, groups: Mapping[Any, Sequence[int]] | UnitClusters,
                image_shape: Sequence[int] = (28, 28), cell: float = 1.1):
    """Image grid (matplotlib figure) for image-output models: rows = samples, columns = intact + each lesion."""
    import matplotlib.pyplot as plt

    groups = _group_units(groups)
    cols = [("intact", collect(model, x)["output"])]
    for name, (units, n_units) in groups.items():
        with lesion(model, site, units):
            cols.append((f"{name}\n({n_units} units)", collect(model, x)["output"]))
    fig, axes = plt.subplots(len(x), len(cols), figsize=(cell * len(cols), cell * len(x)), squeeze=False)
    for j, (title, out) in enumerate(cols):
        for i in range(len(x)):
            ax = axes[i, j]
            ax.imshow(out[i].reshape(*image_shape).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
    return fig
