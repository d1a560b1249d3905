"""Recording activation patterns during normal inference, and replaying them frozen.

Why a torch function mode (``torch.overrides.TorchFunctionMode``) and not torch.fx: forward hooks on modules
cannot see ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` / ``torch.clamp(min=0)`` / ``F.max_pool2d`` written in a
``forward``; torch.fx sees them but only for symbolically traceable models (no data-dependent Python, no
arbitrary modules), and it re-runs a transformed copy of the model instead of the user's own forward. A function
mode sees every torch call of the user's unmodified forward, eagerly, on any device, and leaves the results
bit-identical. Each recorded unit op carries the path of the innermost model module whose code ran it (read from
the call stack); hooks on the root module only (registered through handles, removed on exit, also on exceptions)
mark where a forward pass begins and ends.

Models whose every unit is an ``nn.ReLU`` / ``nn.MaxPool`` module, with nothing else on the input's path that needs
the mode (checked once per model by a torch.fx trace), are recorded by the unit modules' own calls instead
(:mod:`relu_regions.hook_recording`, ``record(route=...)``; instance-level forwards set for the block, cheaper than
forward hooks): the same patterns without the mode's per-call cost.

The same mode, given a recorded pattern, *replays* the forward with every piecewise-linear unit frozen in its
recorded state. The frozen network is an affine function of its input: that is the region's map.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import (
    BATCH_STATISTICS,
    CheckpointedReverseError,
    PatternMismatchError,
    UnsupportedModuleError,
    not_piecewise_linear,
)
from .hook_recording import (
    PLANS,
    RANDOM,
    ForwardPatch,
    HookPlan,
    SessionHook,
    StrongHandle,
    attach,
    draws,
    foreign_hook,
)
from .input_grads import affine_jvp, conv2d_with_fast_input_grad, linear_at_zero
from .keys import pack_patterns, pattern_keys
from .units import (
    ClampRule,
    LayerPattern,
    LeakyReluRule,
    MaxPoolRule,
    PReluRule,
    ReluRule,
    UnitRule,
    _arg,
    boundary_counts,
    write_back,
)

Tensor = torch.Tensor
LayerSelection = None | str | Sequence[str] | slice | int

_relu, _clamp, _leaky, _prelu, _pool = ReluRule(), ClampRule(), LeakyReluRule(), PReluRule(), MaxPoolRule()


def _build_rules() -> dict[Any, tuple[UnitRule, ...]]:
    T = torch.Tensor
    table: dict[Any, tuple[UnitRule, ...]] = {}
    for f in (F.relu, F.relu_, torch.relu, torch.relu_, T.relu, T.relu_):
        table[f] = (_relu,)
    for f in (torch.clamp, torch.clamp_, T.clamp, T.clamp_, torch.clip, torch.clip_, T.clip, T.clip_,
              torch.clamp_min, torch.clamp_min_, T.clamp_min, T.clamp_min_):
        table[f] = (_relu, _clamp)
    for f in (torch.clamp_max, torch.clamp_max_, T.clamp_max, T.clamp_max_, F.hardtanh, F.hardtanh_, F.relu6):
        table[f] = (_clamp,)
    for f in (F.leaky_relu, F.leaky_relu_):
        table[f] = (_leaky,)
    for f in (F.prelu, torch.prelu, torch.Tensor.prelu):
        table[f] = (_prelu,)
    for f in (F.max_pool1d, F.max_pool2d, F.max_pool1d_with_indices, F.max_pool2d_with_indices,
              F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool1d_with_indices,
              F.adaptive_max_pool2d_with_indices):
        table[f] = (_pool,)
    return table


def _build_nonlinear() -> set:
    names = [
        (F, "sigmoid tanh gelu silu mish elu selu celu softplus softmax log_softmax softmin layer_norm group_norm "
            "instance_norm local_response_norm rms_norm scaled_dot_product_attention multi_head_attention_forward "
            "hardswish hardsigmoid logsigmoid softsign tanhshrink glu normalize softshrink hardshrink "
            "threshold elu_ celu_ selu_ rrelu rrelu_ max_pool3d adaptive_max_pool3d fractional_max_pool2d lp_pool2d "
            "lp_pool1d lp_pool3d max_pool3d_with_indices adaptive_max_pool3d_with_indices fractional_max_pool3d "
            "fractional_max_pool2d_with_indices fractional_max_pool3d_with_indices"),
    ]
    out = set()
    for mod, ns in names:
        for n in ns.split():
            if hasattr(mod, n):
                out.add(getattr(mod, n))
    # smooth functions, order statistics, steps and products, under every spelling: torch.f, Tensor.f, the in-place
    # Tensor.f_ and torch.special.f (e.g. h.sigmoid_(), torch.special.expit, h.median(1), torch.fmod)
    more = ("sigmoid tanh exp exp2 expm1 log log2 log10 log1p sqrt rsqrt erf erfc erfinv abs absolute sign sgn "
            "square reciprocal pow float_power maximum minimum fmax fmin max min amax amin aminmax sort msort argsort "
            "topk kthvalue median nanmedian mode quantile nanquantile cummax cummin cumprod logcumsumexp logsumexp "
            "floor ceil round trunc fix frac fmod remainder floor_divide bucketize searchsorted heaviside copysign "
            "sin cos tan asin acos atan arcsin arccos arctan atan2 arctan2 sinh cosh asinh acosh atanh arcsinh "
            "arccosh arctanh hypot logaddexp logaddexp2 xlogy xlog1py expit logit sinc lgamma digamma polygamma "
            "mvlgamma i0 i0e i1 i1e ndtr ndtri log_ndtr entr gammaln softmax log_softmax norm var std var_mean "
            "std_mean dist cdist renorm cosine_similarity pairwise_distance addcmul addcdiv lerp "
            "prod argmax argmin unique unique_consecutive histc histogram bincount igamma "
            "igammac ldexp inverse det logdet slogdet pinverse matrix_exp svd svd_lowrank pca_lowrank nuclear_norm "
            "frobenius_norm matrix_power pdist cov corrcoef qr geqrf cholesky cholesky_inverse lu native_layer_norm "
            "native_group_norm native_norm max_pool1d max_pool2d max_pool3d adaptive_max_pool1d "
            "max_pool1d_with_indices quantized_max_pool1d quantized_max_pool2d")
    # (the torch.* spellings of max-pools: F.max_pool2d calls them where the recording does not look, a direct call
    # would be a max no rule records)
    # the activations and norms of the F list under their torch / Tensor spellings too (torch.selu, h.hardshrink())
    for n in names[0][1].split() + more.split() + ["angle"]:
        for mod in (torch, torch.Tensor, torch.special, F):
            for name in (n, n + "_"):  # the in-place spellings: h.sigmoid_(), torch.sigmoid_(h)
                f = getattr(mod, name, None)
                if callable(f):
                    out.add(f)
    # torch.special holds no affine function (Bessel functions, orthogonal polynomials, zeta, ...)
    out.update(f for n in dir(torch.special) if not n.startswith("_")
               for f in [getattr(torch.special, n)] if callable(f))
    # in-place comparisons write a step of the input into a floating tensor (h.gt_(0))
    for n in ("eq ne gt ge lt le greater greater_equal less less_equal not_equal logical_not logical_and logical_or "
              "logical_xor").split():
        f = getattr(torch.Tensor, n + "_", None)
        if callable(f):
            out.add(f)
    out.update(f for f in (getattr(torch.linalg, "vander", None), getattr(F, "gumbel_softmax", None)) if f is not None)
    # losses (a forward that returns one; Lightning's steps run around the recorded forward, see enter_root)
    for n in dir(F):
        if n.endswith("_loss") or n in ("cross_entropy", "binary_cross_entropy", "binary_cross_entropy_with_logits",
                                        "kl_div", "nll_loss"):
            for mod in (F, torch):
                f = getattr(mod, n, None)
                if callable(f):
                    out.add(f)
    # torch.linalg: all but the (bi)linear maps and the solvers (linear in the right-hand side: see _ONE_SIDED)
    keep = set("diagonal matmul multi_dot vecdot cross solve solve_ex solve_triangular lstsq tensorsolve "
               "lu_solve".split())
    out.update(f for n in dir(torch.linalg) if not n.startswith("_") and n not in keep
               for f in [getattr(torch.linalg, n)] if callable(f) and not isinstance(f, type))
    for n in ("threshold_", "hardshrink", "softshrink", "tanhshrink"):
        if hasattr(F, n):
            out.add(getattr(F, n))
    for n in ("__pow__", "__rpow__", "__ipow__", "__floordiv__", "__rfloordiv__", "__ifloordiv__", "__mod__",
              "__rmod__", "__imod__", "__abs__"):
        if hasattr(torch.Tensor, n):
            out.add(getattr(torch.Tensor, n))
    for n in ("norm", "vector_norm", "matrix_norm"):
        out.add(getattr(torch.linalg, n))
    return out


def _build_bilinear() -> set:
    T = torch.Tensor
    fs = [torch.mul, T.mul, T.__mul__, T.__rmul__, T.__imul__, torch.matmul, T.matmul, T.__matmul__, torch.bmm,
          torch.mm, T.mm, T.bmm, torch.einsum, torch.div, T.div, T.__truediv__, T.__rtruediv__, T.__itruediv__,
          F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, torch.outer, torch.ger, T.ger, torch.baddbmm, torch.addmm,
          T.mul_, T.div_, torch.multiply, T.multiply, torch.divide, T.divide, torch.true_divide, T.true_divide,
          torch.mv, T.mv, torch.addmv, T.addmv, T.addmm, torch.addbmm, T.__rmatmul__, T.outer,
          F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, T.multiply_, T.divide_, T.true_divide_,
          T.addmm_, T.addmv_, T.baddbmm_, T.addbmm_,
          # products that are linear in each operand: with one constant operand they are linear maps
          torch.inner, T.inner, torch.dot, T.dot, torch.vdot, T.vdot, torch.tensordot, torch.kron, T.kron,
          torch.cross, T.cross, torch.linalg.cross,
          torch.linalg.matmul, torch.linalg.multi_dot, torch.linalg.vecdot, torch.chain_matmul]
    return set(fs)


def _build_one_sided() -> dict[Any, tuple[int, str, str]]:
    """Calls linear in their input but not in one other argument: ``func -> (position, keyword, what)`` of that
    argument. Solvers of linear systems are linear in the right-hand side, not in the matrix (an inverse); a sampling
    is linear in the sampled input, not in its grid (a spatial transformer's grid computed from the input). An
    input-dependent such argument is refused."""
    T, L = torch.Tensor, torch.linalg
    matrix = "a coefficient matrix that depends on the input (the solution is linear in the right-hand side only)"
    table = {L.solve: (0, "A"), L.solve_ex: (0, "A"), L.solve_triangular: (0, "input"),
             L.lstsq: (0, "input"), L.tensorsolve: (0, "input"), L.lu_solve: (0, "LU"),
             torch.cholesky_solve: (1, "input2"), T.cholesky_solve: (1, "input2"),
             torch.lu_solve: (1, "LU_data"), T.lu_solve: (1, "LU_data"),
             torch.triangular_solve: (1, "A"), T.triangular_solve: (1, "A")}
    out = {f: (pos, key, matrix) for f, (pos, key) in table.items() if f is not None}
    out[F.grid_sample] = (1, "grid", "a grid that depends on the input (the sampling is linear in the sampled input "
                                     "only)")
    return out


_DIVISIONS = {torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.__itruediv__, torch.Tensor.div_,
              torch.divide, torch.Tensor.divide, torch.true_divide, torch.Tensor.true_divide, torch.Tensor.divide_,
              torch.Tensor.true_divide_}


def _build_selectors() -> dict[Any, tuple[int, str, str]]:
    """Calls that pick elements by a condition, mask or index: ``func -> (position, keyword, what)`` of that
    argument. Picked by the input itself (``torch.where(h > 0, h, 0)``), they are piecewise-linear gates whose state
    no recording keeps."""
    T = torch.Tensor
    table: dict[Any, tuple[int, str, str]] = {torch.where: (0, "condition", "condition"),
                                              T.where: (1, "condition", "condition")}
    for f in (torch.masked_fill, T.masked_fill, T.masked_fill_, torch.masked_select, T.masked_select,
              T.masked_scatter, T.masked_scatter_):
        table[f] = (1, "mask", "mask")
    for f in (T.__getitem__, T.__setitem__, torch.take, T.take):
        table[f] = (1, "index", "index")
    for f in (torch.gather, T.gather, torch.index_select, T.index_select, torch.take_along_dim, T.take_along_dim,
              torch.scatter, T.scatter, T.scatter_, torch.index_add, T.index_add, T.index_add_, torch.index_copy,
              T.index_copy, T.index_copy_, torch.index_fill, T.index_fill, T.index_fill_):
        table[f] = (2, "index", "index")
    return table


# dtype conversions: affine between floating types and from integers (an integer input); from floating values to
# integers / bools (truncation) and from bools (a comparison used as a number) a step function
_CONVERSIONS = {torch.Tensor.to, torch.Tensor.type, torch.Tensor.float, torch.Tensor.double, torch.Tensor.half,
                torch.Tensor.bfloat16, torch.Tensor.long, torch.Tensor.int, torch.Tensor.short, torch.Tensor.bool,
                torch.Tensor.byte, torch.Tensor.char, torch.Tensor.type_as}

# reading an input-dependent tensor's values into Python (a branch, a scale, a round trip through numpy): what
# follows is out of the recording's sight
_SCALARS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__, torch.Tensor.__bool__,
            torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__complex__, torch.Tensor.__index__,
            torch.Tensor.__contains__, torch.equal, torch.Tensor.equal, torch.allclose, torch.Tensor.allclose,
            torch.is_nonzero, torch.Tensor.is_nonzero}


# constant on finite inputs (no boundary inside the input space): their results do not depend on the input, so an
# `assert torch.isfinite(x).all()` in a forward is not a branch on it
_FINITE_CHECKS = {f for n in ("isfinite", "isnan", "isinf", "isposinf", "isneginf", "isreal")
                  for f in (getattr(torch, n, None), getattr(torch.Tensor, n, None)) if f is not None}

_OWN_FILES = {__file__, __file__.replace("recording.py", "compose.py")}
_RULES = _build_rules()
_NONLINEAR = _build_nonlinear()
# piecewise-linear selections the recording has no unit for (refused like the nonlinear calls, with another message)
_ORDER = "Write it with ReLUs / max-pool, or pass strict=False to take the selection as fixed."
_UNRECORDED_PL = {
    "abs": "Write it as F.relu(h) + F.relu(-h) (two recorded units).",
    "absolute": "Write it as F.relu(h) + F.relu(-h) (two recorded units).",
    "maximum": "Write it as b + F.relu(a - b) (one recorded unit).",
    "fmax": "Write it as b + F.relu(a - b) (one recorded unit).",
    "minimum": "Write it as a - F.relu(a - b) (one recorded unit).",
    "fmin": "Write it as a - F.relu(a - b) (one recorded unit).",
    "hardsigmoid": "Write it as F.relu6(h + 3) / 6 (one recorded unit).",
    "softshrink": "Write it as F.relu(h - lambd) - F.relu(-h - lambd) (two recorded units).",
    "rrelu": "In eval mode it is F.leaky_relu(h, (lower + upper) / 2) (one recorded unit); in training its slopes "
             "are random.",
    "threshold": "With value == threshold it is F.relu(h - threshold) + threshold (one recorded unit); other values "
                 "make it discontinuous, which no recorded unit describes.",
    "hardshrink": "It is discontinuous at ±lambd, which no recorded unit describes.",
    **{n: _ORDER for n in ("max", "min", "amax", "amin", "sort", "topk", "kthvalue", "median", "nanmedian",
                           "cummax", "cummin", "msort", "aminmax")}}
_BILINEAR = _build_bilinear()
_BATCH_NORMS = {F.batch_norm, torch.batch_norm}  # both take ``training`` at position 5
# reductions whose ``reduce`` decides: sums and means are linear, max / min / prod are not
_REDUCTIONS = {f: (pos, key) for f, pos, key in (
    (torch.scatter_reduce, 4, "reduce"), (torch.Tensor.scatter_reduce, 4, "reduce"),
    (torch.Tensor.scatter_reduce_, 4, "reduce"), (torch.index_reduce, 4, "reduce"),
    (torch.Tensor.index_reduce, 4, "reduce"), (torch.Tensor.index_reduce_, 4, "reduce"),
    (getattr(torch, "segment_reduce", None), 1, "reduce"), (torch.Tensor.scatter, 4, "reduce"),
    (torch.Tensor.scatter_, 4, "reduce")) if f is not None}
_LINEAR_REDUCE = {None, "sum", "mean", "add"}
_SELECTORS = _build_selectors()
_ONE_SIDED = _build_one_sided()
_LSTSQ = torch.linalg.lstsq
_CHECKED = (_NONLINEAR | _BILINEAR | _BATCH_NORMS | set(_REDUCTIONS) | set(_SELECTORS) | set(_ONE_SIDED)
            | _CONVERSIONS | set(_RULES) | _SCALARS | set(RANDOM))
# torch.ops.<namespace>.<name>[.<overload>] (a set of the exact types: cheaper than isinstance on every call)
_OPERATORS = {t for base in (torch._ops.OpOverload, torch._ops.OpOverloadPacket)
              for t in (base, *base.__subclasses__())}
_RESHAPES = {torch.flatten, torch.Tensor.flatten, torch.Tensor.view, torch.Tensor.reshape, torch.reshape}


_SETITEM = torch.Tensor.__setitem__


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":  # a property read (Tensor.data, Tensor.T): name the property
        owner = getattr(func, "__self__", None)
        return f"Tensor.{getattr(owner, '__name__', '?')}"
    return name


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            if isinstance(o, Tensor):
                yield o


def _derivative(t: Tensor) -> str | None:
    """Which derivatives of the input ``t`` carries: "reverse" (autograd records its uses), "forward" (a dual tensor
    with a tangent) or None."""
    if t.requires_grad and torch.is_grad_enabled():
        return "reverse"
    return "forward" if fwAD.unpack_dual(t).tangent is not None else None


# the calls that drop a forward-mode tangent (a custom autograd.Function without a jvp makes torch raise; one with
# a jvp is taken at its word)
_DETACHES = {torch.Tensor.detach, torch.Tensor.detach_, torch.detach, torch.Tensor.data.__get__}


def _cut_error(origin: str, derivative: str, user: str) -> UnsupportedModuleError:
    what = "autograd (reverse mode)" if derivative == "reverse" else "forward-mode AD"
    return UnsupportedModuleError(
        f"{origin} on input-dependent data where {what} does not follow it (inside torch.no_grad(), through "
        ".detach() / .data, or in the forward of a custom torch.autograd.Function, whose backward or jvp relu-regions "
        f"cannot check), and {user} uses the result: the derivatives of the input this computation reads would be "
        "wrong. Compute it without cutting the graph, use affine_map(..., method='compose') (no derivatives), or "
        "pass strict=False to take the cut values as fixed.")


def _in_checkpoint() -> bool:
    """Whether autograd saves tensors for a non-reentrant ``torch.utils.checkpoint`` here: its backward recomputes
    this part of the forward itself, outside the replay, with live units."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    return bool(hooks) and "_checkpoint_hook" in getattr(hooks[0], "__qualname__", "")


# calls that build a constant of an input-dependent tensor's shape: their results carry no derivative, and need none
_CONSTANTS = {f for n in ("zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full",
                          "new_empty", "new_tensor") for f in (getattr(torch, n, None), getattr(torch.Tensor, n, None))
              if f is not None}


_CASTS = {torch.Tensor.type_as, torch.Tensor.to}


def _reference_only(func, args: tuple, s: _Session) -> bool:
    """``const.type_as(h)`` / ``const.to(h)``: the input-dependent argument gives only its dtype and device; the
    result is the constant, cast (a buffer or positional encoding added to ``h``)."""
    return func in _CASTS and len(args) > 1 and isinstance(args[0], Tensor) and not s.is_tainted(args[0])


class _Pass(list):
    """The patterns of one forward pass, in execution order, and the pass's batch size (from its first input
    tensor; known also for a model without piecewise-linear units)."""

    batch: int | None = None
    device: torch.device | None = None


class StopReplay(Exception):
    """Raised by an ``observe`` callback of :func:`run_frozen` to end the replay after the current call (the caller
    has what it needs); :func:`run_frozen` then returns None."""


class _StopForward(Exception):
    """Raised by the ``logits_at`` hook to end the forward pass at the logits."""

    def __init__(self, output: Tensor):
        super().__init__()
        self.output = output


class _Session:
    """State shared by the hooks and the function mode while a model runs under ``record`` / ``replay``."""

    def __init__(self, model: nn.Module, strict: bool, replay: Sequence[LayerPattern] | None = None,
                 observe: Callable[[LayerPattern, Tensor], None] | None = None):
        self.model = model
        # the thread that opened the session: its hooks and patches are the model's for every thread, but only this
        # thread's calls are recorded (the function mode is per thread anyway)
        self.thread = threading.get_ident()
        self.strict = strict
        self.replay = list(replay) if replay is not None else None
        self.observe = observe
        self.counts: dict[str, int] = {}
        self.passes: list[_Pass] = []
        self.current: list[LayerPattern] | None = None
        self.depth = 0
        self.open_depth = 0  # root calls at this depth open a pass (1 inside a call that wraps the forward)
        self.cursor = 0
        self.stopped = False  # an observer ended the replay early (StopReplay)
        self._names: dict[int, str] | None = None
        self._types: dict[str, str] | None = None
        self.tainted: dict[int, weakref.ref] = {}
        # input-dependent integer / bool tensors computed from input-dependent floating values (comparisons,
        # counts): step functions of the input, fine as long as they are not used as numbers (see _Mode)
        self.stepped: dict[int, weakref.ref] = {}
        self.count_boundary = True
        self.fast_input_grads = False  # set by the reverse route's replay (see relu_regions.input_grads)
        # the replay input when the caller knows it is all zeros, and its reshapes, with their versions then
        self.zero_tensors: list[tuple[Tensor, int]] = []
        self.zero_uses: list = []  # the torch functions that read those
        self.first_linear: tuple | None = None  # (output, weight, version) of F.linear on a zero tensor
        self._zeros: dict = {}
        self.suspended = 0  # > 0 while a nested session (e.g. affine_map inside `with record(...)`) runs
        # a replay that carries derivatives of its input: "reverse" (autograd) or "forward" (dual tensors), else None;
        # then results that lost them (a cut: no_grad, detach, a custom autograd.Function) are marked, with where the
        # cut happened, and may not reach a unit or the output (see _Mode._follow)
        self.derivative: str | None = None
        self.cut: dict[int, tuple[weakref.ref, str]] = {}
        self.tainting = False  # the pass follows the input through the function mode (not the hook route)

    @property
    def names(self) -> dict[int, str]:
        """Module path by module id (by id: any object may sit in a frame's ``self``); built on first use."""
        if self._names is None:
            self._names = {id(m): n for n, m in self.model.named_modules()}
        return self._names

    @property
    def types(self) -> dict[str, str]:
        if self._types is None:
            # (a wrapper the library puts around the user's function names itself as the user knows it)
            self._types = {n: getattr(m, "display_type", type(m).__name__) for n, m in self.model.named_modules()}
        return self._types

    # -- passes ---------------------------------------------------------------------------------------------
    def begin_pass(self, inputs: tuple, taint: bool = True) -> None:
        """Open a pass on the model's positional ``inputs`` (``taint``: mark them as the input, for the function
        mode; the hook route does not need it)."""
        self.counts.clear()
        self.tainted.clear()
        self.stepped.clear()
        self.cursor = 0
        # the batch and device are read before the pass opens: under the function mode, reads inside a pass count
        # as uses of the input (the reverse route's MLP shortcut needs the first Linear as the input's only reader)
        new = _Pass()
        self.derivative = None
        self.cut.clear()
        self.tainting = taint
        for t in inputs:
            for tt in _tensors(t):
                if taint:
                    self.taint(tt)
                if new.batch is None and tt.dim():
                    new.batch, new.device = int(tt.shape[0]), tt.device
                if self.replay is not None and self.derivative is None and tt.is_floating_point():
                    self.derivative = _derivative(tt)
        self.current = new

    def enter_root(self, inputs: tuple, taint: bool = True) -> None:
        """The root module is called: the outermost call opens a pass. A call inside it before any unit ran
        opens the pass instead, and so do later calls at its depth: the outer call wraps the forward (Lightning's
        DDP strategies run the whole training / validation step as the module's forward, and the step calls the
        module again), and what it runs around the forward (the loss, metrics) is not the model's."""
        if self.depth == self.open_depth:
            self.begin_pass(inputs, taint)
        elif (self.depth == self.open_depth + 1 and self.current is not None and not self.current
              and self.replay is None):
            self.open_depth = self.depth
            self.begin_pass(inputs, taint)
        self.depth += 1

    def leave_root(self, raised: bool = False) -> None:
        """The root module's call returned (or ``raised``): the call that opened the pass closes it."""
        self.depth -= 1
        if self.depth == self.open_depth:
            self.end_pass(check=not raised, keep=not raised)
        elif self.depth < self.open_depth:  # the wrapping call returned
            self.open_depth = self.depth

    def end_pass(self, check: bool = True, keep: bool = True) -> None:
        """Close the pass (``check``: a replay must have met every recorded unit; not when the forward raised;
        ``keep=False``: the forward raised, and a pass without an output is dropped -- a loop that catches the
        error and goes on would otherwise get rows for samples it never got outputs for)."""
        if self.current is None:
            return
        if keep:
            self.passes.append(self.current)
        if check and self.replay is not None and self.cursor != len(self.replay) and not self.stopped:
            raise PatternMismatchError(
                f"the replayed forward ran {self.cursor} piecewise-linear operations, the recording has "
                f"{len(self.replay)}: the model's forward depends on its input beyond its activation pattern")
        self.current = None
        self.tainted.clear()
        self.stepped.clear()
        self.cut.clear()

    # -- naming ---------------------------------------------------------------------------------------------
    def unique(self, base: str) -> str:
        k = self.counts.get(base, 0)
        self.counts[base] = k + 1
        return base if k == 0 else f"{base}#{k}"

    def where(self) -> str:
        """Path of the innermost module of the model whose code is running (read from the call stack).

        Module hooks on every submodule would give the same answer at a price paid on every module call of every
        forward (measured: half the recording overhead of an MLP); the stack is read only at piecewise-linear calls
        and in error messages.
        """
        names = self.names
        f = sys._getframe(1)
        while f is not None:
            code = f.f_code
            # reading f_locals copies a frame's locals: only for methods, and not for this package's own frames
            if code.co_argcount and code.co_varnames[0] == "self" and code.co_filename not in _OWN_FILES:
                name = names.get(id(f.f_locals["self"]))
                if name is not None:
                    return name
            f = f.f_back
        return ""

    def check_batch(self, x: Tensor, path: str | None = None) -> None:
        """A unit's states are kept one row per sample: its input must hold the pass's batch in its first dimension
        (``path``: the unit's module; default the innermost module running, read from the call stack on error)."""
        batch = self.current.batch
        if batch is not None and (x.dim() == 0 or x.shape[0] != batch):
            where = self.describe(self.where() if path is None else path)
            raise UnsupportedModuleError(
                f"{where} runs a piecewise-linear unit on a tensor of shape {tuple(x.shape)}, whose first dimension is "
                f"not the batch ({batch} samples): its states would be counted as other samples' (a loop over the "
                "samples of the batch, or a reshape that moves the batch dimension). Keep the batch first through the "
                "units.")

    def describe(self, path: str) -> str:
        return f"module '{path or '<root>'}' ({self.types.get(path.split('#')[0], '?')})"

    # -- taint: which tensors depend on the model input -----------------------------------------------------
    def taint(self, t: Tensor) -> None:
        self.tainted[id(t)] = weakref.ref(t)

    def is_tainted(self, t: Any) -> bool:
        if not isinstance(t, Tensor):
            return False
        r = self.tainted.get(id(t))
        if r is not None and r() is t:
            return True
        b = t._base  # a view taken before input-dependent values were written into the tensor it views
        if b is None:
            return False
        r = self.tainted.get(id(b))
        return r is not None and r() is b

    def is_stepped(self, t: Any) -> bool:
        r = self.stepped.get(id(t))
        return r is not None and r() is t

    def stepped_arg(self, args: tuple, kwargs: dict) -> Tensor | None:
        """The first argument (also inside a list / tuple) that is a step of the input (see ``stepped``)."""
        for a in (*args, *kwargs.values()):
            for t in _tensors(a):
                if self.is_stepped(t):
                    return t
        return None

    def alias(self, t: Tensor, copy: Tensor) -> None:
        """``copy`` stands for ``t`` from now on (an observed inplace unit's input; the graph walker keeps maps)."""

    def cut_of(self, args: tuple, kwargs: dict) -> str | None:
        """Where the derivative of the first argument that lost it was cut (see ``cut``), or None."""
        for a in (*args, *kwargs.values()):
            for t in _tensors(a):
                r = self.cut.get(id(t))
                if r is not None and r[0]() is t:
                    return r[1]
        return None

    def check_output(self, output: Any, path: str = "") -> None:
        """Refuse an output (of the model, or of the ``path`` of ``logits_at``) that the function mode did not see
        depend on the input, or, in a replay, whose derivative was cut (see ``cut``)."""
        if self.derivative is not None and self.cut:
            origin = self.cut_of((output,), {})
            if origin is not None:
                raise _cut_error(origin, self.derivative, "the model's output")
        if self.tainting and self.strict and self.current is not None:
            outs = [t for t in _tensors(output) if t.is_floating_point()]
            if outs and not any(self.is_tainted(t) for t in outs):
                raise UnsupportedModuleError(
                    f"the output of {self.describe(path)} does not depend on the model's input as far as the recording "
                    "sees: the input was passed in a way it does not follow (inside a dict or as a keyword argument; "
                    "pass tensors positionally), or an operation on its path ran where the function mode does not "
                    "see it (a C++ extension function not registered with torch.library). Units after it would be "
                    "missing from every pattern. Pass strict=False if the output is meant not to depend on the input.")

    def floating_tainted(self, args: tuple, kwargs: dict) -> bool:
        """Whether an argument is input-dependent and floating (or already a step of the input)."""
        return any(self.is_tainted(t) and (t.is_floating_point() or self.is_stepped(t))
                   for a in (*args, *kwargs.values()) for t in _tensors(a))

    def any_tainted(self, args: tuple, kwargs: dict) -> int:
        n = 0
        for a in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(a, Tensor):
                n += self.is_tainted(a)
            elif isinstance(a, (list, tuple)):
                for t in _tensors(a):
                    n += self.is_tainted(t)
        return n

    def no_boundary(self, x: Tensor) -> Tensor:
        """A shared ``(B,)`` zero count for unit calls recorded without boundary counting."""
        key = (x.shape[0], x.get_device())  # get_device: an int, cheaper than building a torch.device
        z = self._zeros.get(key)
        if z is None:
            z = self._zeros[key] = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        return z


class _Mode(TorchFunctionMode):
    def __init__(self, session: _Session):
        super().__init__()
        self.s = session

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # runs for every torch call of the forward, so it is kept lean: one pass over the arguments counts the
        # input-dependent ones, which decides everything else (measured: ~3 µs per call over a bare mode)
        if kwargs is None:
            kwargs = {}
        s = self.s
        if s.current is None or s.suspended:  # outside the model's forward, after logits_at, or a nested session
            return func(*args, **kwargs)
        if s.derivative is not None and s.strict:
            cursor = s.cursor
            out = self._call(func, args, kwargs)
            self._follow(func, args, kwargs, out, unit=s.cursor != cursor)
            return out
        return self._call(func, args, kwargs)

    def _call(self, func, args, kwargs):
        s = self.s
        n = s.any_tainted(args, kwargs)
        if n:
            zero = False
            # every reader of the zero input, piecewise-linear units included, also inside a list (torch.cat) or a
            # keyword (torch.add(h, other=x)); it is still zero only while no in-place op wrote it (x.sub_(mean))
            if s.zero_tensors and any(t is z for a in (*args, *kwargs.values()) for t in _tensors(a)
                                      for z, _ in s.zero_tensors):
                s.zero_uses.append(func)
                zero = bool(args) and any(args[0] is z and z._version == v for z, v in s.zero_tensors)
            rules = _RULES.get(func)
            if rules is not None and s.is_tainted(args[0]):
                for rule in rules:
                    try:
                        parsed = rule.parse(func, args, kwargs)
                    except UnsupportedModuleError as e:  # (the rule knows the call, not where it is)
                        raise UnsupportedModuleError(f"{s.describe(s.where())}: {e}") from None
                    if parsed is not None:
                        return self._unit(rule, func, args, kwargs, *parsed)
            if s.strict:
                if func in _CHECKED:
                    self._check(func, args, kwargs, n)
                elif type(func) in _OPERATORS:
                    raise UnsupportedModuleError(
                        f"{s.describe(s.where())} calls the operator '{func}' (torch.ops) on input-dependent data: "
                        "relu-regions records the torch / torch.nn.functional spellings of its units and checks "
                        "theirs, not those of registered operators (a unit in it would be missing from every "
                        "pattern). Call the torch function (torch.ops.aten.relu -> torch.relu), or pass "
                        "strict=False if the operator is affine.")
            if zero:
                if func in _RESHAPES:  # a reshaped zero input (nn.Flatten) is still all zeros
                    out = func(*args, **kwargs)
                    s.zero_tensors.append((out, out._version))
                    s.taint(out)
                    return out
            if s.fast_input_grads and (func is F.conv2d or func is F.linear):
                if func is F.conv2d:
                    out = conv2d_with_fast_input_grad(args, kwargs, zero=zero)
                else:
                    out = linear_at_zero(args, kwargs) if zero else None
                if out is not None:
                    if zero and func is F.linear:
                        s.first_linear = (out, args[1] if len(args) > 1 else kwargs["weight"], out._version)
                    s.taint(out)
                    return out
            if s.replay is not None and func in _AFFINE_LAYERS:  # forward-mode replays (see input_grads)
                out = affine_jvp(func, args, kwargs)
                if out is not None:
                    s.taint(out)
                    return out
        out = func(*args, **kwargs)
        if n:
            if func in _FINITE_CHECKS or _reference_only(func, args, s):
                return out  # the same for every finite input / a constant cast like h: not input-dependent
            if func is _LSTSQ and s.strict and out.residuals.numel():
                raise not_piecewise_linear(
                    s.describe(s.where()), "'linalg_lstsq' with residuals (a driver other than 'gelsy' and a tall "
                    "full-rank matrix)", " The residuals are squared norms, quadratic in the input-dependent "
                    "right-hand side, and may be read later; the solution alone is linear in it: pass driver='gelsy' "
                    "(no residuals), or strict=False if the forward reads only the solution.")
            if func in _CONVERSIONS and s.strict:
                self._check_conversion(func, args, out)
            res = args[0] if func is _SETITEM else out  # buf[:, :3] = h returns None: its result is buf
            if isinstance(res, Tensor):
                if s.stepped or not res.is_floating_point():  # (the common case skips the steps' bookkeeping)
                    self._steps(func, args, kwargs, (res,))
                s.taint(res)
                if (args and res is args[0]) or kwargs.get("out") is res:  # written in place: copy_, add_, out=, []=
                    self._written(res)
            else:
                outs = list(_tensors(out))
                self._steps(func, args, kwargs, outs)
                for t in outs:
                    s.taint(t)
        return out

    def _written(self, t: Tensor) -> None:
        """Input-dependent values were written into ``t`` in place: the tensor it views holds them too (a buffer
        filled slice by slice, ``buf[:, :3] = h`` or ``buf[:, :3].copy_(h)``, is read whole afterwards)."""
        if t._base is not None:
            self.s.taint(t._base)

    def _follow(self, func, args, kwargs, out, unit: bool) -> None:
        """In a replay that carries derivatives: mark results that lost them although an input-dependent argument had
        them (a cut), and results computed from marked ones; refuse a unit whose input is marked. Inside
        ``torch.no_grad()``, through ``.detach()`` / ``.data`` or in a custom ``torch.autograd.Function`` the
        derivative the replay reads is not the forward's (autograd skips the call, or runs a hand-written backward
        that need not be its derivative): the Jacobians, affine maps and boundary distances built from it would be
        wrong. A cut whose result never reaches a unit or the output (a statistic the forward keeps) is fine."""
        s = self.s
        origin = s.cut_of(args, kwargs) if s.cut else None
        if origin is not None and unit:
            raise _cut_error(origin, s.derivative, f"the piecewise-linear unit '{s.current[-1].name}'")
        # a cut made by this call marks only the results that lost the derivative (lstsq keeps its solution's, not its
        # empty singular values'); results of a cut argument are all marked
        made_here = origin is None
        if made_here:
            if func in _CONSTANTS or _reference_only(func, args, s) or not self._cuts(func, args, kwargs, out):
                return
            origin = f"{s.describe(s.where())} calls '{_op_name(func)}'"
        for t in _tensors(out):
            kept = made_here and s.derivative == "reverse" and t.requires_grad
            if (t.is_floating_point() or t.is_complex()) and not kept:
                s.cut[id(t)] = (weakref.ref(t), origin)

    def _cuts(self, func, args, kwargs, out) -> bool:
        """Whether the call drops the derivative of an input-dependent argument that had it."""
        s = self.s
        if s.derivative == "forward":  # only these drop a tangent (no_grad keeps it; reading one costs ~10 µs)
            return func in _DETACHES and bool(s.any_tainted(args, kwargs))
        return (any((t.is_floating_point() or t.is_complex()) and not t.requires_grad for t in _tensors(out))
                and any(s.is_tainted(a) and a.is_floating_point() and a.requires_grad
                        for v in (*args, *kwargs.values()) for a in _tensors(v)))

    def _steps(self, func, args, kwargs, outs) -> None:
        """Mark integer / bool results of input-dependent floating values as steps; refuse a step fed to a floating
        result (see ``_Session.stepped``)."""
        s = self.s
        for t in outs:
            if t.is_floating_point() or t.is_complex():
                if s.stepped and s.strict:
                    self._check_steps(func, args, kwargs)
            elif s.floating_tainted(args, kwargs):
                s.stepped[id(t)] = weakref.ref(t)

    def _check_steps(self, func, args, kwargs) -> None:
        """A step of the input (a comparison, a count of positive units) used as a number: not piecewise linear,
        and invisible to the recording (``h + (h > 0)``, ``h * (h > 0).sum()``)."""
        step = self.s.stepped_arg(args, kwargs)
        if step is not None:
            s = self.s
            raise UnsupportedModuleError(
                f"{s.describe(s.where())} calls '{_op_name(func)}' on a {step.dtype} tensor computed from "
                "input-dependent values (a comparison, a count, a rounding) and uses it as a number: a step function "
                "of the input, not piecewise linear, and a gate no recording keeps. Write gates as ReLU / clamp / "
                "max-pool, or pass strict=False to take the step's values as fixed.")

    def _check_conversion(self, func, args, out) -> None:
        """A conversion of input-dependent floating values to integers / bools (truncation) or of bools to numbers (a
        comparison used as a number) is a step. Integers to floating values pass: an integer input (uint8 images)
        converted in the forward."""
        src = args[0] if args else None
        if isinstance(src, Tensor) and isinstance(out, Tensor) and (
                (src.is_floating_point() and not out.is_floating_point())
                or (src.dtype == torch.bool and out.dtype != torch.bool)):
            s = self.s
            raise UnsupportedModuleError(
                f"{s.describe(s.where())} converts input-dependent values from {src.dtype} to {out.dtype} "
                f"('{_op_name(func)}'): a step function of the input (truncation, or a comparison used as a number), "
                "not piecewise linear; pass strict=False to take the converted values as fixed")

    def _check(self, func, args, kwargs, n: int | None = None) -> None:
        """Raise if ``func`` is not piecewise linear in its ``n`` input-dependent arguments."""
        s = self.s
        if func in _RULES:  # a unit call its rule did not take (an input-dependent bound or slope, other options)
            raise UnsupportedModuleError(
                f"{s.describe(s.where())} calls '{_op_name(func)}' in a way relu-regions does not record as a unit "
                "(an input-dependent bound or slope, or options its rule does not cover): its state would be lost")
        if func in _CONVERSIONS:
            return  # checked on the result (see __torch_function__)
        if func in RANDOM:
            if not draws(func, args, kwargs):
                return
            raise UnsupportedModuleError(
                f"{s.describe(s.where())} calls '{_op_name(func)}' on input-dependent data: random (a dropout in "
                "training mode, noise), so every pass draws other values and the recorded region is not one of the "
                "model's. Put the model in eval mode (model.eval()), or pass strict=False to take the drawn values "
                "as fixed.")
        if func in _SCALARS:
            raise UnsupportedModuleError(
                f"{s.describe(s.where())} reads input-dependent values into Python ('{_op_name(func)}': an `if` or "
                "`assert` on a tensor, `.item()`, `float()`, `.tolist()`, `.numpy()`): what the forward does with them "
                "(a branch, a scale) is out of the recording's sight, so regions and distances could silently miss "
                "it. Keep such reads (logging, checks) outside the model's forward, or pass strict=False to take the "
                "values as fixed.")
        if func in _DIVISIONS and kwargs.get("rounding_mode") is not None and args and s.is_tainted(args[0]):
            raise not_piecewise_linear(s.describe(s.where()),
                                       f"'{_op_name(func)}' with rounding_mode='{kwargs['rounding_mode']}' (a step)")
        one_sided = _ONE_SIDED.get(func)
        if one_sided is not None:
            pos, key, what = one_sided
            if any(s.is_tainted(t) for t in _tensors(_arg(args, kwargs, pos, key))):
                raise not_piecewise_linear(s.describe(s.where()), f"'{_op_name(func)}' with {what}")
            return
        red = _REDUCTIONS.get(func)
        if red is not None:
            mode = _arg(args, kwargs, *red)
            if mode not in _LINEAR_REDUCE:
                raise not_piecewise_linear(s.describe(s.where()), f"'{_op_name(func)}' with reduce={mode!r}")
            # (scatter's index is checked below, with the selectors)
        sel = _SELECTORS.get(func)
        if sel is not None:
            pos, key, what = sel
            if any(s.is_tainted(t) for t in _tensors(_arg(args, kwargs, pos, key))):
                raise UnsupportedModuleError(
                    f"{s.describe(s.where())} calls '{_op_name(func)}' with a {what} that depends on the input: a "
                    "piecewise-linear gate whose state no recording keeps (regions and distances would ignore it). "
                    "Write it as a ReLU / clamp / max-pool (torch.where(h > 0, h, 0) is F.relu(h)), or pass "
                    "strict=False to take the selection as fixed.")
            return
        nonlinear = func in _NONLINEAR
        if nonlinear or func in _BILINEAR or func in _BATCH_NORMS:
            if n is None:
                n = s.any_tainted(args, kwargs)
            # an input-dependent divisor (1/z is not piecewise linear); __rtruediv__(z, c) computes c / z
            divisor = func is torch.Tensor.__rtruediv__ or (func in _DIVISIONS and len(args) > 1 and
                                                            s.is_tainted(args[1]))
            if func in _BATCH_NORMS:
                bad = n and bool(_arg(args, kwargs, 5, "training", False))
            else:
                bad = divisor or (n >= 2 if not nonlinear else n >= 1)
            if bad:
                path = s.where()
                hint = ""
                rewrite = _UNRECORDED_PL.get(_op_name(func).strip("_"))
                if nonlinear and rewrite is not None:
                    raise UnsupportedModuleError(
                        f"{s.describe(path)} calls '{_op_name(func)}' on input-dependent data: piecewise linear, but "
                        "not an operation relu-regions records as units (its states would be missing from every "
                        f"pattern, map and distance). {rewrite}")
                if nonlinear and "max_pool" in _op_name(func):
                    hint = (" Write it as F.max_pool1d / F.max_pool2d or nn.MaxPool1d / nn.MaxPool2d, whose states "
                            "are recorded.")
                elif nonlinear:
                    hint = (" If this is the output activation (softmax/sigmoid head), pass logits_at='<module path>'"
                            " naming the module that produces the logits, or explain a model without the head.")
                what = (BATCH_STATISTICS if func in _BATCH_NORMS
                        else f"a division by an input-dependent tensor ('{_op_name(func)}')" if divisor
                        else f"'{_op_name(func)}'" + ("" if nonlinear else " of two input-dependent tensors"))
                raise not_piecewise_linear(s.describe(path), what, hint)

    def _name(self, func) -> str:
        s = self.s
        path = s.where()
        mod_type = s.types.get(path.split("#")[0], "")
        base = path if mod_type in _UNIT_MODULES else (f"{path}/{_op_name(func)}" if path else _op_name(func))
        return s.unique(base)

    def _unit(self, rule: UnitRule, func, args, kwargs, x: Tensor, params: dict):
        s = self.s
        # an inplace unit overwrites its input: an observer gets the pre-activations in a copy (see the replay below)
        seen = x
        if s.observe is not None and params.get("inplace"):
            seen = x.clone()
            s.alias(x, seen)
        if s.replay is None:
            name = self._name(func)
            s.check_batch(x)
            params["count_boundary"] = s.count_boundary
            out, state, n_boundary, n_states = rule.record(func, args, kwargs, x, params)
            if n_boundary is None:
                n_boundary = s.no_boundary(x)
            params["in_shape"] = tuple(x.shape[1:])
            pattern = LayerPattern(name, rule.kind, state, n_states, n_boundary, params)
        else:  # the recorded name is known: the call stack is read only for error messages
            if s.cursor >= len(s.replay):
                raise PatternMismatchError(f"{s.describe(s.where())}: more piecewise-linear calls than recorded")
            pattern = s.replay[s.cursor]
            if pattern.kind != rule.kind or tuple(x.shape[1:]) != pattern.in_shape:
                raise PatternMismatchError(
                    f"{s.describe(s.where())}: replay reached '{self._name(func)}' ({rule.kind}, input "
                    f"{tuple(x.shape[1:])}) where the recording has '{pattern.name}' ({pattern.kind}, input "
                    f"{pattern.in_shape})")
            s.cursor += 1
            if s.derivative == "reverse" and _in_checkpoint():
                raise CheckpointedReverseError(
                    f"{s.describe(s.where())} runs inside torch.utils.checkpoint: autograd recomputes that part of "
                    "the forward in the backward pass, outside relu-regions' replay, with the units' live patterns at "
                    "the replayed input, so the derivatives of this replay (reverse mode: affine_map(method="
                    "'reverse'), boundary_distance(route='reverse'), attributions, the parsimony penalty) would be "
                    "another region's. Use affine_map(..., method='forward' or 'compose') / boundary_distance(..., "
                    "route='forward'), or call the model without checkpointing.")
            if seen is x:
                out = rule.frozen(x, pattern, func, args, kwargs)
            else:  # the unit reads the observer's copy (derivatives taken at it reach the output), then writes its
                # result into its input as the inplace call does
                out = rule.frozen(seen, replace(pattern, params={**pattern.params, "inplace": False}), func, args,
                                  kwargs)
                out = write_back(x, out, {"inplace": True})
        if s.observe is not None:
            try:
                s.observe(pattern, seen)
            except StopReplay:
                s.stopped = True  # the replay ends here on purpose: not a mismatch with the recording
                raise
        s.current.append(pattern)
        for t in _tensors(out):
            s.taint(t)
        return out


_AFFINE_LAYERS = {F.linear, F.conv1d, F.conv2d}

_UNIT_MODULES = {"ReLU", "LeakyReLU", "PReLU", "ReLU6", "Hardtanh", "MaxPool1d", "MaxPool2d",
                 "AdaptiveMaxPool1d", "AdaptiveMaxPool2d"}


def _check_not_script(model: nn.Module) -> None:
    """TorchScript modules run their operations in the TorchScript interpreter: neither the function mode nor the
    hooks see them, so their units would be missing from every pattern (a silently wrong region)."""
    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            raise UnsupportedModuleError(
                f"module '{name or '<root>'}' is TorchScript ({type(m).__name__}, from torch.jit.script / trace): its "
                "operations run inside the TorchScript interpreter, where recording cannot see them; pass the Python "
                "module it was made from (same weights)")


_ACTIVE: list[_Session] = []  # open sessions of every thread, innermost last (see _session)
_ident = threading.get_ident


def library_call(fn: Callable) -> Callable:
    """Run the entry point ``fn`` with this thread's open recordings paused throughout (:func:`sessions_paused`):
    called from a forward hook inside a recorded pass, its own arithmetic before and after its passes (checks,
    reductions) is not the user's model's either (it failed the pass, or with ``strict=False`` added the library's
    clamps to the recorded pattern as units)."""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not _ACTIVE:  # (the common case: nothing to pause)
            return fn(*args, **kwargs)
        with sessions_paused():
            return fn(*args, **kwargs)
    return call


@contextmanager
def sessions_paused() -> Iterator[None]:
    """Pause every session this thread has open (the user's ``record`` blocks) while the library's own code runs,
    e.g. an entry point called from a forward hook inside a recorded pass: its arithmetic and its passes are not
    the user's model's."""
    me = _ident()
    paused = [o for o in _ACTIVE if o.thread == me]
    for o in paused:
        o.suspended += 1
    try:
        yield
    finally:
        for o in paused:
            o.suspended -= 1


@contextmanager
def _session(model: nn.Module, strict: bool = True, replay: Sequence[LayerPattern] | None = None,
             observe: Callable[[LayerPattern, Tensor], None] | None = None,
             logits_at: str | None = None, stop_at_logits: bool = True,
             mode_cls: type[TorchFunctionMode] | None = None,
             session_cls: type[_Session] | None = None,
             hooks: tuple[HookPlan, dict] | None = None) -> Iterator[_Session]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if hooks is None:  # (the hook route's plan came from _hook_route, which checked)
        _check_not_script(model)
    s = (session_cls or _Session)(model, strict, replay, observe)
    mods = dict(model.named_modules()) if logits_at is not None else {}
    if logits_at is not None and logits_at not in mods:
        raise ValueError(f"logits_at='{logits_at}' is not a submodule of the model; "
                         f"known paths: {', '.join(n for n in mods if n)[:400]}")
    handles: list = []

    def stop(module, inputs, output):  # (registered as a SessionHook, which marks it as ours)
        if s.suspended or _ident() != s.thread:
            return
        s.check_output(output, logits_at)
        if stop_at_logits:
            if s.depth == s.open_depth + 1 and s.current is not None:  # a complete pass: kept (the raise below is
                s.end_pass(check=False)  # ours, not the forward's failing)
            raise _StopForward(output)
        if s.depth == s.open_depth + 1 and s.current is not None:  # recording in the user's own forward: stop
            s.end_pass()

    def root_pre(module, inputs):  # (registered as a SessionHook, which marks it as ours)
        if not s.suspended and _ident() == s.thread:
            s.enter_root(inputs)

    def root_post(module, inputs, output):  # (registered as a SessionHook, which marks it as ours)
        if not s.suspended and _ident() == s.thread:
            # (always_call: also when the forward raised, with output None; its error is the one to report, and
            # torch would only warn about one raised here)
            raised = output is None
            if s.depth == s.open_depth + 1 and not raised:  # the call that closes the pass returns the output
                try:
                    s.check_output(output)
                except BaseException:
                    s.leave_root(raised=True)
                    raise
            s.leave_root(raised)

    def root_body(module, inner, args, kwargs):  # root_pre / root_post of the hook route
        if s.suspended or _ident() != s.thread:
            return inner(*args, **kwargs)
        s.enter_root(args, taint=False)
        try:
            out = inner(*args, **kwargs)
        except BaseException:
            s.leave_root(raised=True)
            raise
        s.leave_root()
        return out

    # only the innermost of nested sessions on one model records (the others pause; the library's own calls pause
    # every session of the thread: state.preserved); sessions of other threads, or of models that share no module
    # with this one (a teacher and a student), go on
    mine = {id(m) for m in model.modules()}
    outer = [o for o in _ACTIVE if o.thread == s.thread and (id(o.model) in mine or any(
        m is model for m in o.model.modules()))]
    for o in outer:
        o.suspended += 1
    _ACTIVE.append(s)
    try:
        if hooks is not None:  # unit patches first: they run inside the module, before its logits_at hook
            handles = attach(*hooks, s)
        if logits_at is not None:
            handles.append(StrongHandle(mods[logits_at].register_forward_hook(SessionHook(stop))))
        if hooks is not None:  # the patch skips nn.Module's slow call path (see hook_recording.ForwardPatch)
            handles.append(ForwardPatch.on(model, root_body))
        else:  # hooks: they run around the user's own root hooks, whose code the mode must see inside the pass
            # (prepend: before the user's pre-hooks, which would otherwise read the input before it is tracked)
            handles.append(StrongHandle(model.register_forward_pre_hook(SessionHook(root_pre), prepend=True)))
            handles.append(StrongHandle(model.register_forward_hook(SessionHook(root_post), always_call=True)))
        if hooks is not None:
            yield s
        else:
            with (mode_cls or _Mode)(s):
                yield s
    finally:
        for h in reversed(handles):
            h.remove()
        _ACTIVE.remove(s)
        for o in outer:
            o.suspended -= 1


class Recording:
    """Activation patterns recorded by :func:`record`, one entry per forward pass.

    Patterns of several passes (batches) are concatenated along the batch by every accessor; ``clear()`` drops
    them (streaming consumers call it after each batch).
    """

    def __init__(self, session: _Session, route: str = "mode"):
        self._s = session
        self.route = route  #: "hooks" or "mode": how the calls were seen (see :func:`record`)

    @property
    def active(self) -> bool:
        """Whether the model's calls are recorded now: not while a session opened inside the block runs
        (``affine_map`` inside ``with record(...)``)."""
        return not self._s.suspended

    @property
    def passes(self) -> list[list[LayerPattern]]:
        """Recorded passes, each a list of :class:`LayerPattern` in execution order."""
        return self._s.passes

    def clear(self) -> None:
        """Forget all recorded passes."""
        self._s.passes.clear()

    @property
    def layer_names(self) -> list[str]:
        """Names of the piecewise-linear calls of the last pass, in execution order."""
        return [p.name for p in self.passes[-1]] if self.passes else []

    def patterns(self, layers: LayerSelection = None) -> list[LayerPattern]:
        """Selected layers' patterns, concatenated over all recorded passes.

        Parameters
        ----------
        layers : None, str, sequence of str, slice or int
            ``None`` for all layers, a name or list of names, a slice over the ordered layers (``slice(-2,
            None)`` = the last two), or an int index.
        """
        if not self.passes:
            raise RuntimeError("nothing recorded: run the model inside `with relu_regions.record(model) as rec:`")
        names = select_layers(self.layer_names, layers)
        # each pass's calls by name (the first of a name, as before), and one concatenation per layer: merging pass
        # by pass copied everything merged so far again (32,000 LeNet samples in passes of 32: 10.8 s against 0.3 s)
        by_name = [{} for _ in self.passes]
        for d, p in zip(by_name, self.passes):
            for q in p:
                d.setdefault(q.name, q)
        out = []
        for name in names:
            for i, d in enumerate(by_name):
                if name not in d:
                    raise RuntimeError(f"layer '{name}' is missing from recorded pass {i}: the passes differ")
            out.append(LayerPattern.concat([d[name] for d in by_name]))
        return out

    def packed(self, layers: LayerSelection = None) -> Tensor:
        """Exact bit-packed patterns, ``(B, n_words)`` int64 (64 bits per word), on the patterns' device."""
        pats = self.patterns(layers)
        if not pats:  # no piecewise-linear unit ran: every input is in the one region of an affine model
            return torch.zeros(len(self), 1, dtype=torch.int64, device=self._device())
        with torch._C.DisableTorchFunction():  # our own arithmetic: not through the (open) recording mode
            return pack_patterns(pats)

    def region_ids(self, layers: LayerSelection = None) -> Tensor:
        """``(B,)`` int64 region keys: equal patterns give equal keys (see :mod:`relu_regions.keys`)."""
        return keys_of(self.patterns(layers), len(self), self._device())

    def n_boundary(self, layers: LayerSelection = None) -> Tensor:
        """``(B,)`` number of units exactly on a breakpoint (pre-activation 0, max-pool ties).

        Needs ``record(model, count_boundary=True)``; raises otherwise (zeros would claim no input is on a
        boundary)."""
        if not self._s.count_boundary:
            raise RuntimeError("boundary units were not counted: record with "
                               "relu_regions.record(model, count_boundary=True) to get n_boundary / on_boundary")
        return boundary_counts(self.patterns(layers), len(self))

    def on_boundary(self, layers: LayerSelection = None) -> Tensor:
        """``(B,)`` bool: the input lies on the boundary of its region (its map is one of several)."""
        return self.n_boundary(layers) > 0

    def _device(self) -> torch.device | None:
        return next((p.device for p in self.passes if p.device is not None), None)

    def __len__(self) -> int:
        return sum(p[0].state.shape[0] if p else (p.batch or 0) for p in self.passes)

    def __repr__(self) -> str:
        return f"Recording(passes={len(self.passes)}, samples={len(self)}, layers={self.layer_names})"


def select_layers(names: list[str], layers: LayerSelection) -> list[str]:
    """Resolve a layer selection against the ordered layer names."""
    if layers is None:
        return list(names)
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(layers, slice):
        return names[layers]
    if isinstance(layers, int):
        if not -len(names) <= layers < len(names):
            raise IndexError(f"layer index {layers} is out of range; recorded layers are {names}")
        return [names[layers]]
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise KeyError(f"unknown layer(s) {unknown}; recorded layers are {names}")
    return list(layers)


def keys_of(patterns: Sequence[LayerPattern], n: int, device: torch.device | None) -> Tensor:
    """``(n,)`` int64 region keys of ``n`` samples' selected patterns (:func:`~relu_regions.keys.pattern_keys`);
    all zero -- the one region of an affine model -- when no pattern is selected."""
    if not patterns:
        return torch.zeros(n, dtype=torch.int64, device=device)
    with torch._C.DisableTorchFunction():  # our own arithmetic, not through an open recording mode
        return pattern_keys(patterns)


@contextmanager
def record(model: nn.Module, *, strict: bool = True, logits_at: str | None = None,
           count_boundary: bool = False, route: str = "auto") -> Iterator[Recording]:
    """Record the activation pattern of every piecewise-linear unit while ``model`` runs.

    Hooks and the function mode are attached on entry and removed on exit, also when the block raises. The
    model's outputs are bit-identical to a run without recording.

    Parameters
    ----------
    model : nn.Module
        Any model; recorded ops: ReLU (also in-place and functional), LeakyReLU, PReLU, ReLU6 / Hardtanh /
        scalar clamps (three-state units), MaxPool1d/2d and adaptive max pools (argmax per window).
    strict : bool
        Raise :class:`~relu_regions.UnsupportedModuleError` when an input-dependent tensor meets an operation that
        is not piecewise linear (sigmoid, GELU, softmax, LayerNorm, attention, products of two input-dependent
        tensors, BatchNorm with batch statistics), or a selection by a condition, mask or index that depends on the
        input (``torch.where(h > 0, h, 0)``, ``masked_fill``, ``h[h > 0]``, ``gather``: gates whose state is not
        recorded; with ``strict=False`` they are taken as fixed).
    logits_at : str, optional
        Module path whose output is the explained output (e.g. the layer before a softmax head); recording
        stops there (the user's forward still runs to the end).
    count_boundary : bool
        Also count units exactly on a breakpoint (pre-activation 0, max-pool ties) per sample, for
        ``rec.n_boundary()`` / ``rec.on_boundary()``. Off by default: it costs one more pass over every ReLU
        input and a runner-up search per max-pool window (on a LeNet about a third more than the recording itself);
        :func:`relu_regions.affine_map` counts on demand (``AffineMap.n_boundary``).
    route : {"auto", "hooks", "mode"}
        How calls are seen. ``"mode"``: a torch function mode sees every torch call of the forward (any model,
        functional units, the checks of ``strict``). ``"hooks"``: the ``nn.ReLU`` / ``nn.MaxPool1d/2d`` modules
        only (an instance-level ``forward`` set on each for the block,
        :class:`~relu_regions.hook_recording.ForwardPatch`; cheaper than forward hooks), allowed when a one-time
        torch.fx trace shows that nothing else on the input's path needs the mode
        (:mod:`relu_regions.hook_recording`); same patterns at a fraction of the cost, raises ``ValueError`` with
        the reason otherwise. ``"auto"`` (default): hooks where allowed,
        ``count_boundary`` is off and no forward hook of your own is attached to the model (only the mode sees what
        such a hook computes), else the mode. ``rec.route`` says which one ran. A forward that branches on
        Python attributes changed between recordings needs ``"mode"`` (an fx trace follows one branch).

    Notes
    -----
    Nesting and threads. Only the thread that opened the block is recorded: the same model run by other threads
    meanwhile passes through both routes unrecorded. Of nested blocks on one model (or on a model and one of its
    submodules) only the innermost records; blocks on unrelated models (a teacher and a student) record
    independently. Entry points such as :func:`~relu_regions.affine_map` called inside the block (also from a hook
    inside a recorded forward) are not recorded, and entry points of several threads run one after the other
    (they switch the model to eval mode and attach hooks for their duration: a plain forward of the same model in
    another thread meanwhile sees that mode, and a block opened on it by another thread meanwhile is not
    supported).

    Examples
    --------
    >>> with relu_regions.record(model) as rec:
    ...     logits = model(x)
    >>> keys = rec.region_ids()
    """
    hooks = _hook_route(model, logits_at, count_boundary, route)
    # not `preserved`: the user's code runs inside the block, and what it changes there (a hook it registers,
    # requires_grad, train/eval) must stay; the session removes exactly the hooks it added, through their handles
    with _session(model, strict=strict, logits_at=logits_at, stop_at_logits=False, hooks=hooks) as s:
        s.count_boundary = count_boundary
        yield Recording(s, "hooks" if hooks is not None else "mode")


def _hook_route(model: nn.Module, logits_at: str | None, count_boundary: bool,
                route: str) -> tuple[HookPlan, dict] | None:
    """The hook plan when ``route`` allows and the model qualifies (see :func:`record`), else None."""
    if route not in ("auto", "hooks", "mode"):
        raise ValueError(f"route must be 'auto', 'hooks' or 'mode', got {route!r}")
    if route == "mode" or (route == "auto" and count_boundary) or not isinstance(model, nn.Module):
        return None
    _check_not_script(model)  # (before the fx trace, which cannot read a TorchScript module's forward)
    with sessions_paused():  # the fx trace runs the forwards of submodules, which an open recording may patch
        plan, modules = PLANS.get(model, logits_at)
    if not isinstance(plan, HookPlan):
        why = plan
    elif count_boundary:
        why = "count_boundary=True needs the function mode"
    else:
        why = foreign_hook(modules)
        if why is None:
            return plan, modules
    if route == "hooks":
        raise ValueError(f"route='hooks' cannot record this model: {why}; use route='auto' or 'mode'")
    return None


def run_recorded(model: nn.Module, x: Tensor, *, strict: bool = True, logits_at: str | None = None,
                 observe: Callable[[LayerPattern, Tensor], None] | None = None,
                 count_boundary: bool = True) -> tuple[Tensor, list[LayerPattern]]:
    """Run ``model(x)`` once under recording; return the explained output and the pass's patterns (recorded by
    the hook route where :func:`record` would take it and nothing is observed)."""
    hooks = None if observe is not None else _hook_route(model, logits_at, count_boundary, "auto")
    with _session(model, strict=strict, logits_at=logits_at, observe=observe, hooks=hooks) as s:
        s.count_boundary = count_boundary
        out = _call(model, x.clone())  # an inplace first layer writes into its input: not into the caller's
        if s.current is not None:  # stopped at logits_at: the root hook did not close the pass yet
            s.end_pass()
    return out, s.passes[-1] if s.passes else []


def run_frozen(model: nn.Module, z: Tensor, patterns: Sequence[LayerPattern], *, strict: bool = True,
               logits_at: str | None = None,
               observe: Callable[[LayerPattern, Tensor], None] | None = None,
               fast_input_grads: bool = False, zero_input: bool = False,
               session_out: list | None = None) -> Tensor:
    """Run ``model`` on ``z`` with every piecewise-linear unit frozen in its recorded state.

    ``z`` may hold ``r`` replicas of the recorded batch (``r * B`` rows, replica-major). With
    ``fast_input_grads``, stride-1 2-d convolutions get the flipped-kernel input gradient of
    :mod:`relu_regions.input_grads` and no parameter gradients; with ``zero_input`` as well (the caller promises
    ``z`` is all zeros), layers reading ``z`` directly return their bias without a matrix product.
    """
    z = z.clone()  # an inplace first layer writes into its input: not into the caller's (autograd and tangents follow)
    with _session(model, strict=strict, replay=patterns, logits_at=logits_at, observe=observe) as s:
        s.fast_input_grads = fast_input_grads
        s.zero_tensors = [(z, z._version)] if fast_input_grads and zero_input else []
        if session_out is not None:  # the reverse route reads the session's record of the first layer
            session_out.append(s)
        try:
            out = _call(model, z)
        except StopReplay:
            return None
        if s.current is not None:
            s.end_pass()
    return out


def eagerly() -> Any:
    """Run ``torch.compile``'d modules as plain Python (the library's own passes): compiled code drops the tangents
    of forward-mode dual tensors without an error (distances came out ``inf``), and the recording's Python would
    be traced. The previous stance comes back on exit."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is None or torch.compiler.is_compiling():
        return nullcontext()
    return set_stance("force_eager")


def _call(model: nn.Module, x: Tensor) -> Tensor:
    try:
        with eagerly():
            out = model(x)
    except _StopForward as stop:
        out = stop.output
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"the model returned {type(out).__name__}; expected a tensor (or pass logits_at=...)")
    return out
