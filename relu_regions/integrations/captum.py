"""Re3 as a Captum attribution: replace ``IntegratedGradients(model)`` by ``Re3(model)``.

Re3's attribution is the logit contribution ``A[target] ⊙ x`` of the region's exact affine map (Re3 paper,
Algorithm 3). On a ReLU network it coincides with Captum's ``InputXGradient`` and with LRP-ε for ε → 0; on
bias-free networks also with ``IntegratedGradients`` and ``DeepLift`` from a zero baseline. What Re3 adds is the
exact remainder: the convergence delta is the region's offset, so ``attributions.sum() + delta == f(x)[target]``.

Captum is imported here only; ``import relu_regions`` does not need it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from captum.attr import GradientAttribution
from captum.log import log_usage

from ..affine import _chunks, _default_chunk, affine_map, check_batch, choose_method, resolve_target
from ..attributions import from_map, same_region
from ..errors import check_finite

Tensor = torch.Tensor


class _Joined(nn.Module):
    """``model(*split(z), *additional_args)`` for a flat ``z``: several inputs become one, so the region's map has
    one ``A`` over all input features, split back per input afterwards. Holds the user's model as a submodule
    (nothing of it is changed; the engine restores flags and hooks).

    Tensor arguments whose first dimension is ``batch`` are per-sample (Captum's convention): they follow the rows
    of ``z``. :meth:`rows` gives the module of a chunk of the batch; a call on ``r`` replicas of the batch
    (replica-major, as the forward route runs it) gets them tiled ``r`` times.
    """

    display_type = "the forward_func given to Re3, its inputs joined"  # the engine's messages name the root so

    def __init__(self, model: nn.Module | Callable, shapes: list[tuple[int, ...]], extra: tuple,
                 batch: int | None = None):
        super().__init__()
        if isinstance(model, nn.Module):
            self.model = model
            self.fn = None
        else:
            owner = getattr(model, "__self__", None)  # a bound method of a module: keep the module visible
            self.model = owner if isinstance(owner, nn.Module) else None
            self.fn = model
        self.shapes = shapes
        self.sizes = [int(np.prod(s)) for s in shapes]
        self.extra = extra
        self.batch = batch
        self.per_sample = [batch is not None and isinstance(e, Tensor) and e.dim() > 0 and e.shape[0] == batch
                           for e in extra]

    def rows(self, sl: slice) -> _Joined:
        """This module for the samples ``sl`` of the batch: its per-sample arguments cut to those rows."""
        extra = tuple(e[sl] if p else e for e, p in zip(self.extra, self.per_sample))
        return _Joined(self.fn if self.fn is not None else self.model, self.shapes, extra,
                       len(range(*sl.indices(self.batch))))

    def forward(self, z: Tensor) -> Tensor:
        parts = torch.split(z, self.sizes, dim=1)
        parts = [p.reshape(p.shape[0], *s) for p, s in zip(parts, self.shapes)]
        f = self.fn if self.fn is not None else self.model
        extra = self.extra
        if any(self.per_sample) and z.shape[0] != self.batch:
            r, rem = divmod(z.shape[0], self.batch)
            if rem:
                raise ValueError(f"the model was called on {z.shape[0]} rows, which are not replicas of the "
                                 f"{self.batch} samples that the per-sample additional_forward_args belong to")
            extra = tuple(e.repeat(r, *([1] * (e.dim() - 1))) if p else e for e, p in zip(extra, self.per_sample))
        return f(*parts, *extra)


def _as_tuple(x: Any) -> tuple:
    if x is None:
        return ()
    return x if isinstance(x, tuple) else (x,)


def _baselines(baselines: Any, inputs: tuple[Tensor, ...], inputs_tuple: bool = True) -> tuple[Tensor, ...] | None:
    """Captum baselines (None, number, tensor, or a tuple of those, one per input) as full-size tensors; the
    messages name the baselines and inputs as the caller passed them (``baselines`` / ``baselines[i]``, ``inputs``
    / ``inputs[i]``, the latter when ``inputs_tuple``)."""
    if baselines is None:
        return None
    bl = baselines if isinstance(baselines, tuple) else (baselines,)
    if len(bl) != len(inputs):
        raise ValueError(f"baselines has {len(bl)} entries for {len(inputs)} input tensors")
    names = [f"baselines[{i}]" if isinstance(baselines, tuple) else "baselines" for i in range(len(bl))]
    out = []
    for i, (b, x) in enumerate(zip(bl, inputs)):
        if not isinstance(b, Tensor):
            out.append(torch.full_like(x, float(b)))
            continue
        b = b.detach().to(device=x.device, dtype=x.dtype)  # like the inputs: no graph into the attributions
        shape = tuple(b.shape)
        if b.shape == x.shape[1:]:
            b = b.unsqueeze(0)
        try:
            out.append(b.expand_as(x))
        except RuntimeError as e:
            which = f"inputs[{i}]" if inputs_tuple else "inputs"
            raise ValueError(f"{names[i]} of shape {shape} does not match {which} of shape {tuple(x.shape)} (give "
                             "one per sample, or one of a single sample's shape)") from e
    for name, b in zip(names, out):
        check_finite(b, name, "the map's value there, and the attributions x − baseline, would be nan / inf")
    return tuple(out)


def _check_inputs(xs: tuple[Tensor, ...], is_tuple: bool) -> None:
    """Captum-style inputs: each a batched floating-point tensor of finite values, named as the caller passed it
    (``inputs``, or ``inputs[i]`` of a tuple), before they are joined into one flat tensor. A 1-D tensor is ``B``
    samples of one feature."""
    for i, t in enumerate(xs):
        name = f"inputs[{i}]" if is_tuple else "inputs"
        if t.dim() == 0:
            raise ValueError(f"{name} must be batched, shape (B, ...); got a 0-d tensor")
        check_batch(t if t.dim() > 1 else t.unsqueeze(1), name)


class Re3(GradientAttribution):
    r"""Exact region attributions (Re3) with Captum's interface.

    Parameters
    ----------
    forward_func : nn.Module or callable
        The model (a piecewise-linear network). A plain callable works if every torch op it runs is seen by the
        engine; a bound method of a module keeps that module's eval/restore handling.
    multiply_by_inputs : bool
        ``True`` (default): ``A[target] ⊙ (x − baseline)`` (the logit contributions); ``False``: ``A[target]``.
    method : str
        Route of :func:`~relu_regions.affine_map`; ``"reverse"`` (one backward pass per target) by default.
    logits_at : str, optional
        Module path whose output is explained (e.g. before a softmax head).
    strict, check : bool
        As in :func:`~relu_regions.affine_map`: ``strict=False`` takes operations the engine cannot follow as fixed
        (e.g. a dropout left in training mode), ``check=False`` skips the check ``A·x + d == f(x)``.

    Notes
    -----
    The convergence delta is the region's map evaluated at the baseline, ``A[t]·x0 + d[t]``: the region's offset
    ``d[t]`` (the frozen network at 0) for the default zero baseline. Hence ``attributions.sum() + delta ==
    f(x)[target]`` exactly. This is not Captum's meaning for IntegratedGradients or DeepLift, whose delta is the
    error of completeness, ``attributions.sum() − (f(x) − f(x0))``, ideally 0: Re3's attributions are exact, and
    its delta is the rest of ``f(x)`` that they do not split. :meth:`compute_convergence_delta` gives the same
    number as ``attribute``; Captum's completeness error is ``f(x0)[t] − delta`` (0 when :attr:`same_region_`).

    With a baseline the split is also ``f(x) − f(x0)`` when ``x0`` lies in the closed region
    of ``x`` (its pattern agrees with that of ``x`` at every unit not exactly at its breakpoint, as the zero baseline
    of a bias-free network does), and in general not otherwise; :attr:`same_region_` holds that flag per sample after
    each call with baselines (a warning is given when it fails for some sample).

    Several input tensors (a tuple) are joined into one flat input for the map and split back: ``A`` covers all
    inputs; a 1-D input ``(B,)`` is ``B`` samples of one feature. ``additional_forward_args`` are constants of the
    map; as in Captum, tensors among them whose first dimension is the batch size are per-sample: every internal
    forward pass (a chunk of the batch, replicas of it) gets their matching rows.
    """

    def __init__(self, forward_func: nn.Module | Callable, multiply_by_inputs: bool = True, method: str = "reverse",
                 logits_at: str | None = None, strict: bool = True, check: bool = True) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func must be a torch.nn.Module or callable, got {type(forward_func).__name__}")
        if logits_at is not None and not isinstance(forward_func, nn.Module) and not isinstance(
                getattr(forward_func, "__self__", None), nn.Module):
            # a module path needs a module to look it up in; a plain callable hides the model it calls
            raise ValueError(f"logits_at={logits_at!r} is a module path, so forward_func must be an nn.Module or a "
                             f"bound method of one; got {type(forward_func).__name__}. Pass the model itself, e.g. "
                             "Re3(model, logits_at=...)")
        GradientAttribution.__init__(self, forward_func)
        self._multiply_by_inputs = multiply_by_inputs
        self.method = method
        self.logits_at = logits_at
        self.strict = strict
        self.check = check
        self.same_region_: Tensor | None = None

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        return True

    @log_usage()
    def attribute(self, inputs: Tensor | tuple[Tensor, ...], baselines: Any = None, target: Any = None,
                  additional_forward_args: Any = None, return_convergence_delta: bool = False,
                  internal_batch_size: int | None = None):
        r"""Re3 attributions of ``target`` for each input.

        Parameters
        ----------
        inputs : Tensor or tuple of Tensors
            Batched inputs ``(B, ...)``; a tuple gives a tuple back.
        baselines : None, number, Tensor or tuple, optional
            Reference ``x0`` (default 0), as in Captum.
        target : int, tuple, list, Tensor or None
            As in Captum (a list has one entry per sample): an index into dim 1 of a ``(B, K)`` output (negative ints
            count from the end; outputs with more dims are refused, as by Captum, unless the extra dims have size 1);
            a tuple with one index per output dimension after the batch names one entry of any output; None only
            for models with one output per sample.
        additional_forward_args : any, optional
            Extra arguments of the forward function (constants of the map); tensors whose first dimension is the
            batch size are per-sample, as in Captum.
        return_convergence_delta : bool
            Also return ``delta`` ``(B,)`` = ``A[t]·x0 + d[t]`` (``d[t]`` for the zero baseline; see the Notes on
            how this differs from Captum's completeness error).
        internal_batch_size : int, optional
            Samples per internal pass of the engine (its ``chunk_size``: memory against speed); the result does not
            depend on it.

        Returns
        -------
        attributions, or (attributions, delta)
        """
        is_tuple = isinstance(inputs, tuple)
        xs = _as_tuple(inputs)
        if not xs or not all(isinstance(t, Tensor) for t in xs):
            raise TypeError("inputs must be a Tensor or a tuple of Tensors")
        _check_inputs(xs, is_tuple)
        b = xs[0].shape[0]
        if any(t.shape[0] != b for t in xs):
            raise ValueError(f"all input tensors need the same batch size; got {[t.shape[0] for t in xs]}")
        xs = tuple(t.detach() for t in xs)
        bls = _baselines(baselines, xs, is_tuple)
        extra = _as_tuple(additional_forward_args)
        model, x, base = self._joined(xs, bls, extra)
        if internal_batch_size is not None and (isinstance(internal_batch_size, bool) or
                                                not isinstance(internal_batch_size, int) or internal_batch_size < 1):
            raise ValueError(f"internal_batch_size must be a positive int or None, got {internal_batch_size!r}")
        with torch.enable_grad():  # Captum users call attribute under no_grad
            values, delta = self._attributions(model, x, base, target, internal_batch_size)
        if base is not None:
            self.same_region_ = same_region(model, x, base, self._logits_at(model), closed=True, strict=self.strict)
            if not bool(self.same_region_.all()):
                import warnings

                n = int((~self.same_region_).sum())
                warnings.warn(f"Re3: for {n} of {b} samples the baseline lies in another activation region; there "
                              "the attributions split f(x) − (A·x0 + d), not f(x) − f(x0)", stacklevel=3)
                # (3: past captum's log_usage wrapper, to the caller's line)
        else:
            self.same_region_ = None
        values = values.to(xs[0].dtype)
        out = self._split(values, xs)
        out = out if is_tuple else out[0]
        if return_convergence_delta:
            return out, delta.to(xs[0].dtype)
        return out

    def compute_convergence_delta(self, attributions: Tensor | tuple[Tensor, ...], start_point: Any,
                                  end_point: Tensor | tuple[Tensor, ...], target: Any = None,
                                  additional_forward_args: Any = None) -> Tensor:
        """Re3's delta for ``attributions`` of ``end_point``: ``f(end_point)[target] − attributions.sum()`` per
        sample, ``(B,)``; for Re3's own attributions the number ``attribute(..., return_convergence_delta=True)``
        gives, ``A[t]·x0 + d[t]`` (see the class Notes: not Captum's completeness error, which is
        ``f(start_point)[t]`` minus this). ``start_point`` is accepted for Captum's signature; this delta does not
        read it."""
        ends = _as_tuple(end_point)
        attrs = _as_tuple(attributions)
        if not ends or not all(isinstance(t, Tensor) for t in (*ends, *attrs)):
            raise TypeError("end_point and attributions must be Tensors or tuples of Tensors")
        if len(attrs) != len(ends):
            raise ValueError(f"attributions has {len(attrs)} tensors for {len(ends)} end_point tensors")
        _check_inputs(ends, isinstance(end_point, tuple))
        b = ends[0].shape[0]
        model, x, _ = self._joined(tuple(t.detach() for t in ends), None, _as_tuple(additional_forward_args))
        out = self._explained(model, x)
        tgt = resolve_target(self._target(target, b, (1, *out.shape[1:])), b, int(np.prod(out.shape[1:])), x.device)
        f = out.reshape(b, -1).gather(1, tgt[:, None])[:, 0].to(torch.float64)
        total = sum(a.detach().reshape(b, -1).to(torch.float64).sum(1) for a in attrs)
        return (f - total).to(ends[0].dtype)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _attributions(self, model: nn.Module, x: Tensor, base: Tensor | None, target: Any,
                      chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Attributions and delta of the flat inputs ``x`` (the engine's batched map, read off per sample)."""
        b, logits_at = x.shape[0], self._logits_at(model)
        per_sample = isinstance(model, _Joined) and any(model.per_sample)
        shape = self._out_shape(model.rows(slice(0, 1)) if per_sample else model, x[:1])
        tgt = self._target(target, b, shape)
        if not per_sample:
            return self._read(affine_map(model, x, target=tgt, method=self.method, logits_at=logits_at,
                                         chunk_size=chunk_size, strict=self.strict, check=self.check), base)
        # per-sample additional_forward_args: the engine runs the model on chunks of the batch (and the forward
        # route on replicas of a chunk), so the map is computed here chunk by chunk, each chunk's module holding
        # the matching rows; the chunks are the engine's own (same size rule)
        k = int(np.prod(shape[1:]))
        tgt = resolve_target(tgt, b, k, x.device)
        n_inputs = int(x[0].numel())
        size = chunk_size or _default_chunk(choose_method(self.method, 1, n_inputs), n_inputs, k)
        parts = [self._read(affine_map(model.rows(sl), x[sl], target=tgt[sl], method=self.method, logits_at=logits_at,
                                       chunk_size=sl.stop - sl.start, strict=self.strict, check=self.check),
                            None if base is None else base[sl])
                 for sl in _chunks(b, size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _read(self, amap, base: Tensor | None) -> tuple[Tensor, Tensor]:
        values, delta = from_map(amap, base)
        return (values if self._multiply_by_inputs else amap.A[:, 0]), delta

    def _joined(self, xs, bls, extra):
        f = self.forward_func
        if len(xs) == 1 and not extra and isinstance(f, nn.Module) and xs[0].dim() > 1:
            return f, xs[0], None if bls is None else bls[0]
        shapes = [tuple(t.shape[1:]) for t in xs]
        model = _Joined(f, shapes, extra, xs[0].shape[0])
        x = torch.cat([t.reshape(t.shape[0], -1) for t in xs], 1)
        base = None if bls is None else torch.cat([t.reshape(t.shape[0], -1) for t in bls], 1)
        return model, x, base

    def _logits_at(self, model: nn.Module) -> str | None:
        if self.logits_at is None or model is self.forward_func:
            return self.logits_at
        return f"model.{self.logits_at}"

    @staticmethod
    def _target(target: Any, b: int, shape: tuple[int, ...]) -> Any:
        """Captum's target for a batch of ``b`` and an explained output of shape ``shape`` for one sample
        ``(1, ...)``; None (one output per sample) becomes 0."""
        if target is not None:
            if isinstance(target, tuple):  # one entry of the output, as Captum's output[(slice(None), *target)]
                dims = shape[1:]
                if len(target) != len(dims) or not all(isinstance(i, int) and not isinstance(i, bool) for i in target):
                    raise ValueError(f"target={target!r}: a tuple target needs one int index per output dimension "
                                     "after the batch; the explained output has shape "
                                     f"(B, {', '.join(map(str, dims))})")
                if not all(-d <= i < d for i, d in zip(target, dims)):
                    raise ValueError(f"target={target!r} lies outside the explained output of shape "
                                     f"(B, {', '.join(map(str, dims))})")
                return int(np.ravel_multi_index(tuple(i % d for i, d in zip(target, dims)), dims))
            if isinstance(target, list) and target and isinstance(target[0], tuple):
                raise NotImplementedError("Re3 does not support lists of tuple targets")
            if len(shape) > 2 and int(np.prod(shape[2:])) != 1:
                # as Captum, which selects output[:, target] (a whole slice here, not one entry) and refuses it;
                # the index into the flattened output would silently explain another entry than Captum's (trailing
                # dims of size 1, (B, K, 1), leave one entry per index: the same in both)
                what = f"target={target!r}" if isinstance(target, int) else "a per-sample target"
                raise ValueError(f"{what} needs a (B, K) output, but the explained output has shape "
                                 f"(B, {', '.join(map(str, shape[1:]))}); as in Captum, int and per-sample targets "
                                 "index dim 1 of a 2-D output only. Flatten the output in a wrapper module "
                                 "(forward returns model(x).flatten(1)) and pass the flat index")
            if isinstance(target, int) and not isinstance(target, bool) and target < 0:
                k = int(np.prod(shape[1:]))  # as Python's (and Captum's) output[:, target]
                if target >= -k:
                    return target + k
            if isinstance(target, list) and len(target) != b:
                # as Captum ("Target list length does not match output!"): a list is one target per sample, never
                # broadcast (a leftover one-element list would explain the wrong class for every other sample)
                raise ValueError(f"target is a list of {len(target)} entries for a batch of {b}; a list needs one "
                                 "entry per sample (pass an int to explain the same output for every sample)")
            return target
        # no target: only for one output per sample (Captum's scalar-output convention)
        k = int(np.prod(shape[1:]))
        if k != 1:
            raise ValueError(f"target=None needs one output per sample; the model gives {k} — pass "
                             "target=<class index>")
        return 0

    def _out_shape(self, model: nn.Module, x1: Tensor) -> tuple[int, ...]:
        """Shape ``(1, ...)`` of the explained output of one sample ``x1``."""
        return tuple(self._explained(model, x1).shape)

    def _explained(self, model: nn.Module, x: Tensor) -> Tensor:
        """The explained output at ``x`` (the model in eval mode, as the engine runs it; a recorded pass, the
        model restored afterwards)."""
        from ..recording import run_recorded
        from ..state import preserved

        with preserved(model, eval_mode=True), torch.no_grad():
            out, _ = run_recorded(model, x, logits_at=self._logits_at(model), strict=self.strict)
        return out

    @staticmethod
    def _split(values: Tensor, xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if len(xs) == 1 and values.shape == xs[0].shape:
            return (values,)
        flat = values.reshape(values.shape[0], -1)
        sizes = [int(t[0].numel()) for t in xs]
        return tuple(p.reshape(t.shape) for p, t in zip(torch.split(flat, sizes, dim=1), xs))


def chw_to_hwc(t: Tensor | np.ndarray) -> np.ndarray:
    """One image ``(C, H, W)`` (or ``(1, C, H, W)``) as the ``(H, W, C)`` numpy array Captum's visualisation expects.

    ``captum.attr.visualization.visualize_image_attr`` takes channels last and silently misplots CHW arrays.
    """
    if isinstance(t, Tensor):
        t = t.detach().cpu()
        # (numpy has no bfloat16: attributions of a bfloat16 model come in that dtype)
        a = (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()
    else:
        a = np.asarray(t)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {a.shape[0]}; index it first")
        a = a[0]
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {a.shape}")
    return np.transpose(a, (1, 2, 0))


def visualize(attribution: Tensor, image: Tensor | None = None, method: str = "blended_heat_map", sign: str = "all",
              **kwargs):
    """``captum.attr.visualization.visualize_image_attr`` on CHW tensors (converted with :func:`chw_to_hwc`).

    ``method`` and ``sign`` are Captum's (``"heat_map"``, ``"blended_heat_map"``, ``"original_image"``,
    ``"masked_image"``, ``"alpha_scaling"``; ``"all"``, ``"positive"``, ``"negative"``, ``"absolute_value"``).
    Without ``image``, the methods that draw it fall back to ``"heat_map"``.

    Returns Captum's ``(figure, axis)``.
    """
    from captum.attr import visualization as viz

    methods, signs = list(viz.ImageVisualizationMethod.__members__), list(viz.VisualizeSign.__members__)
    if method not in methods:
        raise ValueError(f"method must be one of {methods} (Captum's), got {method!r}")
    if sign not in signs:
        raise ValueError(f"sign must be one of {signs} (Captum's), got {sign!r}")
    img = None if image is None else chw_to_hwc(image)
    if method != "heat_map" and img is None:
        method = "heat_map"
    return viz.visualize_image_attr(chw_to_hwc(attribution), img, method=method, sign=sign,
                                    use_pyplot=kwargs.pop("use_pyplot", False), **kwargs)


__all__ = ["Re3", "chw_to_hwc", "visualize"]
