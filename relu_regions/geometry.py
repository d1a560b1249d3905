"""Geometry of activation regions: exact boundary distances, decision distances, what-if steps and line walks.

Inside the region of ``x`` every piecewise-linear unit is frozen, so each of the region's inequalities is affine in
the input. We write them as *margins* ``m(x') >= 0`` (all of them affine in ``x'`` for the frozen pattern):

- ReLU / LeakyReLU / PReLU unit with pre-activation ``z``: ``m = z`` when active (``z > 0``), ``m = -z`` otherwise;
- clamp / hardtanh unit: ``z - lo`` and ``hi - z`` when linear, ``lo - z`` below, ``z - hi`` above;
- max-pool window with recorded argmax ``a``: ``z_a - z_o`` for every other element ``o`` of the window.

The exact ``l_p`` distance from ``x`` to the region's boundary is ``min_j m_j(x) / ||∇ m_j||_q`` (``q`` dual to
``p``; margins with zero gradient never bind and are excluded): the point where the first hyperplane is reached
along the shortest path is the first point where any inequality fails, so no other inequality can be closer.
``method="re3"`` is the Re3 paper's ``|z_j| / ||w_j||_q`` with ``w_j`` the unit's weight row in its *own layer's*
input space — exact only for first-layer units fed directly by a Linear, or by a Conv whose window at the unit's
position lies inside the input (every unit of an unpadded Conv). It ignores how earlier layers stretch space, an
affine step between the layer and the unit, such as a BatchNorm, which rescales ``z_j`` but not ``w_j``, and the
border of a padded Conv: a unit whose window overlaps the padding sees only part of the kernel (zero padding: its
gradient is the cropped kernel, of smaller norm, so re3 underestimates its distance; reflect / circular padding
fold kernel entries together). Kept as the paper defines it, for comparison.

Routes for the exact distance (:func:`boundary_distance`, all exact): ``"structured"`` for plain chains of standard
modules and functional ReLU / max-pool / flatten calls, such as LeNet or PyTorch's MNIST example CNN (the Jacobian
up to the first nonlinearity is shared by all inputs; first max-pool margins use kernel-pair norms; later layers are
pushed as bias-free tangents, one per colour class of input features inside the convolutional prefix, where each unit
sees only a window of the input), ``"forward"`` and ``"reverse"`` for any supported model. ``layers=`` / ``kinds=``
restrict the inequalities (e.g. ReLU hyperplanes only, when max-pool ties on flat image backgrounds make the exact
region distance 0).

Input domains and balls: :func:`boundary_distance_in_box` gives the exact distance to the nearest boundary point that
lies inside a box of valid inputs (box faces are not region boundaries); :func:`inscribed_ball` the largest ball
inside the region (Chebyshev ball) by linear programming with scipy HiGHS — slow, for small models. Both use
:func:`region_inequalities` (all margins with full input gradients).

What-if and line walks only need *directional* derivatives: one forward-mode (JVP) pass through the frozen network
with tangent ``δ`` gives every margin's rate of change along ``δ``, hence the exact step at which the first one
reaches zero — no new forward pass at the perturbed point.
"""

from __future__ import annotations

import copy
import math
import numbers
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

from .affine import (
    _basis_and_x,
    _check_preactivations,
    _dual_norm,
    _frozen_at_zero,
    _qnorm,
    affine_map,
    check_chunk_size,
    preactivation_maps,
)
from .affine import check_batch as _check_x
from .errors import ForwardADMissingError, ReluRegionsError, forward_mode, is_int_at_least
from .hook_recording import PlanCache
from .keys import pack_patterns, pattern_keys
from .recording import LayerSelection, StopReplay, library_call, run_frozen, run_recorded, select_layers
from .state import preserved
from .units import LayerPattern

Tensor = torch.Tensor

_RELU_LIKE = ("relu", "leaky_relu", "prelu")


def dual_norm(p: float) -> float:
    """The ``q`` with ``1/p + 1/q = 1`` for ``p`` in {1, 2, inf}."""
    # a bool is no norm order (float(True) would be the l1 norm); numpy's bool is not a numbers.Real either
    if isinstance(p, bool) or not isinstance(p, (numbers.Real, Tensor)) or (isinstance(p, Tensor) and (
            p.numel() != 1 or p.dtype == torch.bool)):
        raise ValueError(f"p must be 1, 2 or inf (the l_p norm), got {p!r}")
    p = float(p)
    if p == 2.0:
        return 2.0
    if p == 1.0:
        return math.inf
    if math.isinf(p):
        return 1.0
    raise ValueError(f"p must be 1, 2 or inf, got {p}")


# --- margins of the region's inequalities ------------------------------------------------------------------------


def _expand(state: Tensor, rows: int) -> Tensor:
    r = rows // state.shape[0]
    return state if r == 1 else state.repeat(r, *([1] * (state.dim() - 1)))


