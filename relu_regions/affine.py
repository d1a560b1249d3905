"""Exact affine maps of activation regions: f(x') = A·x' + d for every x' in the region of x.

Three routes, all exact (up to floating-point rounding), all working on the network with every piecewise-linear
unit frozen in the state recorded at ``x`` (see :mod:`relu_regions.recording`):

``"reverse"``
    Vector-Jacobian products through the frozen network evaluated at 0: one recorded forward (the pattern), one
    frozen forward, then one backward pass per explained output. The frozen forward is cheap (the layer that reads
    the zero input returns its bias, max-pools are gathers) and the backward computes convolution input gradients
    as flipped-kernel convolutions (:mod:`relu_regions.input_grads`); an MLP's K rows end in one product with its
    first weight matrix. Measured on a 2-core CPU: one target ≈ one forward+backward of the model, all 10 classes
    ≈ 11–16 forwards (``benchmarks/results/engine.md``). Cheapest when outputs < inputs (classifiers).
``"forward"``
    Jacobian-vector products (forward-mode AD) with one tangent per input feature, run as D replicas of the batch.
    Cost ~ 2·D forward passes for D input features, independent of K; cheapest for few inputs (tabular data).
``"compose"``
    The graph walker of :mod:`relu_regions.compose`: composes Linear / Conv / BatchNorm / pooling / residual
    additions layer by layer as explicit matrices. Cost ~ D forward passes plus the matrix products; gives the
    maps of every hidden layer on the way.

``"auto"`` picks ``"reverse"`` when the number of explained outputs (1 with ``target``, else K) is at most the
number of input features, otherwise ``"forward"``.

The offset ``d`` is always the frozen network evaluated at 0 — never ``f(x) - A·x``; that difference is the
independent check (:meth:`AffineMap.residual`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn

from .errors import (
    CheckpointedReverseError,
    ForwardADMissingError,
    check_finite,
    forward_mode,
    is_int_at_least,
    is_integer_tensor,
)
from .keys import pack_patterns, pattern_keys
from .recording import _RESHAPES, LayerSelection, library_call, run_frozen, run_recorded, select_layers
from .state import preserved
from .units import LayerPattern, boundary_counts

Tensor = torch.Tensor
TargetType = None | int | Sequence[int] | Tensor

METHODS = ("auto", "reverse", "forward", "compose")


@dataclass
class AffineMap:
    """The affine map of each sample's activation region.

    Attributes
    ----------
    A : Tensor
        ``(B, K, *input_shape)``: ``A[b, k]`` is the gradient of output ``k`` (or of the target) in region b.
    d : Tensor
        ``(B, K)``: the region's offset, the frozen network evaluated at 0.
    output : Tensor
        ``(B, K)``: the model's output at ``x`` from the recorded forward pass.
    x : Tensor
        The inputs the map was computed at.
    target : Tensor or None
        ``(B,)`` output index per sample when a target was selected (then ``K == 1``).
    packed : Tensor
        ``(B, n_words)`` exact bit-packed activation patterns (packed on first access); ``region_ids`` are the
        keys of :func:`relu_regions.keys.pattern_keys` (equal patterns, equal keys).
    patterns : list of list of LayerPattern
        The recorded patterns, one list per chunk of samples.
    n_boundary : Tensor
        ``(B,)`` units exactly on a breakpoint; where > 0 the input sits on a region boundary, and ``A`` is the
        map of the region selected by the convention (pre-activation > 0 is active). Counted on first access
        (one more recorded forward pass over ``x``), so maps that never ask do not pay for it; a model changed since
        the map was computed (an optimizer step, new weights) is refused then, since it would count another
        network's breakpoints.
    """

    A: Tensor
    d: Tensor
    output: Tensor
    x: Tensor
    target: Tensor | None
    patterns: list
    method: str
    layer_names: list[str] = field(default_factory=list)
    _packed: Tensor | None = field(default=None, repr=False)
    _keys: Tensor | None = field(default=None, repr=False)
    _sizes: list[int] = field(default_factory=list, repr=False)
    _n_boundary: Tensor | None = field(default=None, repr=False)
    _recount: _Recount | None = field(default=None, repr=False, compare=False)  # the counts, for n_boundary

    @property
    def n_boundary(self) -> Tensor:
        """``(B,)`` units of ``x`` exactly on a breakpoint (counted once, on first access)."""
        if self._n_boundary is None:
            if self._recount is None:
                raise RuntimeError("this AffineMap carries no boundary counts and no model to count them with")
            self._n_boundary = self._recount().to(self.A.device)
        return self._n_boundary

    def __getstate__(self) -> dict:
        # pickled (or deep-copied) with its counts, not with the model they come from (the copy's model would be
        # another object); none to take along when the model changed since the map
        state = dict(self.__dict__)
        if state["_n_boundary"] is None and self._recount is not None and not self._recount.changed():
            state["_n_boundary"] = self.n_boundary
        state["_recount"] = None
        return state

    @property
    def packed(self) -> Tensor:
        """``(B, n_words)`` exact bit-packed activation patterns (computed once, on first use)."""
        if self._packed is None:
            self._packed = self._per_chunk(_pack)
        return self._packed

    @property
    def region_ids(self) -> Tensor:
        """``(B,)`` int64 region keys (the same as :meth:`Recording.region_ids` gives for the same patterns)."""
        if self._keys is None:
            self._keys = self._per_chunk(_keys)
        return self._keys

    def _per_chunk(self, fn) -> Tensor:
        """``fn(patterns, n, device)`` of every chunk of samples, concatenated along the batch."""
        sizes = self._sizes or [int(c[0].state.shape[0]) for c in self.patterns]
        parts = [fn(chunk, n, self.A.device) for chunk, n in zip(self.patterns, sizes)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.A.shape[2:])

    def __call__(self, x_new: Tensor) -> Tensor:
        """Evaluate ``A·x_new + d`` per sample (exact for ``x_new`` in the same region)."""
        a = self.A.reshape(self.A.shape[0], self.A.shape[1], -1)
        return torch.einsum("bkd,bd->bk", a, x_new.reshape(x_new.shape[0], -1).to(a.dtype)) + self.d

    def residual(self) -> Tensor:
        """``(B,)`` max |A·x + d − f(x)|: an independent check, zero up to rounding."""
        return (self(self.x) - self.output).abs().amax(1)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AffineMap:
        """Move every tensor (and cast floating ones) like ``Tensor.to``: ``amap.to("cuda")``,
        ``amap.to(torch.float64)``, ``amap.to(device, dtype)``."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device

        def mv(t):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return replace(self, A=mv(self.A), d=mv(self.d), output=mv(self.output), x=mv(self.x),
                       target=mv(self.target), _n_boundary=mv(self._n_boundary),
                       patterns=[[p.to(device) if device is not None else p for p in c] for c in self.patterns],
                       _packed=mv(self._packed), _keys=mv(self._keys))

    def __len__(self) -> int:
        return self.A.shape[0]

    def __repr__(self) -> str:
        return (f"AffineMap(samples={self.A.shape[0]}, outputs={self.A.shape[1]}, input_shape={self.input_shape}, "
                f"method='{self.method}', dtype={self.A.dtype}, device={self.A.device})")


