"""Re3 contributions: what each input feature and each hidden unit adds to a prediction, read off the region's map.

Inside the activation region of ``x`` the network is ``f(x') = A·x' + d``. The Re3 paper (Algorithm 3) splits the
target's logit into per-feature *logit contributions* ``c_i = A[t, i]·x_i``, which add up to ``f(x)[t] − d[t]``
exactly; ``d`` (the frozen network at 0) is the part no feature carries. Algorithm 2 does the same one level down,
for the hidden units; here it is generalised to any depth and to convolutional channels and positions.

Definitions (all exact within the region of ``x``; ``t`` is the target class):

``level="logit"``
    ``c[b, i] = A[b, t, i] · (x[b, i] − x0[b, i])`` with baseline ``x0`` (default 0). ``sum_i c + A[t]·x0 + d[t]
    == f(x)[t]``.
``level="probability"``
    With ``p = softmax(f(x))`` and its Jacobian ``J = diag(p) − p pᵀ``, ``c[b, i] = (J[t, :] · A[b, :, i]) ·
    (x[b, i] − x0[b, i]) = p_t (A[t, i] − Σ_k p_k A[k, i]) (x[b, i] − x0[b, i])``: the gradient of ``p_t`` times the
    input (Re3's probability-level contributions). This is a first-order split of ``p_t`` — softmax is not affine —
    so these do *not* add up to ``p_t``; the logit level is the exact one. A model with a single output is read as
    a binary classifier's logit (as ``BCEWithLogitsLoss`` trains it): ``p = σ(f(x))``, the probability of the
    positive class, and ``c[b, i] = p (1 − p) A[b, 0, i] (x[b, i] − x0[b, i])`` (target 0, the only output).
neuron contributions
    For each piecewise-linear call (ReLU, LeakyReLU, PReLU, max-pool, clamp) with input ``z`` (its
    pre-activation), ``c_z = z ⊙ ∂f_t/∂z`` through the frozen network. For ReLU-like units and max-pools this
    equals ``H ⊙ ∂f_t/∂H`` with ``H`` the unit's output (Re3's ``c2 = H2 ⊙ W3[pred]``, ``c1 = H1 ⊙ (W3[pred]·D2·W2)``
    with the active mask ``D2`` of the region — the exact form), so ``sum c_z`` plus the downstream biases of the
    frozen network is ``f(x)[t]``. For conv layers ``c_z`` keeps channels and positions, ``(B, C, H, W)``;
    :func:`channel_contributions` sums positions. Saturated clamp units have ``∂f/∂z = 0`` and contribute 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .affine import AffineMap, TargetType, affine_map, check_batch, resolve_target
from .errors import check_finite
from .recording import LayerSelection, library_call, run_frozen, run_recorded, select_layers
from .state import preserved
from .units import LayerPattern

Tensor = torch.Tensor
LEVELS = ("logit", "probability")


@dataclass
class Contributions:
    """Per-feature contributions of the target output of each sample.

    Attributes
    ----------
    values : Tensor
        ``(B, *input_shape)`` contributions (see the module docstring for the definition per level).
    offset : Tensor
        ``(B,)``: logit level: the map's value at the baseline, ``A[t]·x0 + d[t]`` (``d[t]`` for the zero baseline),
        so ``values.sum() + offset == output``; probability level: ``p_t − values.sum()`` (first-order remainder).
    output : Tensor
        ``(B,)`` the explained quantity at ``x``: the target logit or the target probability.
    target : Tensor
        ``(B,)`` explained class per sample.
    level : str
        ``"logit"`` or ``"probability"``.
    same_region : Tensor or None
        ``(B,)`` bool, only with a baseline: the baseline lies in the closed activation region of the input (see
        :func:`same_region` with ``closed=True``), so the logit split is also the exact difference
        ``f(x)[t] − f(x0)[t]``; where False it in general is not.
    """

    values: Tensor
    offset: Tensor
    output: Tensor
    target: Tensor
    level: str
    same_region: Tensor | None = None


def _baseline_like(x: Tensor, baseline: Tensor | float | None) -> Tensor | None:
    if baseline is None:
        return None
    if not isinstance(baseline, Tensor):
        base = torch.full_like(x, float(baseline))
    else:
        try:
            base = baseline.detach().to(device=x.device, dtype=x.dtype).expand_as(x)
        except RuntimeError as e:
            raise ValueError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to the input shape "
                             f"{tuple(x.shape)}") from e
    check_finite(base, "baseline")  # like non-finite inputs: the contributions x − x0 and the offset would be nan
    return base


def _default_target(model: nn.Module, x: Tensor, target: TargetType, logits_at: str | None) -> Tensor:
    """Captum-style target, or the predicted class when ``target`` is None (and the output has several entries)."""
    if target is not None:
        return target
    with preserved(model, eval_mode=True), torch.no_grad():
        out, _ = run_recorded(model, x, logits_at=logits_at)
        # taken inside preserved (outside a caller's inference_mode): an inference tensor could not be saved by the
        # autograd of the reverse route
        return out.reshape(x.shape[0], -1).argmax(1)


@library_call
def same_region(model: nn.Module, x: Tensor, other: Tensor, logits_at: str | None = None, *,
                closed: bool = False, strict: bool = True) -> Tensor:
    """``(B,)`` bool: ``other[b]`` lies in the activation region of ``x[b]``.

    Parameters
    ----------
    model, x, logits_at, strict
        As in :func:`~relu_regions.affine_map`.
    other : Tensor
        Points of the shape of ``x``, one per sample.
    closed : bool
        ``False``: ``x[b]`` and ``other[b]`` have exactly the same activation pattern (all layers). ``True``:
        ``other[b]`` lies in the closed region of ``x[b]``: its pattern agrees with that of ``x[b]`` at every unit
        that is not exactly at its breakpoint (a pre-activation exactly 0, a clamp input exactly at a bound, a
        max-pool window whose maximum is also attained at the position ``x`` picks). Those units give the same
        value in either state, so the frozen network of ``x``'s region reproduces the network at ``other``:
        ``A·other + d == f(other)`` exactly (up to rounding), as for the zero input of a bias-free network, which
        lies on the boundary of every region. Decided with exact comparisons, no tolerance.

    Returns
    -------
    Tensor
    """
    from .keys import pack_patterns

    check_batch(x)
    check_batch(other, "other")
    if other.shape != x.shape:
        raise ValueError(f"other must have the shape of x {tuple(x.shape)} (one point per sample), got "
                         f"{tuple(other.shape)}")
    seen: dict[str, Tensor] = {}

    def keep(pattern: LayerPattern, z: Tensor) -> None:
        seen[pattern.name] = z.detach().clone()  # a later inplace op of the model may overwrite z

    with preserved(model, eval_mode=True), torch.no_grad():
        # with closed=True both passes take the route that shows the pre-activations (the same route for both)
        _, px = run_recorded(model, x, logits_at=logits_at, strict=strict,
                             observe=(lambda p, z: None) if closed else None)
        _, po = run_recorded(model, other, logits_at=logits_at, strict=strict, observe=keep if closed else None)
    ones = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if not px and not po:
        return ones
    if [(p.kind, p.in_shape, p.state.shape) for p in px] != [(p.kind, p.in_shape, p.state.shape) for p in po]:
        return ~ones  # the two passes ran different piecewise-linear calls: no shared region
    if not closed:
        return (pack_patterns(px) == pack_patterns(po)).all(1)
    for p, q in zip(px, po):
        ones &= _agree(p, q, seen[q.name])
    return ones


def _agree(p: LayerPattern, q: LayerPattern, z: Tensor) -> Tensor:
    """``(B,)`` bool: every unit of one call, whose input ``z`` was recorded in state ``q``, gives the same value in
    state ``p`` (the states agree, or ``z`` sits exactly on the breakpoint between them)."""
    same = p.state == q.state
    if p.kind == "maxpool":
        if p.params.get("return_indices"):
            ok = same  # the indices are an output too: a tie still changes them
        else:
            d = p.params["dims"]
            flat = z.flatten(-d)
            ok = same | (flat.gather(-1, p.state.flatten(-d)) == flat.gather(-1, q.state.flatten(-d))).view_as(same)
    elif p.kind == "clamp":
        lo, hi = p.params["lo"], p.params["hi"]

        def value(s: Tensor) -> Tensor:  # the unit's output in state s (0 below, 1 linear, 2 above)
            v = torch.where(s == 1, z, torch.zeros_like(z))
            if lo is not None:
                v = torch.where(s == 0, torch.full_like(z, lo), v)
            if hi is not None:
                v = torch.where(s == 2, torch.full_like(z, hi), v)
            return v

        ok = same | (value(p.state) == value(q.state))
    else:  # ReLU-like: both pieces meet at a pre-activation of exactly 0
        ok = same | (z == 0)
    return ok.reshape(ok.shape[0], -1).all(1)


def from_map(amap: AffineMap, baseline: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Logit contributions ``A[t] ⊙ (x − x0)`` and the offset ``A[t]·x0 + d[t]`` from a map with one target.

    A pure function over the map's tensors, shared by :func:`contributions` and the Captum integration.
    """
    if amap.A.shape[1] != 1:
        raise ValueError("from_map needs a map computed with a target (K == 1)")
    a = amap.A[:, 0]
    d = amap.d[:, 0]
    if baseline is None:
        return a * amap.x.to(a.dtype), d
    base = baseline.to(a.dtype)
    at_base = (a * base).reshape(a.shape[0], -1).sum(1) + d
    return a * (amap.x.to(a.dtype) - base), at_base


