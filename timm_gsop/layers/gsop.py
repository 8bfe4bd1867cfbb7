""" GSoP attention modules

"Global Second-order Pooling Convolutional Networks", Gao, Xie, Wang, Li, CVPR 2019 (arXiv:1811.12006).
Released code (MIT): https://github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks

A GSoP module reads a feature map (in GSoP-Net, a bottleneck's ``bn3`` output), builds a second-order matrix of
it and turns each row of that matrix into a weight that rescales the input, like an SE module:

* ``ChannelGSoP`` (the paper's default): covariance of a d-channel reduction, one weight per channel;
* ``PositionGSoP``: a P x P position matrix on an 8x8 grid, one weight per position, resized to H x W;
* ``GSoPFusion``: both, combined as the released ``fusion_avg``, ``fusion_max`` or ``fusion_concat``.

``create_gsop`` builds one from the released manner names. Each maps ``(B, C, H, W) -> (B, C, H, W)`` and takes the
channel count first and ``device`` / ``dtype`` keywords, so timm's ResNet blocks take them as ``attn_layer``.
"""
import math
from typing import Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from timm.layers import register_notrace_module

from .second_order import autocast_off, covariance_pool, position_gram

__all__ = ['GSOP_MANNERS', 'RowConv2d', 'CovarianceGate', 'ChannelGSoP', 'PositionGSoP', 'GSoPFusion', 'create_gsop']

GSOP_MANNERS = ('channel', 'position', 'fusion_avg', 'fusion_max', 'fusion_concat')

# leaves for plain torch.fx.symbolic_trace: it patches the names in this module's globals
torch.fx.wrap('covariance_pool')
torch.fx.wrap('position_gram')


