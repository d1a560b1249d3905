"""Piecewise-linear units: how each one's state is read, counted at its boundary, and frozen.

A *unit* is one scalar piecewise-linear nonlinearity (a ReLU on one pre-activation, one max-pool window, ...).
Every supported operation is described by a :class:`UnitRule`: which torch functions it covers, how to read the
state of every unit from the operation's input, and how to apply the operation with that state frozen, which
turns the network into the affine map of the region.

Convention: a ReLU unit is active iff its pre-activation is > 0, as autograd's ReLU'(0) = 0. A clamp / hardtanh
unit is linear iff lo < z < hi. A max-pool unit's state is the flat index of the maximum (torch's tie-breaking).
Units whose input sits exactly on a breakpoint are counted as *boundary* units.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from .errors import UnsupportedModuleError

Tensor = torch.Tensor


@dataclass
class LayerPattern:
    """The recorded state of one call of one piecewise-linear operation.

    Attributes
    ----------
    name : str
        Module path of the call (``"features.1"``), ``"<path>/<op>"`` for functional calls inside a module's
        forward, with ``"#k"`` appended for the k-th repeated call (k >= 1).
    kind : str
        One of ``"relu"``, ``"leaky_relu"``, ``"prelu"``, ``"clamp"``, ``"maxpool"``.
    state : Tensor
        Per-unit state, shape ``(B, *unit_shape)``: bool for ReLU-like units, int8 0/1/2 (below/linear/above)
        for clamps, int64 argmax indices for max-pools.
    n_states : int
        Number of possible states of one unit (used to pack keys).
    n_boundary : Tensor
        ``(B,)`` int64: units of this call whose input sits exactly on a breakpoint (ties for max-pools).
    params : dict
        Whatever is needed to replay the call with the state frozen (slopes, bounds, pooling geometry). Read-only:
        patterns of one call site and input shape may share it.
    """

    name: str
    kind: str
    state: Tensor
    n_states: int
    n_boundary: Tensor
    params: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return tuple(self.state.shape[1:])

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the operation's input (differs from ``unit_shape`` for pools)."""
        return tuple(self.params.get("in_shape", self.unit_shape))

    @property
    def n_units(self) -> int:
        return math.prod(self.state.shape[1:])  # from the shape: no tensor operation (called per batch)

    @property
    def bits_per_unit(self) -> int:
        return max(1, int(self.key_states - 1).bit_length())

    def flat_state(self) -> Tensor:
        """The state as ``(B, n_units)`` (also for an empty batch)."""
        return self.state.reshape(self.state.shape[0], self.n_units)

    def int_state(self) -> Tensor:
        """State as small integers in ``[0, key_states)``, shape ``(B, n_units)`` (bool for two-state units)."""
        if self.kind == "maxpool" and "geometry" in self.params:
            return _window_offsets(self)
        flat = self.flat_state()
        return flat if flat.dtype in (torch.bool, torch.uint8, torch.int8) else flat.to(torch.int64)

    @property
    def key_states(self) -> int:
        """Number of states used for keys (a max-pool unit: the span of a window in the flattened plane, not the
        plane size)."""
        if self.kind == "maxpool" and "geometry" in self.params:
            ks, _, _, dil, _ = self.params["geometry"]
            return (ks[0] - 1) * dil[0] * self.in_shape[-1] + (ks[1] - 1) * dil[1] + 1
        return self.n_states

    def cat(self, other: LayerPattern) -> LayerPattern:
        """Concatenate two recordings of the same call along the batch."""
        return LayerPattern.concat([self, other])

    @staticmethod
    def concat(parts: Sequence[LayerPattern]) -> LayerPattern:
        """Concatenate recordings of the same call along the batch in one copy (pairwise ``cat`` over many passes
        copied everything merged so far again for each pass: quadratic in the passes)."""
        if len(parts) == 1:
            return parts[0]
        p = parts[0]
        return LayerPattern(p.name, p.kind, torch.cat([q.state for q in parts]), p.n_states,
                            torch.cat([q.n_boundary for q in parts]), p.params)

    def batch(self, index: slice | Tensor) -> LayerPattern:
        """The recording of a subset of the batch."""
        return LayerPattern(self.name, self.kind, self.state[index], self.n_states, self.n_boundary[index], self.params)

    def to(self, device: torch.device | str) -> LayerPattern:
        return LayerPattern(self.name, self.kind, self.state.to(device), self.n_states,
                            self.n_boundary.to(device), self.params)