@library_call
def contributions(model: nn.Module, x: Tensor, target: TargetType = None, level: str = "logit", *,
                  baseline: Tensor | float | None = None, method: str = "auto",
                  logits_at: str | None = None) -> Contributions:
    """Re3 per-feature contributions of each sample's target output.

    Parameters
    ----------
    model : nn.Module
        A piecewise-linear network (left exactly as it was).
    x : Tensor
        ``(B, *input_shape)`` inputs.
    target : int, sequence, Tensor or None
        Class to explain (Captum style); default the predicted class.
    level : {"logit", "probability"}
        See the module docstring for the exact definitions.
    baseline : Tensor or float, optional
        Reference input ``x0`` (broadcast to ``x``, finite); default 0.
    method : str
        Route of :func:`~relu_regions.affine_map` (all exact).
    logits_at : str, optional
        Module path whose output is the logits (see :func:`~relu_regions.affine_map`).

    Returns
    -------
    Contributions
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    check_batch(x)  # before the default target runs the model on x
    x = x.detach()
    base = _baseline_like(x, baseline)
    tgt = _default_target(model, x, target, logits_at)
    same = same_region(model, x, base, logits_at, closed=True) if base is not None else None
    if level == "logit":
        amap = affine_map(model, x, target=tgt, method=method, logits_at=logits_at)
        values, offset = from_map(amap, base)
        return Contributions(values, offset, amap.output[:, 0], amap.target, level, same)
    amap = affine_map(model, x, target=None, method=method, logits_at=logits_at)
    t = resolve_target(tgt, x.shape[0], amap.A.shape[1], x.device)
    a = amap.A.reshape(amap.A.shape[0], amap.A.shape[1], -1)  # (B, K, D)
    a_t = a[torch.arange(a.shape[0], device=a.device), t]  # (B, D)
    if a.shape[1] == 1:  # a binary logit: a softmax over one column is 1 everywhere, with zero gradient
        pt = torch.sigmoid(amap.output)  # (B, 1)
        grad_p = pt * (1 - pt) * a_t
    else:
        p = torch.softmax(amap.output, 1)  # (B, K)
        pt = p.gather(1, t[:, None])  # (B, 1)
        grad_p = pt * (a_t - torch.einsum("bk,bkd->bd", p, a))  # row t of (diag(p) − p pᵀ)·A
    delta = (x - base) if base is not None else x
    values = (grad_p * delta.reshape(delta.shape[0], -1).to(a.dtype)).reshape(x.shape)
    out = pt[:, 0]
    return Contributions(values, out - values.reshape(values.shape[0], -1).sum(1), out, t, level, same)


@library_call
def neuron_contributions(model: nn.Module, x: Tensor, target: TargetType = None, layers: LayerSelection = None, *,
                         logits_at: str | None = None) -> dict[str, Tensor]:
    """Re3 neuron contributions ``z ⊙ ∂f_t/∂z`` of every unit of the selected piecewise-linear calls.

    Parameters
    ----------
    model, x, target, logits_at
        As in :func:`contributions` (default target: the predicted class).
    layers : selection, optional
        Which calls, as in :meth:`~relu_regions.Recording.patterns` (default all).

    Returns
    -------
    dict of name -> Tensor ``(B, *unit_input_shape)`` in execution order: for a conv ReLU ``(B, C, H, W)``, for a
    max-pool the pool input (the window maxima carry the contributions), for a dense ReLU ``(B, units)``.
    """
    check_batch(x)  # before the default target runs the model on x
    x = x.detach()
    tgt = _default_target(model, x, target, logits_at)
    with preserved(model, eval_mode=True):
        with torch.no_grad():
            out, patterns = run_recorded(model, x, logits_at=logits_at)
        t = resolve_target(tgt, x.shape[0], out.reshape(x.shape[0], -1).shape[1], x.device)
        names = select_layers([p.name for p in patterns], layers)
        values: dict[str, Tensor] = {}
        grads: dict[str, Tensor] = {}

        def observe(pattern, z):
            if pattern.name in names:
                values[pattern.name] = z.detach().clone()

                # a tensor hook registered before an in-place op still receives the gradient of the
                # pre-modification value (in-place ReLUs overwrite z in the frozen replay)
                def keep(g, name=pattern.name):
                    grads[name] = g.detach().clone()

                z.register_hook(keep)

        z0 = x.clone().requires_grad_(True)
        with torch.enable_grad():
            y = run_frozen(model, z0, patterns, logits_at=logits_at, observe=observe)
            sel = y.reshape(x.shape[0], -1).gather(1, t[:, None]).sum()
            torch.autograd.grad(sel, z0, allow_unused=True)
        # inside preserved, outside a caller's inference_mode: ordinary tensors back, like affine_map's
        return {n: values[n] * grads[n] if n in grads else torch.zeros_like(values[n]) for n in names}


def channel_contributions(c: Tensor) -> Tensor:
    """Sum a ``(B, C, *positions)`` neuron contribution over positions: ``(B, C)``."""
    return c.reshape(c.shape[0], c.shape[1], -1).sum(2) if c.dim() > 2 else c


def top_units(c: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
    """Indices (flat) and values of the ``k`` largest contributions per sample."""
    flat = c.reshape(c.shape[0], -1)
    v, i = flat.topk(min(k, flat.shape[1]), dim=1)
    return i, v


__all__: Sequence[str] = ["Contributions", "channel_contributions", "contributions", "from_map",
                          "neuron_contributions", "same_region", "top_units"]
