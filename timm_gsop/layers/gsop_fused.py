"""The end of a GSoP bottleneck in training, ``relu(gsop(bn3(x)) + shortcut)``, without storing ``bn3(x)``.

The plain composition keeps two block-sized tensors per GSoP block for backward that a plain bottleneck
does not: ``bn3(x)`` (for ``x * a``) and ``relu(bn3(x))`` (for the GSoP reduction conv). Both are a
per-channel affine map of ``x``, which ``bn3`` keeps anyway, so this path saves ``x`` and the BN's
per-channel ``scale, shift`` and recomputes the rest in backward. Three small ``autograd.Function``s, each
self-contained (nothing passes between them outside autograd):

* :class:`BatchStats`: BatchNorm's training statistics (and running-stat update, as ``nn.BatchNorm2d``);
* :class:`AffineReluConv`: ``conv2d(relu(x * scale + shift))``, saving ``x``;
* :class:`AffineScaleAdd`: ``(x * scale + shift) * a + shortcut``, saving ``x``.

Their backwards are closed forms written with differentiable torch ops (no ``once_differentiable``), so
repeated backward, partial ``torch.autograd.grad``, ``create_graph=True`` double backward, checkpointing and
frozen parameters behave as for the plain composition; they use ``setup_context``, so ``torch.func`` can
transform them. Values equal the plain composition's to float rounding (``tests/test_autograd.py`` checks
all of this in float64 against ``nn.BatchNorm2d`` + ``ChannelGSoP``).

Limits: the path is taken only where it changes nothing observable (:func:`fused_training_applies`):
plain ``nn.BatchNorm2d`` using batch statistics, a plain ``ChannelGSoP``, eager mode without autocast (not
on the meta device), no
hooks on the modules it bypasses (``bn3``, the GSoP module, its ``conv_reduce``) and no global module
hooks, and not under TorchScript, fx / jit tracing, ``torch.compile`` (which plans memory itself) or a
``torch.func`` transform. Everywhere else the block runs timm's plain order.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules import module as _module

from .gsop import ChannelGSoP, ReluConv2d
from .second_order import autocast_active, skip_checks

__all__ = ['BatchStats', 'AffineReluConv', 'AffineScaleAdd', 'fused_training_applies', 'bn_gsop_add_relu',
           'has_hooks']


def _per_channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _channel_dots(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum((2, 3))`` for ``(B, C, H, W)`` tensors: ``(B, C)``, without a block-sized temporary
    when both are contiguous."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.matmul(a.flatten(2).unsqueeze(2), b.flatten(2).unsqueeze(3)).flatten(1)
    return (a * b).sum((2, 3))


class BatchStats(torch.autograd.Function):
    """Per-channel mean and biased variance of ``x`` over ``(B, H, W)``, BatchNorm's training statistics.

    ``running_mean`` / ``running_var`` (or None) are updated in place exactly as ``nn.BatchNorm2d`` does
    (the same kernel: ``torch.batch_norm_update_stats``; unbiased variance, ``momentum``).
    """
    generate_vmap_rule = True  # torch.func.vmap derives the batched rule from forward / backward

    @staticmethod
    def forward(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                momentum: float) -> Tuple[Tensor, Tensor]:
        if running_mean is not None:
            mean, var = torch.batch_norm_update_stats(x, running_mean, running_var, momentum)
        else:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        return mean, var

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], output[0])

    @staticmethod
    def backward(ctx, grad_mean: Tensor, grad_var: Tensor):
        x, mean = ctx.saved_tensors
        count = x.numel() // x.shape[1]
        # d mean / dx = 1 / N, d var / dx = 2 (x - mean) / N (the term through the mean sums to zero)
        coef = grad_var * (2.0 / count)
        return torch.addcmul(_per_channel(grad_mean / count - coef * mean), x, _per_channel(coef)), None, None, None


class AffineReluConv(torch.autograd.Function):
    """``conv2d(relu(x * scale + shift), weight, bias, stride, padding, dilation, groups)`` with per-channel
    ``scale`` / ``shift``, saving ``x`` (not the rectified copy); backward recomputes the ReLU input."""
    generate_vmap_rule = True  # torch.func.vmap derives the batched rule from forward / backward

    @staticmethod
    def forward(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, bias: Optional[Tensor],
                stride, padding, dilation, groups: int) -> Tensor:
        rectified = torch.addcmul(_per_channel(shift), x, _per_channel(scale)).relu_()
        return F.conv2d(rectified, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, scale, shift, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, scale, shift, weight)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, scale, shift, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        needs_x, needs_scale, needs_shift, needs_weight, needs_bias = ctx.needs_input_grad[:5]
        needs_input = needs_x or needs_scale or needs_shift
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        conv_args = (stride, padding, dilation, False, [0] * len(padding), groups)
        rectified = F.relu(torch.addcmul(_per_channel(shift), x, _per_channel(scale)))
        if torch.is_grad_enabled():  # create_graph=True: the same maths in differentiable ops
            grad_r, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_out, rectified, weight, bias_sizes, *conv_args, [needs_input, needs_weight, needs_bias])
            grad_pre = torch.ops.aten.threshold_backward(grad_r, rectified, 0) if needs_input else None
        else:
            # weight gradient first, then only a 1-byte ReLU mask: the recomputed input and the input gradient
            # are never alive together (this runs where training memory peaks)
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_out, rectified, weight, bias_sizes, *conv_args, [False, needs_weight, needs_bias])
            dead = (rectified > 0).logical_not_() if needs_input else None  # as threshold_backward (NaN: 0)
            del rectified
            grad_pre = None
            if needs_input:
                grad_pre = torch.ops.aten.convolution_backward(
                    grad_out, x, weight, None, *conv_args, [True, False, False])[0]
                grad_pre.masked_fill_(dead, 0)  # threshold_backward(grad, relu(pre), 0), in place
        grad_x = grad_scale = grad_shift = None
        if grad_pre is not None:
            if needs_scale:
                grad_scale = _channel_dots(grad_pre, x).sum(0)
            if needs_shift:
                grad_shift = grad_pre.sum((0, 2, 3))
            if needs_x:
                scale_ = _per_channel(scale)
                grad_x = grad_pre * scale_ if torch.is_grad_enabled() else grad_pre.mul_(scale_)
        return grad_x, grad_scale, grad_shift, grad_weight, grad_bias, None, None, None, None


class AffineScaleAdd(torch.autograd.Function):
    """``(x * scale + shift) * a + shortcut`` with per-channel ``scale`` / ``shift`` and ``a`` of shape
    ``(B, C, 1, 1)``, saving ``x`` (not ``x * scale + shift``)."""
    generate_vmap_rule = True  # torch.func.vmap derives the batched rule from forward / backward

    @staticmethod
    def forward(x: Tensor, scale: Tensor, shift: Tensor, a: Tensor, shortcut: Tensor) -> Tensor:
        return torch.addcmul(shortcut, x, _per_channel(scale) * a).add_(_per_channel(shift) * a)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, scale, shift, a, shortcut = inputs
        ctx.save_for_backward(x, scale, shift, a)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, scale, shift, a = ctx.saved_tensors
        needs_x, needs_scale, needs_shift, needs_a, needs_shortcut = ctx.needs_input_grad
        grad_x = grad_scale = grad_shift = grad_a = None
        if needs_scale or needs_shift or needs_a:
            dots = _channel_dots(grad_out, x)   # (B, C): sum over positions of grad * x
            sums = grad_out.sum((2, 3))         # (B, C): sum over positions of grad
            a_flat = a.view(dots.shape)
            if needs_a:
                grad_a = (dots * scale + sums * shift).view_as(a)
            if needs_scale:
                grad_scale = (dots * a_flat).sum(0)
            if needs_shift:
                grad_shift = (sums * a_flat).sum(0)
        if needs_x:
            grad_x = grad_out * (_per_channel(scale) * a)
        return grad_x, grad_scale, grad_shift, grad_a, grad_out if needs_shortcut else None


def has_hooks(*modules: nn.Module) -> bool:
    """True if any of ``modules`` has forward (pre-)hooks or backward hooks, or global module hooks exist:
    then a fused path that bypasses those modules' ``forward`` must step aside."""
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or _module._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


