"""Recording by module hooks alone, for models whose every input-dependent operation is a known module.

The function mode of :mod:`relu_regions.recording` sees every torch call of a forward, and pays for it on every
call: on the 2-core build machine a bare ``TorchFunctionMode`` that only forwards each call adds ~10% to a
784-256-128-10 MLP's forward at batch 256, before any recording work. Most models need none of that: every unit
is an ``nn.ReLU`` or ``nn.MaxPool1d/2d`` module and everything between them is a Linear / Conv / BatchNorm (eval) /
pooling / reshape module or a linear tensor op. For those, the unit modules' own calls record the same patterns
(same names, kinds, states and parameters; a test compares them with the function mode's) for the cost of the units
alone. The route is still called "hooks", but it sets a :class:`ForwardPatch` (an instance-level ``forward`` that
calls the module's own) rather than a forward hook: a module with hooks takes ``nn.Module``'s slow call path, ~3-4%
of a 784-256-128-10 MLP's forward at batch 256 for the root and two ReLUs. With the patches and lean bodies the
MLP's recording went from ~1.13x to ~1.06-1.09x a plain forward (``benchmarks/results/engine.md``).

Which models qualify is decided once per model by a ``torch.fx`` trace (:func:`hook_plan`): every node that
depends on the input must be on an allow-list, and no unit module may run on data that does not depend on the
input. Anything else -- functional ``F.relu`` / ``torch.clamp``, LeakyReLU / PReLU / Hardtanh (recorded by the
function mode only), a model fx cannot trace, a forward with more than one argument -- keeps the function mode,
which also gives the clear errors for operations that are not piecewise linear. The plan is cached per model
(weakly) and re-derived whenever a module, a module's class or ``forward``, or a training flag changes.

Hooks the user registered (or another library, or a global module hook) run code on the input's path that the
trace does not show and only the function mode sees and checks: while any is attached, ``route="auto"`` takes the
mode (:func:`foreign_hook`). Hooks registered inside an open hook-route recording run around the patched forward:
a forward hook gets the pooled tensor, not the ``(values, indices)`` pair the recording asks a max-pool for, and
what it does to a unit's output does not change the unit's recorded state (as on the mode's route).

Limits, as for every fx-based tool: the trace follows the branches a forward takes on Python values at trace time.
A forward that switches on a plain attribute (``if self.use_gelu:``) after the first recording would be recorded
by the stale plan; pass ``route="mode"`` to :func:`relu_regions.record` for such models. The trace runs the
forward's Python code once with symbolic tensors (no tensor is computed, no parameter or buffer changes); a
forward with other side effects (a call counter, a print) sees that one extra call.
"""

from __future__ import annotations

import copy
import functools
import inspect
import operator
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import BATCH_STATISTICS, UnsupportedModuleError, not_piecewise_linear
from .units import LayerPattern, MaxPoolRule

Tensor = torch.Tensor

_UNITS = {nn.ReLU: "relu", nn.MaxPool1d: "maxpool", nn.MaxPool2d: "maxpool"}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_LINEAR_MODULES = {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d,
                   nn.Dropout2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                   nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, *_BATCH_NORMS, *_UNITS}
# linear in each tensor argument, and affine in all of them together as long as at most one depends on the input
_SCALING = {operator.mul, operator.truediv, operator.matmul, torch.mul, torch.div, torch.matmul, F.linear,
            F.conv1d, F.conv2d, "mul", "div", "matmul", "__mul__", "__rmul__", "__truediv__", "__matmul__"}
_LINEAR_OPS = {operator.add, operator.sub, operator.neg, operator.pos, operator.getitem, torch.add, torch.sub,
               torch.cat, torch.stack, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose,
               torch.permute, torch.narrow, "add", "sub", "__add__", "__radd__", "__sub__", "__rsub__", "__neg__",
               "view", "reshape", "flatten", "unflatten", "size", "dim", "contiguous", "permute", "transpose",
               "unsqueeze", "squeeze", "narrow", "clone", "__getitem__", F.pad, F.dropout, F.avg_pool1d,
               F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, torch.mean, "mean", *_SCALING}
