"""Plots of regions and explanations (matplotlib; plotly only for the Sankey, imported on first use).

Every function returns the figure and draws on ``ax`` when given; nothing is shown or saved implicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .recording import library_call
from .regions import DEFAULT, RegionStats, largest_first

Tensor = torch.Tensor


def _axes(ax, figsize=(7, 4)):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    return ax.figure, ax


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_top(top: Any) -> None:
    # (top=-1 drew all regions but the last one, top=0 an empty plot, top=2.5 a TypeError deep in numpy)
    if not _is_int(top) or top < 1:
        raise ValueError(f"top must be a positive int (how many to show), got {top!r}")


def region_sizes(stats: RegionStats, granularity: str = DEFAULT, top: int = 30,
                 class_names: Sequence[str] | None = None, ax=None):
    """Stacked bars of the ``top`` largest regions' sizes, coloured by true class (Re3 Fig. 2a)."""
    _check_top(top)
    hist = _np(stats.class_histograms(granularity))
    if class_names is not None and len(class_names) != hist.shape[1]:
        raise ValueError(f"class_names has {len(class_names)} names for {hist.shape[1]} classes")
    fig, ax = _axes(ax)
    order = largest_first(stats.sizes(granularity), stats.region_keys(granularity))[:top]
    bottom = np.zeros(len(order))
    for c in range(hist.shape[1]):
        label = class_names[c] if class_names is not None else f"class {c}"
        ax.bar(np.arange(len(order)), hist[order, c], bottom=bottom, label=label)
        bottom += hist[order, c]
    ax.set_xlabel(f"region (largest {len(order)} of {hist.shape[0]})")
    ax.set_ylabel("samples")
    ax.set_title("Region sizes by true class")
    ax.legend(fontsize="small")
    return fig


def importance_heatmap(stats: RegionStats, cls: int = 0, top: int = 20,
                       feature_names: Sequence[str] | None = None, ax=None):
    """Heatmap of the mean contribution ``A_r[cls] ⊙ x`` per region (rows) and feature (Re3 Fig. 2b)."""
    _check_top(top)
    contrib = _np(stats.mean_contributions())
    if isinstance(cls, bool) or not isinstance(cls, (int, np.integer)) or not 0 <= cls < contrib.shape[1]:
        # (a class past the last was shown as the last one, under the asked class's title)
        raise ValueError(f"cls must be a class index in [0, {contrib.shape[1]}), got {cls!r}")
    fig, ax = _axes(ax, (8, 5))
    mc = contrib[:, cls]
    order = largest_first(stats.sizes(), stats.region_keys())[:top]
    m = mc[order]
    lim = float(np.abs(m).max()) or 1.0
    im = ax.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_ylabel("region (by size)")
    if feature_names is not None:
        ax.set_xticks(range(len(feature_names)))
        ax.set_xticklabels(feature_names, rotation=60, ha="right", fontsize="small")
    ax.set_title(f"Mean contribution to class {cls} per region")
    fig.colorbar(im, ax=ax)
    return fig


def validity(distances: Tensor | dict[str, Tensor], ax=None):
    """Validity curve(s) (share of explanations valid at every ε) and a violin plot of distances (Re3 Fig. 3)."""
    import matplotlib.pyplot as plt

    from .geometry import validity_curve, validity_epsilons

    groups = distances if isinstance(distances, dict) else {"distance": distances}
    if ax is None:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    else:
        a1, a2 = ax
        fig = a1.figure
    for name, d in groups.items():
        e, v = validity_curve(d)
        eps = validity_epsilons(d)
        a1.plot(_np(e), _np(v), label=f"{name} (ε90={eps['eps90']:.3g})")
    for lv in (0.9, 0.75, 0.5):
        a1.axhline(lv, color="grey", lw=0.5, ls=":")
    a1.set_xlabel("ε")
    a1.set_ylabel("share valid")
    a1.legend(fontsize="small")
    data = [_np(d)[np.isfinite(_np(d))] for d in groups.values()]
    a2.violinplot(data, showmedians=True)
    a2.set_xticks(range(1, len(groups) + 1))
    a2.set_xticklabels(list(groups))
    a2.set_ylabel("distance to region boundary")
    return fig