def boundary_counts(patterns: Sequence[LayerPattern], batch: int, device: torch.device | str = "cpu") -> Tensor:
    """``(batch,)`` units exactly on a breakpoint, summed over ``patterns`` (zeros when there are none)."""
    if not patterns:
        return torch.zeros(batch, dtype=torch.int64, device=device)
    return torch.stack([p.n_boundary for p in patterns]).sum(0)


def _window_offsets(p: LayerPattern) -> Tensor:
    """Max-pool argmax as its offset from its window's corner in the flattened plane, ``dr*dil*W + dc*dil``:
    ``(B, n_units)`` in ``[0, key_states)``. The same information as the flat plane index (the window is fixed
    by the output position) in a byte or two, for one subtraction: splitting it into (row, column) would cost
    divisions for no information."""
    ks, st, pad, dil, _ = p.params["geometry"]
    idx = p.state
    if p.params["dims"] == 1:
        idx = idx.unsqueeze(-2)
    small = p.key_states <= 256  # the offset fits a byte: subtract modulo 256, after one narrowing cast
    corner = _corners(tuple(idx.shape[-2:]), tuple(st), tuple(pad), p.in_shape[-1], idx.device, small)
    rel = (idx.to(torch.uint8) if small else idx) - corner
    return rel.flatten(1)


@functools.lru_cache(maxsize=256)
def _corners(out_hw: tuple, st: tuple, pad: tuple, w_in: int, device: torch.device, small: bool) -> Tensor:
    """Flat plane index of every window's top-left corner, ``(Ho, Wo)`` (uint8 modulo 256 when ``small``); a
    constant of the pooling geometry, cached."""
    ho, wo = out_hw
    r0 = (torch.arange(ho, device=device) * st[0] - pad[0]).view(-1, 1)
    c0 = (torch.arange(wo, device=device) * st[1] - pad[1]).view(1, -1)
    corner = r0 * w_in + c0
    return corner.to(torch.uint8) if small else corner


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _inplace(name: str, args: tuple, kwargs: dict, pos: int) -> bool:
    return name.endswith("_") or bool(_arg(args, kwargs, pos, "inplace", False))


def write_back(z: Tensor, out: Tensor, params: dict) -> Tensor:
    """Honour in-place semantics in the frozen replay (user code may rely on the input being modified)."""
    if params.get("inplace") and not (z.is_leaf and z.requires_grad):
        return z.copy_(out)
    return out


def _count(mask: Tensor) -> Tensor:
    flat = mask.flatten(1)
    if flat.device.type == "cpu" and not bool(flat.any()):
        # exact zeros are rare: on the CPU an any() pass is much cheaper than an integer sum (and syncs nothing)
        return torch.zeros(flat.shape[0], dtype=torch.int64)
    return flat.sum(1)


def _boundary(x: Tensor, params: dict, at: float = 0.0) -> Tensor | None:
    """Units whose input equals the breakpoint ``at``, per sample (None if counting is switched off: the
    recorder fills in shared zeros)."""
    if not params.get("count_boundary", True):
        return None
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    flat = (x.detach() if at == 0 else x.detach() - at).reshape(x.shape[0], -1)  # x - at == 0 iff x == at
    # count_nonzero reads floats in one pass, with no bool temporary (a third of the time of (x == 0).sum());
    # on the CPU a global count first: exact zeros are rare, and that count syncs nothing there
    if flat.device.type == "cpu" and int(torch.count_nonzero(flat)) == flat.numel():
        return torch.zeros(flat.shape[0], dtype=torch.int64)
    return flat.shape[1] - torch.count_nonzero(flat, dim=1)


