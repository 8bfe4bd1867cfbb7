"""The package's custom autograd functions, and what they promise.

Each exists because a measurement showed it saves memory the plain ops cannot (``benchmarks/README.md``):

* :class:`Covariance` keeps its input for backward instead of a centred copy (the ReLU in front of every
  covariance keeps that tensor anyway): 28 MB less peak training memory for gsop_resnet50 at batch 32 (an
  earlier run);
* :class:`BatchStats`, :class:`AffineReluConv`, :class:`AffineScaleAdd` let a GSoP bottleneck end keep no copy
  of its ``bn3`` output (``gsop_fused``): 1.15x -> 1.04x the backbone's peak training memory at batch 32.

What they support, checked in float64 against plain autograd (``tests/test_autograd.py``): any subset of inputs
requiring grad, repeated backward over a retained graph, ``create_graph=True`` double backward (every
backward is written in differentiable torch ops; none is ``once_differentiable``), ``torch.func`` transforms
(``setup_context``; ``generate_vmap_rule`` for vmap), checkpointing. Each is self-contained: nothing passes
between them outside autograd.

Limits: they compute in their inputs' dtype and do not handle autocast themselves (callers step aside under
autocast, or disable it: the covariance runs in float32); no meta-device kernel for ``batch_norm_update_stats``;
TorchScript and fx cannot trace through them (callers use the plain ops there).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['centred_covariance', 'Covariance', 'BatchStats', 'AffineReluConv', 'AffineScaleAdd']


def centred_covariance(x: Tensor) -> Tensor:
    """``(B, C, M) -> (B, C, C)``: ``(X - mean)(X - mean)^T / M``, in plain autograd ops."""
    centred = x - x.mean(dim=2, keepdim=True)
    # centred product == X I_hat X^T of the released code, without the (M, M) I_hat
    return torch.bmm(centred, centred.transpose(1, 2)).div_(x.shape[-1])


class Covariance(torch.autograd.Function):
    """``(B, C, M) -> (B, C, C)`` centred covariance that keeps its input for backward, not a centred copy:
    the ReLU in front of every covariance here keeps that tensor anyway. The backward,
    ``(G + G^T)(X - mean) / M``, is written in differentiable ops (double backward, torch.func)."""
    generate_vmap_rule = True  # torch.func.vmap derives the batched rule from forward / backward

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return centred_covariance(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        x, = ctx.saved_tensors
        # no term through the mean: the rows of (G + G^T)(X - mean) already sum to zero over M
        return torch.bmm(grad + grad.transpose(1, 2), x - x.mean(dim=2, keepdim=True)) / x.shape[-1]


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
        pre = torch.addcmul(_per_channel(shift), x, _per_channel(scale))
        if torch.is_grad_enabled():  # create_graph=True: the same maths in differentiable ops
            rectified = F.relu(pre)
            grad_r, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_out, rectified, weight, bias_sizes, *conv_args, [needs_input, needs_weight, needs_bias])
            grad_pre = torch.ops.aten.threshold_backward(grad_r, rectified, 0) if needs_input else None
        else:
            # weight gradient first, then only a 1-byte ReLU mask: the recomputed input and the input gradient
            # are never alive together (this runs where training memory peaks)
            rectified = pre.relu_()
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_out, rectified, weight, bias_sizes, *conv_args, [False, needs_weight, needs_bias])
            dead = (rectified > 0).logical_not_() if needs_input else None  # as threshold_backward (NaN: 0)
            del pre, rectified
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
