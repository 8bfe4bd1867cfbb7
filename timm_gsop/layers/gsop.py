"""GSoP attention modules (Gao et al., "Global Second-order Pooling Convolutional Networks", CVPR 2019).

A GSoP block reads the output of a convolution (in GSoP-Net, ``bn3`` of a bottleneck), builds a
second-order matrix from it, and turns each row of that matrix into weights that rescale the input:

* :class:`ChannelGSoP` (the paper's default): ``C x C`` channel covariance of a ``d``-channel reduction,
  one weight per channel.
* :class:`PositionGSoP`: ``P x P`` position matrix on an 8x8 grid, one weight per position, resized to
  the input's ``H x W``.
* :class:`GSoPFusion`: both branches, combined as the released code's ``fusion_avg``, ``fusion_max`` or
  ``fusion_concat``.

:func:`create_gsop` builds one from the released code's manner names. Each module maps
``(B, C, H, W) -> (B, C, H, W)`` like an SE layer, and exposes ``attention(x)`` for the raw weights.
Parameter names differ from the released code (``conv_for_DR`` -> ``conv_reduce`` ...); the model's
``checkpoint_filter_fn`` maps them.
"""
import math
from typing import Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from timm.layers import register_notrace_module
from torch.autograd.function import once_differentiable

from . import second_order
from .second_order import autocast_active, autocast_off, skip_checks

__all__ = [
    'GSOP_MANNERS', 'ReluConv2d', 'CovarianceGate', 'ChannelGSoP', 'PositionGSoP', 'GSoPFusion', 'create_gsop',
    'row_conv', 'GradientLink', 'batch_norm_train_affine', 'affine_per_channel']

GSOP_MANNERS = ('channel', 'position', 'fusion_avg', 'fusion_max', 'fusion_concat')