def _per_replica(z: Tensor, factor: Tensor) -> Tensor:
    """``z * factor`` for ``z`` of ``r * B`` rows and ``factor`` of ``B`` rows, broadcasting (no repeated copy)."""
    primal, tangent = fwAD.unpack_dual(z)
    if tangent is not None:
        # the forward-mode derivative of a product with a constant, spelled out: forward AD would give the factor
        # a zero tangent, and arithmetic on such zero tensors takes a slow generic route (torch 2.13 on the 2-core
        # Xeon: ~1 ms for a 16 x 6 x 24 x 24 product, against ~30 µs for the two plain products)
        return fwAD.make_dual(_per_replica(primal, factor), _per_replica(tangent, factor))
    b = factor.shape[0]
    if z.shape[0] == b:
        return z * factor
    return (z.view(z.shape[0] // b, *factor.shape) * factor).view(z.shape)


def _cached(pattern: LayerPattern, name: str, like: Tensor, build) -> Tensor:
    key = (name, like.dtype, like.device)
    t = pattern._cache.get(key)
    if t is None:
        t = pattern._cache[key] = build()
    return t


def _expand_state(state: Tensor, z: Tensor) -> Tensor:
    """Repeat a ``(B, ...)`` state for an input batched as ``(r*B, ...)`` (replica-major)."""
    r, rem = divmod(z.shape[0], state.shape[0])
    if rem:
        raise ValueError(f"batch {z.shape[0]} is not a multiple of the recorded batch {state.shape[0]}")
    return state if r == 1 else state.repeat(r, *([1] * (state.dim() - 1)))


def _adaptive_ties(x: Tensor, out: Tensor, dims: int) -> Tensor:
    """``(B,)`` windows of an adaptive max-pool whose nonzero maximum is attained more than once: window ``i`` of a
    length-``n`` axis pooled to ``o`` is ``[floor(i n / o), ceil((i + 1) n / o))`` (torch's rule; windows may
    overlap), one comparison per window."""
    if dims == 1:
        x, out = x.unsqueeze(-2), out.unsqueeze(-2)
    (h, w), (oh, ow) = x.shape[-2:], out.shape[-2:]
    rows = [(i * h // oh, -(-(i + 1) * h // oh)) for i in range(oh)]
    cols = [(j * w // ow, -(-(j + 1) * w // ow)) for j in range(ow)]
    ties = torch.zeros(out.shape, dtype=torch.bool, device=out.device)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            top = out[..., i, j]
            ties[..., i, j] = ((x[..., r0:r1, c0:c1] == top[..., None, None]).flatten(-2).sum(-1) > 1) & (top != 0)
    return _count(ties.reshape(x.shape[0], -1))


def _top_two(x: Tensor, ks: tuple) -> tuple[Tensor, Tensor | None]:
    """Largest and second largest entry of every disjoint ``ks`` window of ``x`` (..., H, W): running merges over
    the rows of each window (contiguous slices), then over its columns."""
    kh, kw = ks
    ho, wo = x.shape[-2] // kh, x.shape[-1] // kw
    v = x[..., : ho * kh, : wo * kw].unflatten(-2, (ho, kh))

    def merge(t1, s1, t2, s2):
        top, second = torch.maximum(t1, t2), torch.minimum(t1, t2)
        for s in (s1, s2):
            if s is not None:
                second = torch.maximum(second, s)
        return top, second

    t, s = v[..., 0, :], None
    for i in range(1, kh):
        t, s = merge(t, s, v[..., i, :], None)
    t = t.unflatten(-1, (wo, kw))
    s = None if s is None else s.unflatten(-1, (wo, kw))
    top, second = t[..., 0], None if s is None else s[..., 0]
    for j in range(1, kw):
        top, second = merge(top, second, t[..., j], None if s is None else s[..., j])
    return top, second


class UnitRule:
    """How one family of torch functions behaves as piecewise-linear units."""

    kind: str = ""

    def parse(self, func, args: tuple, kwargs: dict) -> tuple[Tensor, dict] | None:
        """Return (input tensor, params) if this call is a piecewise-linear unit op, else None."""
        raise NotImplementedError

    def record(self, func, args: tuple, kwargs: dict, x: Tensor, params: dict) -> tuple[Any, Tensor, Tensor, int]:
        """Run the call as the user wrote it; return (output, state, n_boundary, n_states).

        ``n_boundary`` is None when ``params["count_boundary"]`` is false."""
        raise NotImplementedError

    def frozen(self, z: Tensor, pattern: LayerPattern, func, args: tuple, kwargs: dict) -> Any:
        """Apply the call to ``z`` with the recorded state frozen (an affine function of z)."""
        raise NotImplementedError

    def frozen_linear(self, m: Tensor, pattern: LayerPattern, func, args: tuple, kwargs: dict) -> Tensor:
        """The linear part of the frozen call, applied to replicas ``m`` (used by the graph walker)."""
        out = self.frozen(m, replace(pattern, params={**pattern.params, "inplace": False}), func, args, kwargs)
        return out[0] if isinstance(out, tuple) else out


class ReluRule(UnitRule):
    kind = "relu"
    _clamps = ("clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_")

    def parse(self, func, args, kwargs):
        name = getattr(func, "__name__", "")
        if name in self._clamps:
            lo = _arg(args, kwargs, 1, "min")
            hi = _arg(args, kwargs, 2, "max") if "min" not in name else None
            if hi is not None or isinstance(lo, Tensor) or lo is None or float(lo) != 0.0:
                return None
            return args[0], {"inplace": name.endswith("_")}
        return args[0], {"inplace": _inplace(name, args, kwargs, 1)}

    def record(self, func, args, kwargs, x, params):
        n_boundary = _boundary(x, params)  # before the call: an in-place ReLU overwrites x
        out = func(*args, **kwargs)
        # max(x, 0) is nonzero exactly where x > 0; casting the output to bool is ~5x cheaper than comparing x
        return out, out.bool(), n_boundary, 2

    def frozen(self, z, pattern, func, args, kwargs):
        mask = _cached(pattern, "mask", z, lambda: pattern.state.to(z.dtype))
        return write_back(z, _per_replica(z, mask), pattern.params)


class LeakyReluRule(UnitRule):
    kind = "leaky_relu"

    def parse(self, func, args, kwargs):
        return args[0], {"slope": float(_arg(args, kwargs, 1, "negative_slope", 0.01)),
                         "inplace": _inplace(getattr(func, "__name__", ""), args, kwargs, 2)}

    def record(self, func, args, kwargs, x, params):
        # the state and the boundary before the call: an in-place leaky ReLU overwrites x (with a negative or zero
        # slope, x > 0 and x == 0 read afterwards are another pattern)
        state, n_boundary = x > 0, _boundary(x, params)
        return func(*args, **kwargs), state, n_boundary, 2

    def frozen(self, z, pattern, func, args, kwargs):
        slopes = _cached(pattern, "slopes", z, lambda: torch.where(
            pattern.state, torch.ones((), dtype=z.dtype, device=z.device),
            torch.full((), pattern.params["slope"], dtype=z.dtype, device=z.device)))
        return write_back(z, _per_replica(z, slopes), pattern.params)


class PReluRule(UnitRule):
    kind = "prelu"

    def parse(self, func, args, kwargs):
        return args[0], {}

    def record(self, func, args, kwargs, x, params):
        return func(*args, **kwargs), x > 0, _boundary(x, params), 2

    def frozen(self, z, pattern, func, args, kwargs):
        w = _arg(args, kwargs, 1, "weight")
        if w.numel() > 1 and z.dim() >= 2:
            w = w.reshape(1, -1, *([1] * (z.dim() - 2)))
        s = _expand_state(pattern.state, z)
        return torch.where(s, z, z * w.to(z.dtype))


class ClampRule(UnitRule):
    """Hardtanh, ReLU6 and clamp with scalar bounds: three-state units (below, linear, above)."""

    kind = "clamp"

    def parse(self, func, args, kwargs):
        name = getattr(func, "__name__", "")
        if name in ("hardtanh", "hardtanh_"):
            lo, hi = float(_arg(args, kwargs, 1, "min_val", -1.0)), float(_arg(args, kwargs, 2, "max_val", 1.0))
            return args[0], {"lo": lo, "hi": hi, "inplace": _inplace(name, args, kwargs, 3)}
        if name in ("relu6", "relu6_"):
            return args[0], {"lo": 0.0, "hi": 6.0, "inplace": _inplace(name, args, kwargs, 1)}
        else:  # clamp family: the ReLU rule has already taken clamp(min=0)
            if "max" in name:  # clamp_max(input, max)
                lo, hi = None, _arg(args, kwargs, 1, "max")
            else:
                lo = _arg(args, kwargs, 1, "min")
                hi = None if "min" in name else _arg(args, kwargs, 2, "max")
            if isinstance(lo, Tensor) or isinstance(hi, Tensor) or (lo is None and hi is None):
                return None
        lo = None if lo is None else float(lo)
        hi = None if hi is None else float(hi)
        return args[0], {"lo": lo, "hi": hi, "inplace": name.endswith("_")}

    def record(self, func, args, kwargs, x, params):
        lo, hi = params["lo"], params["hi"]
        if lo is not None and hi is not None and lo > hi:  # (before: recorded as if lo <= hi, wrong states)
            raise UnsupportedModuleError(
                f"'{getattr(func, '__name__', func)}' with min {lo:g} > max {hi:g}: torch sets every element to max, "
                "a constant, which no three-state unit describes; write the constant instead")
        state = torch.ones_like(x, dtype=torch.int8)
        n_boundary = None
        for bound, value, below in ((lo, 0, True), (hi, 2, False)):
            if bound is not None:
                state = torch.where(x <= bound if below else x >= bound, torch.full_like(state, value), state)
                nb = _boundary(x, params, bound)
                n_boundary = nb if n_boundary is None or nb is None else n_boundary + nb
        return func(*args, **kwargs), state, n_boundary, 3

    def frozen(self, z, pattern, func, args, kwargs):
        s = _expand_state(pattern.state, z)
        out = torch.where(s == 1, z, torch.zeros_like(z))
        if pattern.params["lo"] is not None:
            out = torch.where(s == 0, torch.full_like(z, pattern.params["lo"]), out)
        if pattern.params["hi"] is not None:
            out = torch.where(s == 2, torch.full_like(z, pattern.params["hi"]), out)
        return write_back(z, out, pattern.params)

    def frozen_linear(self, m, pattern, func, args, kwargs):
        # saturated units contribute a constant, which belongs to the offset, not to the linear part
        return m * (_expand_state(pattern.state, m) == 1).to(m.dtype)


def _check_windows(plane: tuple[int, ...], dims: int, ks, st, pad, dil, ceil_mode: bool) -> None:
    """Raise :class:`UnsupportedModuleError` when a pooling window lies entirely in the padding: torch returns -inf
    there and an argmax outside the plane, which no region describes. Only a dilated window can (torch limits the
    padding to half the kernel), so undilated pools cost no loop here."""
    if all(d == 1 for d in dil) or not any(pad):
        return
    for n, k, s_, p, d in zip(plane, ks[-dims:], st[-dims:], pad[-dims:], dil[-dims:]):
        span = d * (k - 1) + 1
        n_out = (n + 2 * p - span + (s_ - 1 if ceil_mode else 0)) // s_ + 1
        if ceil_mode and (n_out - 1) * s_ >= n + p:  # torch drops a last window that starts in the right padding
            n_out -= 1
        for o in range(max(0, n_out)):
            if not any(0 <= o * s_ - p + j * d < n for j in range(k)):
                raise UnsupportedModuleError(
                    f"max pool with kernel {tuple(ks[-dims:])}, stride {tuple(st[-dims:])}, padding "
                    f"{tuple(pad[-dims:])}, dilation {tuple(dil[-dims:])} on a plane of {plane}: output {o} of a "
                    "dimension pools only padding (torch returns -inf and an argmax outside the input); use less "
                    "padding or dilation")


class MaxPoolRule(UnitRule):
    """Max pooling (1d/2d, also adaptive): the flat argmax inside each window is the unit's state."""

    kind = "maxpool"

    def parse(self, func, args, kwargs):
        name = getattr(func, "__name__", "")
        adaptive = name.startswith("adaptive")
        ri_pos = 2 if adaptive else 6
        ret = "with_indices" in name or bool(_arg(args, kwargs, ri_pos, "return_indices", False))
        params = {"fn": name, "dims": 1 if "1d" in name else 2, "return_indices": ret, "adaptive": adaptive}
        if not adaptive:
            def pair(v, default, lead=1):
                # 1d pools are treated as 2d pools over a height-1 plane: lead is that extra dimension's value
                v = default if v is None else v
                if isinstance(v, int):
                    v = (v,) * params["dims"]
                v = tuple(v)
                return v if params["dims"] == 2 else (lead,) + v
            ks = pair(_arg(args, kwargs, 1, "kernel_size"), None)
            st = _arg(args, kwargs, 2, "stride")
            st = ks if st is None or (isinstance(st, (list, tuple)) and len(st) == 0) else pair(st, None)
            params["geometry"] = (ks, st, pair(_arg(args, kwargs, 3, "padding", 0), 0, lead=0),
                                  pair(_arg(args, kwargs, 4, "dilation", 1), 1),
                                  bool(_arg(args, kwargs, 5, "ceil_mode", False)))
            _check_windows(tuple(args[0].shape[-params["dims"]:]), params["dims"], *params["geometry"])
        return args[0], params

    @staticmethod
    def _with_indices(args, kwargs, params):
        kw = {k: v for k, v in kwargs.items() if k != "return_indices"}
        if params["adaptive"]:
            f = F.adaptive_max_pool1d if params["dims"] == 1 else F.adaptive_max_pool2d
            return f(args[0], _arg(args, kw, 1, "output_size"), return_indices=True)
        f = F.max_pool1d if params["dims"] == 1 else F.max_pool2d
        kw.update({k: v for k, v in zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), args[1:6])})
        return f(args[0], **kw, return_indices=True)

    def record(self, func, args, kwargs, x, params):
        out, idx = self._with_indices(args, kwargs, params)
        result = (out, idx) if params["return_indices"] else out
        return result, idx, self._ties(x, out, idx, params), int(torch.Size(x.shape[-params["dims"]:]).numel())

    @staticmethod
    def _ties(x: Tensor, out: Tensor, idx: Tensor, params: dict) -> Tensor | None:
        """Windows whose nonzero maximum is attained more than once (counted exactly).

        Ties at exactly 0 are not counted: after a ReLU they are windows of inactive units, whose affine functions
        coincide (no boundary there). A max-pool reading exact zeros that no ReLU made (an input image's
        background) does have a boundary there, which this count leaves out; ``boundary_distance`` gives 0.
        """
        if not params.get("count_boundary", True):
            return None
        zero = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        if x.shape[0] == 0:
            return zero
        if params["adaptive"]:
            return _adaptive_ties(x.detach(), out.detach(), params["dims"])
        ks, st, pad, dil, _ = params["geometry"]
        m = out.detach()
        xx = x.detach()
        if params["dims"] == 1:  # a 1d pool: a 2d pool over a height-1 plane
            xx, m = xx.unsqueeze(-2), m.unsqueeze(-2)
        # ceil_mode's partial windows at the far ends: how far the last window reaches past the (padded) input
        extra = [max(0, (o - 1) * s_ + d * (k - 1) + 1 - (n + 2 * p))
                 for o, s_, d, k, n, p in zip(m.shape[-2:], st, dil, ks, xx.shape[-2:], pad)]
        if tuple(st) == tuple(ks) and not any(pad) and all(d == 1 for d in dil) and not any(extra):
            # disjoint windows: the runner-up of every window from strided slices; a tie is a runner-up equal to
            # the maximum (3x cheaper than knocking the winner out and pooling again)
            top, second = _top_two(xx, ks)
            if second is None:  # 1x1 windows
                return zero
            ties = (second == top) & (top != 0)
            return _count(ties.reshape(x.shape[0], -1))
        batch_shape = xx.shape[:-2]
        xx = xx.reshape(-1, 1, *xx.shape[-2:])
        # padding and partial windows: -inf, as the pool's own padding (unfold pads with 0, max-pool with -inf)
        if any(pad) or any(extra):
            xx = F.pad(xx, (pad[1], pad[1] + extra[1], pad[0], pad[0] + extra[0]), value=float("-inf"))
        cols = F.unfold(xx, ks, dilation=dil, stride=st)  # (N, k, L)
        m = m.reshape(cols.shape[0], -1)
        if m.shape[-1] != cols.shape[-1]:  # (a geometry this arithmetic does not know: refuse to guess)
            raise RuntimeError(f"max-pool ties: {cols.shape[-1]} windows for {m.shape[-1]} outputs; please report")
        # ties at exactly 0 are windows of inactive ReLUs: their affine functions coincide, no boundary there
        ties = ((cols == m.unsqueeze(1)).sum(1) > 1) & (m != 0)
        return _count(ties.reshape(*batch_shape, -1).reshape(x.shape[0], -1))

    def frozen(self, z, pattern, func, args, kwargs):
        d = pattern.params["dims"]
        # a gather of the recorded argmax; its backward is a scatter-add, which measured (2-core Xeon, batch 256,
        # 6x24x24 planes) 1 ms for forward and backward together, against 6 ms for a one-hot mask with a sum-pool
        idx, b = pattern.state, pattern.state.shape[0]
        r = z.shape[0] // b
        # replicas (r*B rows): gather through a broadcast view of the indices, not r copies of them
        zr = z.reshape(r, b, *z.shape[1:]).flatten(-d)
        ir = idx.flatten(-d).unsqueeze(0).expand(r, *idx.flatten(-d).shape)
        out = zr.gather(-1, ir).view(r * b, *idx.shape[1:])
        if pattern.params["return_indices"]:
            return out, _expand_state(pattern.state, z)
        return out