_DIVISIONS = {operator.truediv, torch.div, "div", "__truediv__"}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d)


# random calls: (position, keyword, default) of the `training` switch for dropouts (random only when on and p > 0),
# None for calls that always draw. Both routes read it: the plan for functional dropouts, the mode for all.
def _build_random() -> dict[Any, tuple[int, str, bool] | None]:
    T = torch.Tensor
    table: dict[Any, tuple[int, str, bool] | None] = {
        F.dropout: (2, "training", True), F.dropout1d: (2, "training", True), F.dropout2d: (2, "training", True),
        F.dropout3d: (2, "training", True), F.alpha_dropout: (2, "training", False),
        F.feature_alpha_dropout: (2, "training", False)}
    for n in ("rand_like", "randn_like", "randint_like", "bernoulli", "poisson", "multinomial", "normal",
              "binomial", "native_dropout"):
        f = getattr(torch, n, None)
        if callable(f):
            table[f] = None
    for n in ("bernoulli", "bernoulli_", "multinomial", "uniform_", "normal_", "exponential_", "geometric_",
              "log_normal_", "cauchy_", "random_"):
        f = getattr(T, n, None)
        if callable(f):
            table[f] = None
    return table


RANDOM = _build_random()


def draws(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a call of ``func`` (a key of ``RANDOM``) with these arguments draws random values: a dropout only
    when its ``training`` switch is on and ``p > 0`` (arguments may be fx nodes: those count as on)."""
    switch = RANDOM[func]
    if switch is None:
        return True
    pos, key, default = switch
    training = args[pos] if len(args) > pos else kwargs.get(key, default)
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    return bool(training) and bool(p)


_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}  # getattr on an input-dependent tensor that reads no values


@dataclass(frozen=True)
class HookPlan:
    """What a hook-only recording attaches to: unit modules (path, kind) and BatchNorm modules to check."""

    units: tuple[tuple[str, str], ...]
    batch_norms: tuple[str, ...]


_DROPOUTS = (nn.modules.dropout._DropoutNd,)


class PlanCache:
    """Per-model cache of ``build(model, logits_at)`` (a plan read from a ``torch.fx`` trace), keyed weakly on the
    model, checked against a structural signature (module objects, types, train flags, patched forwards)."""

    def __init__(self, build: Callable[[nn.Module, str | None], Any]) -> None:
        self._build = build
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, model: nn.Module, logits_at: str | None) -> tuple[Any, dict[str, nn.Module]]:
        modules = dict(model.named_modules())
        # checked on every recording that opens (per batch under RegionMonitor): a list comprehension, and
        # instance_forward only where the instance holds a forward
        # (a dropout's p too: whether a training-mode dropout draws anything decides the plan, and warm-up
        # schedules change p on the same module)
        sig = (logits_at, tuple([(n, id(m), type(m), m.training,
                                  id(instance_forward(m) if "forward" in m.__dict__ else None),
                                  m.p if isinstance(m, _DROPOUTS) else None)
                                 for n, m in modules.items()]))
        plans = self._cache.setdefault(model, {})  # a few signatures per model: train/eval flags alternate
        plan = plans.get(sig)
        if plan is None:
            if len(plans) >= 8:
                plans.clear()
            plan = plans[sig] = self._build(model, logits_at)
        return plan, modules


def hook_plan(model: nn.Module, logits_at: str | None = None) -> HookPlan | str:
    """Trace ``model`` with torch.fx and decide whether module hooks alone can record it.

    Returns
    -------
    HookPlan or str
        The plan, or the reason (one sentence naming the node) why the function mode is needed.
    """
    replaced = next((n for n, m in model.named_modules() if instance_forward(m) is not None), None)
    if replaced is not None:  # fx traces the class's forward, the module runs the instance's
        return f"module '{replaced or '<root>'}' has a forward set on the instance"
    sig = inspect.signature(type(model).forward.__get__(model))  # the class's: the instance may hold a patch
    params = [p for p in sig.parameters.values()]
    if len(params) != 1 or params[0].default is not inspect.Parameter.empty or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return "the forward takes other arguments than one input tensor"
    try:
        graph = fx_graph(model)
    except Exception as e:  # any failure of symbolic tracing (data-dependent Python, unsupported calls)
        first = str(e).splitlines()[0][:120] if str(e) else ""
        return f"torch.fx cannot trace the forward ({type(e).__name__}: {first})"
    modules = dict(model.named_modules())
    tainted: set = set()
    units: list[tuple[str, str]] = []
    norms: list[str] = []
    nodes = until_logits(list(graph.nodes), logits_at)
    if nodes is None:
        return f"the trace does not show where logits_at='{logits_at}' runs"
    for node in nodes:
        what = f"'{getattr(node.target, '__name__', node.target)}'"
        dep = node.op == "placeholder" or any(a in tainted for a in node.all_input_nodes)
        if dep:
            tainted.add(node)
        if node.op == "call_module":
            m = modules[node.target]
            kind = _UNITS.get(type(m))
            if not dep:
                if kind is not None or isinstance(m, _BATCH_NORMS):
                    return f"module '{node.target}' runs on data that does not depend on the input"
                continue
            if type(m) not in _LINEAR_MODULES:
                return f"module '{node.target}' ({type(m).__name__}) is not on the hook route's list"
            if isinstance(m, _DROPOUTS) and m.training and m.p:
                return f"module '{node.target}' ({type(m).__name__}) is in training mode (random)"
            if sum(a in tainted for a in node.all_input_nodes) != 1 or len(node.args) != 1 or node.kwargs:
                return f"module '{node.target}' is called with more than its input"
            if kind is not None:
                if node.target not in [u[0] for u in units]:
                    units.append((node.target, kind))
            elif isinstance(m, _BATCH_NORMS) and node.target not in norms:
                norms.append(node.target)
        elif node.op in ("call_function", "call_method") and dep:
            if node.target is getattr and len(node.args) == 2 and node.args[1] in _ATTRIBUTES:
                continue
            if node.target not in _LINEAR_OPS:
                return f"{what} on input-dependent data needs the function mode"
            if node.target in RANDOM and draws(node.target, node.args, node.kwargs):
                return f"{what} in training mode (random)"
            if node.target in _SCALING and sum(a in tainted for a in node.all_input_nodes) > 1:
                return f"{what} of two input-dependent tensors"
            if node.target in _DIVISIONS and len(node.args) > 1 and any(a in tainted for a in _nodes(node.args[1:])):
                return f"{what} by an input-dependent divisor"
            if node.target in (operator.getitem, "__getitem__") and any(
                    a in tainted for a in _nodes(node.args[1:])):
                return "an index that depends on the input"
    if not units:
        return "no ReLU or max-pool modules"
    return HookPlan(tuple(units), tuple(norms))


PLANS = PlanCache(hook_plan)


def ours(hook: Callable) -> Callable:
    """Mark ``hook`` as one of this library's own hooks (read-only for the input's path; see :func:`foreign_hook`)."""
    hook._relu_regions_hook = True  # type: ignore[attr-defined]
    return hook


def is_ours(hook: object) -> bool:
    """Whether ``hook`` is one of this library's own hooks (:func:`ours`, :class:`SessionHook`)."""
    return bool(getattr(hook, "_relu_regions_hook", False))