def _pool_geometry(p: LayerPattern, h: int, w: int) -> tuple:
    """``(kernel, stride, padding, dilation)`` of a recorded max-pool call on an ``h x w`` input."""
    if p.params.get("adaptive"):
        out = p.state.shape[-2:] if p.params["dims"] == 2 else (1, p.state.shape[-1])
        if h % out[0] or w % out[1]:
            raise NotImplementedError(f"layer '{p.name}': adaptive max-pool with input {h}x{w} not divisible by "
                                      f"output {tuple(out)} has uneven windows; not supported by geometry")
        ks = (h // out[0], w // out[1])
        return ks, ks, (0, 0), (1, 1)
    ks, st, pad, dil, _ = p.params["geometry"]
    return ks, st, pad, dil


def _window_index(p: LayerPattern, h: int, w: int, device) -> Tensor:
    """``(k, L)`` flat input indices of every window element (``-1`` for padding, and for the part of a ceil_mode
    window past the input; adaptive windows of uneven sizes are padded to the largest)."""
    out = tuple(p.state.shape[-2:]) if p.params.get("dims", 2) == 2 else (1, p.state.shape[-1])
    if p.params.get("adaptive") and (h % out[0] or w % out[1]):
        # torch's adaptive windows: output i covers [floor(i n / o), ceil((i + 1) n / o))
        spans = [[(i * n // o, -(-(i + 1) * n // o)) for i in range(o)] for n, o in ((h, out[0]), (w, out[1]))]
        kh, kw = (max(e - b for b, e in sp) for sp in spans)
        win = torch.full((kh * kw, out[0] * out[1]), -1, dtype=torch.int64)
        for a, (r0, r1) in enumerate(spans[0]):
            for c, (c0, c1) in enumerate(spans[1]):
                rr, cc = torch.meshgrid(torch.arange(r0, r1), torch.arange(c0, c1), indexing="ij")
                pos = (rr - r0) * kw + (cc - c0)
                win[pos.reshape(-1), a * out[1] + c] = (rr * w + cc).reshape(-1)
        return win.to(device)
    ks, st, pad, dil = (_pair(v) for v in _pool_geometry(p, h, w))
    idx = torch.arange(h * w, dtype=torch.float64, device=device).reshape(1, 1, h, w) + 1
    # ceil_mode: the recorded output has windows that start inside the input and end past it; extend the plane
    extra = [max(0, (o - 1) * s_ + d * (k - 1) + 1 - (n + 2 * q))
             for o, s_, d, k, n, q in zip(out, st, dil, ks, (h, w), pad)]
    if any(extra):
        idx = F.pad(idx, (0, extra[1], 0, extra[0]))
    cols = F.unfold(idx, ks, dilation=dil, padding=pad, stride=st)[0]  # zero padding -> index -1 after shift
    return cols.to(torch.int64) - 1


def margins(p: LayerPattern, z: Tensor, const: bool = True) -> Tensor:
    """``(rows, M)`` margins of layer ``p``'s inequalities from its input ``z`` (``(rows, *in_shape)``).

    With ``const=False`` the constant terms are dropped (for tangents / Jacobians); margins that do not exist
    (missing clamp bound, padding) are ``+inf`` with ``const`` and ``0`` without.
    """
    rows = z.shape[0]
    if p.kind in _RELU_LIKE:
        s = _expand(p.state, rows).reshape(rows, -1)
        zz = z.reshape(rows, -1)
        return torch.where(s, zz, -zz)
    if p.kind == "clamp":
        s = _expand(p.state, rows).reshape(rows, -1)
        zz = z.reshape(rows, -1)
        lo, hi = p.params["lo"], p.params["hi"]
        inf = torch.full_like(zz, math.inf if const else 0.0)

        def c(v):
            return v if const else 0.0

        a = torch.where(s == 0, c(lo if lo is not None else 0.0) - zz, inf)
        a = torch.where(s == 2, zz - c(hi if hi is not None else 0.0), a)
        if lo is not None:
            a = torch.where(s == 1, zz - c(lo), a)
        b = inf
        if hi is not None:
            b = torch.where(s == 1, c(hi) - zz, inf)
        return torch.cat([a, b], 1)
    if p.kind == "maxpool":
        zz = z if p.params["dims"] == 2 else z.unsqueeze(-2)
        h, w = zz.shape[-2:]
        zf = zz.reshape(rows, -1, h * w)  # (rows, C, HW)
        state = _expand(p.state, rows).reshape(rows, zf.shape[1], -1)  # (rows, C, L)
        win = _window_index(p, h, w, z.device)  # (k, L)
        if win.shape[1] != state.shape[2]:
            raise NotImplementedError(f"layer '{p.name}': max-pool windows ({win.shape[1]}) do not match its recorded "
                                      f"output ({state.shape[2]})")
        za = zf.gather(2, state)
        zo = zf[:, :, win.clamp(min=0)]  # (rows, C, k, L)
        m = za.unsqueeze(2) - zo
        pad = (win < 0).expand_as(m)
        m = torch.where(pad, torch.full_like(m, math.inf if const else 0.0), m)
        return m.reshape(rows, -1)
    raise NotImplementedError(f"layer '{p.name}': unit kind '{p.kind}' has no margins")


# --- boundary distances -----------------------------------------------------------------------------------------


@dataclass
class BoundaryDistances:
    """Exact distances from each input to its region's boundary.

    Attributes
    ----------
    distance : Tensor
        ``(B,)`` ``l_p`` distance (``inf`` when no inequality binds, e.g. an affine network).
    layer : Tensor
        ``(B,)`` index into ``layer_names`` of the nearest inequality's layer (``-1`` when none).
    unit : Tensor
        ``(B,)`` flat margin index within that layer (for ReLU layers: the flat unit index).
    per_layer : dict name -> Tensor
        ``(B,)`` smallest distance per layer.
    layer_names : list of str
    p : float
    method : str
    """

    distance: Tensor
    layer: Tensor
    unit: Tensor
    per_layer: dict
    layer_names: list
    p: float
    method: str

    def nearest(self, i: int) -> tuple[str, int] | None:
        """``(layer name, margin index)`` of sample ``i``'s nearest inequality."""
        k = int(self.layer[i])
        return None if k < 0 else (self.layer_names[k], int(self.unit[i]))


def _layer_min(m: Tensor, nrm: Tensor) -> tuple[Tensor, Tensor]:
    d = m.clamp(min=0) / nrm
    d = torch.where(nrm > 0, d, torch.full_like(d, math.inf))
    d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)
    if d.shape[1] == 0:
        return torch.full((d.shape[0],), math.inf, dtype=d.dtype, device=d.device), torch.zeros(
            d.shape[0], dtype=torch.int64, device=d.device)
    return d.min(1)


def _exact_chunk(model, x, q, logits_at, strict, route, wanted):
    b = x.shape[0]
    with torch.no_grad():
        _, patterns = run_recorded(model, x, strict=strict, logits_at=logits_at)
    per: dict[str, tuple[Tensor, Tensor]] = {}
    if route == "forward":
        tangent, n = _basis_and_x(x)
        offsets = _frozen_at_zero(model, x, patterns, wanted, strict, logits_at)  # for _check_preactivations
        flat_x = x.reshape(b, -1)
        pending: list[tuple[str, Tensor, Tensor, Tensor]] = []

        def grab(p, t):
            if p.name not in wanted:
                return
            primal, tan = fwAD.unpack_dual(t)
            m = margins(p, primal[:b])
            if tan is None:
                tan = torch.zeros_like(primal)
            raw = tan.reshape(n + 1, b, -1)  # e_1 ... e_D, then x
            if p.kind in _RELU_LIKE:  # margins ±z: the sign does not change a norm, so skip the flip
                nrm = _qnorm(raw[:n], q, 0)
                terms = nrm * _dual_norm(flat_x, q)  # (the norms bound the check's terms at no cost)
            else:  # clamps and max-pools: margins are differences of the unit inputs; the check reads the inputs
                nrm = _qnorm(margins(p, tan[:n * b], const=False).reshape(n, b, -1), q, 0)
                terms = _qnorm(raw[:n], 2.0, 0) * _dual_norm(flat_x, 2.0)
            pending.append((p.name, primal[:b].clone(), raw[n].clone(), terms))
            per[p.name] = _layer_min(m, nrm)

        with forward_mode("route='forward'", "use route='reverse'"), torch.no_grad(), fwAD.dual_level():
            primal = x.unsqueeze(0).expand(n + 1, *x.shape).reshape((n + 1) * b, *x.shape[1:])
            run_frozen(model, fwAD.make_dual(primal.contiguous(), tangent), patterns, strict=strict,
                       logits_at=logits_at, observe=grab)
        # (after the replay: its own refusals, e.g. of a derivative cut before a unit, name the cause better)
        for name, value, lin, terms in pending:
            _check_preactivations(model, name, value, offsets[name], lin, terms)
    else:
        maps = preactivation_maps(model, x, [p.name for p in patterns if p.name in wanted], reduce=None,
                                  method="reverse", logits_at=logits_at, strict=strict)
        byname = {p.name: p for p in patterns}
        d_in = int(x[0].numel())
        for name, lm in maps.items():
            p = byname[name]
            m = margins(p, lm.value)
            jac = lm.jacobian.reshape(b, *p.in_shape, d_in)
            jac = jac.movedim(-1, 1).reshape(b * d_in, *p.in_shape)  # rows = (sample, input feature)
            g = margins(_rep_pattern(p, d_in), jac, const=False).reshape(b, d_in, -1)
            per[name] = _layer_min(m, _qnorm(g, q, 1))
    return per, [p.name for p in patterns]


# --- structured fast path for chains of standard modules ----------------------------------------------------------
#
# Most CNNs used with this package are a plain chain Conv/Linear -> ReLU -> MaxPool -> ... of standard modules. For
# those, input gradients of every inequality are propagated directly as tangents (the bias-free linear part of each
# module), which is exact like forward mode but (1) never replicates the primal pass, (2) treats everything before and
# at the first piecewise-linear layer as *shared*: the Jacobian of the first layer's input does not depend on x (no
# nonlinearity comes before it), so it is computed once per call, the first ReLU only rescales it by 0/1 per sample,
# and the margins z_a − z_o of a max-pool right after it have gradients J[a] − J[o] whose norms are looked up in a
# table of all pairs inside each window (for a conv directly on the input: two kernels placed at two positions).
# Only layers after that are pushed as per-sample tangents (``D`` rows per sample, in chunks).

_LINEAR_LEAVES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Flatten, nn.Identity, nn.Dropout, nn.AvgPool2d, nn.AvgPool1d)
_PL_LEAVES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.MaxPool2d: "maxpool"}
# functional calls of the chain: units, and the batch-preserving flattens written in forwards
_PL_CALLS = {F.relu: "relu", torch.relu: "relu", "relu": "relu", F.leaky_relu: "leaky_relu",
             F.max_pool2d: "maxpool"}
_FLATTENS = {torch.flatten, "flatten", "view", "reshape"}
_SIZE_READS = {"size", "dim"}


def _chain_plan(model: nn.Module, x1: Tensor, strict: bool, logits_at, out: Tensor,
                pats: list[LayerPattern]) -> list | None:
    """``[(step, kind, name)]`` if the model (up to ``logits_at``) is a plain chain, else None.

    ``out`` and ``pats`` are the explained output and the patterns of the recorded run on ``x1``.

    A chain is a sequence of supported modules and functional calls, each reading only the previous one's output:
    Conv1d/2d, Linear, Flatten, Identity, Dropout, AvgPool; ReLU, LeakyReLU, MaxPool2d as modules or as
    ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` / ``F.leaky_relu`` / ``F.max_pool2d``; and the flattens forwards
    write (``torch.flatten(x, 1)``, ``x.view(x.size(0), -1)``). Read from a ``torch.fx`` trace, then checked on
    ``x1``: the chain's steps must reproduce the model's (explained) output bit for bit and its piecewise-linear
    calls must be the recorded ones, so a trace that does not describe the run is never used. ``step`` is the module
    applied to tangents for linear steps (bias dropped by :func:`_apply_linear`); None for units.
    """
    if not strict:
        return None
    steps, modules = _CHAINS.get(model, logits_at)  # the trace once per model structure; the check on every call
    if steps is None:
        return None
    from .hook_recording import foreign_hook

    if foreign_hook(modules) is not None:
        # the check below runs the modules with their hooks, the tangents are pushed with their weights only: a
        # hook that scales a layer's output passed the check and scaled no gradient (distances off by its factor)
        return None
    plan_kinds = [k for _, k, _ in steps if k]
    with torch.no_grad():
        t = x1.clone()  # x1 is the caller's: an inplace first step (nn.ReLU(inplace=True)) would write into it
        for _, _, fn in steps:
            t = fn(t)
    if plan_kinds != [p.kind for p in pats] or not isinstance(out, Tensor) or t.shape != out.shape \
            or not torch.equal(t, out):
        return None
    names = iter(p.name for p in pats)
    return [(mod, kind, next(names) if kind else None) for mod, kind, _ in steps]


def _chain_steps(model: nn.Module, logits_at: str | None) -> list | None:
    """``[(step module or None, kind or None, primal function)]`` read from the model's ``torch.fx`` trace (up to
    ``logits_at``), or None when the trace is not a plain chain."""
    from .hook_recording import fx_graph, until_logits

    try:
        nodes = until_logits(list(fx_graph(model).nodes), logits_at)
    except Exception:  # not traceable: the forward / reverse routes handle it
        return None
    if not nodes or nodes[0].op != "placeholder" or any(n.op == "placeholder" for n in nodes[1:]):
        return None
    modules = dict(model.named_modules())
    steps: list = []
    prev, side = nodes[0], set()
    for node in nodes[1:]:
        if node.op == "output":
            if node.args[0] is not prev:
                return None
            break
        deps = node.all_input_nodes
        if prev not in deps and not side.intersection(deps):
            if any(d.op != "get_attr" for d in deps):
                return None  # uses something of the chain other than its head: a residual, a branch
            continue
        if _is_size_read(node, prev, side):
            side.add(node)
            continue
        if [u for u in prev.users if u not in side and u is not node]:
            return None  # the head is read twice: not a chain
        step = _chain_step(node, prev, side, modules)
        if step is None:
            return None
        steps.append(step)
        prev = node
    return steps


_CHAINS = PlanCache(_chain_steps)


def _is_size_read(node, prev, side: set) -> bool:
    """``x.size(...)`` / ``x.dim()`` / ``x.shape`` of the chain's head, or an item of one: reads no values."""
    if node.op == "call_method" and node.target in _SIZE_READS and node.args and node.args[0] is prev:
        return True
    if node.op == "call_function" and node.target is getattr and node.args[0] is prev and node.args[1] == "shape":
        return True
    return node.op == "call_function" and node.target is operator.getitem and node.args[0] in side


def _chain_step(node, prev, side: set, modules: dict) -> tuple | None:
    """``(module for tangents or None, kind or None, primal function)`` of one chain node, or None."""
    args, kwargs = node.args, dict(node.kwargs)
    if not args or args[0] is not prev:
        return None
    if node.op == "call_module":
        mod = modules[node.target]
        kind = _PL_LEAVES.get(type(mod))
        if len(args) != 1 or kwargs or (kind is None and not isinstance(mod, _LINEAR_LEAVES)):
            return None
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.padding_mode != "zeros":
            return None
        if isinstance(mod, nn.Flatten) and (mod.start_dim != 1 or mod.end_dim != -1):
            return None
        if isinstance(mod, nn.MaxPool2d) and mod.return_indices:
            return None
        return mod, kind, mod
    if node.op not in ("call_function", "call_method"):
        return None
    rest = args[1:]
    if any(isinstance(a, torch.fx.Node) and a not in side for a in (*rest, *kwargs.values())):
        return None
    kind = _PL_CALLS.get(node.target)
    if kind is not None:
        if kwargs.get("return_indices") or (kind == "maxpool" and len(rest) >= 6 and rest[5]):
            return None
        if kind == "relu":  # (an inplace flag is dropped: the check must not write into its input)
            return None, kind, F.relu
        if kind == "leaky_relu":
            slope = rest[0] if rest else kwargs.get("negative_slope", 0.01)
            return None, kind, lambda t: F.leaky_relu(t, slope)
        return None, kind, lambda t: F.max_pool2d(t, *rest, **kwargs)
    if node.target in _FLATTENS:
        flat = nn.Flatten()
        if node.target in (torch.flatten, "flatten"):
            ok = (rest in ((1,), (1, -1)) and not kwargs) or (not rest and kwargs in ({"start_dim": 1},
                                                                                      {"start_dim": 1, "end_dim": -1}))
        else:  # view / reshape to (batch, -1), the batch read from the head's size
            shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            ok = not kwargs and len(shape) == 2 and shape[1] == -1 and isinstance(shape[0], torch.fx.Node) \
                and shape[0] in side and _reads_batch(shape[0], prev)
        return (flat, None, flat) if ok else None
    return None


def _reads_batch(node, prev) -> bool:
    """``node`` is ``prev.size(0)``, ``prev.shape[0]`` or ``prev.size()[0]``."""
    if node.op == "call_method" and node.target == "size":
        return node.args[0] is prev and (node.args[1:] == (0,) or node.kwargs == {"dim": 0})
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        src = node.args[0]
        return (src.op == "call_function" and src.target is getattr and src.args == (prev, "shape")) or (
            src.op == "call_method" and src.target == "size" and src.args == (prev,) and not src.kwargs)
    return False


def _apply_linear(mod: nn.Module, rows: Tensor) -> Tensor:
    """The bias-free (linear) part of a supported module applied to tangent rows."""
    if isinstance(mod, nn.Conv2d):
        return F.conv2d(rows, mod.weight, None, mod.stride, mod.padding, mod.dilation, mod.groups)
    if isinstance(mod, nn.Conv1d):
        return F.conv1d(rows, mod.weight, None, mod.stride, mod.padding, mod.dilation, mod.groups)
    if isinstance(mod, nn.Linear):
        return F.linear(rows, mod.weight)
    return mod(rows)  # Flatten, Identity, Dropout (eval), average pools: linear already


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _pool_pair_norms(t: Tensor, win: Tensor, q: float) -> tuple[Tensor, Tensor]:
    """For shared tangents ``t`` (D, C, HW): ``||t[a] - t[o]||_q`` for all window pairs (C, k, k, L), and
    ``||t[e]||_q`` for all window elements (C, k, L)."""
    tw = t[:, :, win.clamp(min=0)]  # (D, C, k, L)
    rown = _qnorm(tw, q, 0)
    pair = torch.stack([_qnorm(tw[:, c, :, None, :] - tw[:, c, None, :, :], q, 0)
                        for c in range(tw.shape[1])])
    return pair, rown


# --- colouring: few tangents for the convolutional prefix ---------------------------------------------------------
#
# Up to the first Linear / Flatten, a unit of a CNN only sees a window of the input (its receptive field), so its input
# gradient is zero outside that window. Input features whose positions agree modulo the window size ("colours", per
# input channel) never share a window, so one tangent per colour (the sum of those features' basis vectors) yields
# every gradient entry exactly, in place of one tangent per input feature: 36 instead of 784 on PyTorch's MNIST CNN
# (6x6 windows behind its first max-pool). The norms need no unpacking (each colour appears at most once in a
# window). The first Linear (after the flatten) needs full rows: it is applied per position in the colour domain,
# and only its small output is gathered back to input features.

_WINDOWED = (nn.Conv1d, nn.Conv2d, nn.AvgPool1d, nn.AvgPool2d)
_POINTWISE = (nn.Identity, nn.Dropout)


def _window_steps(mod, kind: str | None, p: LayerPattern | None, d: int) -> tuple | None:
    """``(kernel, stride, padding, dilation)`` per spatial dim of a windowed step, ``()`` for a pointwise one,
    None for a step that mixes positions (Linear, Flatten) or has another number of spatial dims."""
    if kind == "maxpool":
        if d != 2:
            return None
        h, w = p.in_shape[-2:]
        return tuple(tuple(_pair(v)) for v in _pool_geometry(p, h, w))
    if kind is not None or isinstance(mod, _POINTWISE):
        return ()
    if not isinstance(mod, _WINDOWED):
        return None
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        ks, st, pad, dil = mod.kernel_size, mod.stride, mod.padding, mod.dilation
        if isinstance(pad, str):  # "same" / "valid": the module resolves it; take the explicit form
            pad = tuple(0 if pad == "valid" else (dl * (k - 1)) // 2 for k, dl in zip(ks, dil))
    else:
        ks, st, pad, dil = mod.kernel_size, mod.stride, mod.padding, 1
    geo = tuple(tuple(v) if isinstance(v, (tuple, list)) else (v,) * d for v in (ks, st, pad, dil))
    return geo if all(len(v) == d for v in geo) else None


@dataclass
class _Colouring:
    """Colour classes of the input features for the windowed prefix ``plan[:stop]`` of a chain."""

    basis: Tensor  # (G, *input_shape): one tangent per colour
    period: tuple  # per spatial dim
    field: tuple  # receptive-field size per spatial dim at the end of the prefix
    stride: tuple  # input positions between neighbouring units there
    offset: tuple  # input position of unit 0's field start, negated (padding)
    stop: int  # index of the first step after the prefix
    linear: int  # index of the Linear that reads the flattened prefix (-1: not needed)
    n_units: int  # piecewise-linear calls inside the prefix

    def gather_index(self, out_shape: tuple, in_shape: tuple, device) -> Tensor:
        """``(D, K)``: for each input feature, the flat ``(colour, position)`` pairs that hold its entries (at most
        ``K`` positions see a feature), padded with ``G·L`` (a zero row)."""
        flat = self.scatter_index(out_shape, in_shape, device).reshape(-1)
        d_in = int(torch.Size(in_shape).numel())
        order = torch.argsort(flat, stable=True)
        feat = flat[order]
        counts = torch.bincount(flat, minlength=d_in + 1)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(flat.numel(), device=device) - first[feat]
        keep = feat < d_in
        inv = torch.full((d_in, max(1, int(counts[:d_in].max()))), flat.numel(), dtype=torch.int64, device=device)
        inv[feat[keep], rank[keep]] = order[keep]
        return inv

    def scatter_index(self, out_shape: tuple, in_shape: tuple, device) -> Tensor:
        """``(G, L)`` flat input feature of each colour in each unit's window at the prefix's end (``L`` positions
        of ``out_shape``), or ``n_features`` where the colour has no feature in that window."""
        sizes, nd = in_shape[1:], len(in_shape) - 1
        idx = torch.zeros((), dtype=torch.int64, device=device)
        ok = torch.ones((), dtype=torch.bool, device=device)
        for k, (o_k, h_k, per, r, s, off) in enumerate(zip(out_shape, sizes, self.period, self.field, self.stride,
                                                           self.offset)):
            one = [1] * (2 * nd)
            g = torch.arange(per, device=device).view(*one[:k], per, *one[k + 1:])  # colour coordinate k
            start = (torch.arange(o_k, device=device) * s - off).view(*one[:nd + k], o_k, *one[nd + k + 1:])
            shift = (g - start) % per  # the one position of colour g in [start, start + per)
            pos = start + shift
            ok = ok & (shift < r) & (pos >= 0) & (pos < h_k)
            idx = idx * h_k + pos
        plane = int(torch.Size(sizes).numel())
        idx = idx.reshape(-1, int(torch.Size(out_shape).numel()))  # (colours per channel, L)
        chan = torch.arange(in_shape[0], device=device).view(-1, 1, 1) * plane
        full = torch.where(ok.reshape(idx.shape), idx + chan, torch.full_like(idx, plane * in_shape[0]))
        return full.reshape(-1, idx.shape[1])


def _colouring(plan: list, byname: dict, in_shape: tuple, last: int, dtype, device) -> _Colouring | None:
    """The colouring for the windowed prefix of ``plan`` (up to step ``last`` when that comes first), or None when
    it would not need fewer tangents than one per input feature."""
    d = len(in_shape) - 1
    if d < 1:
        return None
    field, stride, offset = [1] * d, [1] * d, [0] * d
    stop, windowed, n_units = len(plan), False, 0
    for i, (mod, kind, name) in enumerate(plan):
        geo = _window_steps(mod, kind, byname.get(name), d)
        if geo is None:
            stop = i
            break
        if i > last:
            stop = i
            break
        n_units += kind is not None
        if geo:
            windowed = True
            for k, (ks, st, pad, dil) in enumerate(zip(*geo)):
                field[k] += (ks - 1) * dil * stride[k]
                offset[k] += pad * stride[k]
                stride[k] *= st
    linear = -1
    if stop <= last:  # unpacked at the first Linear, which must read the flattened prefix
        linear = next((j for j in range(stop + 1, len(plan)) if not isinstance(plan[j][0], _POINTWISE)), -1)
        if linear < 0 or not isinstance(plan[stop][0], nn.Flatten) or not isinstance(plan[linear][0], nn.Linear):
            return None
    if any(f > h for f, h in zip(field, in_shape[1:])):
        # a receptive field longer than the input (padding): a window starting in the padding would hold one colour
        # twice (the first Linear's rows of some features were lost, distances off by ~3%)
        return None
    period = tuple(field)
    n = int(torch.Size(in_shape).numel())
    g = in_shape[0] * int(torch.Size(period).numel())
    if not windowed or g >= n:
        return None
    # colour of each input feature: (channel, position mod period); basis[g] sums the features of colour g
    colour = torch.arange(in_shape[0], device=device).view(-1, *([1] * d))
    for k, per in enumerate(period):
        pos = torch.arange(in_shape[1 + k], device=device).view(-1, *([1] * (d - 1 - k))) % per
        colour = colour * per + pos
    basis = torch.zeros(g, n, dtype=dtype, device=device)
    basis[colour.reshape(-1), torch.arange(n, device=device)] = 1
    basis = basis.reshape(g, *in_shape)
    return _Colouring(basis, period, tuple(field), tuple(stride), tuple(offset), stop, linear, n_units)


def _fast_chunk(model, plan, x, q, wanted, cache, logits_at=None, colour: _Colouring | None = None):
    b = x.shape[0]
    found: dict[str, tuple[LayerPattern, Tensor]] = {}

    def grab(p, t):
        if p.name in wanted:
            found[p.name] = (p, margins(p, t.detach()))

    with torch.no_grad():
        _, patterns = run_recorded(model, x, strict=True, logits_at=logits_at, observe=grab)
        if [p.name for p in patterns] != [n for _, k, n in plan if k]:
            raise RuntimeError("the model's piecewise-linear calls changed between samples; use route='forward'")
        last = max([i for i, (_, k, n) in enumerate(plan) if k and n in wanted], default=-1)
        byname = {p.name: p for p in patterns}
        d_in = int(x[0].numel())
        if colour is None:  # one tangent per input feature
            t = torch.eye(d_in, dtype=x.dtype, device=x.device).reshape(d_in, *x.shape[1:])
        else:  # one per colour up to colour.stop, unpacked to one per feature there
            t = colour.basis
        n = t.shape[0]  # tangents (rows) per sample
        shared, scale, binary = True, None, True  # per-sample tangent = t * scale (elementwise, lazy)
        per: dict[str, tuple[Tensor, Tensor]] = {}
        resume = 0
        for i, (mod, kind, name) in enumerate(plan[:last + 1]):
            if i < resume:
                continue
            if colour is not None and i == colour.stop:
                if shared:
                    t, shared, scale = _per_sample(t, scale, b), False, None
                t, n = _unpack_colours(t, colour, plan[colour.linear][0], x.shape[1:], cache), d_in
                resume = colour.linear + 1
                continue
            if kind is None:
                if shared and scale is not None:
                    t, shared, scale = _per_sample(t, scale, b), False, None
                if shared:  # the same for every chunk: computed once per call
                    if ("t", i) not in cache:
                        cache[("t", i)] = _apply_linear(mod, t)
                    t = cache[("t", i)]
                else:
                    t = _rows(mod, t, b, n)
                continue
            p = byname[name]
            if kind in _RELU_LIKE:
                if name in wanted:
                    if shared:
                        if ("norm", name) not in cache:
                            cache[("norm", name)] = _qnorm(t.reshape(n, -1), q, 0)
                        nrm = cache[("norm", name)].expand(b, -1)
                        if scale is not None:
                            nrm = nrm * scale.reshape(b, -1).abs()
                    else:
                        nrm = _qnorm(t.reshape(b, n, -1), q, 1)
                    per[name] = _layer_min(found[name][1], nrm)
                if kind == "relu":
                    s = p.state.to(x.dtype)
                else:  # the slope in x's dtype (a Python float would make a float32 tensor: 1e-8 off in float64)
                    one = torch.ones((), dtype=x.dtype, device=x.device)
                    s = torch.where(p.state, one, one * p.params["slope"])
                binary = binary and kind == "relu"
                if shared:
                    scale = s if scale is None else scale * s
                else:
                    t = t * s.unsqueeze(1)
                continue
            # max-pool
            c = t.shape[-3]
            h, w = t.shape[-2:]
            win = _window_index(p, h, w, x.device)  # (k, L)
            state = p.state.reshape(b, c, -1)  # (B, C, L) flat argmax indices
            k, ll = win.shape
            if ll != state.shape[2]:
                raise NotImplementedError(f"layer '{name}': max-pool windows ({ll}) do not match its recorded output "
                                          f"({state.shape[2]})")
            if name in wanted:
                pad = (win < 0).expand(b, c, k, ll)
                # (B, C, L) position of the argmax in its window (exactly one element matches; a sum: argmax
                # over a middle dim is ~25x slower on CPU)
                hit = win.view(1, 1, k, ll) == state.unsqueeze(2)
                ka = (hit * torch.arange(k, device=x.device).view(1, 1, k, 1)).sum(2)
                if shared and binary:
                    if ("pair", name) not in cache:
                        cache[("pair", name)] = _pool_pair_norms(t.reshape(n, c, h * w), win, q)
                    pair, rown = cache[("pair", name)]
                    both = pair.unsqueeze(0).expand(b, c, k, k, ll).gather(
                        2, ka.view(b, c, 1, 1, ll).expand(b, c, 1, k, ll)).squeeze(2)  # (B, C, k_o, L)
                    if scale is None:
                        nrm = both
                    else:
                        sf = scale.reshape(b, c, h * w) > 0
                        sa = sf.gather(2, state).unsqueeze(2)  # (B, C, 1, L)
                        so = sf[:, :, win.clamp(min=0)]  # (B, C, k, L)
                        ra = rown.unsqueeze(0).expand(b, c, k, ll).gather(2, ka.unsqueeze(2))  # (B, C, 1, L)
                        ro = rown.unsqueeze(0)
                        zero = torch.zeros((), dtype=x.dtype, device=x.device)
                        nrm = torch.where(sa & so, both, torch.where(sa, ra, torch.where(so, ro, zero)))
                else:
                    if shared:
                        t, shared, scale = _per_sample(t, scale, b), False, None
                    tf = t.reshape(b, n, c, h, w)
                    ks, st, pd, dl = _pool_geometry(p, h, w)
                    ks, st, pd, dl = (_pair(v) for v in (ks, st, pd, dl))
                    tiles = st == ks and pd == (0, 0) and (dl == (1, 1) or ks == (1, 1)) \
                        and h % ks[0] == 0 and w % ks[1] == 0
                    parts = []
                    step = max(1, (1 << 24) // max(1, b * n * k * ll))  # bound memory: a few channels at a time
                    for c0 in range(0, c, step):
                        c1 = min(c, c0 + step)
                        # windows as (k, L) in _window_index's order (row-major kernel, row-major windows)
                        tc = tf[:, :, c0:c1]
                        if tiles:  # non-overlapping windows: views, no copy of the tangents
                            hh, ww, cc = h // ks[0], w // ks[1], c1 - c0
                            to = tc.reshape(b, n, cc, hh, ks[0], ww, ks[1])
                            ta = tc.reshape(b, n, cc, h * w).gather(3, state[:, None, c0:c1].expand(b, n, cc, ll))
                            dn = _qnorm(ta.view(b, n, cc, hh, 1, ww, 1) - to, q, 1)  # (B, c, hh, k0, ww, k1)
                            parts.append(dn.permute(0, 1, 3, 5, 2, 4).reshape(b, cc, k, ll))
                            continue
                        else:  # padding reads element 0, masked below
                            idx = win.clamp(min=0).reshape(1, 1, 1, k * ll).expand(b, n, c1 - c0, k * ll)
                            to = tc.reshape(b, n, c1 - c0, h * w).gather(3, idx).view(b, n, c1 - c0, k, ll)
                        ta = to.gather(3, ka[:, None, c0:c1, None, :].expand(b, n, c1 - c0, 1, ll))
                        parts.append(_qnorm(ta - to, q, 1))
                    nrm = torch.cat(parts, 1)
                nrm = torch.where(pad, torch.zeros((), dtype=x.dtype, device=x.device), nrm)
                per[name] = _layer_min(found[name][1], nrm.reshape(b, -1))
            if i == last:
                break
            # the pooled tangents (per sample from here on)
            if shared:
                tf = t.reshape(1, n, c, h * w).expand(b, n, c, h * w)
                tout = tf.gather(3, state.unsqueeze(1).expand(b, n, c, ll))
                if scale is not None:
                    tout = tout * scale.reshape(b, 1, c, h * w).gather(3, state.unsqueeze(1))
                shared, scale = False, None
            else:
                tout = t.reshape(b, n, c, h * w).gather(3, state.unsqueeze(1).expand(b, n, c, ll))
            t = tout.reshape(b, n, *p.unit_shape)
    return per, [p.name for p in patterns]


def _per_sample(t: Tensor, scale: Tensor | None, b: int) -> Tensor:
    """Shared tangents ``(n, ...)`` times their lazy per-sample scale ``(B, ...)`` (or none) -> ``(B, n, ...)``."""
    return t.unsqueeze(0).expand(b, *t.shape) if scale is None else t.unsqueeze(0) * scale.unsqueeze(1)


def _unpack_colours(t: Tensor, colour: _Colouring, linear: nn.Linear, in_shape: tuple, cache: dict) -> Tensor:
    """Per-colour tangents ``(B, G, C, *spatial)`` at the end of the prefix -> the bias-free ``linear`` applied to
    the flattened per-feature tangents, ``(B, D, out_features)``.

    Each position's unit sees colour ``g`` at exactly one input feature, so the Linear's products are formed per
    position in the colour domain (``B·G·C·L·F`` multiply-adds, not ``B·D·C·L·F``), then each feature sums the
    products of the positions that see it, in a fixed order (a gather, not an atomic scatter: deterministic on GPUs).
    """
    b, g, c = t.shape[:3]
    spatial = tuple(t.shape[3:])
    ll = int(torch.Size(spatial).numel())
    key = ("gather", spatial)
    if key not in cache:
        cache[key] = colour.gather_index(spatial, in_shape, t.device)
    inv = cache[key]  # (D, K)
    w = linear.weight.reshape(-1, c, ll)  # (F, C, L): flatten order (C, *spatial)
    f = w.shape[0]
    # per position l: (B·G, C) @ (C, F), written straight into a buffer whose last row is the zero row
    prod = t.new_empty(ll * b * g + 1, f)
    prod[-1].zero_()
    torch.bmm(t.reshape(b * g, c, ll).permute(2, 0, 1), w.permute(2, 1, 0), out=prod[:-1].view(ll, b * g, f))
    # row of (colour gc, position lc) for sample s: (lc·B + s)·G + gc; the padding points at the zero row
    gc, lc = inv // ll, inv % ll
    rows_of = torch.where(inv < g * ll, (lc.unsqueeze(0) * b + torch.arange(b, device=t.device).view(b, 1, 1)) * g
                          + gc.unsqueeze(0), torch.full_like(inv, ll * b * g).unsqueeze(0))  # (B, D, K)
    rows = prod.index_select(0, rows_of[:, :, 0].reshape(-1))
    for k in range(1, inv.shape[1]):
        rows += prod.index_select(0, rows_of[:, :, k].reshape(-1))
    return rows.view(b, -1, f)


def _rows(mod: nn.Module, t: Tensor, b: int, n: int) -> Tensor:
    out = _apply_linear(mod, t.reshape(b * n, *t.shape[2:]))
    return out.reshape(b, n, *out.shape[1:])


def _rep_pattern(p: LayerPattern, r: int) -> LayerPattern:
    """The pattern with each sample's state repeated ``r`` times consecutively (sample-major rows)."""
    st = p.state.repeat_interleave(r, dim=0)
    return LayerPattern(p.name, p.kind, st, p.n_states, p.n_boundary.repeat_interleave(r), p.params)


def _re3_chunk(model, x, q, logits_at, strict, wanted):
    """Re3: |z_j| / ||w_j||_q with w_j the weight row of the Linear / Conv that produced the unit's input."""
    last: list[nn.Module] = []
    per: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(mod, inp, out):
        last.append((mod, out.shape if isinstance(out, Tensor) else None))

    def grab(p, t):
        if (p.kind not in _RELU_LIKE and p.kind != "clamp") or p.name not in wanted:
            return  # Re3 defines distances for ReLU units only
        if not last:
            raise ValueError(f"method='re3': no Linear/Conv module ran before layer '{p.name}'")
        mod, shape = last[-1]
        # the unit's channels (features) must be that module's outputs: a pool between them keeps them (conv ->
        # max-pool -> relu), a concatenation of feature maps (a DenseNet) does not
        axis = -1 if isinstance(mod, nn.Linear) else 1
        if shape is None or len(shape) != t.dim() or shape[axis] != t.shape[axis]:
            name = next((n for n, m in model.named_modules() if m is mod), type(mod).__name__)
            shape = tuple(shape) if shape is not None else None
            raise ValueError(
                f"method='re3': the input of layer '{p.name}' (shape {tuple(t.shape)}) does not have the channels of "
                f"the Linear / Conv that ran last ('{name}', output shape {shape})"
                ", so the Re3 estimate has no weight row for its units (e.g. a torch.cat of feature maps); use "
                "method='exact', or layers= without this layer")
        w = mod.weight.detach().to(t.dtype).reshape(mod.weight.shape[0], -1)
        wn = _qnorm(w, q, 1)
        if isinstance(mod, nn.Linear):
            nrm = wn.expand(t.shape[0], *t.shape[1:])
        else:
            nrm = wn.reshape(1, -1, *([1] * (t.dim() - 2))).expand_as(t)
        m = margins(p, t.detach())
        nrm = nrm.reshape(t.shape[0], -1)
        if p.kind == "clamp":
            nrm = torch.cat([nrm, nrm], 1)
        per[p.name] = _layer_min(m, nrm)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    try:
        with torch.no_grad():
            _, patterns = run_recorded(model, x, strict=strict, logits_at=logits_at, observe=grab)
    finally:
        for h in handles:
            h.remove()
    return per, [p.name for p in patterns if p.name in per]


_KINDS = ("relu", "leaky_relu", "prelu", "clamp", "maxpool")


@library_call
def boundary_distance(model: nn.Module, x: Tensor, p: float = 2, method: str = "exact", *,
                      layers: LayerSelection = None, kinds: Sequence[str] | None = None,
                      logits_at: str | None = None, strict: bool = True, chunk_size: int | None = None,
                      route: str = "auto", progress: bool = False, per_layer: bool = True) -> BoundaryDistances:
    """Distance from each input to the boundary of its activation region, in input space.

    Parameters
    ----------
    model : nn.Module
        Piecewise-linear network (run in eval mode; its state is restored afterwards).
    x : Tensor
        ``(B, *input_shape)``.
    p : {2, inf, 1}
        The norm; gradients are measured in the dual norm.
    method : {"exact", "re3"}
        ``"exact"``: ``min_j m_j / ||∇ₓ m_j||_q`` over every inequality of the region (ReLU-like units, clamps,
        max-pool argmax comparisons). ``"re3"``: the Re3 paper's per-layer ``|z_j| / ||w_j||_q`` (ReLU and clamp
        units only, ``w_j`` the full weight row / kernel) — exact for first-layer units fed directly by the first
        Linear, or by the first Conv where the unit's window lies inside the input (all units of an unpadded
        Conv; not through a BatchNorm or other affine step, whose scaling it ignores). Not exact for the border
        units of a padded Conv, whose window overlaps the padding: with zero padding their gradient is the
        cropped kernel, of smaller norm, so re3 underestimates their distance. Deeper layers: an overestimate
        or an underestimate is possible. ``w_j`` comes from the ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``
        module that ran last before the unit (the paper's chain of layers): with parallel branches of equal width
        (two towers added), or linear steps of other kinds (``F.linear``, ``ConvTranspose``, ``Conv3d``) before
        the unit, those are another layer's rows; a unit whose channels differ from that module's outputs (a
        ``torch.cat`` of feature maps) is refused.
    layers : selection, optional
        Only the inequalities of these piecewise-linear calls (a name, list of names, int or slice as in
        :meth:`~relu_regions.Recording.patterns`). Default: all — the distance to the region's boundary.
    kinds : sequence of str, optional
        Only calls of these unit kinds (``"relu"``, ``"leaky_relu"``, ``"prelu"``, ``"clamp"``, ``"maxpool"``),
        applied after ``layers``. ``kinds=("relu",)`` gives the distance to the nearest *ReLU* hyperplane: useful
        on images with flat backgrounds, where max-pool windows of equal values are ties (a real kink of the max:
        the exact region distance is 0 there). With a subset of layers the result is the distance at which one of
        *those* inequalities first fails — not a region distance (other units may switch earlier); ``per_layer``
        always holds the distances of the computed layers.
    logits_at : str, optional
        Module path whose output is the explained output (as in :func:`~relu_regions.affine_map`): the run ends
        there, so only the piecewise-linear calls before it bound the region.
    strict : bool
        Raise :class:`~relu_regions.UnsupportedModuleError` on operations that are not piecewise linear (as in
        :func:`~relu_regions.affine_map`); the structured route needs it.
    chunk_size : int, optional
        Samples per chunk (bounds memory: the forward and structured routes hold ``D`` tangents per sample).
    route : {"auto", "structured", "forward", "reverse"}
        How input gradients are computed for ``"exact"`` (all exact): ``"structured"`` for models that are a plain
        chain of standard modules (Conv1d/2d, Linear, ReLU, LeakyReLU, MaxPool2d, AvgPool, Flatten, Dropout,
        Identity, called one after the other — e.g. :class:`~relu_regions.models.LeNet` — where ReLU, LeakyReLU,
        max-pool and flatten may also be functional calls, as in PyTorch's MNIST example; up to ``logits_at``
        when given; read from a ``torch.fx`` trace and checked against the run): tangents of the
        bias-free linear parts, with the Jacobian up to the first piecewise-linear layer computed once per call
        and first max-pool margins looked up from kernel-pair norms, and, up to the first Linear, one tangent per
        colour class of input features (features whose positions agree modulo the receptive field: 36 instead
        of 784 on PyTorch's MNIST CNN) in place of one per feature (much faster on CNNs); ``"forward"``: forward
        mode through the frozen network (one pass with ``D`` tangents, any supported model); ``"reverse"``: full
        Jacobians per layer by :func:`~relu_regions.preactivation_maps`. ``"auto"``: structured when the model is
        such a chain (and ``strict``), else forward when the input has at most as many features
        as the widest layer, else reverse.
    progress : bool
        tqdm progress bar over chunks.
    per_layer : bool
        With False only ``distance`` (and the nearest inequality) is wanted, and ``per_layer`` is left empty: inputs
        that lie exactly on their region's boundary — a margin that is exactly 0 with a nonzero rate along a fixed
        random direction, which proves a nonzero gradient; e.g. max-pool ties on flat image backgrounds — get
        distance 0 from one forward-mode pass, and only the others go through the full computation (``"exact"``
        only; same distances).

    Returns
    -------
    BoundaryDistances
    """
    q = dual_norm(p)
    if method not in ("exact", "re3"):
        raise ValueError(f"method must be 'exact' or 're3', got {method!r}")
    if route not in ("auto", "structured", "forward", "reverse"):
        raise ValueError(f"route must be 'auto', 'structured', 'forward' or 'reverse', got {route!r}")
    kinds = _check_kinds(kinds)
    _check_x(x)
    check_chunk_size(chunk_size)
    x = x.detach()
    b = x.shape[0]
    d_in = int(x[0].numel())
    with preserved(model, eval_mode=True):
        x1 = x[:1]
        whole = first = None  # recordings of x (a few inputs whose proofs are looked for) and of x1 alone
        with torch.no_grad():
            if not per_layer and method == "exact" and b <= _RECORD_WHOLE:
                whole = run_recorded(model, x, strict=strict, logits_at=logits_at, count_boundary=False)
                probe = [pp.batch(slice(0, 1)) for pp in whole[1]]
            else:
                first = run_recorded(model, x1, strict=strict, logits_at=logits_at, count_boundary=False)
                probe = first[1]

        def chain_plan() -> list | None:
            nonlocal first
            if first is None:  # the check compares bit for bit with a run on x1 alone (kernels vary by batch size)
                with torch.no_grad():
                    first = run_recorded(model, x1, strict=strict, logits_at=logits_at, count_boundary=False)
            plan = _chain_plan(model, x1, strict, logits_at, *first)
            if plan is None and route == "structured":
                raise ValueError("route='structured' needs a model that is a plain chain of Conv/Linear/ReLU/"
                                 "LeakyReLU/MaxPool2d/AvgPool/Flatten/Dropout modules or the functional ReLU, "
                                 "max-pool and flatten calls, without forward (pre-)hooks of its own (and "
                                 "strict=True); use route='forward' or 'reverse'")
            return plan

        plan = chain_plan() if method == "exact" and route == "structured" else None
        all_names = [pp.name for pp in probe]
        wanted = set(select_layers(all_names, layers))
        if kinds is not None:
            wanted = {pp.name for pp in probe if pp.name in wanted and pp.kind in kinds}
        widest = max([int(torch.Size(pp.in_shape).numel()) for pp in probe] or [0])
        names = [pp.name for pp in probe if pp.name in wanted]
        rest, proof = None, None
        if not per_layer and method == "exact":
            # bounded memory: the pass holds every margin and its rate of a chunk
            n_margins = sum(int(torch.Size(pp.in_shape).numel()) for pp in probe if pp.name in wanted)
            step = max(1, min(1024, (1 << 22) // max(1, n_margins)))
            found = [_on_boundary(model, x[i:i + step], wanted, names, logits_at, strict,
                                  None if whole is None else [pp.batch(slice(i, i + step)) for pp in whole[1]])
                     for i in range(0, b, step)]
            proof = tuple(torch.cat(parts) for parts in zip(*found))  # (x holds samples: check_batch)
            rest = (~proof[0]).nonzero()[:, 0]
            x = x[rest]
        auto = route == "auto"
        if auto:  # the chain's trace and check only when inputs are left to compute
            plan = chain_plan() if method == "exact" and x.shape[0] else None
            route = "structured" if plan is not None else ("forward" if d_in <= max(widest, 1) else "reverse")
        colour = None
        size = 1
        if route == "structured" and x.shape[0]:
            byname = {pp.name: pp for pp in probe}
            last = max([i for i, (_, k, nm) in enumerate(plan) if k and nm in wanted], default=-1)
            colour = _colouring(plan, byname, tuple(x.shape[1:]), last, x.dtype, x.device)
            # per-sample tangents start after the first layer (its Jacobian is shared): one per colour inside
            # the windowed prefix, one per input feature after it
            k = colour.n_units if colour is not None else 0
            rows = [int(torch.Size(pp.unit_shape).numel()) * (colour.basis.shape[0] if j < k else d_in)
                    for j, pp in enumerate(probe) if j > 0]
            size = chunk_size or max(1, min(256, (1 << 25) // max([1, *rows])))
        elif route != "structured":
            size = chunk_size or max(1, min(1024, (1 << 23) // max(1, d_in * max(widest, 1))))
        n_rest = x.shape[0]
        chunks = [slice(i, min(n_rest, i + size)) for i in range(0, n_rest, size)]
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=f"boundary_distance ({method}, {route})", unit="chunk")
        parts = []
        cache: dict = {}  # shared tangents / norms of the structured route
        for sl in chunks:
            if method == "re3":
                per, names = _re3_chunk(model, x[sl], q, logits_at, strict, wanted)
            elif route == "structured":
                per, names = _fast_chunk(model, plan, x[sl], q, wanted, cache, logits_at, colour)
            else:
                try:
                    per, names = _exact_chunk(model, x[sl], q, logits_at, strict, route, wanted)
                except ForwardADMissingError:
                    if not auto:
                        raise
                    route = "reverse"  # exact as well, without forward-mode rules
                    per, names = _exact_chunk(model, x[sl], q, logits_at, strict, route, wanted)
            parts.append(per)
    if parts:
        names = [n for n in names if n in parts[0]]
    per_layer = {n: torch.cat([pp[n][0] for pp in parts]) for n in names} if parts else {}
    per_unit = {n: torch.cat([pp[n][1] for pp in parts]) for n in names} if parts else {}
    if per_layer:
        stack = torch.stack([per_layer[n] for n in names], 1)
        dist, layer = stack.min(1)
        units = torch.stack([per_unit[n] for n in names], 1).gather(1, layer[:, None])[:, 0]
        none = torch.isinf(dist)
        layer = torch.where(none, torch.full_like(layer, -1), layer)
    else:
        dist = torch.full((n_rest,), math.inf, dtype=x.dtype, device=x.device)
        layer = torch.full((n_rest,), -1, dtype=torch.int64, device=x.device)
        units = torch.zeros(n_rest, dtype=torch.int64, device=x.device)
    if proof is not None:  # proven samples: 0 at the proving inequality; the others as computed
        # in the distances' dtype, which follows the margins: a model that computes its units in float64 from a
        # float32 input gives float64 distances
        dist = torch.zeros(b, dtype=torch.promote_types(x.dtype, dist.dtype), device=x.device).index_copy(
            0, rest, dist.to(torch.promote_types(x.dtype, dist.dtype)))
        layer = proof[1].index_copy(0, rest, layer)
        units = proof[2].index_copy(0, rest, units)
        per_layer = {}
    return BoundaryDistances(dist, layer, units, per_layer, names, float(p), method)


_RECORD_WHOLE = 64  # boundary_distance(per_layer=False) records up to this many inputs once (RegionMonitor's probe)


def _on_boundary(model: nn.Module, x: Tensor, wanted: set, names: list[str], logits_at, strict: bool,
                 patterns: list[LayerPattern] | None = None) -> tuple:
    """``(proven, layer, unit)``: which inputs provably lie on their region's boundary, and an inequality that
    proves it (``layer`` indexes ``names``; -1 where not proven).

    A margin that is exactly 0 with a nonzero rate of change along some direction has a nonzero gradient, so the
    input sits on that inequality's hyperplane: distance 0, exactly as :func:`boundary_distance` finds it. One
    forward-mode pass along a fixed random direction gives every margin's rate; a margin whose gradient happens to
    be orthogonal to it is only not used as a proof (the input is then computed in full).
    """
    if patterns is None:  # (else: x's recording, made by the caller)
        with torch.no_grad():
            _, patterns = run_recorded(model, x, strict=strict, logits_at=logits_at, count_boundary=False)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(x)
    so_far = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)  # proven by the layers seen so far

    def enough(m: Tensor, s: Tensor) -> bool:  # every input proven: the later layers cannot change the first proof
        so_far.logical_or_(((m <= 0) & (s != 0)).any(1))
        return bool(so_far.all())

    m, s, out, _, widths = _directional(model, x, v, patterns, logits_at, strict, wanted, enough)
    if m.shape[1] == 0:  # no inequality at all (an affine network, or a selection that matches no call)
        none = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return none, torch.full_like(none, -1, dtype=torch.int64), torch.zeros_like(none, dtype=torch.int64)
    hit = (m <= 0) & (s != 0)  # (<= as in _layer_min, which clamps margins at 0)
    if len(widths) > len(names) or (out is not None and len(widths) != len(names)):
        hit = torch.zeros_like(hit)  # the calls differ from the first sample's: no proofs, compute in full
    proven = hit.any(1)
    first = hit.to(torch.uint8).argmax(1)  # the first proving margin, in layer order
    w = torch.tensor(widths, dtype=torch.int64, device=x.device)
    ends = w.cumsum(0)
    layer = torch.searchsorted(ends, first, right=True).clamp(max=max(len(widths) - 1, 0))
    unit = first - (ends - w)[layer] if widths else first
    return proven, torch.where(proven, layer, -1), torch.where(proven, unit, 0)


def _check_kinds(kinds) -> tuple | None:
    if kinds is None:
        return None
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in _KINDS]
    if bad:
        raise ValueError(f"kinds: unknown unit kind(s) {bad}; choose from {_KINDS}")
    return kinds


# --- decision boundary and certified radius ---------------------------------------------------------------------


@library_call
def decision_distance(model: nn.Module, x: Tensor, p: float = 2, *, logits_at: str | None = None,
                      strict: bool = True) -> Tensor:
    """``(B,)`` distance to the decision boundary *of the region's affine map*.

    For the predicted class ``c``: ``min_{k != c} (f_c - f_k) / ||A_c - A_k||_q``; for a single output (binary
    logit) ``|f| / ||A||_q``. Exact for the true decision boundary only within the region; see
    :func:`certified_radius`.
    """
    q = dual_norm(p)
    _check_x(x)
    amap = affine_map(model, x.detach(), logits_at=logits_at, strict=strict)
    a = amap.A.reshape(amap.A.shape[0], amap.A.shape[1], -1)
    f = amap.output
    if f.shape[1] == 1:
        n = _qnorm(a[:, 0], q, 1)
        return torch.where(n > 0, f[:, 0].abs() / n, torch.full_like(n, math.inf))
    c = f.argmax(1)
    ar = torch.arange(f.shape[0], device=f.device)
    gap = f[ar, c][:, None] - f
    n = _qnorm(a[ar, c][:, None] - a, q, 2)
    d = torch.where(n > 0, gap / n, torch.full_like(gap, math.inf))
    d[ar, c] = math.inf
    return d.min(1).values


@library_call
def certified_radius(model: nn.Module, x: Tensor, p: float = 2, *, logits_at: str | None = None,
                     strict: bool = True, chunk_size: int | None = None, route: str = "auto",
                     progress: bool = False) -> Tensor:
    """``(B,)`` ``min(region distance, decision distance)``: no perturbation of smaller ``l_p`` norm changes the
    prediction (inside that ball the network is the region's affine map).

    The region distance is the exact one over every unit (:func:`boundary_distance`, ``method="exact"``): the
    options that would loosen it (``method="re3"``, ``layers=``, ``kinds=``) are not taken, since with them the
    radius would no longer be certified. The other options are :func:`boundary_distance`'s.
    """
    bd = boundary_distance(model, x, p=p, logits_at=logits_at, strict=strict, chunk_size=chunk_size, route=route,
                           progress=progress, per_layer=False).distance
    dd = decision_distance(model, x, p=p, logits_at=logits_at, strict=strict)
    return torch.minimum(bd, dd)


# --- validity curves --------------------------------------------------------------------------------------------


def _distances(distances: Tensor) -> Tensor:
    """Distances as a flat float64 CPU tensor; none at all, NaN (no distance) or negative ones refused. ``inf`` is a
    distance: a region that no unit bounds."""
    if not isinstance(distances, Tensor):
        distances = torch.as_tensor(distances)
    d = distances.detach().reshape(-1).to(torch.float64).cpu()
    if d.numel() == 0:
        raise ValueError("distances is empty: validity is a share of explanations, and there are none")
    bad = int(torch.isnan(d).sum()) + int((d < 0).sum())
    if bad:
        raise ValueError(f"distances holds {bad} NaN or negative value(s); a distance is >= 0 (inf: unbounded)")
    return d


def validity_curve(distances: Tensor, eps: Tensor | None = None, n: int = 200) -> tuple[Tensor, Tensor]:
    """Share of explanations still valid under every perturbation of norm ``eps``: ``mean(distance >= eps)``.

    Returns ``(eps, validity)``; ``eps`` defaults to ``n`` points from 0 to the largest finite distance.
    """
    d = _distances(distances)
    if not is_int_at_least(n, 1):
        raise ValueError(f"n (points of the curve) must be a positive int, got {n!r}")
    if eps is None:
        finite = d[torch.isfinite(d)]
        top = float(finite.max()) if finite.numel() else 1.0
        eps = torch.linspace(0, top, n, dtype=torch.float64)
    eps = torch.as_tensor(eps, dtype=torch.float64).reshape(-1)
    if bool(torch.isnan(eps).any()):
        raise ValueError("eps holds NaN")
    # counted by binary search in the sorted distances: (n, N) comparisons held 1.6 GB for a million distances
    below = torch.searchsorted(torch.sort(d).values, eps, side="left")
    return eps, (d.numel() - below).to(torch.float64) / d.numel()


def validity_epsilons(distances: Tensor, levels: float | Sequence[float] = (0.9, 0.75, 0.5)) -> dict[str, float]:
    """ε_L: the largest ε with validity >= L, i.e. the ⌈L·N⌉-th largest distance (exact, Re3 §4.2.4).

    Parameters
    ----------
    distances : Tensor
        Per-explanation distances (e.g. :attr:`BoundaryDistances.distance`); ``inf`` is allowed, NaN is not.
    levels : float or sequence of float
        Validity levels ``L`` in (0, 1]; a single number is one level.

    Returns
    -------
    dict
        ``"eps90"`` -> ε_0.9 and so on (keys in whole percents, or fractions of one: ``"eps99.5"``).
    """
    if isinstance(levels, numbers.Real) and not isinstance(levels, bool):
        levels = (levels,)
    elif isinstance(levels, Tensor):
        levels = levels.reshape(-1).tolist()
    else:
        try:
            if isinstance(levels, (str, bytes)):
                raise TypeError
            levels = tuple(levels)
        except TypeError:
            raise TypeError(f"levels must be a number or a sequence of numbers in (0, 1], got {levels!r}") from None
    d = torch.sort(_distances(distances), descending=True).values
    out = {}
    for lv in levels:
        # a bool is not a share (True would be the level 1.0)
        if isinstance(lv, bool) or not isinstance(lv, numbers.Real) or not 0 < lv <= 1:
            raise ValueError(f"levels are shares of the explanations, in (0, 1]; got {lv!r}")
        k = max(1, math.ceil(lv * d.numel() - 1e-9))
        key = f"eps{lv * 100:g}"  # eps90, eps99.5 (rounded to whole percents, 0.9 and 0.904 shared one key)
        if key in out:
            raise ValueError(f"levels {list(levels)} name the level {key} twice")
        out[key] = float(d[k - 1])
    return out


_REVERSE_ONLY = ("affine_map, preactivation_maps and boundary_distance / decision_distance fall back to reverse mode "
                 "for such models")


# --- directional: what-if and line walks ------------------------------------------------------------------------


def _directional(model, x, v, patterns, logits_at, strict, wanted: set | None = None,
                 enough: Callable[[Tensor, Tensor], bool] | None = None):
    """Margins at x, their rates along v, the frozen output and its rate (one JVP pass), and the margins' count
    per layer (only the ``wanted`` layers' margins when given). With ``enough``, the pass ends after the first layer
    whose margins and rates make ``enough(m, s)`` true (the output and its rate are then None)."""
    ms, ss = [], []

    def grab(p, t):
        if wanted is not None and p.name not in wanted:
            return
        primal, tan = fwAD.unpack_dual(t)
        ms.append(margins(p, primal))
        ss.append(torch.zeros_like(ms[-1]) if tan is None else margins(p, tan, const=False))
        if enough is not None and enough(ms[-1], ss[-1]):
            raise StopReplay

    b = x.shape[0]
    primal = tan = None
    with forward_mode("this directional computation (what_if, line_walk, certified_radius)",
                      _REVERSE_ONLY), torch.no_grad(), fwAD.dual_level():
        # contiguous: make_dual writes into its primal's and tangent's layout, which an expanded (stride-0) input,
        # one sample broadcast to a batch, does not allow
        out = run_frozen(model, fwAD.make_dual(x.contiguous(), v.to(x.dtype).contiguous()), patterns, strict=strict,
                         logits_at=logits_at, observe=grab)
        if out is not None:
            primal, tan = fwAD.unpack_dual(out)
    if primal is not None:
        primal = primal.reshape(b, -1)
        tan = torch.zeros_like(primal) if tan is None else tan.reshape(b, -1)
    if ms:
        m, s = torch.cat(ms, 1), torch.cat(ss, 1)
    else:
        m = s = torch.zeros(b, 0, dtype=x.dtype, device=x.device)
    return m, s, primal, tan, [t.shape[1] for t in ms]


def _exit_steps(m: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Largest forward and backward step along the direction that keep every margin >= 0."""
    inf = torch.full_like(m, math.inf)
    mc = m.clamp(min=0)
    fwd = torch.where(s < 0, mc / (-s), inf)
    bwd = torch.where(s > 0, mc / s, inf)
    if m.shape[1] == 0:
        z = torch.full((m.shape[0],), math.inf, dtype=m.dtype, device=m.device)
        return z, z.clone()
    return fwd.min(1).values, bwd.min(1).values


@dataclass
class WhatIf:
    """Result of :func:`what_if`.

    Attributes
    ----------
    prediction : Tensor
        ``(B, K)`` the region's affine map at ``x + δ``: ``A(x + δ) + d``.
    certified : Tensor
        ``(B,)`` bool: ``x + δ`` satisfies every inequality of ``x``'s region (closure), so ``prediction`` is
        exactly ``f(x + δ)``.
    max_step : Tensor
        ``(B,)`` largest ``t >= 0`` with ``x + tδ`` in the region (``inf`` when the ray never leaves it).
    output : Tensor
        ``(B, K)`` ``f(x)``.
    """

    prediction: Tensor
    certified: Tensor
    max_step: Tensor
    output: Tensor


@library_call
def what_if(model: nn.Module, x: Tensor, delta: Tensor, *, logits_at: str | None = None,
            strict: bool = True) -> WhatIf:
    """Exact prediction after a change ``δ``, certified from the region's affine inequalities.

    One forward-mode pass through the network frozen in ``x``'s pattern gives the pre-activations' rates along
    ``δ``; from them the largest step that stays in the region and the affine prediction ``f(x) + J δ`` follow.
    No forward pass at ``x + δ`` is made.
    """
    _check_x(x)
    if not isinstance(delta, Tensor) or delta.shape != x.shape:
        raise ValueError(f"delta must be a tensor of the same shape as x {tuple(x.shape)}, got "
                         f"{tuple(delta.shape) if isinstance(delta, Tensor) else type(delta).__name__}")
    _check_x(delta, "delta")
    x = x.detach()
    with preserved(model, eval_mode=True):
        with torch.no_grad():
            out, patterns = run_recorded(model, x, strict=strict, logits_at=logits_at)
        m, s, primal, tan, _ = _directional(model, x, delta.detach(), patterns, logits_at, strict)
    step, _ = _exit_steps(m, s)
    return WhatIf(primal + tan, step >= 1, step, out.reshape(x.shape[0], -1).detach())


@dataclass
class LineWalk:
    """The regions crossed by the segment ``x0 + t (x1 - x0)``, ``t`` in [0, 1].

    Attributes
    ----------
    breakpoints : Tensor
        ``(n + 1,)`` float64 ``t`` values ``0 = t_0 < t_1 < ... < t_n = 1``; region ``i`` covers
        ``[t_i, t_{i+1}]``.
    region_ids : Tensor
        ``(n,)`` int64 keys of the regions in order.
    packed : Tensor
        ``(n, n_words)`` exact bit-packed patterns.
    complete : bool
        False when the walk stopped at ``max_regions``: the last region is then only known to start at its
        breakpoint (the segment beyond it was not walked; :func:`line_walk` warns).
    """

    breakpoints: Tensor
    region_ids: Tensor
    packed: Tensor
    complete: bool = True

    @property
    def n_regions(self) -> int:
        return int(self.region_ids.numel())

    def region_at(self, t: float) -> int:
        """Index of the region containing ``t`` (the left one at a breakpoint)."""
        i = int(torch.searchsorted(self.breakpoints[1:-1], torch.tensor(float(t), dtype=torch.float64)))
        return i


@library_call
def line_walk(model: nn.Module, x0: Tensor, x1: Tensor, *, logits_at: str | None = None, strict: bool = True,
              max_regions: int = 100_000, float64: bool = True) -> LineWalk:
    """Exact sequence of regions along the segment from ``x0`` to ``x1`` (one sample each, shape
    ``(1, *input_shape)``; 1-D tensors are taken as one tabular sample).

    From the pattern at the current point one JVP pass gives the step at which the first inequality fails; the
    next region's pattern is recorded just past that breakpoint (a tiny step ``η``), and its own backward exit is
    checked to reach back to the breakpoint — otherwise ``η`` is halved, so thin regions are not skipped. With
    ``float64=True`` (default) the walk runs on a float64 deep copy of the model (the user's model is not touched);
    a model that cannot be deep-copied, has an instance-level ``forward`` function (a wrapper, which the copy would
    keep calling on the original modules) or fails as a float64 copy (a forward that casts to a fixed dtype) is
    refused with an error that says to pass ``float64=False``, which walks in the model's own dtype.

    Consecutive regions always differ: a region meets the segment in one interval (regions are convex), so where
    rounding ends a region short of its real end (by ~1e-7 in float32) and the step past it finds the same region
    again, that region is extended, not listed twice. Breakpoints are as exact as the walk's dtype allows.
    """
    if not isinstance(x0, Tensor):
        raise TypeError(f"x0 must be a tensor, got {type(x0).__name__}")
    if not is_int_at_least(max_regions, 1):
        raise ValueError(f"max_regions must be a positive int, got {max_regions!r}")
    x0 = x0.detach()
    if x0.dim() == 1:
        x0 = x0.unsqueeze(0)
    if x0.shape[0] != 1:
        raise ValueError(f"x0 must be one sample with a batch dimension (1, *input_shape); got {tuple(x0.shape)}")
    _check_x(x0, "x0")
    if not isinstance(x1, Tensor) or x1.numel() != x0.numel():
        raise ValueError(f"x1 must be a tensor with as many elements as x0 {tuple(x0.shape)}")
    x1 = x1.detach().reshape(x0.shape)
    _check_x(x1, "x1")
    dtype = x0.dtype
    net = model
    if float64:
        net = _float64_copy(model)
        x0, x1 = x0.double(), x1.double()
    v = x1 - x0
    bps = [0.0]
    packs, keys = [], []
    with preserved(net, eval_mode=True):

        def probe(t):
            xt = x0 + t * v
            with torch.no_grad():
                _, pats = run_recorded(net, xt, strict=strict, logits_at=logits_at)
            m, s, _, _, _ = _directional(net, xt, v, pats, logits_at, strict)
            fwd, bwd = _exit_steps(m, s)
            return pats, float(fwd[0]), float(bwd[0])

        t = 0.0
        try:
            pats, fwd, bwd = probe(0.0)
        except Exception as e:
            if not float64 or isinstance(e, ReluRegionsError) or not _runs(model, x0.to(dtype)):
                raise
            # the model runs in its own dtype and its float64 copy does not: its forward casts to a fixed dtype
            # (x.float()), or keeps layers of another dtype
            raise RuntimeError(f"line_walk(float64=True) runs on a float64 copy of the model, which fails on x0 "
                               f"({type(e).__name__}: {e}) although the model itself runs in {dtype}; its forward "
                               "probably casts to a fixed dtype. Pass float64=False to walk in the model's own "
                               "dtype") from e
        tol = _walk_resolution(net, x0, x1)
        # the first step past a breakpoint: well above the rounding of t (else the step may not move the point)
        eta0 = max(1e-9 if float64 else 1e-5, min(4 * tol, 1e-2))
        if fwd <= 0:  # starting on a boundary: take the region just after it
            pats, fwd, bwd, t = _step_past(probe, 0.0, eta0, float64, tol)
        complete = True
        while True:
            packed = pack_patterns(pats) if pats else torch.zeros(1, 1, dtype=torch.int64)
            end = t + fwd
            if packs and packed.shape == packs[-1].shape and torch.equal(packed, packs[-1]):
                # the step past the last breakpoint found the same region again: rounding ended it short of its
                # real end (a region meets a segment in one interval, so it is the same stretch): extend it
                if not end > bps[-1]:
                    raise RuntimeError(f"line_walk: the region ending at t={bps[-1]:.9g} could not be resolved "
                                       f"({'float64' if float64 else 'the model dtype'}: breakpoints closer than "
                                       "its rounding)" + ("; use float64=True (the default)" if not float64 else ""))
                bps.pop()
            else:
                packs.append(packed)
                keys.append(pattern_keys(pats) if pats else torch.zeros(1, dtype=torch.int64))
            if end >= 1.0 or len(packs) >= max_regions:
                complete = end >= 1.0
                bps.append(1.0)
                break
            bps.append(end)
            pats, fwd, bwd, t = _step_past(probe, end, eta0, float64, tol)
    if not complete:
        import warnings

        warnings.warn(f"line_walk stopped at max_regions={max_regions} at t={bps[-2]:.6g}: the last region's end and "
                      "the regions beyond it were not walked (LineWalk.complete is False)", UserWarning, stacklevel=2)
    packed = torch.cat(packs)
    return LineWalk(torch.tensor(bps, dtype=torch.float64), torch.cat(keys), packed, complete)


def _float64_copy(model: nn.Module, what: str = "line_walk(float64=True)", doing: str = "walk") -> nn.Module:
    """A float64 deep copy of ``model`` (for :func:`line_walk`, :func:`inscribed_ball`: ``what`` names the call,
    ``doing`` what float64=False does), or a clear error where a copy cannot stand in for it."""
    try:
        net = copy.deepcopy(model)
    except Exception as e:
        raise TypeError(f"{what} runs on a float64 deep copy of the model, and the model cannot be deep-copied "
                        f"({type(e).__name__}: {e}); pass float64=False to {doing} in the model's own dtype") from e
    for (name, mod), dup in zip(model.named_modules(), net.modules()):
        fwd = mod.__dict__.get("forward")
        # an instance-level forward that deepcopy kept as it is (a function: a wrapper set with model.forward = ...)
        # still calls the float32 original; a method of the model is rebound to the copy, and a compiled module
        # makes its own
        if fwd is not None and dup.__dict__.get("forward") is fwd:
            raise ValueError(f"{what} runs on a float64 deep copy of the model, but "
                             f"{'the model' if not name else repr(name)} has an instance-level forward "
                             f"({getattr(fwd, '__qualname__', type(fwd).__name__)}) that the copy would keep "
                             f"calling on the original modules; pass float64=False to {doing} in the model's own "
                             "dtype")
    return net.double()


def _runs(model: nn.Module, x: Tensor) -> bool:
    """Whether a plain forward pass of ``model`` on ``x`` succeeds (the model's state restored afterwards)."""
    try:
        with preserved(model, eval_mode=True), torch.no_grad():
            model(x)
    except Exception:
        return False
    return True


def _walk_resolution(net: nn.Module, x0: Tensor, x1: Tensor) -> float:
    """How far apart (in ``t``) two computed ends of one region may lie from rounding alone, in the coarsest
    floating dtype of the walk (the inputs', the model's parameters and buffers).

    A point ``x0 + t v`` is rounded to ``eps·|x|``, i.e. ``eps·|x|/|v|`` in ``t``, and every margin and rate is
    rounded to a few ``eps`` of its terms: in float32 the end of a region computed from two points inside it differs
    by ~1e-7, far above a float64-sized tolerance (the next region then seemed not to reach back to the breakpoint).
    """
    dts = {x0.dtype} | {t.dtype for t in (*net.parameters(), *net.buffers()) if t.is_floating_point()}
    eps = max(torch.finfo(d).eps for d in dts)
    span = float((x1 - x0).abs().max())
    size = float(torch.maximum(x0.abs().max(), x1.abs().max()))
    return 4 * eps * max(1.0, size / span if span > 0 else 1.0)


def _step_past(probe, tb: float, eta: float, float64: bool, tol: float = 0.0):
    """Record the region just after breakpoint ``tb``: the largest tried ``η`` whose region reaches back to tb
    (within ``tol``, the walk's rounding in ``t``: :func:`_walk_resolution`)."""
    for _ in range(40):
        t = tb + eta
        pats, fwd, bwd = probe(t)
        if t - bwd <= tb + max(1e-12, tol) * max(1.0, abs(tb)) + eta * 1e-6 and fwd > 0:
            return pats, fwd, bwd, t
        eta /= 2
    # no region found that starts at tb and leads on: in the model's own precision the breakpoints are closer than
    # its rounding (going on would repeat tb, or skip regions)
    raise RuntimeError(f"line_walk: no region after the breakpoint t={tb:.9g} could be resolved "
                       f"({'float64' if float64 else 'the model dtype'}: breakpoints closer than its rounding)"
                       + ("; use float64=True (the default)" if not float64 else ""))


# --- explicit inequalities: input-domain box, largest inscribed ball ----------------------------------------------


@dataclass
class RegionInequalities:
    """The region's inequalities written out: ``m_j(y) = m_j(x) + g_j · (y - x) >= 0`` for every margin ``j``.

    Attributes
    ----------
    margin : Tensor
        ``(B, M)`` margins at ``x``, every layer's in the order of
        :func:`margins` (the numbering of :attr:`BoundaryDistances.unit`); one a sample does not
        have (a max-pool window position in the padding, a clamp unit's bound in its saturated state) is ``+inf``
        (never violated).
    grad : Tensor
        ``(B, M, D)`` their input gradients (flattened input); zero where the margin is ``+inf``.
    layer : Tensor
        ``(M,)`` index into ``layer_names`` of each margin's layer.
    layer_names : list of str
    """

    margin: Tensor
    grad: Tensor
    layer: Tensor
    layer_names: list


@library_call
def region_inequalities(model: nn.Module, x: Tensor, *, layers: LayerSelection = None,
                        kinds: Sequence[str] | None = None, logits_at: str | None = None,
                        strict: bool = True) -> RegionInequalities:
    """All of the region's inequalities with their full input gradients (forward mode, ``D`` tangents per sample).

    Memory ``B·M·D`` for ``M`` margins and ``D`` input features: meant for small models or a few samples; use
    :func:`boundary_distance` (which only keeps gradient norms) for distances at scale.
    """
    _check_x(x)
    x = x.detach()
    b = x.shape[0]
    with preserved(model, eval_mode=True):
        with torch.no_grad():
            _, patterns = run_recorded(model, x, strict=strict, logits_at=logits_at)
        names = select_layers([p.name for p in patterns], layers)
        kinds = _check_kinds(kinds)
        if kinds is not None:
            names = [p.name for p in patterns if p.name in names and p.kind in kinds]
        tangent, n = _basis_and_x(x)
        offsets = _frozen_at_zero(model, x, patterns, names, strict, logits_at)  # for _check_preactivations
        flat_x = x.reshape(b, -1)
        pending: list[tuple[str, Tensor, Tensor, Tensor]] = []
        ms, gs, lay = [], [], []

        def grab(p, t):
            if p.name not in names:
                return
            primal, tan = fwAD.unpack_dual(t)
            m = margins(p, primal[:b])
            if tan is None:
                tan = torch.zeros_like(primal)
            raw = tan.reshape(n + 1, b, -1)  # e_1 ... e_D, then x
            pending.append((p.name, primal[:b].clone(), raw[n].clone(),
                            _qnorm(raw[:n], 2.0, 0) * _dual_norm(flat_x, 2.0)))
            g = margins(p, tan[:n * b], const=False).reshape(n, b, -1)
            ms.append(m)
            gs.append(g.permute(1, 2, 0))
            lay.append(torch.full((m.shape[1],), names.index(p.name), dtype=torch.int64))

        with forward_mode("region_inequalities", _REVERSE_ONLY), torch.no_grad(), fwAD.dual_level():
            primal = x.unsqueeze(0).expand(n + 1, *x.shape).reshape((n + 1) * b, *x.shape[1:])
            run_frozen(model, fwAD.make_dual(primal.contiguous(), tangent), patterns, strict=strict,
                       logits_at=logits_at, observe=grab)
        for name, value, lin, terms in pending:
            _check_preactivations(model, name, value, offsets[name], lin, terms)
    if not ms:
        z = torch.zeros(b, 0, dtype=x.dtype, device=x.device)
        return RegionInequalities(z, z.unsqueeze(2).expand(b, 0, n), torch.zeros(0, dtype=torch.int64), names)
    m, g, layer = torch.cat(ms, 1), torch.cat(gs, 1), torch.cat(lay)
    # every column stays, +inf with a zero gradient where a sample lacks it (max-pool padding; a clamp's upper bound
    # is a constraint of its linear units, not of its saturated ones): a sample's numbering is the same in any batch
    # (dropping the columns no sample of the batch had renumbered the rest) and the same as boundary_distance's
    return RegionInequalities(m, g, layer, names)


def _as_box(box, x: Tensor) -> tuple[Tensor, Tensor]:
    try:
        lo, hi = box
    except (TypeError, ValueError):
        raise ValueError(f"box must be a pair (lo, hi) of numbers or tensors shaped like one input, got {box!r}") \
            from None
    shape = x.shape[1:]
    bounds = []
    for name, v in (("lo", lo), ("hi", hi)):
        t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        try:
            t = t.expand(shape).reshape(-1)
        except RuntimeError:
            raise ValueError(f"box: {name} of shape {tuple(t.shape)} does not broadcast to one input's shape "
                             f"{tuple(shape)}") from None
        if bool(torch.isnan(t).any()):  # (NaN passes every comparison below)
            raise ValueError(f"box: {name} holds NaN")
        bounds.append(t)
    lo, hi = bounds
    if (lo > hi).any():
        raise ValueError("box: lo must be <= hi everywhere")
    xf = x.reshape(x.shape[0], -1)
    if ((xf < lo) | (xf > hi)).any():
        raise ValueError("box: every input must lie inside the box")
    return lo, hi


def _halfspace_box_distance(s: Tensor, a: Tensor, x: Tensor, lo: Tensor, hi: Tensor, p: float) -> Tensor:
    """``(M,)`` exact ``l_p`` distance from ``x`` to ``{y in box : a_j·(y - x) + s_j <= 0}`` (``inf`` if empty).

    One linear constraint over a box is separable: moving coordinate ``i`` by ``t_i`` (towards decreasing
    ``a_j·y``, at most ``cap_i`` before the box face) lowers the margin by ``|a_ji| t_i``. The cheapest ``t``
    reaching ``s_j``: for ``p = 1`` greedily along the largest ``|a_ji|`` (fractional knapsack); for ``p = 2`` and
    ``inf`` the KKT solution ``t_i = min(λ w_i, cap_i)`` (``w = |a|`` resp. 1), with ``λ`` found exactly on the
    piecewise-linear, increasing function ``Σ |a_i| min(λ w_i, cap_i)`` by sorting its breakpoints.
    """
    absa = a.abs()
    cap = torch.where(a > 0, x - lo, hi - x).expand_as(a)
    cap = torch.where(absa > 0, cap, torch.zeros_like(cap))
    s = s.clamp(min=0)
    total = (absa * cap).sum(1)
    inf = torch.full_like(s, math.inf)
    if a.shape[1] == 0:
        return torch.where(s == 0, torch.zeros_like(s), inf)
    if p == 1:
        order = absa.argsort(1, descending=True)
        aa, cc = absa.gather(1, order), cap.gather(1, order)
        red = (aa * cc).cumsum(1)
        k = (red < s[:, None]).sum(1).clamp(max=a.shape[1] - 1)  # first coordinate that completes the reduction
        before = torch.cat([torch.zeros_like(red[:, :1]), red[:, :-1]], 1).gather(1, k[:, None])[:, 0]
        moved = torch.cat([torch.zeros_like(cc[:, :1]), cc.cumsum(1)[:, :-1]], 1).gather(1, k[:, None])[:, 0]
        ak = aa.gather(1, k[:, None])[:, 0]
        d = moved + (s - before) / torch.where(ak > 0, ak, torch.ones_like(ak))
    else:
        w = absa if p == 2 else (absa > 0).to(a.dtype)
        beta = torch.where(w > 0, cap / torch.where(w > 0, w, torch.ones_like(w)), inf[:, None].expand_as(w))
        order = beta.argsort(1)
        bb, aa, cc, ww = (t.gather(1, order) for t in (beta, absa, cap, w))
        pre = torch.cat([torch.zeros_like(aa[:, :1]), (aa * cc).cumsum(1)[:, :-1]], 1)  # Σ_{i<k} |a_i| cap_i
        suf = (aa * ww).flip(1).cumsum(1).flip(1)  # Σ_{i>=k} |a_i| w_i
        g_at = pre + torch.where(torch.isinf(bb), inf[:, None].expand_as(bb), bb * suf)
        k = (g_at < s[:, None]).sum(1).clamp(max=a.shape[1] - 1)
        pk, sk = pre.gather(1, k[:, None])[:, 0], suf.gather(1, k[:, None])[:, 0]
        lam = (s - pk) / torch.where(sk > 0, sk, torch.ones_like(sk))
        if p == 2:
            d = _qnorm(torch.minimum(lam[:, None] * absa, cap), 2, 1)
        else:
            d = lam
    d = torch.where(total < s, inf, d)  # the box never reaches the hyperplane
    return torch.where(s == 0, torch.zeros_like(d), d)


@dataclass
class BoxDistances:
    """Result of :func:`boundary_distance_in_box`.

    Attributes
    ----------
    distance : Tensor
        ``(B,)`` distance from ``x`` to the nearest region-boundary point *inside the box*: every point of the box
        closer than this lies in ``x``'s region (``inf`` when no margin reaches 0 inside the box; a hyperplane that
        only touches the box counts, see :func:`boundary_distance_in_box`).
    unrestricted : Tensor
        ``(B,)`` the ordinary region distance (:func:`boundary_distance`); ``distance >= unrestricted``.
    nearest_in_box : Tensor
        ``(B,)`` bool: the ordinary nearest boundary point is reachable inside the box (the two distances agree).
    layer, unit : Tensor
        ``(B,)`` the inequality attaining ``distance`` (``-1`` / 0 when none): layer index into ``layer_names``
        and margin index within the layer's margins that exist (as in :class:`RegionInequalities`).
    layer_names : list of str
    """

    distance: Tensor
    unrestricted: Tensor
    nearest_in_box: Tensor
    layer: Tensor
    unit: Tensor
    layer_names: list


@library_call
def boundary_distance_in_box(model: nn.Module, x: Tensor, box, p: float = 2, *, layers: LayerSelection = None,
                             kinds: Sequence[str] | None = None, logits_at: str | None = None,
                             strict: bool = True) -> BoxDistances:
    """Exact distance to the region's boundary when inputs are confined to a box (e.g. pixels in ``[0, 1]``).

    The faces of the box are *not* region boundaries: the result is ``min_j dist_p(x, {y in box: m_j(y) <= 0})``,
    the radius within which every *valid* input lies in the region — never smaller than the ordinary distance,
    and ``inf`` when no margin reaches 0 inside the box. The hyperplanes are the boundary (``m_j(y) <= 0``, closed):
    one that only touches the box where the unit is still in x's state (a bias-free row of non-positive weights
    touching the corner 0 of ``[0, 1]^D``) gives its distance, though no box point changes pattern there — a
    conservative radius, never one that a changed pattern lies within. Each term is solved exactly (a single linear
    constraint over a box is separable; see :func:`_halfspace_box_distance`), so no LP is needed. Uses the full
    gradients of all margins (:func:`region_inequalities`): for small models / few samples.

    Parameters
    ----------
    model : nn.Module
        Piecewise-linear network (run in eval mode; its state is restored afterwards).
    x : Tensor
        ``(B, *input_shape)`` inputs, each inside the box.
    box : (lo, hi)
        Numbers or tensors broadcastable to one input's shape; every ``x`` must lie inside.
    p, layers, kinds, logits_at, strict
        As in :func:`boundary_distance`.

    Returns
    -------
    BoxDistances
    """
    q = dual_norm(p)
    p = float(p)
    _check_x(x)
    lo, hi = _as_box(box, x)
    ineq = region_inequalities(model, x, layers=layers, kinds=kinds, logits_at=logits_at, strict=strict)
    xf = x.detach().reshape(x.shape[0], -1)
    dist, unres, lay, unit = [], [], [], []
    for i in range(x.shape[0]):
        g, m = ineq.grad[i], ineq.margin[i]
        top = g.abs().amax(1) if g.shape[1] else torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
        nz = top > 0
        # each half-space divided by its gradient's largest entry (the same set): products of gradients in tiny or
        # huge input units neither under- nor overflow
        top = torch.where(nz, top, torch.ones_like(top))
        db = _halfspace_box_distance(m / top, g / top[:, None], xf[i], lo, hi, p)
        db = torch.where(nz, db, torch.full_like(db, math.inf))
        nrm = _qnorm(g, q, 1)
        du = torch.where(nz, m.clamp(min=0) / torch.where(nz, nrm, torch.ones_like(nrm)), torch.full_like(db, math.inf))
        if db.numel():
            v, j = db.min(0)
            dist.append(v)
            unres.append(du.min())
            lay.append(ineq.layer[j] if torch.isfinite(v) else torch.tensor(-1))
            first = int((ineq.layer == ineq.layer[j]).nonzero()[0]) if torch.isfinite(v) else int(j)
            unit.append(torch.tensor(int(j) - first if torch.isfinite(v) else 0))
        else:
            dist.append(torch.tensor(math.inf, dtype=x.dtype))
            unres.append(torch.tensor(math.inf, dtype=x.dtype))
            lay.append(torch.tensor(-1))
            unit.append(torch.tensor(0))
    d, u = torch.stack(dist), torch.stack(unres)
    # the two distances come from different formulas: they agree up to a few roundings of their dtype
    close = (d <= u * (1 + max(1e-9, 16 * torch.finfo(d.dtype).eps))) | (torch.isinf(d) & torch.isinf(u))
    return BoxDistances(d, u, close, torch.stack(lay), torch.stack(unit), ineq.layer_names)


@dataclass
class InscribedBall:
    """Largest ``l_p`` ball inside each region (Chebyshev ball), from :func:`inscribed_ball`.

    Attributes
    ----------
    radius : Tensor
        ``(B,)`` (``inf`` for an unbounded region without a box).
    center : Tensor
        ``(B, *input_shape)`` (``nan`` where the radius is ``inf``).
    """

    radius: Tensor
    center: Tensor


@library_call
def inscribed_ball(model: nn.Module, x: Tensor, p: float = 2, *, box=None, layers: LayerSelection = None,
                   logits_at: str | None = None, strict: bool = True, float64: bool = True) -> InscribedBall:
    """Radius and center of the largest ``l_p`` ball inside ``x``'s region (and the box, if given), by LP.

    Maximise ``r`` subject to ``m_j(x) + g_j·u >= r ||g_j||_q`` for every margin (center ``x + u``) and, with a
    box, ``lo_i + r <= x_i + u_i <= hi_i - r``. Solved with scipy's HiGHS (``linprog(method="highs")``) in
    float64, one LP per sample with ``D + 1`` variables and one row per margin: **slow** (seconds per sample for
    image-sized inputs) — meant for small models and a few samples.

    HiGHS's tolerances are absolute (about 1e-7), so the LP is posed scale-free: every row divided by
    ``||g_j||_q`` (its right side is then ``x``'s distance to the hyperplane) and lengths measured in units of
    ``x``'s distance to its nearest face. The returned radius is the exact distance from the returned center to
    the nearest hyperplane or box face (recomputed after the solve, so the ball lies inside the region up to
    float64 rounding of the inequalities), and within about 1e-7 relative of the largest radius — relative to
    the ball's size and its center's distance from ``x`` together: in a region thinner than ~1e-7 times its
    extent (a wedge whose faces pass through ``x``), the ball found may have radius 0 (an estimate from below,
    never a ball outside the region).

    With ``float64=True`` (default) the inequalities come from a float64 deep copy of the model (the user's model is
    not touched), as in :func:`line_walk`: where the region contains lines (inequality normals spanning fewer than
    ``D`` directions: a first layer narrower than the input, features no unit sees) and no box bounds them,
    float32 rounding tilts the deeper rows slightly into those free directions, and the LP followed the tilt
    ~10⁸ away: centers outside the region and radii several times too large or ``inf`` (27 of 29 random float32 MLPs
    6-3-8-2). ``float64=False`` uses the model's own dtype (for a model whose forward casts to a fixed dtype).

    A box may have infinite bounds (``(0, inf)``: non-negative features); only its finite faces bound the ball.
    """
    import numpy as np
    from scipy.optimize import linprog

    q = dual_norm(p)
    _check_x(x)
    lohi = _as_box(box, x) if box is not None else None
    net, xs = model, x
    if float64 and (x.dtype != torch.float64 or any(t.is_floating_point() and t.dtype != torch.float64
                                                    for t in (*model.parameters(), *model.buffers()))):
        net, xs = _float64_copy(model, "inscribed_ball(float64=True)", "solve"), x.detach().double()
    try:
        ineq = region_inequalities(net, xs, layers=layers, logits_at=logits_at, strict=strict)
    except Exception as e:
        if net is model or isinstance(e, ReluRegionsError) or not _runs(model, x):
            raise
        raise RuntimeError(f"inscribed_ball(float64=True) runs on a float64 copy of the model, which fails on x "
                           f"({type(e).__name__}: {e}) although the model itself runs in {x.dtype}; its forward "
                           "probably casts to a fixed dtype. Pass float64=False to solve in the model's own "
                           "dtype") from e
    b = x.shape[0]
    xf = x.detach().reshape(b, -1).to(torch.float64).cpu().numpy()
    n = xf.shape[1]
    radius = np.full(b, np.inf)
    center = np.full((b, n), np.nan)
    if lohi is not None:
        lo, hi = (t.to(torch.float64).cpu().numpy() for t in lohi)
    for i in range(b):
        g = ineq.grad[i].to(torch.float64).cpu().numpy()
        m = ineq.margin[i].to(torch.float64).cpu().numpy()
        top = np.abs(g).max(axis=1) if n else np.zeros(len(g))
        keep = (top > 0) & np.isfinite(m)  # a zero gradient never binds; an infinite margin is no inequality
        g, m = g[keep] / top[keep, None], m[keep] / top[keep]  # (no squares of huge / tiny entries)
        nrm = np.linalg.norm(g, ord=q, axis=1)
        g, dist = g / nrm[:, None], np.maximum(m / nrm, 0.0)  # unit rows; x's l_p distance to each hyperplane
        walls = np.concatenate([xf[i] - lo, hi - xf[i]]) if lohi is not None else np.zeros(0)
        wall_rows = np.vstack([-np.eye(n), np.eye(n)]) if lohi is not None else np.zeros((0, n))
        finite = np.isfinite(walls)  # (an infinite bound is no face: linprog refuses inf right sides)
        walls, wall_rows = walls[finite], wall_rows[finite]
        faces = np.concatenate([dist, walls])
        if not faces.size:  # nothing bounds the region
            continue
        pos = faces[faces > 0]
        scale = float(faces.min()) if faces.min() > 0 else (float(pos.min()) if pos.size else 1.0)
        # variables (u, r) in units of scale; rows: -g·u + r <= dist, and the box faces -u + r <= x - lo,
        # u + r <= hi - x (right sides: faces / scale)
        rows = np.vstack([-g, wall_rows])
        a_ub = np.hstack([rows, np.ones((len(rows), 1))])
        cost = np.zeros(n + 1)
        cost[-1] = -1.0
        for _ in range(3):  # solved again where the unit was far above the radius (x on a face)
            res = linprog(cost, A_ub=a_ub, b_ub=faces / scale, bounds=[(None, None)] * n + [(0, None)],
                          method="highs")
            solved = scale  # (the units of res.x: the loop may change scale after the last solve)
            if res.status != 0 or not 0 < res.x[-1] < 1e-2:
                break
            scale *= float(res.x[-1])
        if res.status == 3:  # unbounded: arbitrarily large balls fit
            continue
        if res.status != 0:
            raise RuntimeError(f"inscribed_ball: HiGHS failed for sample {i}: {res.message}")
        u = res.x[:n]
        # the radius that the returned center really has (HiGHS may overshoot by its tolerance): its distance to
        # the nearest hyperplane and box face
        room = faces / solved - rows @ u
        radius[i] = max(0.0, float(room.min())) * solved
        center[i] = xf[i] + u * solved
    return InscribedBall(torch.as_tensor(radius, dtype=x.dtype, device=x.device),
                         torch.as_tensor(center, dtype=x.dtype, device=x.device).reshape(x.shape))
