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
- sums, differences, scaling by constants: the same on ``M``;
- in-place writes (``torch.relu_(h[:, :3])``, ``h[:, :3].mul_(2)``): the new ``M`` also goes to every tensor of the
  walk that shares the written memory (the tensor a view views, its other views), as the values do.

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
# the rules below that read the linear part of the first argument (the input) only
_OF_INPUT = {*_IDENTITY, F.linear, *_CONV, F.batch_norm, *_POOL, F.pad, *_NEG, *_REDUCE}


class _ComposeSession(_Session):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.maps: dict[int, tuple[weakref.ref, Tensor]] = {}
        self.d = 0

    def begin_pass(self, inputs: tuple, taint: bool = True) -> None:
        super().begin_pass(inputs, taint)
        for t, m in getattr(self, "pending_inputs", []):
            self.set_m(t, m)

    def own(self, t: Tensor) -> Tensor | None:
        """The linear part kept for ``t`` itself (none derived from the tensor it views)."""
        e = self.maps.get(id(t))
        return e[1] if e is not None and e[0]() is t else None

    def m_of(self, t: Any) -> Tensor | None:
        if not isinstance(t, Tensor):
            return None
        e = self.maps.get(id(t))
        if e is not None and e[0]() is t:
            return e[1]
        b = t._base  # a view taken before the tensor it views became input-dependent: it reads that tensor's memory
        if b is None:
            return None
        e = self.maps.get(id(b))
        if e is None or e[0]() is not b or b.dtype != t.dtype:
            return None
        m = self._gather(b, e[1], t)
        self.set_m(t, m)
        return m

    def _positions(self, t: Tensor) -> Tensor:
        """The memory position (in elements of its storage) of every element of ``t``, flattened."""
        n = t.untyped_storage().nbytes() // t.element_size()
        idx = torch.arange(n, device=t.device)
        return idx.as_strided(t.shape, t.stride(), t.storage_offset()).reshape(-1)

    def _element_of(self, t: Tensor) -> Tensor:
        """For every memory position of ``t``'s storage, the flat index of the element of ``t`` stored there (-1
        where none is)."""
        n = t.untyped_storage().nbytes() // t.element_size()
        lut = torch.full((n,), -1, dtype=torch.long, device=t.device)
        lut[self._positions(t)] = torch.arange(t.numel(), device=t.device)
        return lut

    def _gather(self, src: Tensor, m_src: Tensor, dst: Tensor) -> Tensor:
        """The linear part of ``dst`` read from that of ``src``, which covers ``dst``'s memory."""
        j = self._element_of(src)[self._positions(dst)]
        if bool((j < 0).any()):  # memory of the view outside its base's elements (as_strided into padding)
            raise UnsupportedModuleError(
                f"{self.describe(self.where())} reads a view of an input-dependent tensor that reaches outside that "
                "tensor's elements, which the graph walker (method='compose') has no rule for; use method='reverse' "
                "or 'forward', which need no per-operation rules")
        flat = torch.broadcast_to(m_src, (self.d, *src.shape)).reshape(self.d, -1)
        return flat[:, j].reshape(self.d, *dst.shape)

    def written(self, t: Tensor) -> None:
        """``t`` was written in place (its linear part is set): every other tensor of the walk that shares its memory
        (the tensor it views, other views of that) holds the new values too, so their linear parts change there."""
        if t.numel() == 0:
            return
        base = t._base
        if base is not None and self.own(base) is None:
            # a constant tensor written through a view: it is input-dependent from now on, where the view is
            self.set_m(base, torch.zeros(self.d, *base.shape, dtype=t.dtype, device=t.device))
        ptr = t.untyped_storage().data_ptr()
        m_t = torch.broadcast_to(self.m_of(t), (self.d, *t.shape)).reshape(self.d, -1)
        lut = None
        for ref, m in list(self.maps.values()):
            u = ref()
            if u is None or u is t or u.numel() == 0 or u.untyped_storage().data_ptr() != ptr:
                continue
            if u.dtype != t.dtype:  # the same memory read as another dtype: no linear relation between the two
                raise UnsupportedModuleError(
                    f"{self.describe(self.where())} writes in place into a tensor whose memory is also read as "
                    f"{u.dtype} (a .view(dtype)), which the graph walker (method='compose') has no rule for; use "
                    "method='reverse' or 'forward', which need no per-operation rules")
            if lut is None:
                lut = self._element_of(t)
            j = lut[self._positions(u)]
            hit = j >= 0
            if not bool(hit.any()):
                continue
            if bool(hit.all()) and torch.equal(j, torch.arange(len(j), device=j.device)):
                mu = m_t[:, :len(j)]  # the same elements in the same order (h.flatten(1) written in place)
            else:
                mu = torch.broadcast_to(m, (self.d, *u.shape)).reshape(self.d, -1).clone()
                mu[:, hit] = m_t[:, j[hit]].to(mu.dtype)
            self.set_m(u, mu.reshape(self.d, *u.shape))

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
                    res = out[0] if isinstance(out, tuple) else out
                    s.set_m(res, m_out)
                    if res is parsed[0]:  # an inplace unit (torch.relu_(h[:, :3])): the tensor it views changed too
                        s.written(res)
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
            # written in place (h[:, :3].mul_(2), out=): the tensor it views and other views of its memory changed too
            # (not a conversion that returned its input: h.float() on a float tensor keeps its linear part)
            inplace = any(o is t for a in (*args, *kwargs.values()) for t in _tensors(a)) and m is not s.own(o)
            s.set_m(o, m)
            if inplace:
                s.written(o)
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
    if func in _OF_INPUT:
        # linear in their input only: an input-dependent weight, bias, statistic (or keyword input) has no rule here
        if func in (T.to, T.type_as):  # the other tensor gives only the dtype and device
            if m0 is None:
                return []  # a constant cast like an input-dependent tensor (pe.type_as(h)): still a constant
        elif m0 is None or any(s.m_of(t) is not None for a in (*args[1:], *kwargs.values()) for t in _tensors(a)):
            raise UnsupportedModuleError(
                f"{s.describe(s.where())} calls '{_op_name(func)}' with an input-dependent argument other than its "
                "input (a weight, bias or statistic computed from the model's input, or the input passed by keyword), "
                "which the graph walker (method='compose') has no rule for; use method='reverse' or 'forward', which "
                "need no per-operation rules")
    if func in _IDENTITY:
        if func in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout):
            if bool(args[2] if len(args) > 2 else kwargs.get("training", True)):
                return None
        return [m0.to(dtype=o.dtype, device=o.device)]
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
    strict : bool
        Refuse (:class:`~relu_regions.UnsupportedModuleError`) an output that the walk does not see depend on the
        input; ``False`` takes such an output as a constant (zero linear part). Pass the ``strict`` the patterns
        were recorded with. Operations that are not piecewise linear, or have no rule here, are refused either way.
    logits_at : str, optional
        Module path whose output is mapped instead of the model's (the forward stops there, as in
        :func:`~relu_regions.affine_map`); record ``patterns`` with the same ``logits_at``.
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