def resolve_target(target: TargetType, batch: int, n_outputs: int, device: torch.device) -> Tensor | None:
    """Turn a Captum-style target (int, per-sample list/tensor, None) into a ``(B,)`` index tensor or None."""
    if target is None:
        return None
    if isinstance(target, int) and not isinstance(target, bool):
        t = torch.full((batch,), target, dtype=torch.long, device=device)
    elif isinstance(target, (list, tuple)) and len(target) != batch:
        # as Captum: a list is one target per sample, never broadcast (a leftover one-element list would explain
        # the wrong output for every other sample); an int or a one-element tensor applies to all
        raise ValueError(f"target is a list of {len(target)} entries for a batch of {batch}; a list needs one entry "
                         "per sample (pass an int to explain the same output for every sample)")
    else:
        try:
            t = torch.as_tensor(target, device=device).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:  # a string, a dict, ragged lists: torch's own words
            # ("new(): invalid data type 'str'") name neither the argument nor what it takes
            raise TypeError(f"target must be an int, a (B,) integer tensor or a list of ints (one per sample), or "
                            f"None; got {target!r:.80}") from e
        if not is_integer_tensor(t):
            raise TypeError(f"target must be an int or integer output indices (one per sample), got {t.dtype} "
                            f"values")
        t = t.long()
        if t.is_inference():  # (argmax taken under torch.inference_mode): autograd may not save it as an index
            with torch.inference_mode(False):
                t = t.clone()
        if t.numel() == 1:
            t = t.expand(batch).clone()
    if t.numel() != batch:
        raise ValueError(f"target has {t.numel()} entries for a batch of {batch}")
    if (t < 0).any() or (t >= n_outputs).any():
        raise ValueError(f"target indices must lie in [0, {n_outputs}); got {t.min().item()}..{t.max().item()}")
    return t


def _flat_out(out: Tensor, batch: int) -> Tensor:
    return out.reshape(batch, -1)


