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

from . import second_order
from .second_order import autocast_active, skip_checks

__all__ = [
    'GSOP_MANNERS', 'ReluConv2d', 'CovarianceGate', 'ChannelGSoP', 'PositionGSoP', 'GSoPFusion', 'create_gsop',
    'row_conv']

GSOP_MANNERS = ('channel', 'position', 'fusion_avg', 'fusion_max', 'fusion_concat')


class ReluConv2d(nn.Conv2d):
    """``conv(relu(x))``: the GSoP branch's entry (the block output itself stays un-rectified, so the ReLU
    cannot be in place).

    A 1x1 conv with stride ``s`` and no padding reads only every ``s``-th position, so ``forward`` subsamples
    ``x`` first and rectifies ``1 / s^2`` of the map (the same output). Parameters are a plain ``Conv2d``'s;
    plain autograd ops.
    """

    @property
    def subsamples(self) -> bool:
        """True when ``forward`` reads a strided subsample of its input (1x1 kernel, stride > 1)."""
        return self.kernel_size == (1, 1) and self.padding == (0, 0) and self.stride != (1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.subsamples:
            x = x[:, :, ::self.stride[0], ::self.stride[1]]
            return F.conv2d(F.relu(x), self.weight, self.bias, 1, 0, self.dilation, self.groups)
        return self._conv_forward(F.relu(x), self.weight, self.bias)


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

    oneDNN's grouped conv is several times slower here (``timm-gsop bench --ops`` measures both).
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
        return self.attention_from_reduced(self.conv_reduce(x))

    def attention_from_reduced(self, reduced: Tensor) -> Tensor:
        """:meth:`attention` from the output of ``conv_reduce``."""
        return self.gate(second_order.covariance_pool(self.act(self.bn_reduce(reduced))))

    def check_input(self, x: Tensor) -> Tensor:
        """``x``, after a ValueError naming the expected shape if it is not ``(B, channels, H, W)``."""
        _check_channels(x, self.channels, type(self).__name__)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            self.check_input(x)
        return x * self.attention(x).to(x.dtype)


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
