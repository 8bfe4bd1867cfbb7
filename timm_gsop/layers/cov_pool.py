"""iSQRT-COV global pooling: the covariance head of GSoP-Net2 and iSQRT-COV networks."""
from typing import Type

import torch.nn as nn
from torch import Tensor

from . import second_order

__all__ = ['ISqrtCovPool']


class ISqrtCovPool(nn.Module):
    """Global covariance pooling with iSQRT normalisation, a drop-in for timm's ``global_pool``.

    ``(B, C, H, W)`` -> 1x1 conv to ``dim`` (no bias) -> BN -> ReLU -> covariance ``(B, dim, dim)`` ->
    iSQRT (``num_iters`` coupled Newton-Schulz steps) -> triangle vector ``(B, dim (dim + 1) / 2)``.
    With ``dim=256`` that is 32,896 features. The second-order part runs in float32 (see
    ``second_order``); the output is cast back to the dtype of the reduced features, which is what an
    autocast caller expects for the classifier that follows.

    Args:
        in_chs: channels of the feature map.
        dim: channels after the 1x1 reduction (iSQRT-COV / GSoP-Net2: 256); ``0`` skips the reduction.
        num_iters: Newton-Schulz iterations (GSoP-Net2: 3, iSQRT-COV: 5).
    """
    pool_type: str = 'isqrt'

    def __init__(
            self,
            in_chs: int,
            dim: int = 256,
            num_iters: int = 3,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if not isinstance(num_iters, int) or num_iters < 1:
            raise ValueError(f'isqrt_iters must be a positive integer, got {num_iters!r}')
        if not isinstance(dim, int) or dim < 0:
            raise ValueError(f'isqrt_dim must be a non-negative integer (0: no reduction), got {dim!r}')
        self.in_chs = in_chs
        self.num_iters = num_iters
        if dim:
            self.conv_reduce = nn.Conv2d(in_chs, dim, kernel_size=1, bias=False, **dd)
            self.bn_reduce = norm_layer(dim, **dd)
            self.act = act_layer(inplace=True)
        else:
            dim = in_chs
            self.conv_reduce = nn.Identity()
            self.bn_reduce = nn.Identity()
            self.act = nn.Identity()
        self.dim = dim
        self.out_features = dim * (dim + 1) // 2

    def is_identity(self) -> bool:
        return False

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.bn_reduce(self.conv_reduce(x)))
        cov = second_order.covariance_pool(y)
        root = second_order.isqrt(cov, self.num_iters)
        return second_order.triu_vectorize(root).to(y.dtype)

    def extra_repr(self) -> str:
        return f'in_chs={self.in_chs}, dim={self.dim}, num_iters={self.num_iters}'