def _reverse(model: nn.Module, patterns: list[LayerPattern], x: Tensor, sel: Tensor | None, n_outputs: int,
             **kw) -> tuple:
    b = x.shape[0]
    z = torch.zeros_like(x, requires_grad=True)
    sessions: list = []
    with torch.enable_grad():
        g = _flat_out(run_frozen(model, z, patterns, fast_input_grads=True, zero_input=True, session_out=sessions,
                                 **kw), b)
        if sel is not None:
            (grad,) = torch.autograd.grad(g.gather(1, sel[:, None]).sum(), z)
            return grad.unsqueeze(1), g.detach().gather(1, sel[:, None])
        k = g.shape[1]
        first = _input_linear(sessions[0], x)
        if first is None:
            # all K outputs: one forward, then one backward per output through the same graph. Measured on an
            # idle 2-core CPU (LeNet, B=128): 131 ms, vs 180 ms with a vmapped backward (is_grads_batched: vmap
            # handles convolution backwards poorly) and 228 ms with K replicas of the batch in one pass
            rows = [torch.autograd.grad(g[:, i].sum(), z, retain_graph=i < k - 1)[0] for i in range(k)]
            a = torch.stack(rows, 1)
        else:
            # an MLP's rows stop at the first Linear's output; behind it are matrix products, which a vmapped
            # backward batches into one product per layer (784-256-128-10, B=256: ~3.3 ms vs ~5 ms for K calls)
            eye = torch.eye(k, dtype=g.dtype, device=g.device).unsqueeze(1).expand(k, b, k)
            (rows,) = torch.autograd.grad(g, first[0], eye, is_grads_batched=True)
            # then one (B*K, H) x (H, D) product, ~6x a forward for a 784-256-128-10 MLP at B=256 on a 2-core Xeon:
            # the floor of any all-class map of that model (2-d operands: a strided 3-d one makes matmul take bmm,
            # 2x slower)
            a = rows.transpose(0, 1).reshape(b * k, -1) @ first[1].detach().to(rows.dtype)
            a = a.reshape(b, k, *x.shape[1:])
    return a, g.detach()


def _input_linear(session, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(output, weight)`` of the Linear layer that is the only reader of the replay's zero input (maybe through
    reshapes, as behind ``nn.Flatten``) when no in-place op changed that output: an MLP, whose all-class rows can
    stop at that output and finish with one product. None otherwise."""
    first, uses = session.first_linear, session.zero_uses
    if (first is None or not uses or uses[-1] is not torch.nn.functional.linear or first[0].dim() != 2
            or not all(f in _RESHAPES for f in uses[:-1]) or first[1].shape[1] != x[0].numel()
            or first[0]._version != first[2]):
        return None
    return first[0], first[1]


def _basis(x: Tensor) -> tuple[Tensor, int]:
    """``D`` replicas of the batch, replica i with tangent e_i: shape ``(D*B, *input_shape)``."""
    b, shape = x.shape[0], x.shape[1:]
    n = int(torch.Size(shape).numel())
    eye = torch.eye(n, dtype=x.dtype, device=x.device).reshape(n, 1, *shape).expand(n, b, *shape)
    return eye.reshape(n * b, *shape), n


def _forward(model: nn.Module, patterns: list[LayerPattern], x: Tensor, sel: Tensor | None, n_outputs: int,
             **kw) -> tuple:
    b = x.shape[0]
    tangent, n = _basis(x)
    with forward_mode("method='forward'", "use method='reverse'"), torch.no_grad(), fwAD.dual_level():
        out = run_frozen(model, fwAD.make_dual(torch.zeros_like(tangent), tangent), patterns, **kw)
        primal, tan = fwAD.unpack_dual(out)
    d = primal.reshape(n, b, -1)[0]
    if tan is None:  # output does not depend on the input at all
        tan = torch.zeros_like(primal)
    a = tan.reshape(n, b, -1).permute(1, 2, 0)  # (B, K, D)
    a = a.reshape(b, a.shape[1], *x.shape[1:])
    if sel is not None:
        a = a[torch.arange(b, device=x.device), sel].unsqueeze(1)
        d = d.gather(1, sel[:, None])
    return a, d


def _compose(model: nn.Module, patterns: list[LayerPattern], x: Tensor, sel: Tensor | None, n_outputs: int,
             **kw) -> tuple:
    from .compose import compose_maps

    a, d = compose_maps(model, patterns, x, **kw)
    if sel is not None:
        a = a[torch.arange(x.shape[0], device=x.device), sel].unsqueeze(1)
        d = d.gather(1, sel[:, None])
    return a, d


_ROUTES = {"reverse": _reverse, "forward": _forward, "compose": _compose}


def choose_method(method: str, n_explained: int, n_inputs: int) -> str:
    """The method ``"auto"`` resolves to: reverse when explained outputs <= input features, else forward."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "reverse" if n_explained <= n_inputs else "forward"


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def _widest(patterns: list[LayerPattern]) -> int:
    """Per-sample elements of the widest unit input among ``patterns`` (a CNN's first feature map, typically)."""
    return max((int(torch.Size(p.in_shape).numel()) for p in patterns), default=1)