def _functorch_active() -> bool:
    functorch = getattr(torch._C, '_functorch', None)
    peek = getattr(functorch, 'peek_interpreter_stack', None)
    return peek is not None and peek() is not None


def fused_training_applies(bn: nn.Module, gsop: nn.Module, x: Tensor) -> bool:
    """Whether :func:`bn_gsop_add_relu` gives exactly what ``bn`` -> ``gsop`` -> ``+ shortcut`` would, with
    gradients wanted: see the module docstring for the conditions."""
    if not torch.is_grad_enabled() or skip_checks(x) or torch.compiler.is_compiling() or _functorch_active():
        return False
    if x.device.type == 'meta':  # no meta kernel for batch_norm_update_stats; nothing to save there anyway
        return False
    if type(bn) is not nn.BatchNorm2d or not (bn.training or bn.running_mean is None):
        return False
    if type(gsop) is not ChannelGSoP or type(gsop.conv_reduce) is not ReluConv2d:
        return False
    if gsop.conv_reduce.padding_mode != 'zeros' or autocast_active(x):
        return False
    return not has_hooks(bn, gsop, gsop.conv_reduce)


def _bn_momentum(bn: nn.BatchNorm2d) -> float:
    """``nn.BatchNorm2d.forward``'s exponential average factor, counting this batch as it does."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return momentum


def bn_gsop_add_relu(x: Tensor, bn: nn.BatchNorm2d, gsop: ChannelGSoP, shortcut: Tensor, act: nn.Module) -> Tensor:
    """``act(gsop(bn(x)) + shortcut)`` in training, keeping no copy of ``bn(x)`` for backward.

    Call only where :func:`fused_training_applies`. ``bn``'s running statistics and ``num_batches_tracked``
    are updated as ``bn(x)`` would update them.
    """
    gsop.check_input(x)
    track = bn.training and bn.track_running_stats
    mean, var = BatchStats.apply(
        x, bn.running_mean if track else None, bn.running_var if track else None, _bn_momentum(bn))
    invstd = torch.rsqrt(var + bn.eps)
    scale = invstd if bn.weight is None else bn.weight * invstd
    shift = -mean * scale if bn.bias is None else bn.bias - mean * scale
    conv = gsop.conv_reduce
    source, stride = x, conv.stride
    if conv.subsamples:  # as ReluConv2d.forward: a strided 1x1 conv reads every stride-th position only
        source, stride = x[:, :, ::conv.stride[0], ::conv.stride[1]], (1, 1)
    reduced = AffineReluConv.apply(
        source, scale, shift, conv.weight, conv.bias, stride, conv.padding, conv.dilation, conv.groups)
    a = gsop.attention_from_reduced(reduced).to(x.dtype)
    return act(AffineScaleAdd.apply(x, scale, shift, a, shortcut))
