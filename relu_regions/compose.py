"""The graph walker: compose a region's affine map layer by layer, as explicit matrices.

The model runs on 0 with its recorded pattern frozen (so every tensor's value is the constant part ``c`` of its
affine function of the input), and beside every input-dependent tensor ``T = M·x + c`` the walker keeps the linear
part ``M`` with shape ``(D, B, *T.shape[1:])`` — one slice per input feature. Each operation has a rule for ``M``:

- Linear: ``W·M`` (the layer's matrix); Conv1d/Conv2d: the convolution without bias applied to each slice (the
  Toeplitz matrix, applied rather than materialised); BatchNorm (eval): per-channel scale; AvgPool /
  AdaptiveAvgPool / padding: the same linear operation;
- ReLU / LeakyReLU / PReLU: multiply by the frozen slopes; clamps: keep linear units only; MaxPool: gather the
  recorded argmax;
- data movement (view, reshape, flatten, permute, indexing, cat, ...): the same movement of ``M``, derived by
  running the operation on an index tensor;
- sums, differences, scaling by constants: the same on ``M``.

Any other operation on an input-dependent tensor raises :class:`~relu_regions.UnsupportedModuleError` naming the
module and the operation (a whitelist: nothing unknown passes silently). Cost ~ D forward passes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UnsupportedModuleError
from .recording import _RULES, _call, _Mode, _op_name, _Session, _session, _tensors
from .units import LayerPattern

Tensor = torch.Tensor
T = torch.Tensor


def _fold(m: Tensor) -> Tensor:
    return m.reshape(m.shape[0] * m.shape[1], *m.shape[2:])


def _unfold(m: Tensor, d: int) -> Tensor:
    return m.reshape(d, m.shape[0] // d, *m.shape[1:])


_MOVE = {T.view, T.reshape, torch.reshape, T.flatten, torch.flatten, T.unflatten, torch.unflatten, T.squeeze,
         torch.squeeze, T.unsqueeze, torch.unsqueeze, T.contiguous, T.clone, torch.clone, T.permute, torch.permute,
         T.transpose, torch.transpose, T.t, torch.t, T.movedim, torch.movedim, T.__getitem__, T.expand, T.expand_as,
         T.repeat, T.narrow, torch.narrow, T.select, torch.select, T.flip, torch.flip, T.roll, torch.roll, T.chunk,
         torch.chunk, T.split, torch.split, T.unbind, torch.unbind, T.view_as, T.reshape_as, T.detach, torch.detach,
         T.swapaxes, torch.swapaxes, T.mT, T.T, F.pixel_shuffle, F.pixel_unshuffle, torch.pixel_shuffle,
         torch.pixel_unshuffle, F.channel_shuffle, torch.tile, T.tile}
_IDENTITY = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, T.to,
             T.float, T.double, T.type_as}
_ADD = {torch.add, T.add, T.add_, T.__add__, T.__radd__, T.__iadd__}
_SUB = {torch.sub, T.sub, T.sub_, T.__sub__, T.__isub__, torch.subtract}
_RSUB = {T.__rsub__, torch.rsub}
_NEG = {torch.neg, T.neg, T.__neg__, T.neg_}
_MUL = {torch.mul, T.mul, T.mul_, T.__mul__, T.__rmul__, T.__imul__, torch.multiply}
_DIV = {torch.div, T.div, T.div_, T.__truediv__, T.__itruediv__, torch.true_divide}
# linear maps of one tensor, applied to each slice of M as they are (interpolation at fixed sizes is linear in
# every mode)
_POOL = {F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.interpolate, F.upsample,
         F.upsample_nearest, F.upsample_bilinear}
_CONV = {F.conv1d: 7, F.conv2d: 7, F.conv_transpose1d: 8, F.conv_transpose2d: 8}  # -> number of arguments
_CAT = {torch.cat, torch.concat, torch.concatenate, torch.stack}
_REDUCE = {T.sum, torch.sum, T.mean, torch.mean}


class _ComposeSession(_Session):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.maps: dict[int, tuple[weakref.ref, Tensor]] = {}
        self.d = 0

    def begin_pass(self, inputs: tuple, taint: bool = True) -> None:
        super().begin_pass(inputs, taint)
        for t, m in getattr(self, "pending_inputs", []):
            self.set_m(t, m)

    def m_of(self, t: Any) -> Tensor | None:
        if not isinstance(t, Tensor):
            return None
        e = self.maps.get(id(t))
        return e[1] if e is not None and e[0]() is t else None

    def alias(self, t: Tensor, copy: Tensor) -> None:
        m = self.m_of(t)
        if m is not None:
            self.set_m(copy, m)

    def set_m(self, t: Tensor, m: Tensor) -> None:
        key = id(t)
        self.maps[key] = (weakref.ref(t, lambda _r, k=key, maps=self.maps: maps.pop(k, None)), m)
        self.taint(t)


class _ComposeMode(_Mode):
    s: _ComposeSession

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        s = self.s
        if s.current is None:
            return func(*args, **kwargs)
        tracked = [t for a in list(args) + list(kwargs.values()) for t in _tensors(a) if s.m_of(t) is not None]
        if not tracked:
            return func(*args, **kwargs)
        rules = _RULES.get(func)
        if rules is not None and s.m_of(args[0] if args else None) is not None:
            for rule in rules:
                parsed = rule.parse(func, args, kwargs)
                if parsed is not None:
                    m_in = s.m_of(parsed[0])
                    out = self._unit(rule, func, args, kwargs, *parsed)
                    pattern = s.current[-1]
                    m_out = _unfold(rule.frozen_linear(_fold(m_in), pattern, func, args, kwargs), s.d)
                    s.set_m(out[0] if isinstance(out, tuple) else out, m_out)
                    return out
        self._check(func, args, kwargs)
        if func is T.__setitem__:  # returns None: the write would pass as a shape query, M left as it was
            raise UnsupportedModuleError(
                f"{s.describe(s.where())} writes into a tensor ('__setitem__') with an input-dependent tensor "
                "involved, which the graph walker (method='compose') has no rule for; use method='reverse' or "
                "'forward', which need no per-operation rules")
        out = func(*args, **kwargs)
        outs = list(_tensors(out))
        if not outs or not any(o.is_floating_point() for o in outs):
            return out  # shape queries, comparisons used for control flow, ...
        maps = _linear_rule(s, func, args, kwargs, out)
        if maps is None:
            raise UnsupportedModuleError(
                f"{s.describe(s.where())} calls '{_op_name(func)}', which the graph walker (method='compose') has no "
                "rule for; use method='reverse' or 'forward', which need no per-operation rules")
        for o, m in zip(outs, maps):
            s.set_m(o, m)
        return out


def _by_index(func, args, kwargs, src: Tensor, m: Tensor, d: int) -> list[Tensor]:
    """Movement ops: run the op on an index tensor in place of ``src`` and gather ``m`` accordingly."""
    idx = torch.arange(src.numel(), device=src.device).reshape(src.shape)
    a = [idx if x is src else x for x in args]
    kw = {k: (idx if v is src else v) for k, v in kwargs.items()}
    moved = func(*a, **kw)
    flat = m.reshape(d, -1)
    return [flat[:, i.reshape(-1)].reshape(d, *i.shape) for i in _tensors(moved)]


def _linear_rule(s: _ComposeSession, func, args, kwargs, out) -> list[Tensor] | None:
    d = s.d
    m0 = s.m_of(args[0]) if args else None
    o = out if isinstance(out, Tensor) else None

    def like_out(m: Tensor) -> Tensor:
        return m if tuple(m.shape[1:]) == tuple(o.shape) else torch.broadcast_to(m, (d, *o.shape))

    if func in _MOVE:
        return _by_index(func, args, kwargs, args[0], m0, d) if m0 is not None else None
    if func in _IDENTITY:
        if func in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout):
            if bool(args[2] if len(args) > 2 else kwargs.get("training", True)):
                return None
        return [m0.to(o.dtype)]
    if func is F.linear:
        return [F.linear(m0, args[1] if len(args) > 1 else kwargs["weight"])]
    if func in _CONV:
        a = list(args) + [None] * (_CONV[func] - len(args))
        kw = {k: v for k, v in kwargs.items() if k != "bias"}
        rest = [x for x in a[3:] if x is not None]
        return [_unfold(func(_fold(m0), a[1], None, *rest, **kw), d)]
    if func is F.batch_norm:
        rv = args[2] if len(args) > 2 else kwargs["running_var"]
        w = args[3] if len(args) > 3 else kwargs.get("weight")
        eps = args[7] if len(args) > 7 else kwargs.get("eps", 1e-5)
        scale = torch.rsqrt(rv + eps) * (w if w is not None else 1)
        return [m0 * scale.reshape(-1, *([1] * (m0.dim() - 3)))]
    if func in _POOL or func is F.pad:
        kw = dict(kwargs)
        if func is F.pad:
            kw.pop("value", None)
            a = list(args[:3])
            return [_unfold(F.pad(_fold(m0), *a[1:], **kw), d)]
        return [_unfold(func(_fold(m0), *args[1:], **kw), d)]
    if func in _ADD or func in _SUB or func in _RSUB:
        ma, mb = s.m_of(args[0]), s.m_of(args[1] if len(args) > 1 else kwargs.get("other"))
        alpha = kwargs.get("alpha", 1)
        if func in _SUB:
            alpha = -alpha
        if func in _RSUB:  # other - self
            ma, mb, alpha = mb, ma, -alpha
        total = ma if ma is not None else None
        if mb is not None:
            total = alpha * mb if total is None else total + alpha * mb
        return [like_out(total)]
    if func in _NEG:
        return [-m0]
    if func in _MUL or func in _DIV:
        other = args[1] if len(args) > 1 else kwargs.get("other")
        if s.m_of(other) is not None:
            return None  # product of two input-dependent tensors (caught by strict mode already)
        if m0 is None:  # constant * tracked (reflected)
            return None
        return [like_out(m0 * other if func in _MUL else m0 / other)]
    if func in _CAT:
        tensors = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        parts = [s.m_of(t) if s.m_of(t) is not None else torch.zeros(d, *t.shape, dtype=o.dtype, device=o.device)
                 for t in tensors]
        return [func(parts, dim=dim + 1 if dim >= 0 else dim)]
    if func in _REDUCE:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if dim is None:
            return None  # reduces over the batch too
        dims = [dim] if isinstance(dim, int) else list(dim)
        keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        dims = [x + 1 if x >= 0 else x for x in dims]
        return [m0.sum(dims, keepdim=keep) if func in (T.sum, torch.sum) else m0.mean(dims, keepdim=keep)]
    if func in (torch.matmul, T.matmul, T.__matmul__):
        a, b = args[0], args[1]
        if s.m_of(a) is not None and s.m_of(b) is None:
            return [s.m_of(a) @ b]
        return None
    return None


def compose_maps(model: nn.Module, patterns: Sequence[LayerPattern], x: Tensor, *, strict: bool = True,
                 logits_at: str | None = None,
                 observe: Callable[[LayerPattern, Tensor, Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
    """Compose the region's map ``(A, d)`` by walking the frozen network on 0.

    Parameters
    ----------
    model, patterns, x
        The model, its recorded patterns at ``x`` (from ``run_recorded``) and the inputs ``(B, *input_shape)``.
    observe : callable, optional
        Called as ``observe(pattern, value_at_0, linear_part)`` at every piecewise-linear call, where
        ``linear_part`` has shape ``(D, B, *unit_in_shape)``: the maps from the input to that layer's
        pre-activations, for free on the way.

    Returns
    -------
    A : Tensor ``(B, K, *input_shape)``
    d : Tensor ``(B, K)``
    """
    b, shape = x.shape[0], x.shape[1:]
    n = int(torch.Size(shape).numel())
    z = torch.zeros_like(x)
    holder: dict[str, _ComposeSession] = {}

    def seen(pattern: LayerPattern, t: Tensor) -> None:
        if observe is not None:
            observe(pattern, t, holder["s"].m_of(t))

    with torch.no_grad(), _session(model, strict=strict, replay=patterns, logits_at=logits_at,
                                   observe=seen, mode_cls=_ComposeMode, session_cls=_ComposeSession) as s:
        holder["s"] = s
        s.d = n
        eye = torch.eye(n, dtype=x.dtype, device=x.device).reshape(n, 1, *shape).expand(n, b, *shape)
        s.pending_inputs = [(z, eye)]
        out = _call(model, z)
        m_out = s.m_of(out)
        if s.current is not None:
            s.end_pass()
    if m_out is None:
        m_out = torch.zeros(n, *out.shape, dtype=out.dtype, device=out.device)
    a = m_out.reshape(n, b, -1).permute(1, 2, 0).reshape(b, -1, *shape)
    return a, out.reshape(b, -1)