class ReluConv2d(nn.Conv2d):
    """``conv(relu(x))``: the GSoP branch's entry (the block output itself stays un-rectified).

    With ``recompute=True`` (default), training keeps only ``x`` for backward -- which the block's ``x * a``
    keeps anyway -- instead of a full-size ``relu(x)`` copy; backward recomputes the ReLU (not the conv).
    A 1x1 conv with stride ``s`` and no padding subsamples ``x`` first (the same output), so the ReLU runs
    on ``1 / s^2`` of the map. Parameters are a plain ``Conv2d``'s.
    """

    def __init__(self, *args, recompute: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recompute = recompute

    @property
    def subsamples(self) -> bool:
        """True when ``forward`` reads a strided subsample of its input (1x1 kernel, stride > 1)."""
        return self.kernel_size == (1, 1) and self.padding == (0, 0) and self.stride != (1, 1)

    def _subsample(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        if self.subsamples:
            return x[:, :, ::self.stride[0], ::self.stride[1]], (1, 1)
        return x, self.stride

    def forward(self, x: Tensor) -> Tensor:
        x, stride = self._subsample(x)
        if not torch.jit.is_scripting():
            if (self.recompute and self.padding_mode == 'zeros' and not skip_checks(x)
                    and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
                return _ReluConvFunction.apply(
                    x, self.weight, self.bias, stride, self.padding, self.dilation, self.groups, None, None, None, None,
                    None)
        if self.padding_mode != 'zeros':
            return self._conv_forward(F.relu(x), self.weight, self.bias)
        return F.conv2d(F.relu(x), self.weight, self.bias, stride, self.padding, self.dilation, self.groups)

    def forward_affine_input(
            self, x: Tensor, source: Tensor, scale: Tensor, shift: Tensor, link: Optional['GradientLink'] = None,
    ) -> Tensor:
        """``forward(x)`` for ``x == source * scale + shift`` (per channel, e.g. a BatchNorm's output): saves
        ``source`` instead of ``x`` and recomputes ``x`` in backward. For when ``source`` is kept anyway.
        ``link``: see :class:`GradientLink`."""
        if self.padding_mode != 'zeros':
            raise ValueError('forward_affine_input supports zero padding only')
        step = None
        if link is not None and self.subsamples:
            # subsample inside the function: its backward then writes the subsample's gradient into the
            # linked full-size term, with no zero-filled buffer and no separate accumulation
            step, stride = self.stride, (1, 1)
        else:
            x, stride = self._subsample(x)
            source = self._subsample(source)[0]
        return _ReluConvFunction.apply(
            x, self.weight, self.bias, stride, self.padding, self.dilation, self.groups, source, scale, shift, link,
            step)


class _ReluConvFunction(torch.autograd.Function):
    """``conv2d(relu(x))`` saving ``x`` (or the ``source`` it is an affine map of) instead of ``relu(x)``;
    backward re-applies the ReLU only.

    Under autocast it computes in autocast's dtype, as ``F.conv2d`` would, and returns gradients in the
    inputs' own dtypes.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, source, scale, shift, link, step):
        ctx.step, ctx.full_shape = step, x.shape
        if step is not None:  # x is the full map; the conv reads every step-th position
            x = x[:, :, ::step[0], ::step[1]]
        autocast = autocast_active(x)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        ctx.conv_args = (stride, padding, dilation, groups, dtype, autocast, x.dtype)
        ctx.has_bias = bias is not None
        ctx.from_source = source is not None
        ctx.link = link
        ctx.save_for_backward(*((x, weight) if source is None else (source, weight, scale, shift)))
        with autocast_off(x, autocast):
            return F.conv2d(
                F.relu(_cast(x, dtype)), _cast(weight, dtype), _cast(bias, dtype), stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        stride, padding, dilation, groups, dtype, autocast, x_dtype = ctx.conv_args
        if ctx.from_source:
            source, weight, scale, shift = ctx.saved_tensors
            if ctx.step is not None:
                source = source[:, :, ::ctx.step[0], ::ctx.step[1]]
            x = affine_per_channel(source, scale, shift, x_dtype)
        else:
            x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        with autocast_off(x, autocast):
            grad_out = _cast(grad_out, dtype)
            weight_c = _cast(weight, dtype)
            # a recomputed x is ours to rectify in place (one block-sized buffer, not two)
            relu_x = _cast(x, dtype).relu_() if ctx.from_source else F.relu(_cast(x, dtype))
            del x
            grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_out, relu_x, weight_c, [weight.shape[0]] if ctx.has_bias else None,
                stride, padding, dilation, False, [0, 0], groups, [needs_x, needs_weight, needs_bias and ctx.has_bias])
            if grad_x is not None:
                # relu's backward, in place: one block-sized buffer less at the start of backward (the peak)
                grad_x = torch.ops.aten.threshold_backward.grad_input(grad_x, relu_x, 0, grad_input=grad_x)
                grad_x = _cast(grad_x, x_dtype)
                if ctx.step is not None:  # only set together with a link
                    grad_x = ctx.link.scatter_add_to(grad_x, ctx.step, ctx.full_shape)
                elif ctx.link is not None:
                    grad_x = ctx.link.add_to(grad_x)
        ctx.link = None
        return (grad_x, _cast(grad_weight, weight.dtype), _cast(grad_bias, weight.dtype),
                None, None, None, None, None, None, None, None, None)


def affine_per_channel(source: Tensor, scale: Tensor, shift: Tensor, dtype: torch.dtype) -> Tensor:
    """``source * scale + shift`` with ``(C,)`` scale and shift, in ``dtype`` (BatchNorm's output dtype)."""
    shape = (1, -1) + (1,) * (source.dim() - 2)
    return torch.addcmul(shift.view(shape), source, scale.view(shape)).to(dtype)


def batch_norm_train_affine(x: Tensor, bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor, Tensor]:
    """``bn(x)`` in training mode (running statistics updated as ``nn.BatchNorm2d`` does), also returning
    the per-channel ``scale, shift`` it applied (``bn(x) == x * scale + shift``, detached)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    out, mean, invstd = torch.native_batch_norm(
        x, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, momentum, bn.eps)
    with torch.no_grad():
        scale = invstd.float() if bn.weight is None else invstd.float() * bn.weight.float()
        shift = -mean.float() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.float()
    return out, scale, shift


class _ReluCovarianceFunction(torch.autograd.Function):
    """``covariance_pool(relu(x))`` for ``x == source * scale + shift``, saving ``source`` (which the BN that
    made ``x`` keeps anyway) instead of ``relu(x)``. Float32 maths, like ``covariance_pool``."""

    @staticmethod
    def forward(ctx, x, source, scale, shift):
        autocast = autocast_active(x)
        ctx.meta = (x.dtype, autocast)
        with autocast_off(x, autocast):
            cov, mean = second_order.centred_covariance(second_order.upcast(F.relu(x).flatten(2)))
        ctx.save_for_backward(source, scale, shift, mean)
        return cov

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        source, scale, shift, mean = ctx.saved_tensors
        x_dtype, autocast = ctx.meta
        with autocast_off(grad, autocast):
            relu_x = F.relu(affine_per_channel(source, scale, shift, x_dtype))
            grad_y = second_order.covariance_grad(
                second_order.upcast(grad), second_order.upcast(relu_x.flatten(2)), mean).view_as(relu_x)
            grad_x = torch.ops.aten.threshold_backward(grad_y, second_order.upcast(relu_x), 0)
        return grad_x.to(x_dtype), None, None, None


class GradientLink:
    """Hands ``x``'s gradient term ``grad * a`` from :class:`_ScaleAddFunction`'s backward to the backward
    of the :class:`_ReluConvFunction` that reads the same ``x``, which adds it in place to its own input
    gradient. Autograd would otherwise hold both terms as separate block-sized buffers until it sums them,
    at the start of backward where memory peaks. The conv's backward always runs later: ``a`` is computed
    from its output."""

    def __init__(self) -> None:
        self.grad: Optional[Tensor] = None
        self.scale: Optional[Tensor] = None

    def add_to(self, grad_x: Tensor) -> Tensor:
        """``grad_x + grad * a``, in place in ``grad_x``."""
        if self.grad is not None:
            grad_x = grad_x.addcmul_(self.grad, self.scale.to(grad_x.dtype))
            self.grad = self.scale = None
        return grad_x

    def scatter_add_to(self, grad_sub: Tensor, step: Tuple[int, int], shape: torch.Size) -> Tensor:
        """``grad * a`` over the full map plus ``grad_sub`` at the positions a strided conv read."""
        if self.grad is not None:
            full = self.grad * self.scale.to(self.grad.dtype)
            self.grad = self.scale = None
        else:
            full = grad_sub.new_zeros(shape)
        full[:, :, ::step[0], ::step[1]] += grad_sub.to(full.dtype)
        return full


class _ScaleAddFunction(torch.autograd.Function):
    """``x * a + shortcut`` saving ``source`` (with ``x == source * scale + shift``) instead of ``x``."""

    @staticmethod
    def forward(ctx, x, a, shortcut, source, scale, shift, link):
        ctx.x_dtype = x.dtype
        ctx.link = link
        ctx.save_for_backward(a, source, scale, shift)
        # in place: x is a fresh BN output nothing saves; a new block-sized buffer costs page faults on CPU
        ctx.mark_dirty(x)
        with autocast_off(x):
            torch.addcmul(shortcut, x, a.to(x.dtype), out=x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, source, scale, shift = ctx.saved_tensors
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            if ctx.link is not None:  # the conv branch's backward adds grad * a (see GradientLink)
                ctx.link.grad, ctx.link.scale = grad, a
            else:
                grad_x = grad * a.to(grad.dtype)
        ctx.link = None
        if ctx.needs_input_grad[1]:
            if grad.dtype in (torch.float32, torch.float64) and source.dtype == grad.dtype:
                # sum(grad * x) = scale * sum(grad * source) + shift * sum(grad)
                if grad.is_contiguous() and source.is_contiguous():
                    # batched dot products: no block-sized temporary (channels_last would need copies)
                    dots = torch.matmul(grad.flatten(2).unsqueeze(2), source.flatten(2).unsqueeze(3)).flatten(1)
                else:
                    dots = (grad * source).sum((2, 3))
                grad_a = dots * scale + grad.sum((2, 3)) * shift
            else:  # reduced precision: recompute x and accumulate in float32
                x = affine_per_channel(source, scale, shift, ctx.x_dtype)
                grad_a = (grad * x).sum((2, 3), dtype=torch.float32)
            grad_a = grad_a.view_as(a).to(a.dtype)
        return grad_x, grad_a, grad, None, None, None, None


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


@register_notrace_module  # a leaf for timm's fx tools, so its float32 region survives tracing
class CovarianceGate(nn.Module):
    """Sigmoid weights from an ``N x N`` second-order matrix, computed in float32.

    Row-wise normalisation (``BatchNorm2d(N)`` on the matrix seen as an N-channel N x 1 image), row-wise
    convolution (each row gives ``row_expansion`` values: the released grouped ``(N, 1)`` conv's parameters,
    computed as per-row dot products), optional ReLU (the position branch has one), 1x1 conv to
    ``out_features`` (computed as a linear layer), sigmoid.

    Input ``(B, N, N)``; output ``(B, out_features, 1, 1)`` in the module's parameter dtype (float32 unless
    the whole model was cast). Autocast is disabled inside: the weights are what rescale every activation.
    """

    def __init__(
            self,
            size: int,
            out_features: int,
            row_expansion: int = 4,
            act_after_row: bool = False,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.size = size
        self.bn_row = norm_layer(size, **dd)
        self.conv_row = nn.Conv2d(
            size, row_expansion * size, kernel_size=(size, 1), groups=size, bias=True, **dd)
        self.act = nn.ReLU(inplace=True) if act_after_row else nn.Identity()
        self.conv_expand = nn.Conv2d(row_expansion * size, out_features, kernel_size=1, bias=True, **dd)

    def _gate(self, mat: Tensor) -> Tensor:
        x = mat.to(self.conv_row.weight.dtype).unsqueeze(-1)  # (B, N, N, 1): row i is channel i
        x = row_conv(self.bn_row(x).squeeze(-1), self.conv_row.weight, self.conv_row.bias)
        # a 1x1 conv on a 1x1 map is a linear layer, and runs faster as one
        x = F.linear(self.act(x), self.conv_expand.weight.flatten(1), self.conv_expand.bias)
        return torch.sigmoid(x).unsqueeze(-1).unsqueeze(-1)

    def forward(self, mat: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            _check_square(mat, self.size)
            if autocast_active(mat):
                with torch.autocast(device_type=mat.device.type, enabled=False):
                    return self._gate(mat)
        return self._gate(mat)


def row_conv(mat: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The released row-wise convolution -- a grouped ``(N, 1)`` conv over ``(B, N, N)`` seen as an N-channel
    N x 1 image, with that conv's ``(N * k, 1, N, 1)`` weight and ``(N * k,)`` bias -- computed as per-row dot
    products: ``(B, N, N) -> (B, N * k)``, in the grouped conv's output order.

    oneDNN's grouped conv is about 10x slower here in inference (0.36 vs 0.05 ms at N=128, batch 8, 2 CPU
    threads) and 2.8x in forward + backward.
    """
    size = mat.shape[-1]
    row_kernels = weight.view(size, -1, size)  # (row i, output k, column j)
    out = (mat.unsqueeze(2) * row_kernels).sum(-1).flatten(1)
    if bias is not None:
        out = out + bias
    return out


def _check_square(mat: Tensor, size: int) -> None:
    if skip_checks(mat):
        return
    if mat.dim() != 3 or mat.shape[1] != size or mat.shape[2] != size:
        raise ValueError(f'CovarianceGate expects (B, {size}, {size}) matrices, got shape {tuple(mat.shape)}')


def _check_channels(x: Tensor, channels: int, name: str) -> None:
    if skip_checks(x):
        return
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f'{name} expects (B, {channels}, H, W) input, got shape {tuple(x.shape)}')


class ChannelGSoP(nn.Module):
    """Channel-wise GSoP: ``x * sigmoid(W2 rowconv(rowBN(cov(ReLU(BN(conv1x1(ReLU(x))))))))``.

    Args:
        channels: channels of the input (and output).
        dim: reduced dimension ``d`` before the covariance (paper: 128). Clamped to ``channels``.
        stride: stride of the 1x1 reduction; the paper uses 2 in the first ResNet stage so the covariance
            is taken at 28x28 instead of 56x56.
        row_expansion: values produced per covariance row (paper: 4).
    """

    def __init__(
            self,
            channels: int,
            dim: int = 128,
            stride: int = 1,
            row_expansion: int = 4,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        _check_positive(dim=dim, channels=channels, stride=stride, row_expansion=row_expansion)
        dim = min(dim, channels)
        self.channels = channels
        self.dim = dim
        self.conv_reduce = ReluConv2d(channels, dim, kernel_size=1, stride=stride, bias=True, **dd)
        self.bn_reduce = norm_layer(dim, **dd)
        self.act = act_layer(inplace=True)
        self.gate = CovarianceGate(dim, channels, row_expansion=row_expansion, norm_layer=norm_layer, **dd)

    def attention(self, x: Tensor) -> Tensor:
        """Per-channel weights in (0, 1), shape ``(B, C, 1, 1)``, float32."""
        y = self.act(self.bn_reduce(self.conv_reduce(x)))
        return self.gate(second_order.covariance_pool(y))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            _check_channels(x, self.channels, type(self).__name__)
        return x * self.attention(x).to(x.dtype)

    def forward_bn_add(self, x: Tensor, bn: nn.Module, shortcut: Tensor) -> Tensor:
        """``self(bn(x)) + shortcut``, the end of a residual block, in one pass.

        Training with a plain ``nn.BatchNorm2d`` keeps no copy of ``bn(x)`` for backward: the block keeps
        ``x`` for the BN's own backward anyway, and ``bn(x)`` is recomputed from it there (7 MB per
        224x224 image over GSoP-Net1's four blocks). Same values and gradients as the plain composition.
        """
        if not torch.jit.is_scripting():
            if (type(bn) is nn.BatchNorm2d and bn.training and torch.is_grad_enabled() and not skip_checks(x)
                    and self.conv_reduce.recompute):
                _check_channels(x, self.channels, type(self).__name__)
                y, scale, shift = batch_norm_train_affine(x, bn)
                # the link fuses two block-sized gradient terms; torch.compile traces both backwards on its own
                link = None if torch.compiler.is_compiling() else GradientLink()
                reduced = self.conv_reduce.forward_affine_input(y, x, scale, shift, link)
                if type(self.bn_reduce) is nn.BatchNorm2d and self.bn_reduce.training and type(self.act) is nn.ReLU:
                    pre, scale_r, shift_r = batch_norm_train_affine(reduced, self.bn_reduce)
                    cov = _ReluCovarianceFunction.apply(pre, reduced, scale_r, shift_r)
                else:
                    cov = second_order.covariance_pool(self.act(self.bn_reduce(reduced)))
                a = self.gate(cov)
                return _ScaleAddFunction.apply(y, a, shortcut, x, scale, shift, link)
        y = bn(x)
        if not torch.jit.is_scripting():
            _check_channels(y, self.channels, type(self).__name__)
        a = self.attention(y).to(y.dtype)
        if not torch.is_grad_enabled():
            # in place, like timm's `x += shortcut`: y is this block's own BN output
            return torch.addcmul(shortcut, y, a, out=y)
        return torch.addcmul(shortcut, y, a)


class PositionGSoP(nn.Module):
    """Position-wise GSoP: weights per position of a ``pool_size`` grid, resized to the input, then
    ``ReLU(x * a)`` (as released).

    Args:
        channels: channels of the input (and output).
        dim: channels of the 1x1 reduction (paper: 128; no ReLU after its BN, as released).
        pool_size: side of the grid the features are average-pooled to (released: 8, so P = 64).
        row_expansion: values produced per row of the P x P matrix (released: 4).
    """

    def __init__(
            self,
            channels: int,
            dim: int = 128,
            pool_size: int = 8,
            row_expansion: int = 4,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        _check_positive(dim=dim, channels=channels, pool_size=pool_size, row_expansion=row_expansion)
        dim = min(dim, channels)
        self.channels = channels
        self.dim = dim
        self.pool_size = pool_size
        num_positions = pool_size * pool_size
        self.conv_reduce = ReluConv2d(channels, dim, kernel_size=1, bias=True, **dd)
        self.bn_reduce = norm_layer(dim, **dd)
        self.gate = CovarianceGate(
            num_positions, num_positions, row_expansion=row_expansion, act_after_row=True,
            norm_layer=norm_layer, **dd)

    def attention(self, x: Tensor) -> Tensor:
        """Per-position weights in (0, 1), shape ``(B, 1, H, W)``, float32."""
        y = self.bn_reduce(self.conv_reduce(x))
        y = F.adaptive_avg_pool2d(y, self.pool_size)
        a = self.gate(second_order.position_gram(y))
        a = a.reshape(-1, 1, self.pool_size, self.pool_size)
        # released code "unpools" with adaptive average pooling to the input's size
        return F.adaptive_avg_pool2d(a, x.shape[-2:])

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            _check_channels(x, self.channels, type(self).__name__)
        # ReLU written as torch.where, for two reasons:
        # * relu saves its output for backward, and timm's Bottleneck adds the shortcut to this output in
        #   place (the released code's position modes fail to train for this reason); where saves a mask;
        # * its gradient passes at exactly 0 (relu's / clamp_min's is 0 there). With timm's default
        #   zero_init_last (the block's last BN starts at 0, e.g. as attn_layer of timm's resnet50) x is all
        #   zeros at init, and a zero gradient there would keep the residual branch dead forever.
        # Same forward values as relu (NaN propagates); the gradient differs only where x * a == 0.
        y = x * self.attention(x).to(x.dtype)
        return torch.where(y < 0, 0.0, y)


class GSoPFusion(nn.Module):
    """Channel and position GSoP on the same input, fused as in the released code.

    * ``avg``: ``x * a_c + ReLU(x * a_p)`` (a sum, despite the released name ``fusion_avg``).
    * ``max``: element-wise max of the two.
    * ``concat``: each branch through its own grouped ``(k x 1)`` conv, summed, then BatchNorm. The
      grouping and ``k`` follow the released code: ``groups = C / 64``, ``k = 2 log2(32 / groups) + 5``.
    """

    def __init__(
            self,
            channels: int,
            mode: str = 'avg',
            dim: int = 128,
            stride: int = 1,
            pool_size: int = 8,
            row_expansion: int = 4,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if mode not in ('avg', 'max', 'concat'):
            raise ValueError(f"GSoPFusion mode must be one of 'avg', 'max', 'concat', got {mode!r}")
        self.mode = mode
        self.channels = channels
        self.channel = ChannelGSoP(
            channels, dim=dim, stride=stride, row_expansion=row_expansion,
            act_layer=act_layer, norm_layer=norm_layer, **dd)
        self.position = PositionGSoP(
            channels, dim=dim, pool_size=pool_size, row_expansion=row_expansion, norm_layer=norm_layer, **dd)
        if mode == 'concat':
            groups, kernel = _concat_conv_shape(channels)
            conv_args = dict(
                kernel_size=(kernel, 1), padding=(kernel // 2, 0), groups=groups, bias=True, **dd)
            self.concat_channel = nn.Conv2d(channels, channels, **conv_args)
            self.concat_position = nn.Conv2d(channels, channels, **conv_args)
            self.concat_bn = norm_layer(channels, **dd)
        else:
            # placeholders keep the forward scriptable for every mode
            self.concat_channel = nn.Identity()
            self.concat_position = nn.Identity()
            self.concat_bn = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            _check_channels(x, self.channels, type(self).__name__)
        x_channel = x * self.channel.attention(x).to(x.dtype)
        x_position = F.relu(x * self.position.attention(x).to(x.dtype))
        if self.mode == 'avg':
            return x_channel + x_position
        if self.mode == 'max':
            return torch.maximum(x_channel, x_position)
        return self.concat_bn(self.concat_channel(x_channel) + self.concat_position(x_position))


def _concat_conv_shape(channels: int) -> Tuple[int, int]:
    groups = max(1, channels // 64)
    if channels % groups:
        raise ValueError(f'fusion_concat needs channels divisible by channels // 64, got {channels}')
    factor = int(math.log2(32 / groups))
    return groups, 2 * factor + 5


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')


def create_gsop(
        channels: int,
        manner: str = 'channel',
        dim: int = 128,
        stride: int = 1,
        pool_size: int = 8,
        **kwargs,
) -> Union[ChannelGSoP, PositionGSoP, GSoPFusion]:
    """Build a GSoP module from the released code's manner name (see ``GSOP_MANNERS``)."""
    if manner == 'channel':
        return ChannelGSoP(channels, dim=dim, stride=stride, **kwargs)
    if manner == 'position':
        return PositionGSoP(channels, dim=dim, pool_size=pool_size, **kwargs)
    if manner in ('fusion_avg', 'fusion_max', 'fusion_concat'):
        return GSoPFusion(
            channels, mode=manner[len('fusion_'):], dim=dim, stride=stride, pool_size=pool_size, **kwargs)
    raise ValueError(f'Unknown GSoP manner {manner!r}; valid choices: {", ".join(GSOP_MANNERS)}')
