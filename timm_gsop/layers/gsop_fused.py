"""The end of a GSoP bottleneck in training, ``relu(gsop(bn3(x)) + shortcut)``, without storing ``bn3(x)``.

The plain composition keeps two block-sized tensors per GSoP block for backward that a plain bottleneck
does not: ``bn3(x)`` (for ``x * a``) and ``relu(bn3(x))`` (for the GSoP reduction conv). Both are a
per-channel affine map of ``x``, which ``bn3`` keeps anyway, so this path saves ``x`` and the BN's
per-channel ``scale, shift`` and recomputes the rest in backward, with three of ``autograd_functions``
(its docstring says what they support): ``BatchStats`` (BatchNorm's training statistics and running-stat
update, as ``nn.BatchNorm2d``), ``AffineReluConv`` (``conv2d(relu(x * scale + shift))``) and
``AffineScaleAdd`` (``(x * scale + shift) * a + shortcut``). Values equal the plain composition's to float
rounding (``tests/test_autograd.py`` checks it in float64 against ``nn.BatchNorm2d`` + ``ChannelGSoP``).

Limits: the path is taken only where it changes nothing observable (:func:`fused_training_applies`):
plain ``nn.BatchNorm2d`` using batch statistics, a plain ``ChannelGSoP``, eager mode without autocast and not
on the meta device, no hooks on the modules it bypasses (``bn3``, the GSoP module, its ``conv_reduce``) and no
global module hooks, and not under TorchScript, fx / jit tracing, ``torch.compile`` (which plans memory
itself) or a ``torch.func`` transform. Everywhere else the block runs timm's plain order.
"""
import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules import module as _module

from .autograd_functions import AffineReluConv, AffineScaleAdd, BatchStats
from .gsop import ChannelGSoP, ReluConv2d
from .second_order import autocast_active, skip_checks

__all__ = ['fused_training_applies', 'bn_gsop_add_relu', 'has_hooks']


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