def _default_chunk(method: str, n_inputs: int, n_outputs: int, widest: int = 64) -> int:
    """Samples per chunk. Forward mode and composition carry one tangent (one row of a Jacobian) per input feature
    through every layer: a chunk's widest activation holds chunk * n_inputs * ``widest`` elements, kept below 2**26
    (256 MiB in float32; the 3x64x64 CNN of a 16-channel first conv needs ~3 GiB per sample and gets 1)."""
    if method in ("forward", "compose"):
        return max(1, min(512, (1 << 26) // max(1, n_inputs * max(64, widest))))
    budget = 1 << 24  # elements of the largest per-chunk Jacobian block
    return max(1, min(256, budget // max(1, n_inputs * n_outputs)))


@library_call
def affine_map(model: nn.Module, x: Tensor, target: TargetType = None, method: str = "auto", *,
               logits_at: str | None = None, chunk_size: int | None = None, strict: bool = True,
               check: bool = True, progress: bool = False) -> AffineMap:
    """Compute the exact affine map of each input's activation region.

    Parameters
    ----------
    model : nn.Module
        A piecewise-linear network. It runs in eval mode for the call (BatchNorm uses running statistics,
        Dropout is the identity) and every module's training flag, requires_grad flags and hooks are restored
        afterwards, also when the call raises.
    x : Tensor
        ``(B, *input_shape)`` inputs.
    target : int, sequence of int, Tensor or None
        Output index (or one per sample) to explain, as in Captum; ``None`` explains every output.
    method : {"auto", "reverse", "forward", "compose"}
        See the module docstring for costs; all are exact. ``"auto"`` takes forward mode where reverse mode would
        meet a unit inside ``torch.utils.checkpoint`` (which ``"reverse"`` refuses), and reverse mode where an
        operation has no forward-mode rule in PyTorch (``grid_sample``; ``"forward"`` raises
        :class:`~relu_regions.errors.ForwardADMissingError`).
    logits_at : str, optional
        Module path whose output is explained (e.g. the layer before a softmax head). A model (or module) that
        returns a tuple or list is explained through its first element (``(logits, aux)``); name the module that
        produces another element to explain that one.
    chunk_size : int, optional
        Samples per chunk; bounds memory. Default: reverse mode keeps a chunk's Jacobian block below 2**24
        elements; forward mode and composition carry a tangent per input feature through every layer and keep the
        chunk's widest activation below 2**26 elements (down to one sample per chunk).
    strict : bool
        Raise :class:`~relu_regions.UnsupportedModuleError` on operations that are not piecewise linear.
    check : bool
        Verify ``|A·x + d − f(x)| <= 1e-3·(1 + max(|f(x)|, |A|·|x| + |d|))`` per sample (the largest output;
        float32; 1e-8 for float64, 4·eps for bfloat16 / float16: rounding scales with the terms the sum cancels)
        and raise if it fails, which catches nonlinear operations that slipped past ``strict``.
    progress : bool
        Show a progress bar over chunks (tqdm).

    Returns
    -------
    AffineMap
    """
    check_batch(x)
    check_chunk_size(chunk_size)
    x = x.detach()
    b = x.shape[0]
    n_inputs = int(x[0].numel())
    parts = []
    with preserved(model, eval_mode=True):
        sel_all = route = size = None
        start, bar = 0, None
        while start < b:
            # the first chunk's recorded output fixes K, the target indices, the route and the chunk size
            stop = min(b, start + (size or chunk_size or 256))
            xs = x[start:stop]
            with torch.no_grad():
                out, patterns = run_recorded(model, xs, strict=strict, logits_at=logits_at, count_boundary=False)
            out = _flat_out(out, xs.shape[0])
            if route is None:
                n_outputs = out.shape[1]
                sel_all = resolve_target(target, b, n_outputs, x.device)
                route = choose_method(method, 1 if sel_all is not None else n_outputs, n_inputs)
                size = chunk_size or _default_chunk(route, n_inputs, n_outputs, _widest(patterns))
                if stop - start > size:  # first pass recorded more than one chunk: keep only its first chunk
                    stop = start + size
                    xs, out = x[start:stop], out[:size]
                    patterns = [p.batch(slice(0, size)) for p in patterns]
                if progress and b > size:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=b, desc=f"affine_map ({route})", unit="sample")
            sel = None if sel_all is None else sel_all[start:stop]
            try:
                parts.append(_one_chunk(model, xs, out, patterns, sel, route, logits_at, strict))
            except (CheckpointedReverseError, ForwardADMissingError) as e:
                other = "forward" if isinstance(e, CheckpointedReverseError) else "reverse"
                if method != "auto" or parts or route == other:
                    raise
                # "auto" chose reverse mode, which a unit under torch.utils.checkpoint refuses, or forward mode,
                # which an operation without a forward-AD rule refuses; the other mode is exact there: this chunk
                # again, in that mode's chunks
                route = other
                size = chunk_size or _default_chunk(route, n_inputs, n_outputs, _widest(patterns))
                if bar is not None:
                    bar.set_description(f"affine_map ({route})")
                continue
            if bar is not None:
                bar.update(stop - start)
            start = stop
        if bar is not None:
            bar.close()
    def join(i):
        return parts[0][i] if len(parts) == 1 else torch.cat([p[i] for p in parts])

    cat = {i: join(i) for i in (0, 1, 2)}
    amap = AffineMap(A=cat[0], d=cat[1], output=cat[2], x=x, target=sel_all, patterns=[p[3] for p in parts],
                     _sizes=[len(p[0]) for p in parts], method=route, layer_names=parts[0][4],
                     _recount=_Recount(model, x, chunk_size=size, strict=strict, logits_at=logits_at))
    if check:
        _check(amap, model)
    return amap


class _Recount:
    """``n_boundary``'s counts on first access: one more recorded pass through the model, refused when the model
    changed since the map (which tensors it holds and their version counters: an optimizer step, load_state_dict and
    in-place writes bump them; new weights are other tensors). No tensor work at map time (a checksum of the weights
    cost ~6% of an example-CNN map)."""

    def __init__(self, model: nn.Module, x: Tensor, **kw: Any) -> None:
        self.model, self.x, self.kw = model, x, kw
        self.fingerprint = _fingerprint(model)

    def changed(self) -> bool:
        return _fingerprint(self.model) != self.fingerprint

    def __call__(self) -> Tensor:
        if self.changed():
            raise RuntimeError("n_boundary: the model changed (its parameters or buffers were written or replaced) "
                               "after this AffineMap was computed, and the counts come from one more pass through "
                               "the model; read n_boundary before changing the model, or compute a new map")
        return boundary_units(self.model, self.x, **self.kw)


def _fingerprint(model: nn.Module) -> tuple:
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return tuple((n, id(t), t.data_ptr(), _version(t)) for n, t in named)


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


def check_batch(x: Tensor, name: str = "x") -> None:
    """Raise a clear error unless ``x`` is a batched floating-point tensor of finite values (``name``: what the
    messages call it)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be batched, shape (B, ...); got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} holds no samples (shape {tuple(x.shape)}): there is no region to compute")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    check_finite(x, name, "no activation region contains such an input")


def check_chunk_size(chunk_size: int | None) -> None:
    """Raise a clear error unless ``chunk_size`` is None or a positive int."""
    if chunk_size is not None and not is_int_at_least(chunk_size, 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def _one_chunk(model, x, out, patterns, sel, route, logits_at, strict):
    a, d = _ROUTES[route](model, patterns, x, sel, out.shape[1], strict=strict, logits_at=logits_at)
    if sel is not None:
        out = out.gather(1, sel[:, None])
    return a.detach(), d.detach(), out.detach(), patterns, [p.name for p in patterns]


@library_call
def boundary_units(model: nn.Module, x: Tensor, *, chunk_size: int = 256, strict: bool = True,
                   logits_at: str | None = None) -> Tensor:
    """``(B,)`` number of units of each input exactly on a breakpoint (pre-activation 0, max-pool ties with a
    nonzero maximum), from recorded forward passes in chunks (the model in eval mode, restored afterwards)."""
    parts = []
    with preserved(model, eval_mode=True), torch.no_grad():
        for sl in _chunks(x.shape[0], chunk_size):
            _, patterns = run_recorded(model, x[sl], strict=strict, logits_at=logits_at, count_boundary=True)
            parts.append(boundary_counts(patterns, sl.stop - sl.start, x.device))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=x.device)


def _pack(patterns: list[LayerPattern], n: int, device: torch.device) -> Tensor:
    if not patterns:  # an affine network: one region
        return torch.zeros(n, 1, dtype=torch.int64, device=device)
    return pack_patterns(patterns)


def _keys(patterns: list[LayerPattern], n: int, device: torch.device) -> Tensor:
    if not patterns:  # an affine network: one region
        return torch.zeros(n, dtype=torch.int64, device=device)
    return pattern_keys(patterns)


def _tolerance(model: nn.Module | None, *tensors: Tensor) -> float:
    """Relative tolerance of an exactness check: 1e-8 in float64, 1e-3 in float32; bfloat16 / float16 round at ~4e-3
    / 5e-4 per operation. The least precise dtype the pass computed in: A follows the input, but a float32 model fed
    float64 inputs (x.float() in its forward, for numpy data) rounds at float32."""
    dtypes = {t.dtype for t in tensors}
    if model is not None:
        dtypes |= {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    eps = max(torch.finfo(dt).eps for dt in dtypes)
    return 1e-8 if eps <= torch.finfo(torch.float64).eps else max(1e-3, 4 * eps)


def _check(amap: AffineMap, model: nn.Module | None = None) -> None:
    tol = _tolerance(model, amap.A, amap.output)
    err = amap.residual()
    # relative to the terms A·x + d adds up, not only to its sum: inputs with a large offset that the model removes
    # (standardisation around 1e4) cancel ~|A|·|x| in every output, and rounding scales with that
    a = amap.A.reshape(amap.A.shape[0], amap.A.shape[1], -1)
    terms = torch.einsum("bkd,bd->bk", a.abs(), amap.x.reshape(a.shape[0], -1).abs().to(a.dtype)) + amap.d.abs()
    bound = tol * (1 + torch.maximum(amap.output.abs(), terms).amax(1))
    bad = err > bound
    if bad.any():
        i = int(bad.nonzero()[0])
        raise RuntimeError(
            f"affine map check failed for sample {i}: |A·x + d − f(x)| = {err[i].item():.3g} > {bound[i].item():.3g}."
            " The model computes something that is not piecewise linear in its input and was not detected"
            " (please report the model); pass check=False to skip this check.")


# --- maps of the hidden layers ---------------------------------------------------------------------------------


@dataclass
class LayerMap:
    """The affine map from the input to the input of one piecewise-linear call (its pre-activations).

    Attributes
    ----------
    name, kind : str
        As in :class:`~relu_regions.units.LayerPattern`.
    value : Tensor
        ``(B, *unit_in_shape)`` pre-activations at ``x``.
    offset : Tensor
        ``(B, *unit_in_shape)`` pre-activations of the frozen network at 0 (the map's constant term).
    jacobian : Tensor or None
        ``(B, *unit_in_shape, *input_shape)``, when ``reduce`` is None.
    norm : Tensor or None
        ``(B, *unit_in_shape)`` q-norm of each unit's input gradient, when ``reduce`` is given.
    method : str
        "forward" or "reverse", whichever was cheaper for this layer.
    """

    name: str
    kind: str
    value: Tensor
    offset: Tensor
    jacobian: Tensor | None
    norm: Tensor | None
    method: str


def _qnorm(t: Tensor, q: float, dim: int) -> Tensor:
    """``||t||_q`` along ``dim`` for any order ``q > 0`` (written out for 2, 1 and inf: much faster than
    ``vector_norm`` for outer reductions on CPU).

    The 2-norm is scaled where it has to be: squares of ordinary float32 numbers under- or overflow (entries
    below ~1e-19 or above ~1e19; ``vector_norm`` does not scale either), which made distances 0 or inf for inputs
    in tiny or huge units. Where any row's sum of squares lost precision (nonzero but below ``D·tiny/eps``, so its
    relative error may exceed ``eps``) or overflowed, or every row came out 0, all norms are recomputed with each
    row divided by its largest entry (the plain sum costs a third of that, and rows of exact zeros, such as a
    max-pool element compared with itself, are common). Not caught: a row whose squares *all* underflow (entries
    below ~1e-23 in float32, ~1e-162 in float64) in a tensor whose other rows are all ordinary counts as 0 (its
    margin is taken as one that never binds).
    """
    if q == 2:
        s = t.square().sum(dim)
        n = t.shape[dim] if t.dim() else 1
        if n == 0 or s.numel() == 0:
            return s.sqrt()
        fi = torch.finfo(t.dtype)
        lost = ((s > 0) & (s < fi.tiny * n / fi.eps)) | torch.isinf(s)
        if bool(lost.any()) or not bool((s > 0).any()):
            top = t.abs().amax(dim, keepdim=True)
            top = torch.where(top > 0, top, torch.ones_like(top))
            return (t / top).square().sum(dim).sqrt() * top.squeeze(dim)
        return s.sqrt()
    if q == 1:
        return t.abs().sum(dim)
    if q == float("inf"):
        return t.abs().amax(dim)
    top = t.abs().amax(dim, keepdim=True)  # (other orders, for preactivation_maps(reduce=q): scaled always)
    top = torch.where(top > 0, top, torch.ones_like(top))
    return torch.linalg.vector_norm(t / top, ord=q, dim=dim) * top.squeeze(dim)


_PREACTIVATION_METHODS = ("auto", "forward", "reverse")


@library_call
def preactivation_maps(model: nn.Module, x: Tensor, layers: LayerSelection = None, *, reduce: float | None = None,
                       method: str = "auto", logits_at: str | None = None, strict: bool = True,
                       unit_chunk: int = 256, chunk_size: int | None = None) -> dict[str, LayerMap]:
    """Affine maps from the input to the pre-activations of selected piecewise-linear calls.

    Parameters
    ----------
    model, x, logits_at, strict
        As in :func:`affine_map`.
    layers : selection, optional
        Which calls (see :meth:`Recording.patterns`); default all.
    reduce : float, optional
        Instead of full Jacobians, return each unit's gradient norm of this order (``2``, ``1``,
        ``float("inf")``) — what exact boundary distances need, without keeping the Jacobians.
    method : {"auto", "forward", "reverse"}
        ``"auto"`` picks per layer: forward mode when input features <= units of the layer, else reverse.
    unit_chunk : int
        Units per batched backward pass in reverse mode.
    chunk_size : int, optional
        Samples per chunk; bounds memory. Default: as forward mode in :func:`affine_map` (a chunk's widest
        activation of the tangents below 2**26 elements).

    Returns
    -------
    dict of name -> LayerMap, in execution order.
    """
    if method not in _PREACTIVATION_METHODS:
        raise ValueError(f"method must be one of {_PREACTIVATION_METHODS}, got {method!r}")
    if reduce is not None and (isinstance(reduce, bool) or not isinstance(reduce, (int, float)) or not reduce > 0):
        raise ValueError(f"reduce must be None or a norm order > 0 (2, 1, float('inf')), got {reduce!r}")
    check_batch(x)
    check_chunk_size(chunk_size)
    if not is_int_at_least(unit_chunk, 1):
        raise ValueError(f"unit_chunk must be a positive int, got {unit_chunk!r}")
    x = x.detach()
    parts: list[dict[str, LayerMap]] = []
    with preserved(model, eval_mode=True):
        start, size = 0, chunk_size
        while start < x.shape[0] or not parts:
            # the first chunk's patterns give the default size (a chunk of at most 256 recorded first, as
            # affine_map does)
            xs = x[start:start + (size or 256)]
            with torch.no_grad():
                _, patterns = run_recorded(model, xs, strict=strict, logits_at=logits_at)
            if size is None:
                size = _default_chunk("forward", int(x[0].numel()), 1, _widest(patterns))
                if xs.shape[0] > size:
                    xs = xs[:size]
                    patterns = [p.batch(slice(0, size)) for p in patterns]
            parts.append(_preactivation_chunk(model, xs, patterns, layers, reduce, method, logits_at, strict,
                                              unit_chunk))
            start += xs.shape[0]
    if len(parts) == 1:
        return parts[0]

    def cat(ts: list) -> Tensor | None:
        return None if ts[0] is None else torch.cat(ts)

    return {name: LayerMap(name, m.kind, cat([p[name].value for p in parts]), cat([p[name].offset for p in parts]),
                           cat([p[name].jacobian for p in parts]), cat([p[name].norm for p in parts]), m.method)
            for name, m in parts[0].items()}


def _check_close(model: nn.Module, got: Tensor, want: Tensor, terms: Tensor, message: Callable[..., str]) -> None:
    """Raise ``RuntimeError(message(i, j, err, bound))`` at the first ``(sample, unit)`` where ``(B, units)`` ``got``
    and ``want`` differ beyond rounding: the tolerance of the pass's dtypes (:func:`_tolerance`) relative to the
    largest of ``|want|`` and the ``terms`` they add up from, per sample (inputs with a large offset cancel in every
    unit)."""
    err = (got - want).abs()
    bound = _tolerance(model, want, got) * (1 + torch.maximum(want.abs(), terms).amax(1, keepdim=True))
    bad = err > bound
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise RuntimeError(message(i, j, err[i, j].item(), bound[i, 0].item()))


def _check_preactivations(model: nn.Module, name: str, value: Tensor, offset: Tensor, lin: Tensor,
                          terms: Tensor) -> None:
    """Raise ``RuntimeError`` unless ``value ≈ offset + lin`` for every unit, ``lin = J·x`` (all ``(B, units)``):
    the frozen network is affine per sample. A forward that mixes the samples of a batch (statistics over dim 0)
    fails it -- its Jacobians pick up the other rows -- as affine_map's check refuses it; passed unchecked, its
    distances were numbers of no region. ``terms``: any upper bound of ``Σ_i |J_i|·|x_i|``, e.g. a Hölder bound
    from norms at hand."""
    b = value.shape[0]
    value, offset, lin = value.reshape(b, -1), offset.reshape(b, -1), lin.reshape(b, -1)
    _check_close(model, offset + lin, value, terms.reshape(b, -1) + offset.abs(), lambda i, j, err, bound: (
        f"pre-activation check failed at layer {name!r}, sample {i}, unit {j}: |z(0) + J·x − z(x)| = {err:.3g} > "
        f"{bound:.3g}. The frozen network is not affine per sample: its forward mixes the samples of a batch (e.g. "
        "statistics over dim 0), or computes something else that is not piecewise linear (please report the model)"))


def _frozen_at_zero(model: nn.Module, x: Tensor, patterns: list[LayerPattern], names: Sequence[str] | None,
                    strict: bool, logits_at: str | None) -> dict[str, Tensor]:
    """Unit inputs of the network frozen in ``patterns``, evaluated at 0 (the maps' constant terms, what
    :func:`_check_preactivations` reads as ``z(0)``), for the calls in ``names`` (None: all)."""
    out: dict[str, Tensor] = {}

    def keep(p, t):
        if names is None or p.name in names:
            out[p.name] = t.detach().clone()

    with torch.no_grad():
        run_frozen(model, torch.zeros_like(x), patterns, strict=strict, logits_at=logits_at, observe=keep)
    return out


def _basis_and_x(x: Tensor) -> tuple[Tensor, int]:
    """:func:`_basis` and one more replica whose tangent is x itself: its tangent output is ``J·x``, for
    :func:`_check_preactivations` (one replica more, instead of a pass over all D tangents per layer)."""
    tangent, n = _basis(x)
    return torch.cat([tangent, x]), n


def _dual_norm(x: Tensor, q: float) -> Tensor:
    """``(B, 1)`` ``‖x‖_{q*}`` of ``(B, D)`` rows, ``1/q + 1/q* = 1`` (q ≥ 1; for q < 1 the 1-norm's dual, the max,
    bounds nothing: the sum of ``|x|`` is returned, for which ``Σ|g_i||x_i| ≤ max|g|·Σ|x| ≤ ‖g‖_q·Σ|x|``)."""
    x = x.abs()
    if q == 1:
        return x.amax(1, keepdim=True)
    if q == float("inf") or q < 1:
        return x.sum(1, keepdim=True)
    return torch.linalg.vector_norm(x, q / (q - 1), dim=1, keepdim=True)


def _preactivation_chunk(model: nn.Module, x: Tensor, patterns: list[LayerPattern], layers: LayerSelection,
                         reduce: float | None, method: str, logits_at: str | None, strict: bool,
                         unit_chunk: int) -> dict[str, LayerMap]:
    """:func:`preactivation_maps` of one chunk of samples, whose patterns are recorded."""
    b = x.shape[0]
    n_inputs = int(x[0].numel())
    names = select_layers([p.name for p in patterns], layers)
    chosen = {}
    for p in patterns:
        if p.name in names:
            n_units = int(torch.Size(p.in_shape).numel())
            m = method if method != "auto" else ("forward" if n_inputs <= n_units else "reverse")
            chosen[p.name] = m
    offsets = _frozen_at_zero(model, x, patterns, None, strict, logits_at)
    result: dict[str, LayerMap] = {}
    flat_x = x.reshape(b, -1)
    fw = [n for n, m in chosen.items() if m == "forward"]
    if fw:
        tangent, n = _basis_and_x(x)
        pending: list[tuple[str, Tensor, Tensor, Tensor]] = []

        def grab(p, t):
            if p.name in fw:
                primal, tan = fwAD.unpack_dual(t)
                val = primal.reshape(n + 1, b, *p.in_shape)[0].clone()
                if tan is None:
                    tan = torch.zeros_like(primal)
                g = tan.reshape(n + 1, b, -1)  # (D + 1, B, units): e_1 ... e_D, then x
                g, lin = g[:n], g[n]
                q = 2.0 if reduce is None else reduce
                nrm = _qnorm(g, q, 0)
                pending.append((p.name, val, lin.clone(), nrm * _dual_norm(flat_x, q)))
                jac = norm = None
                if reduce is None:
                    jac = g.permute(1, 2, 0).reshape(b, *p.in_shape, *x.shape[1:]).clone()
                else:
                    norm = nrm.reshape(b, *p.in_shape)
                result[p.name] = LayerMap(p.name, p.kind, val, offsets[p.name], jac, norm, "forward")

        try:
            with forward_mode("method='forward'", "use method='reverse'"), torch.no_grad(), fwAD.dual_level():
                primal = x.unsqueeze(0).expand(n + 1, *x.shape).reshape((n + 1) * b, *x.shape[1:])
                run_frozen(model, fwAD.make_dual(primal.contiguous(), tangent), patterns, strict=strict,
                           logits_at=logits_at, observe=grab)
            # (after the replay: its own refusals, e.g. of a derivative cut before a unit, name the cause better)
            for name, value, lin, terms in pending:
                _check_preactivations(model, name, value, offsets[name], lin, terms)
        except ForwardADMissingError:
            if method != "auto":
                raise
            for name in fw:  # reverse mode is exact there too
                chosen[name] = "reverse"
                result.pop(name, None)
    rv = [n for n, m in chosen.items() if m == "reverse"]
    if rv:
        captured: dict[str, Tensor] = {}
        z = x.clone().requires_grad_(True)
        with torch.enable_grad():
            # clones (in the graph): the model may change a unit's input in place after the unit read it
            # (h += block(relu(h))), and these are read after the whole forward
            run_frozen(model, z, patterns, strict=strict, logits_at=logits_at,
                       observe=lambda p, t: captured.__setitem__(p.name, t.clone()) if p.name in rv else None)
            for name in rv:
                pre = captured[name].reshape(b, -1)
                units = pre.shape[1]
                rows = []
                offset = offsets[name].reshape(b, -1)
                for sl in _chunks(units, unit_chunk):
                    k = sl.stop - sl.start
                    eye = torch.zeros(k, b, units, dtype=pre.dtype, device=pre.device)
                    eye[torch.arange(k), :, torch.arange(sl.start, sl.stop)] = 1
                    (g,) = torch.autograd.grad(pre, z, eye, is_grads_batched=True, retain_graph=True)
                    g = g.reshape(k, b, -1)
                    _check_preactivations(model, name, pre.detach()[:, sl], offset[:, sl], (g * flat_x).sum(2).T,
                                          _qnorm(g, 2.0, 2).T * _dual_norm(flat_x, 2.0))
                    rows.append(g.permute(1, 0, 2) if reduce is None else _qnorm(g, reduce, 2).T)
                p = next(q for q in patterns if q.name == name)
                full = torch.cat(rows, 1)
                jac = full.reshape(b, *p.in_shape, *x.shape[1:]) if reduce is None else None
                norm = full.reshape(b, *p.in_shape) if reduce is not None else None
                result[name] = LayerMap(name, p.kind, pre.detach().reshape(b, *p.in_shape),
                                        offsets[name], jac, norm, "reverse")
    return {n: result[n] for n in names}