@ours
def inert_hook(*args: Any) -> None:
    """What a copy of the model made inside a recording (``copy.deepcopy``, pickling) gets for the recording's own
    module hooks: nothing (the copy is not recorded, and pickles)."""
    return None


class SessionHook:
    """A module hook of one recording (``fn`` closes over its session); copied or pickled with the model it becomes
    :func:`inert_hook` (before: the copy kept the live closure, which recorded into a closed session and would not
    pickle)."""

    __slots__ = ("fn",)
    _relu_regions_hook = True

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __deepcopy__(self, memo: dict) -> Callable:
        return inert_hook

    def __reduce__(self) -> tuple:
        return (_inert, ())


def _inert() -> Callable:
    return inert_hook


def foreign_hook(modules: dict[str, nn.Module]) -> str | None:
    """Why the hook route must not record now: a forward (pre-)hook that is not one of this library's own runs code
    on the input's path that only the function mode sees; None when there is none."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "a global module forward hook is registered (its code runs inside every module call)"
    for path, m in modules.items():
        if not (m._forward_pre_hooks or m._forward_hooks):  # the common case, without building generators
            continue
        for kind, hooks in (("forward pre-hook", m._forward_pre_hooks), ("forward hook", m._forward_hooks)):
            if any(not is_ours(h) for h in hooks.values()):
                return f"module '{path or '<root>'}' has a {kind} of its own (only the function mode sees its code)"
    return None


def fx_graph(model: nn.Module) -> torch.fx.Graph:
    """The ``torch.fx`` graph of ``model``'s forward (raises whatever symbolic tracing raises)."""
    with warnings.catch_warnings():  # the checks are ours: fx's advice on the user's code is not wanted here
        warnings.simplefilter("ignore")
        return torch.fx.Tracer().trace(model)


