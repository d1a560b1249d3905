"""Recording by module hooks alone, for models whose every input-dependent operation is a known module.

The function mode of :mod:`relu_regions.recording` sees every torch call of a forward, and pays for it on every
call: on the 2-core build machine a bare ``TorchFunctionMode`` that only forwards each call adds ~10% to a
784-256-128-10 MLP's forward at batch 256, before any recording work. Most models need none of that: every unit
is an ``nn.ReLU`` or ``nn.MaxPool1d/2d`` module and everything between them is a Linear / Conv / BatchNorm (eval) /
pooling / reshape module or a linear tensor op. For those, forward hooks on the unit modules record the same
patterns (same names, kinds, states and parameters; a test compares them with the function mode's) for the cost of
the units alone.

Which models qualify is decided once per model by a ``torch.fx`` trace (:func:`hook_plan`): every node that
depends on the input must be on an allow-list, and no unit module may run on data that does not depend on the
input. Anything else -- functional ``F.relu`` / ``torch.clamp``, LeakyReLU / PReLU / Hardtanh (recorded by the
function mode only), a model fx cannot trace, a forward with more than one argument -- keeps the function mode,
which also gives the clear errors for operations that are not piecewise linear. The plan is cached per model
(weakly) and re-derived whenever a module, a module's class or ``forward``, or a training flag changes.

Hooks the user registered (or another library, or a global module hook) run code on the input's path that the
trace does not show and only the function mode sees and checks: while any is attached, ``route="auto"`` takes the
mode (:func:`foreign_hook`). Hooks registered inside an open hook-route recording run after the library's own: they
get the pooled tensor, not the ``(values, indices)`` pair the recording asks a max-pool for, and what they do to a
unit's output does not change the unit's recorded state (as on the mode's route).

Limits, as for every fx-based tool: the trace follows the branches a forward takes on Python values at trace time.
A forward that switches on a plain attribute (``if self.use_gelu:``) after the first recording would be recorded
by the stale plan; pass ``route="mode"`` to :func:`relu_regions.record` for such models. The trace runs the
forward's Python code once with symbolic tensors (no tensor is computed, no parameter or buffer changes); a
forward with other side effects (a call counter, a print) sees that one extra call.
"""

from __future__ import annotations

import inspect
import operator
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import BATCH_STATISTICS, not_piecewise_linear
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
_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}  # getattr on an input-dependent tensor that reads no values


@dataclass(frozen=True)
class HookPlan:
    """What a hook-only recording attaches to: unit modules (path, kind) and BatchNorm modules to check."""

    units: tuple[tuple[str, str], ...]
    batch_norms: tuple[str, ...]


class PlanCache:
    """Per-model cache of ``build(model, logits_at)`` (a plan read from a ``torch.fx`` trace), keyed weakly on the
    model, checked against a structural signature (module objects, types, train flags, patched forwards)."""

    def __init__(self, build: Callable[[nn.Module, str | None], Any]) -> None:
        self._build = build
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, model: nn.Module, logits_at: str | None) -> tuple[Any, dict[str, nn.Module]]:
        modules = dict(model.named_modules())
        sig = (logits_at, tuple((n, id(m), type(m), m.training, id(m.__dict__.get("forward")))
                                for n, m in modules.items()))
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
    sig = inspect.signature(model.forward)
    params = [p for p in sig.parameters.values()]
    if len(params) != 1 or params[0].default is not inspect.Parameter.empty or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return "the forward takes other arguments than one input tensor"
    replaced = next((n for n, m in model.named_modules() if "forward" in m.__dict__), None)
    if replaced is not None:  # fx traces the class's forward, the module runs the instance's
        return f"module '{replaced or '<root>'}' has a forward set on the instance"
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


