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

import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import is_int_at_least, is_integer_tensor
from .state import preserved

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


def _module(model: nn.Module, site: str) -> nn.Module:
    try:
        return model.get_submodule(site)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"site {site!r} is not a module path of the model; choose 'input' or one of "
                         f"{names[:20]}{' ...' if len(names) > 20 else ''}") from None


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


def _set(t: Tensor, units: Tensor, value: Any, site: str) -> Tensor:
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
    v = torch.as_tensor(value, dtype=flat.dtype, device=flat.device)
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
        ``"input"`` for the model's (first positional) input, or a module path whose output holds the units
        (e.g. ``"decoder.3"`` for the ReLU of a hidden layer).
    units : int, sequence of int or Tensor
        Flat indices (0 .. n_units - 1) into the per-sample tensor at the site, or a bool mask over its n_units.
    value : float or Tensor
        The value set: a scalar, ``(units,)`` one value per unit, or ``(N, 1)`` / ``(N, units)`` per sample of
        the batch the model is called with.
    """
    u = _units(units)
    # no `preserved` here: the user's code runs inside the block and keeps what it changes; only our hook goes
    if site == "input":
        def pre(module, args):
            return (_set(args[0], u, value, site), *args[1:])

        handle = model.register_forward_pre_hook(pre)
    else:
        mod = _module(model, site)

        def post(module, args, output):
            if not isinstance(output, Tensor):
                raise TypeError(f"site {site!r} returns {type(output).__name__}, not a tensor")
            return _set(output, u, value, site)

        handle = mod.register_forward_hook(post)
    try:
        yield model
    finally:
        handle.remove()


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
    reused at several places) is refused: its calls cannot be told apart.
    """
    layers = _layer_names(layers)
    if not isinstance(x, Tensor) or x.dim() == 0 or len(x) == 0:
        raise ValueError(f"x must be a non-empty batch of model inputs, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    mods = {name: _module(model, name) for name in layers}
    batches = _batches(len(x), batch_size)
    store: dict[str, list[Tensor]] = {name: [] for name in layers}
    store["output"] = []
    with preserved(model, eval_mode=True), torch.no_grad():
        handles = []
        try:
            for name, m in mods.items():
                handles.append(m.register_forward_hook(
                    lambda mod, a, out, name=name: store[name].append(out.detach().reshape(out.shape[0], -1).clone())))
            for i, sl in enumerate(batches):
                out = model(x[sl])
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
        The intervention grid; the baseline is the mean of ``E[y | do(α)]`` over it.
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
    alphas = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    if alphas.numel() < 2:
        raise ValueError("alphas needs at least two values (the baseline is their mean)")
    xs = _draw(data, n_samples, seed)
    sums: dict[str, list[Tensor]] = {}
    it = alphas.tolist()
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"ACE do({site}[{unit}])")
    for a in it:
        with intervene(model, site, unit, a):
            res = collect(model, xs, observe, batch_size)
        for k, v in res.items():
            sums.setdefault(k, []).append(v.double().mean(0))
    expectation = {k: torch.stack(v) for k, v in sums.items()}
    effect = {k: v - v.mean(0, keepdim=True) for k, v in expectation.items()}
    return ACEResult(site, unit, alphas, expectation, effect, len(xs))


def ace_profiles(model: nn.Module, data: Tensor, site: str, units: Sequence[int], alphas: Sequence[float],
                 layer: str, n_samples: int | None = 256, seed: int = 0) -> Tensor:
    """``(n_hidden_units, len(units) * A)``: each hidden unit's ACE curves for each intervened unit."""
    parts = [ace(model, data, site, u, alphas, [layer], n_samples, seed).effect[layer].T for u in units]
    return torch.cat(parts, 1)


def activation_profiles(model: nn.Module, data: Tensor, layer: str, batch_size: int = 1024) -> Tensor:
    """``(n_units, N)``: each hidden unit's activations over the data."""
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
        if target.numel() != n:  # (N, 1) labels against (N,) predictions broadcast to (N, N)
            raise ValueError(f"metric 'accuracy' needs one label per sample ({n}); target has shape "
                             f"{tuple(target.shape)}")
        return float((output.reshape(n, -1).argmax(1) == target.reshape(-1)).double().mean())
    if target.numel() != output.numel():
        raise ValueError(f"metric 'mse' needs a target of the output's shape {tuple(output.shape)}; got "
                         f"{tuple(target.shape)}")
    return float(((output - target.reshape(output.shape).to(output)) ** 2).double().mean())


def _group_units(groups: Mapping[Any, Units] | UnitClusters) -> dict[Any, tuple[Units, int]]:
    """name -> (units, how many units they select), checked before anything runs."""
    if isinstance(groups, UnitClusters):
        groups = {f"cluster {c}": u for c, u in groups.groups().items()}
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
        Labels for ``"accuracy"`` or reference outputs for ``"mse"`` (e.g. the input images for an
        autoencoder's reconstruction error).
    metric : "accuracy", "mse" or callable(output, target) -> float
    batch_size : int
        Samples per forward pass of the model.

    Returns
    -------
    pandas.DataFrame
        One row for the intact model and one per group: units, metric, change vs intact, mean |Δoutput|,
        share of changed argmax predictions (with ``metric="accuracy"``).
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
                     "changed_argmax": float((out.argmax(1) != intact.argmax(1)).double().mean())})
    df = pd.DataFrame(rows)
    if metric != "accuracy":  # argmax changes only mean something for classifiers
        df = df.drop(columns="changed_argmax")
    return df


def _out_shape(model: nn.Module, data: Tensor) -> tuple[int, ...]:
    with preserved(model, eval_mode=True), torch.no_grad():
        return tuple(model(data[:1]).shape[1:])


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