def until_logits(nodes: list, logits_at: str | None) -> list | None:
    """The graph's nodes up to the last one run inside the module ``logits_at`` (all when None; None when the trace
    does not show that module). The explained output is ready there; the function mode does not look past it."""
    if logits_at is None:
        return nodes
    inside = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == logits_at
              or any(v[0] == logits_at for v in (n.meta.get("nn_module_stack") or {}).values())]
    return nodes[: inside[-1] + 1] if inside else None


def _nodes(args) -> list:
    """The fx nodes inside (nested) call arguments."""
    out: list = []
    torch.fx.node.map_arg(args, out.append)
    return out


class StrongHandle:
    """A hook handle that removes its hook also when it is collected in a reference cycle (a generator that holds an
    open recording, abandoned): torch's ``RemovableHandle`` reaches the hook dicts through weak references, which
    the garbage collector clears before the generator's ``finally`` runs, so its ``remove()`` did nothing and the
    recording's hooks stayed on the model."""

    __slots__ = ("id", "dicts")

    def __init__(self, handle: Any) -> None:
        refs = (handle.hooks_dict_ref, *getattr(handle, "extra_dict_ref", ()))
        self.id = handle.id
        self.dicts = [d for d in (r() for r in refs) if d is not None]

    def remove(self) -> None:
        for d in self.dicts:
            d.pop(self.id, None)