def foreign_hook(modules: dict[str, nn.Module]) -> str | None:
    """Why the hook route must not record now: a forward (pre-)hook that is not one of this library's own runs code
    on the input's path that only the function mode sees; None when there is none."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "a global module forward hook is registered (its code runs inside every module call)"
    for path, m in modules.items():
        for kind, hooks in (("forward pre-hook", m._forward_pre_hooks), ("forward hook", m._forward_hooks)):
            if any(not getattr(h, "_relu_regions_hook", False) for h in hooks.values()):
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


def attach(plan: HookPlan, modules: dict[str, nn.Module], session) -> tuple[list, Callable[[], None]]:
    """Register the plan's hooks for ``session`` (a ``recording._Session``); return the handles and a function
    that restores the max-pools' ``return_indices`` flags (for the caller's ``finally``)."""
    s = session
    handles = []
    flipped: list[nn.Module] = []

    def relu_hook(path: str) -> Callable:
        @ours
        def hook(module, inputs, output):
            if s.current is None or s.suspended:
                return None
            x = inputs[0]
            # max(x, 0) is nonzero exactly where x > 0 (also for an in-place ReLU, whose input is its output)
            params = {"inplace": module.inplace, "count_boundary": False, "in_shape": tuple(x.shape[1:])}
            s.current.append(LayerPattern(s.unique(path), "relu", output.bool(), 2, s.no_boundary(x), params))
            return None
        return hook

    def pool_hooks(path: str) -> tuple[Callable, Callable]:
        pending: list[bool] = []  # per call: did the pre-hook ask the module for indices it does not return

        @ours
        def pre(module, inputs):
            if s.current is None or s.suspended:
                pending.append(False)
                return
            asked = not module.return_indices
            if asked:  # the module computes the argmax anyway; have it hand it over instead of pooling twice
                module.return_indices = True
                flipped.append(module)
            pending.append(asked)

        @ours
        def post(module, inputs, output):
            asked = pending.pop() if pending else False
            if asked:
                module.return_indices = False
                flipped.remove(module)
            if output is None or s.current is None or s.suspended:  # the forward raised, or not recording
                return None
            if not asked and not module.return_indices:
                return None
            values, idx = output
            x = inputs[0]
            dims = 1 if isinstance(module, nn.MaxPool1d) else 2
            # the function the module calls, as the function mode sees it (the name is part of the params)
            fn = {(1, True): F.max_pool1d, (2, True): F.max_pool2d, (1, False): F.max_pool1d_with_indices,
                  (2, False): F.max_pool2d_with_indices}[dims, asked]
            _, params = _POOL.parse(fn, (x, module.kernel_size, module.stride, module.padding, module.dilation),
                                    {"ceil_mode": module.ceil_mode, "return_indices": not asked})
            params["count_boundary"] = False
            params["in_shape"] = tuple(x.shape[1:])
            n_states = int(torch.Size(x.shape[-dims:]).numel())
            s.current.append(LayerPattern(s.unique(path), "maxpool", idx, n_states, s.no_boundary(x), params))
            return values if asked else None
        return pre, post

    def norm_hook(path: str) -> Callable:
        @ours
        def hook(module, inputs):
            if s.current is None or s.suspended or not s.strict:
                return
            if module.training or (module.running_mean is None and module.running_var is None):
                raise not_piecewise_linear(s.describe(path), BATCH_STATISTICS)
        return hook

    def restore() -> None:
        for m in flipped:
            m.return_indices = False
        flipped.clear()

    try:
        for path, kind in plan.units:
            m = modules[path]
            # a user's hook attached before these sends "auto" to the mode (foreign_hook); one registered later
            # runs after them: it sees the pool's plain output, and the state is read before it can change anything
            if kind == "relu":
                handles.append(m.register_forward_hook(relu_hook(path)))
            else:
                pre, post = pool_hooks(path)
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post, always_call=True))
        for path in plan.batch_norms:
            handles.append(modules[path].register_forward_pre_hook(norm_hook(path)))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles, restore


_POOL = MaxPoolRule()