def cluster_importance(stats: RegionStats, feature_names: Sequence[str] | None = None, top: int = 4,
                       output: int = -1, ax=None):
    """Bars of the mean effective weights (feature importance) of the ``top`` largest clusters.

    ``output`` indexes the model's outputs as Python does (default -1: the last one).
    """
    _check_top(top)
    w = _np(stats.mean_weights())
    n_out = w.shape[1]
    if not _is_int(output) or not -n_out <= output < n_out:
        # (an index past the last output was a bare IndexError from numpy, after an empty figure was made)
        raise ValueError(f"output must be an output index in [-{n_out}, {n_out}) (-1: the last), got {output!r}")
    fig, ax = _axes(ax, (8, 4))
    w = w[:, output]
    sizes = _np(stats.sizes())
    order = largest_first(stats.sizes(), stats.region_keys())[:top]
    n_f = w.shape[1]
    width = 0.8 / max(1, len(order))
    for j, r in enumerate(order):
        ax.bar(np.arange(n_f) + j * width, w[r], width, label=f"cluster {j} (n={sizes[r]})")
    ax.set_xticks(np.arange(n_f) + 0.4 - width / 2)
    ax.set_xticklabels(feature_names if feature_names is not None else [str(i) for i in range(n_f)],
                       rotation=45, ha="right", fontsize="small")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("mean effective weight")
    ax.legend(fontsize="small")
    return fig


def _first_unit_output(model, x: Tensor, logits_at: str | None) -> tuple[Tensor, Tensor]:
    """The first piecewise-linear call of ``model`` at the one sample ``x``: the output ``a`` of each of its units
    (``unit_shape``) and the Jacobian ``∂a/∂x`` (``(*unit_shape, n_inputs)``), exact in the region.

    The output is read from the pre-activations ``z`` and the recorded state, per kind: ReLU ``max(z, 0)``,
    leaky ReLU / PReLU ``z`` or ``slope·z``, clamp (ReLU6, Hardtanh, clamp) ``z`` between its bounds or the bound
    it is saturated at, max-pool the window's maximum.
    """
    from .affine import preactivation_maps
    from .recording import run_recorded
    from .state import preserved

    with preserved(model, eval_mode=True), torch.no_grad():
        _, patterns = run_recorded(model, x, logits_at=logits_at)
    if not patterns:
        raise ValueError("pathway_flows needs a piecewise-linear unit (ReLU, clamp, max-pool, ...) in the model; "
                         "this one is affine, its pathway is the affine map itself (relu_regions.affine_map)")
    p = patterns[0]
    lm = next(iter(preactivation_maps(model, x, layers=0, logits_at=logits_at).values()))  # the same call as p
    n_in = int(x[0].numel())
    z = lm.value[0]  # (*in_shape)
    jac = lm.jacobian[0].reshape(*z.shape, n_in)
    state = p.state[0]
    if p.kind == "maxpool":  # the window's maximum: the input at the recorded argmax (as the frozen call gathers)
        d = p.params["dims"]
        idx = state.flatten(-d)  # (..., windows)
        a = z.flatten(-d).gather(-1, idx).reshape(state.shape)
        j = jac.flatten(-d - 1, -2).gather(-2, idx.unsqueeze(-1).expand(*idx.shape, n_in))
        return a, j.reshape(*state.shape, n_in)
    if p.kind == "relu":
        slope = state.to(z.dtype)
        const = torch.zeros_like(z)
    elif p.kind == "leaky_relu":
        slope = torch.where(state, torch.ones_like(z), torch.full_like(z, p.params["slope"]))
        const = torch.zeros_like(z)
    elif p.kind == "prelu":
        owner = p.name.split("#")[0]
        mod = dict(model.named_modules()).get(owner)
        if not isinstance(mod, torch.nn.PReLU):  # F.prelu(x, w) in a forward: its weight is not recorded
            raise NotImplementedError(
                f"pathway_flows reads a PReLU's slopes from its nn.PReLU module; the first piecewise-linear call "
                f"'{p.name}' is a functional prelu, whose weight it cannot find: use nn.PReLU there")
        w = mod.weight.detach().to(z.dtype)
        w = w.reshape(-1, *([1] * (z.dim() - 1))) if w.numel() > 1 else w.reshape(())
        slope = torch.where(state, torch.ones_like(z), w.expand_as(z))
        const = torch.zeros_like(z)
    elif p.kind == "clamp":
        lo, hi = p.params["lo"], p.params["hi"]
        slope = (state == 1).to(z.dtype)  # saturated units are constant in the region
        const = torch.zeros_like(z)
        if lo is not None:
            const = torch.where(state == 0, torch.full_like(z, lo), const)
        if hi is not None:
            const = torch.where(state == 2, torch.full_like(z, hi), const)
    else:  # pragma: no cover - a new unit kind must say what its activation is
        raise NotImplementedError(f"pathway_flows does not know the activation of a '{p.kind}' unit ('{p.name}')")
    return slope * z + const, slope.unsqueeze(-1) * jac


