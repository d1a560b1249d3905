"""Input gradients of the frozen network's convolutions, computed as forward convolutions.

The reverse route of :func:`relu_regions.affine_map` differentiates the frozen network with respect to its input
only, once per explained output. For a stride-1 2-d convolution the input gradient is a forward convolution of
the cotangent with the spatially flipped kernel (input and output channels swapped per group) and padding
``dilation·(k − 1) − padding``: the same sums in another order. On CPUs that forward convolution is several times
faster than torch's input-gradient kernel for layers with few input channels — an image model's first layer
(measured on a 2-core Xeon, LeNet conv1, batch 256: 15–22 ms for torch's backward, 5–7 ms for the flipped
convolution). The replay of the reverse route sends eligible ``F.conv2d`` calls through
:func:`conv2d_with_fast_input_grad`; everything else keeps torch's own backward.

Weights enter as constants (detached): the reverse route needs no parameter gradients, and code that does
(``training.parsimony_penalty``) replays without this substitution. The reverse route evaluates the frozen network
at 0, so the layer that reads the input directly returns its bias there (:func:`linear_at_zero`, and
``conv2d_with_fast_input_grad(..., zero=True)``) and skips one matrix product: most of an MLP's forward.

The forward-mode routes (tangents of the frozen network: ``affine_map(method="forward")``, the boundary distances'
directional passes) send ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` calls on dual inputs through
:func:`affine_jvp`: the tangent is the same layer without its bias, applied to the input's tangent. Torch's own
rule also differentiates the constant weight and bias, as zero tensors whose arithmetic takes a slow generic path
(torch 2.13 on the 2-core Xeon: a 16-sample LeNet conv 0.6-0.7 ms against 0.4 ms, a 784-256 linear layer on 2000
tangents 19 ms against 12 ms). The results are the same numbers (a test compares them bit for bit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

Tensor = torch.Tensor


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _at_zero(x: Tensor, bias: Tensor | None, out_shape: tuple, dim: int = 1) -> Tensor:
    """A linear layer's output at an all-zero input: its bias along ``dim`` (the channels of a convolution, the
    last dimension of a Linear), broadcast (no matrix product)."""
    if bias is None:
        return x.new_zeros(out_shape)
    view = [1] * len(out_shape)
    view[dim] = -1
    return bias.to(x.dtype).reshape(view).expand(out_shape).clone()


class _Conv2dFastInputGrad(torch.autograd.Function):
    generate_vmap_rule = True  # batched cotangents (is_grads_batched) vmap the backward convolution

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple, dilation: tuple,
                groups: int, zero: bool) -> Tensor:
        if zero:
            kh, kw = weight.shape[-2:]
            h = x.shape[-2] + 2 * padding[0] - dilation[0] * (kh - 1)
            w = x.shape[-1] + 2 * padding[1] - dilation[1] * (kw - 1)
            return _at_zero(x, bias, (x.shape[0], weight.shape[0], h, w))
        return F.conv2d(x, weight, bias, 1, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _, padding, dilation, groups, _ = inputs
        ctx.save_for_backward(weight)
        ctx.conf = (padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        padding, dilation, groups = ctx.conf
        return transposed_conv2d(grad, weight, padding, dilation, groups), None, None, None, None, None, None


class _LinearAtZero(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _at_zero(x, bias, (*x.shape[:-1], weight.shape[0]), dim=-1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight, None, None


def transposed_conv2d(grad: Tensor, weight: Tensor, padding: tuple, dilation: tuple, groups: int) -> Tensor:
    """The input gradient of ``F.conv2d(x, weight, stride=1, padding, dilation, groups)`` for cotangent ``grad``,
    as a forward convolution with the flipped kernel."""
    c_out, c_in_g, kh, kw = weight.shape
    pad = (dilation[0] * (kh - 1) - padding[0], dilation[1] * (kw - 1) - padding[1])
    if groups == 1 and c_in_g == 1:
        # one input channel (a grayscale image's first layer): the flipped convolution would have one output
        # channel, a shape oneDNN handles badly; as a depthwise convolution over all (sample, channel) planes plus a
        # sum over channels it is ~2x faster (2-core Xeon, LeNet conv1, batch 256: 2.5 ms vs 4.9 ms)
        b, h, w_ = grad.shape[0], grad.shape[-2], grad.shape[-1]
        wd = weight.flip(-2, -1).reshape(1, c_out, 1, kh, kw).expand(b, c_out, 1, kh, kw).reshape(b * c_out, 1, kh, kw)
        out = F.conv2d(grad.reshape(1, b * c_out, h, w_), wd, None, 1, pad, dilation, b * c_out)
        return out.view(b, c_out, *out.shape[-2:]).sum(1, keepdim=True)
    w = weight.reshape(groups, c_out // groups, c_in_g, kh, kw).transpose(1, 2)
    w = w.reshape(groups * c_in_g, c_out // groups, kh, kw).flip(-2, -1)
    return F.conv2d(grad, w, None, 1, pad, dilation, groups)


def linear_at_zero(args: tuple, kwargs: dict) -> Tensor | None:
    """``F.linear(*args, **kwargs)`` for an input the caller knows to be all zeros: the bias, broadcast, with the
    input gradient ``grad @ weight``; None for inputs of fewer than 2 dimensions."""
    a = dict(zip(("input", "weight", "bias"), args))
    a.update(kwargs)
    x, weight, bias = a["input"], a["weight"], a.get("bias")
    if x.dim() < 2:
        return None
    return _LinearAtZero.apply(x, weight.detach(), None if bias is None else bias.detach())


def conv2d_with_fast_input_grad(args: tuple, kwargs: dict, zero: bool = False) -> Tensor | None:
    """``F.conv2d(*args, **kwargs)`` with the flipped-kernel input gradient, or None where that does not apply
    (stride > 1, string padding, padding wider than the kernel's reach, an input that needs no gradient).
    ``zero``: the caller knows the input is all zeros, and the output is the bias without a convolution."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    a = dict(zip(names, defaults))
    a.update(zip(names, args))
    a.update(kwargs)
    x, weight, bias = a["input"], a["weight"], a["bias"]
    if not (isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled() and x.dim() == 4):
        return None
    if isinstance(a["padding"], str) or _pair(a["stride"]) != (1, 1):
        return None
    padding, dilation = _pair(a["padding"]), _pair(a["dilation"])
    kh, kw = weight.shape[-2:]
    if padding[0] > dilation[0] * (kh - 1) or padding[1] > dilation[1] * (kw - 1):
        return None
    return _Conv2dFastInputGrad.apply(x, weight.detach(), None if bias is None else bias.detach(), padding,
                                      dilation, int(a["groups"]), zero)


def affine_jvp(func, args: tuple, kwargs: dict) -> Tensor | None:
    """``func(*args, **kwargs)`` for ``func`` in ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` whose input is a dual
    tensor (forward-mode AD) and whose weight and bias are not: the layer on the primal, and the layer without bias
    on the tangent, made dual again. None when that does not apply (no tangent, or a dual weight or bias)."""
    if not args:  # the input passed by keyword: torch's own rule
        return None
    primal, tangent = fwAD.unpack_dual(args[0])
    if tangent is None:
        return None
    rest = list(args[1:])
    if any(isinstance(t, Tensor) and fwAD.unpack_dual(t).tangent is not None for t in (*rest, *kwargs.values())):
        return None
    kw = dict(kwargs)
    if len(rest) > 1:  # the bias is the third argument of all three
        no_bias = [rest[0], None, *rest[2:]]
    else:
        no_bias = rest
        kw.pop("bias", None)
    return fwAD.make_dual(func(primal, *rest, **kwargs), func(tangent, *no_bias, **kw))