class RowConv2d(nn.Conv2d):
    """The released row-wise convolution: an ``N x N`` matrix seen as an N-channel ``N x 1`` image, an ``(N, 1)``
    kernel per channel group, ``expansion`` values per row. The same parameters, input ``(B, N, N, 1)`` and output
    ``(B, expansion N, 1, 1)`` as that grouped ``nn.Conv2d`` (so hooks see what they would see there); computed
    as per-row dot products, several times faster than a grouped convolution on CPU."""

    def __init__(self, size: int, expansion: int = 4, device=None, dtype=None) -> None:
        super().__init__(size, expansion * size, kernel_size=(size, 1), groups=size, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        size = self.in_channels
        kernels = self.weight.view(size, self.out_channels // size, size)
        y = torch.einsum('bij,ikj->bik', x[..., 0], kernels).flatten(1)  # row i with the kernels of group i
        bias = self.bias
        if bias is not None:
            y = y + bias
        return y[:, :, None, None]


@register_notrace_module  # a leaf for timm's fx feature extraction: keeps its float32 region
class CovarianceGate(nn.Module):
    """Sigmoid weights from an ``N x N`` second-order matrix: ``(B, N, N) -> (B, out_features, 1, 1)``. Row-wise
    BatchNorm, ``RowConv2d`` (``row_expansion`` values per row), optional ReLU (the position branch has one), 1x1 conv
    to ``out_features``, sigmoid: the released layers, in float32 under autocast."""

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
        self.bn_row = norm_layer(size, **dd)
        self.conv_row = RowConv2d(size, row_expansion, **dd)
        self.act = nn.ReLU(inplace=True) if act_after_row else nn.Identity()
        self.conv_expand = nn.Conv2d(row_expansion * size, out_features, kernel_size=1, **dd)

    def _gate(self, mat: Tensor) -> Tensor:
        x = self.bn_row(mat.to(self.conv_row.weight.dtype).unsqueeze(-1))
        return torch.sigmoid(self.conv_expand(self.act(self.conv_row(x))))

    def forward(self, mat: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            with autocast_off(mat):
                return self._gate(mat)
        return self._gate(mat)


class ChannelGSoP(nn.Module):
    """Channel-wise GSoP: ``x * sigmoid(W2 rowconv(rowBN(cov(ReLU(BN(conv1x1(ReLU(x))))))))``.

    Args:
        dim: reduced dimension d before the covariance (paper: 128), at most the input's (and output's) ``channels``.
        stride: stride of the 1x1 reduction; 2 in the paper's first ResNet stage (covariance at 28x28, not 56x56).
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
        _check_positive(channels=channels, dim=dim, stride=stride, row_expansion=row_expansion)
        self.dim = min(dim, channels)
        self.stride = stride
        # a strided 1x1 conv reads every stride-th position only: attention() subsamples before the ReLU instead
        self.conv_reduce = nn.Conv2d(channels, self.dim, kernel_size=1, **dd)
        self.bn_reduce = norm_layer(self.dim, **dd)
        self.act = act_layer(inplace=True)
        self.gate = CovarianceGate(self.dim, channels, row_expansion=row_expansion, norm_layer=norm_layer, **dd)

    def attention(self, x: Tensor) -> Tensor:
        """Per-channel weights in (0, 1), ``(B, C, 1, 1)``, float32."""
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        y = self.act(self.bn_reduce(self.conv_reduce(F.relu(x))))
        return self.gate(covariance_pool(y))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f'stride={self.stride}'


class PositionGSoP(nn.Module):
    """Position-wise GSoP: weights on a ``pool_size`` grid, resized to the input, then ``ReLU(x * a)``.

    Args:
        dim: channels of the 1x1 reduction (paper: 128; no ReLU after its BN, as released), at most ``channels``.
        pool_size: side of the grid the reduced features are average-pooled to (released: 8, so P = 64).
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
        _check_positive(channels=channels, dim=dim, pool_size=pool_size, row_expansion=row_expansion)
        self.dim = min(dim, channels)
        self.pool_size = pool_size
        positions = pool_size * pool_size
        self.conv_reduce = nn.Conv2d(channels, self.dim, kernel_size=1, **dd)
        self.bn_reduce = norm_layer(self.dim, **dd)
        self.gate = CovarianceGate(
            positions, positions, row_expansion=row_expansion, act_after_row=True, norm_layer=norm_layer, **dd)

    def attention(self, x: Tensor) -> Tensor:
        """Per-position weights in (0, 1), ``(B, 1, H, W)``, float32."""
        y = adaptive_avg_pool(self.bn_reduce(self.conv_reduce(F.relu(x))), self.pool_size, self.pool_size)
        a = self.gate(position_gram(y)).reshape(-1, 1, self.pool_size, self.pool_size)
        return adaptive_avg_pool(a, x.shape[-2], x.shape[-1])  # the released code "unpools" by adaptive pooling

    def forward(self, x: Tensor) -> Tensor:
        y = x * self.attention(x).to(x.dtype)
        # ReLU as torch.where: relu saves its output for backward, which timm's Bottleneck then changes by its
        # in-place residual add (why the released position modes fail to train); and where passes the gradient
        # at exactly 0, so with zero_init_last (x == 0 at init) the branch is not dead forever. Same values.
        return torch.where(y < 0, 0.0, y)


class GSoPFusion(nn.Module):
    """Channel and position GSoP on the same input, fused as released.

    * ``avg``: ``x * a_c + ReLU(x * a_p)`` (a sum, despite the released name ``fusion_avg``);
    * ``max``: the element-wise max of the two;
    * ``concat``: each through its own grouped ``(k x 1)`` conv, summed, then BatchNorm; as released,
      ``groups = C / 64`` and ``k = 2 log2(32 / groups) + 5``.
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
        branch_args = dict(dim=dim, row_expansion=row_expansion, norm_layer=norm_layer, **dd)
        self.channel = ChannelGSoP(channels, stride=stride, act_layer=act_layer, **branch_args)
        self.position = PositionGSoP(channels, pool_size=pool_size, **branch_args)
        if mode == 'concat':
            groups, kernel = _concat_conv_shape(channels)
            conv_args = dict(kernel_size=(kernel, 1), padding=(kernel // 2, 0), groups=groups, **dd)
            self.concat_channel = nn.Conv2d(channels, channels, **conv_args)
            self.concat_position = nn.Conv2d(channels, channels, **conv_args)
            self.concat_bn = norm_layer(channels, **dd)
        else:  # placeholders keep forward scriptable in every mode
            self.concat_channel, self.concat_position, self.concat_bn = nn.Identity(), nn.Identity(), nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x_channel, x_position = self.channel(x), self.position(x)
        if self.mode == 'avg':
            return x_channel + x_position
        if self.mode == 'max':
            return torch.maximum(x_channel, x_position)
        return self.concat_bn(self.concat_channel(x_channel) + self.concat_position(x_position))


def _adaptive_avg_matrix(size_in: int, size_out: int, like: Tensor) -> Tensor:
    """``(size_out, size_in)`` weights whose row i averages the inputs adaptive average pooling averages for output
    i: ``floor(i size_in / size_out)`` up to ``ceil((i + 1) size_in / size_out)``."""
    i = torch.arange(size_out, device=like.device)
    start = torch.div(i * size_in, size_out, rounding_mode='floor')
    end = torch.div((i + 1) * size_in + size_out - 1, size_out, rounding_mode='floor')
    j = torch.arange(size_in, device=like.device)
    weights = ((j >= start[:, None]) & (j < end[:, None])).to(like.dtype)
    return weights / weights.sum(1, keepdim=True)


def adaptive_avg_pool(x: Tensor, height: int, width: int) -> Tensor:
    """``F.adaptive_avg_pool2d(x, (height, width))`` as two averaging matrices (the same averages, to rounding),
    which every exporter knows: TorchScript's ONNX export has no adaptive pooling of a map whose size it traces
    (a dynamic batch) or to a size that is not a factor of the input's."""
    rows = _adaptive_avg_matrix(x.shape[-2], height, x)
    cols = _adaptive_avg_matrix(x.shape[-1], width, x)
    if not torch.jit.is_scripting():
        with autocast_off(x):  # in x's dtype, as adaptive pooling runs under autocast
            return torch.einsum('hi,bcij,wj->bchw', rows, x, cols)
    return torch.einsum('hi,bcij,wj->bchw', rows, x, cols)


def _concat_conv_shape(channels: int) -> Tuple[int, int]:
    groups = max(1, channels // 64)
    if channels % groups:
        raise ValueError(f'fusion_concat needs channels divisible by channels // 64, got {channels}')
    return groups, 2 * int(math.log2(32 / groups)) + 5


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')


def create_gsop(channels: int, manner: str = 'channel', dim: int = 128, stride: int = 1, pool_size: int = 8,
                **kwargs) -> Union[ChannelGSoP, PositionGSoP, GSoPFusion]:
    """A GSoP module from the released manner name (``GSOP_MANNERS``)."""
    if manner == 'channel':
        return ChannelGSoP(channels, dim=dim, stride=stride, **kwargs)
    if manner == 'position':
        return PositionGSoP(channels, dim=dim, pool_size=pool_size, **kwargs)
    if manner in ('fusion_avg', 'fusion_max', 'fusion_concat'):
        return GSoPFusion(channels, mode=manner[len('fusion_'):], dim=dim, stride=stride, pool_size=pool_size, **kwargs)
    raise ValueError(f'Unknown GSoP manner {manner!r}; valid choices: {", ".join(GSOP_MANNERS)}')