@library_call
def pathway_flows(model, x: Tensor, target: int | None = None, feature_names: Sequence[str] | None = None,
                  top: int = 8, *, logits_at: str | None = None) -> dict[str, Any]:
    """Flows of one sample's decision pathway: input feature → unit of the first recorded layer → class.

    ``a_u`` is the unit's output (its activation) as the model computes it: ``max(z, 0)`` for a ReLU,
    ``min(max(z, lo), hi)`` for ReLU6 / Hardtanh / clamp, ``z`` or ``slope·z`` for a leaky ReLU / PReLU, the window's
    maximum for a max-pool. Input→unit links are ``|∂a_u/∂x_i · x_i|`` (exact in the region: zero for a saturated
    clamp unit, which is constant there); unit→class links are the size ``|a_u|`` (a size, not a signed
    contribution). Convolutional layers are aggregated per channel (sums over positions); the ``top`` units with
    the largest ``|a_u|`` are kept, units whose output is 0 never. Returns nodes and links (used by :func:`sankey`).
    ``logits_at`` names the module whose output are the logits (a model ending in softmax), as in
    :func:`relu_regions.affine_map`; the predicted class is read there when ``target`` is None.
    """
    from .affine import affine_map
    from .training import _decisions

    if x.dim() < 2 or x.shape[0] != 1:
        raise ValueError(f"x must be one sample with a batch dimension, got shape {tuple(x.shape)}")
    _check_top(top)
    out = affine_map(model, x, logits_at=logits_at).output[0]
    if isinstance(target, Tensor) and target.numel() == 1 and not (target.is_floating_point() or target.is_complex()
                                                                   or target.dtype == torch.bool):
        target = int(target.item())
    # a single output is a binary classifier's logit: class 1 where it is > 0 (as evaluate and RegionMonitor read it)
    n_classes = 2 if out.numel() == 1 else out.numel()
    if target is None:
        c = int(_decisions(out[None])[0])
    elif _is_int(target) and 0 <= target < n_classes:
        c = int(target)
    else:  # (before, any value only named the last node "class <target>", the flows being the same)
        raise ValueError(f"target must be a class index in [0, {n_classes}) or None (the predicted class), "
                         f"got {target!r}")
    # (before: every kind was read as a ReLU, clamp(z, min=0): a ReLU6 unit saturated at 6 counted as z)
    act, jac = _first_unit_output(model, x, logits_at)
    unit_shape = act.shape
    n_in = int(x[0].numel())
    contrib_in = (jac * x.reshape(-1)).abs()  # (*units, inputs)
    size = act.abs()
    if len(unit_shape) > 1:  # conv: aggregate per channel
        contrib_in = contrib_in.reshape(unit_shape[0], -1, n_in).sum(1)
        unit_val = size.reshape(unit_shape[0], -1).sum(1)
        unit_names = [f"channel {k}" for k in range(unit_shape[0])]
    else:
        unit_val = size
        unit_names = [f"unit {k}" for k in range(unit_shape[0])]
    keep_units = torch.argsort(unit_val, descending=True)[:top]
    keep_units = keep_units[unit_val[keep_units] > 0]
    in_tot = contrib_in[keep_units].sum(0)
    keep_in = torch.argsort(in_tot, descending=True)[:top]
    fnames = list(feature_names) if feature_names is not None else [f"x{i}" for i in range(n_in)]
    nodes = [fnames[int(i)] for i in keep_in] + [unit_names[int(u)] for u in keep_units] + [f"class {c}"]
    src, dst, val = [], [], []
    for a, i in enumerate(keep_in):
        for b, u in enumerate(keep_units):
            v = float(contrib_in[u, i])
            if v > 0:
                src.append(a)
                dst.append(len(keep_in) + b)
                val.append(v)
    for b, u in enumerate(keep_units):
        src.append(len(keep_in) + b)
        dst.append(len(nodes) - 1)
        val.append(float(unit_val[u]))
    return {"nodes": nodes, "source": src, "target": dst, "value": val, "class": c}


@library_call
def sankey(model, x: Tensor, target: int | None = None, feature_names: Sequence[str] | None = None, top: int = 8,
           *, logits_at: str | None = None):
    """Plotly Sankey of one sample's decision pathway (Re3 Fig. 4; the flows of :func:`pathway_flows`); plotly is
    imported lazily."""
    try:
        import plotly.graph_objects as go
    except ImportError as e:  # pragma: no cover
        raise ImportError("relu_regions.plots.sankey needs plotly (pip install plotly)") from e
    f = pathway_flows(model, x, target, feature_names, top, logits_at=logits_at)
    return go.Figure(go.Sankey(node={"label": f["nodes"]},
                               link={"source": f["source"], "target": f["target"], "value": f["value"]}))