class ForwardPatch:
    """A module's ``forward``, set on the instance for one recording; ``remove()`` takes it off, like a hook handle.

    Why not forward hooks: a module with hooks takes ``nn.Module``'s slow call path (hook dicts, ``always_call``
    bookkeeping), about half the recording's own cost on a small MLP. The patch runs ``body(module,
    inner, args, kwargs)``, where ``inner`` is what ``module.forward`` was before (the class's forward, or an
    instance forward someone else set). Patches of nested recordings stack; one removed out of order becomes a
    pass-through and is unlinked when the patch above it is removed. A copy of the module (``copy.deepcopy``) made
    while the patch is on gets an inert patch that calls the copy's own forward (the copy is not recorded).
    """

    __slots__ = ("module", "prev", "inner", "body", "live")

    def __init__(self, module: nn.Module, body: Callable) -> None:
        self.module = module
        self.prev = module.__dict__.get("forward")  # None: the class's forward
        if _copied_forward(module, self.prev):  # left by a copy made during a recording: unlinked on remove()
            self.prev = None
        self.inner = type(module).forward.__get__(module) if self.prev is None else self.prev
        self.body = body
        self.live = True

    @classmethod
    def on(cls, module: nn.Module, body: Callable) -> ForwardPatch:
        """Set a patch running ``body`` on ``module``; returns its handle."""
        patch = cls(module, body)
        module.__dict__["forward"] = patch
        return patch

    @property
    def __wrapped__(self) -> Callable:
        # what inspect.signature(module.forward) and friends see through to (code that reads the forward's
        # arguments while a recording is open)
        return self.inner

    def __call__(self, *args, **kwargs):
        if not self.live:
            return self.inner(*args, **kwargs)
        return self.body(self.module, self.inner, args, kwargs)

    def __deepcopy__(self, memo: dict) -> Callable:
        # a copy of the model made while the patch is on (copy.deepcopy inside a recording) gets what the forward
        # was before the patch: the copy's own class forward (a partial: picklable, unlike this patch's closure),
        # or a copy of the instance forward below the patch
        twin = copy.deepcopy(self.module, memo)  # the module's copy: in the memo while its dict is copied
        if self.prev is None:
            return functools.partial(type(twin).forward, twin)
        return copy.deepcopy(self.prev, memo)

    def __reduce__(self) -> tuple:
        # pickled with its module (torch.save of the model inside a recording): as for a copy
        if self.prev is None:
            return (functools.partial, (type(self.module).forward, self.module))
        return (_identity, (self.prev,))

    def remove(self) -> None:
        self.live = False
        d = self.module.__dict__
        if d.get("forward") is not self:  # someone set a forward on top: stay as a pass-through until unlinked
            return
        prev = self.prev
        while isinstance(prev, ForwardPatch) and not prev.live:  # patches removed out of order below this one
            prev = prev.prev
        if prev is None:
            del d["forward"]
        else:
            d["forward"] = prev


def _identity(x: Any) -> Any:
    return x


def instance_forward(module: nn.Module) -> Any:
    """The forward set on ``module``'s instance by anyone but this library's patches (None if none, or if it is the
    class's own forward bound to the module: Lightning's DDP strategies leave that behind after each step)."""
    f = module.__dict__.get("forward")
    while isinstance(f, ForwardPatch):
        f = f.prev
    if getattr(f, "__func__", None) is type(module).forward and getattr(f, "__self__", None) is module:
        return None
    return None if _copied_forward(module, f) else f


def _copied_forward(module: nn.Module, f: Any) -> bool:
    """Whether ``f`` is what a copy of a patched module got for the patch (:meth:`ForwardPatch.__deepcopy__`)."""
    return (isinstance(f, functools.partial) and f.func is type(module).forward and len(f.args) == 1
            and f.args[0] is module and not f.keywords)


_KNOWN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # unit module -> {call key: params}


def _known(module: nn.Module) -> dict:
    """The module's params per call key; cleared when a recording opens with more than 64 kept (inputs of ever new
    shapes must not grow it without end)."""
    known = _KNOWN.setdefault(module, {})
    if len(known) > 64:
        known.clear()
    return known


