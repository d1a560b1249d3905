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

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import is_int_at_least
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
    if t.is_floating_point() or t.is_complex():
        # .long() would truncate 2.7 to unit 2
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
    if v.dim() == 1 and v.numel() == flat.shape[0] and units.numel() != flat.shape[0]:
        v = v[:, None]  # one value per sample
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
        The value set (a scalar, one value per unit, or one value per sample).
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


def collect(model: nn.Module, x: Tensor, layers: Sequence[str] = (), batch_size: int = 1024) -> dict[str, Tensor]:
    """Run ``model`` on ``x`` (eval mode, no grad) and return ``{layer: (N, units)} | {"output": (N, K)}``."""
    mods = {name: _module(model, name) for name in layers}
    batches = _batches(len(x), batch_size)
    store: dict[str, list[Tensor]] = {name: [] for name in layers}
    store["output"] = []
    with preserved(model, eval_mode=True), torch.no_grad():
        handles = []
        try:
            for name, m in mods.items():
                handles.append(m.register_forward_hook(
                    lambda mod, a, out, name=name: store[name].append(out.detach().reshape(out.shape[0], -1))))
            for sl in batches:
                out = model(x[sl])
                store["output"].append(out.detach().reshape(out.shape[0], -1))
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


def _draw(data: Tensor, n_samples: int | None, seed: int) -> Tensor:
    if n_samples is None or n_samples >= len(data):
        return data
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
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
    """
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
    return ACEResult(site, int(unit), alphas, expectation, effect, len(xs))


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
    """
    from sklearn.cluster import AffinityPropagation, KMeans

    p = profiles.detach().cpu().double().numpy() if isinstance(profiles, Tensor) else np.asarray(profiles, float)
    if p.ndim != 2:
        raise ValueError(f"profiles must be 2-D (units, features); got shape {p.shape}")
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
    if target is None:
        raise ValueError(f"metric {metric!r} needs a target")
    if metric == "accuracy":
        return float((output.reshape(len(output), -1).argmax(1) == target.to(output.device)).double().mean())
    if metric == "mse":
        return float(((output - target.to(output)) ** 2).double().mean())
    raise ValueError(f"metric must be 'accuracy', 'mse' or a callable, got {metric!r}")


def lesion_table(model: nn.Module, data: Tensor, site: str, groups: Mapping[Any, Sequence[int]] | UnitClusters,
                 target: Tensor | None = None, metric: str | Callable = "accuracy", batch_size: int = 1024):
    """Effect of zeroing each unit group at ``site`` on the outputs and on a metric.

    Parameters
    ----------
    groups : mapping name -> unit indices, or UnitClusters (each cluster, dead units included as ``-1``)
    target : Tensor, optional
        Labels for ``"accuracy"`` or reference outputs for ``"mse"`` (e.g. the input images for an
        autoencoder's reconstruction error).
    metric : "accuracy", "mse" or callable(output, target) -> float

    Returns
    -------
    pandas.DataFrame
        One row for the intact model and one per group: units, metric, change vs intact, mean |Δoutput|,
        share of changed argmax predictions (with ``metric="accuracy"``).
    """
    import pandas as pd

    if isinstance(groups, UnitClusters):
        groups = {f"cluster {c}": u for c, u in groups.groups().items()}
    intact = collect(model, data, (), batch_size)["output"]
    base = _metric(metric, intact.reshape(len(data), *_out_shape(model, data)), target)
    rows = [{"lesion": "none", "units": 0, "metric": base, "change": 0.0, "mean_abs_output_change": 0.0,
             "changed_argmax": 0.0}]
    for name, units in groups.items():
        with lesion(model, site, units):
            out = collect(model, data, (), batch_size)["output"]
        m = _metric(metric, out.reshape(len(data), *_out_shape(model, data)), target)
        rows.append({"lesion": str(name), "units": len(units), "metric": m, "change": m - base,
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

    if isinstance(groups, UnitClusters):
        groups = {f"cluster {c}": u for c, u in groups.groups().items()}
    cols = [("intact", collect(model, x)["output"])]
    for name, units in groups.items():
        with lesion(model, site, units):
            cols.append((f"{name}\n({len(units)} units)", collect(model, x)["output"]))
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