def attach(plan: HookPlan, modules: dict[str, nn.Module], session) -> list:
    """Patch the plan's unit modules (and check its BatchNorms) for ``session`` (a ``recording._Session``); return
    the handles (``remove()`` each, in reverse order, to undo)."""
    s = session

    # Python in these bodies runs once per unit call, with the caches cold from the layer before: it is kept to
    # dictionary lookups. Each unit module's params dicts are kept per input shape (_KNOWN, across recordings)
    # and shared between its patterns (read-only, like every pattern's params).
    def relu_body(path: str) -> Callable:
        known = _known(modules[path])

        def body(module, inner, args, kwargs):
            out = inner(*args, **kwargs)
            if s.current is None or s.suspended or _ident() != s.thread:  # (another thread's call: not ours)
                return out
            x = args[0]
            shape = x.shape
            if not shape or shape[0] != s.current.batch:
                s.check_batch(x, path)
            params = known.get((shape, module.inplace))
            if params is None:
                params = known[shape, module.inplace] = {"inplace": module.inplace, "count_boundary": False,
                                                         "in_shape": tuple(shape[1:])}
            # max(x, 0) is nonzero exactly where x > 0 (also for an in-place ReLU, whose input is its output)
            s.current.append(LayerPattern(s.unique(path), "relu", out.bool(), 2, s.no_boundary(x), params))
            return out
        return body

    def pool_body(path: str) -> Callable:
        known = _known(modules[path])

        def body(module, inner, args, kwargs):
            if s.current is None or s.suspended or _ident() != s.thread:
                return inner(*args, **kwargs)
            asked = not module.return_indices
            bottom = inner
            while isinstance(bottom, ForwardPatch):  # outer recordings' patches: suspended or removed, they pass
                bottom = bottom.inner  # the call through
            if not asked:
                values, idx = inner(*args, **kwargs)
            elif getattr(bottom, "__func__", None) is type(module).forward and len(args) == 1 and not kwargs:
                # the class's forward as it calls it, with the argmax (instead of pooling twice); unlike toggling
                # return_indices, this leaves the module's attributes alone
                values, idx = _WITH_INDICES[type(module)](args[0], module.kernel_size, module.stride,
                                                          module.padding, module.dilation, module.ceil_mode)
            else:  # someone else's forward below: the module hands the argmax over
                module.return_indices = True
                try:
                    values, idx = inner(*args, **kwargs)
                finally:
                    module.return_indices = False
            x = args[0]
            if not x.shape or x.shape[0] != s.current.batch:
                s.check_batch(x, path)
            key = (x.shape, asked, module.kernel_size, module.stride, module.padding, module.dilation,
                   module.ceil_mode)
            found = known.get(key)
            if found is None:
                dims = 1 if isinstance(module, nn.MaxPool1d) else 2
                # the function the module calls, as the function mode sees it (the name is part of the params)
                fn = {(1, True): F.max_pool1d, (2, True): F.max_pool2d, (1, False): F.max_pool1d_with_indices,
                      (2, False): F.max_pool2d_with_indices}[dims, asked]
                try:
                    _, params = _POOL.parse(fn, (x, module.kernel_size, module.stride, module.padding,
                                                 module.dilation),
                                            {"ceil_mode": module.ceil_mode, "return_indices": not asked})
                except UnsupportedModuleError as e:
                    raise UnsupportedModuleError(f"module '{path}' ({type(module).__name__}): {e}") from None
                params["count_boundary"] = False
                params["in_shape"] = tuple(x.shape[1:])
                found = known[key] = (params, int(torch.Size(x.shape[-dims:]).numel()))
            params, n_states = found
            s.current.append(LayerPattern(s.unique(path), "maxpool", idx, n_states, s.no_boundary(x), params))
            return values if asked else (values, idx)
        return body

    def norm_hook(path: str) -> Callable:
        @ours
        def hook(module, inputs):
            if s.current is None or s.suspended or not s.strict or _ident() != s.thread:
                return
            if module.training or (module.running_mean is None and module.running_var is None):
                raise not_piecewise_linear(s.describe(path), BATCH_STATISTICS)
        return hook

    handles: list = []
    try:
        for path, kind in plan.units:
            # a user's hook attached before these sends "auto" to the mode (foreign_hook); one registered later
            # runs around the patched forward: it sees the pool's plain output, and the state is read before a
            # forward hook can change anything
            handles.append(ForwardPatch.on(modules[path], relu_body(path) if kind == "relu" else pool_body(path)))
        for path in plan.batch_norms:
            handles.append(StrongHandle(modules[path].register_forward_pre_hook(norm_hook(path))))
    except BaseException:
        for h in reversed(handles):
            h.remove()
        raise
    return handles


_POOL = MaxPoolRule()
_ident = threading.get_ident
# what nn.MaxPool1d / nn.MaxPool2d.forward call with return_indices=True (the hook route takes exactly these types)
_WITH_INDICES = {nn.MaxPool1d: F.max_pool1d_with_indices, nn.MaxPool2d: F.max_pool2d_with_indices}
