""" iSQRT-COV global covariance pooling: the head of GSoP-Net2 and of iSQRT-COV networks

"Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square Root
Normalization", Li, Xie, Wang, Gao, CVPR 2018 (arXiv:1712.01034). Code (MIT): https://github.com/jiangtaoxie/fast-MPN-COV
"""
from typing import Tuple, Type

import torch
import torch.nn as nn
from torch import Tensor

from timm.layers import create_classifier

from .second_order import covariance_pool, isqrt, triu_indices_flat, triu_vectorize

__all__ = ['POOL_TYPES', 'ISqrtCovPool', 'create_cov_classifier']

# timm's SelectAdaptivePool2d types ('' is none) and the iSQRT-COV head
POOL_TYPES = ('avg', 'max', 'avgmax', 'catavgmax', 'fast', 'fastavg', 'fastmax', 'fastavgmax', 'fastcatavgmax', '',
              'isqrt')

# leaves for plain torch.fx.symbolic_trace: it patches the names in this module's globals
torch.fx.wrap('covariance_pool')
torch.fx.wrap('isqrt')
torch.fx.wrap('triu_vectorize')


class ISqrtCovPool(nn.Module):
    """Global covariance pooling with iSQRT normalisation, in the place of timm's ``global_pool``.

    ``(B, C, H, W)`` -> 1x1 conv to ``dim`` (no bias) -> BN -> ReLU -> covariance ``(B, dim, dim)`` -> iSQRT
    (``num_iters`` coupled Newton-Schulz steps) -> triangle vector ``(B, dim (dim + 1) / 2)``: 32,896 features at
    ``dim=256``. The second-order part runs in float32; the output has the dtype of the reduced features, which is
    what an autocast caller expects for the classifier that follows.

    Args:
        in_chs: channels of the feature map.
        dim: channels after the 1x1 reduction (iSQRT-COV and GSoP-Net2: 256); ``0``: no reduction.
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
            nn.init.kaiming_normal_(self.conv_reduce.weight, mode='fan_out', nonlinearity='relu')
        else:
            dim = in_chs
            self.conv_reduce, self.bn_reduce, self.act = nn.Identity(), nn.Identity(), nn.Identity()
        self.dim = dim
        self.out_features = dim * (dim + 1) // 2
        # the triangle's flat indices: built once, rebuilt by code that re-initialises buffers (TimmWrapper does)
        self.register_buffer('triu_index', torch.empty(self.out_features, dtype=torch.long, device=device),
                             persistent=False)
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """Fill the triangle index (not saved in a state dict)."""
        with torch.no_grad():
            self.triu_index.copy_(triu_indices_flat(self.dim, self.triu_index.device))

    def is_identity(self) -> bool:
        return False

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.bn_reduce(self.conv_reduce(x)))
        root = isqrt(covariance_pool(y), self.num_iters)
        return triu_vectorize(root, self.triu_index).to(y.dtype)

    def extra_repr(self) -> str:
        return f'in_chs={self.in_chs}, dim={self.dim}, num_iters={self.num_iters}'


def create_cov_classifier(
        num_features: int,
        num_classes: int,
        pool_type: str = 'isqrt',
        isqrt_dim: int = 256,
        isqrt_iters: int = 3,
        device=None,
        dtype=None,
) -> Tuple[nn.Module, nn.Module, int]:
    """timm's ``create_classifier`` with one more ``pool_type``, ``'isqrt'`` (an :class:`ISqrtCovPool` head).

    Returns ``(global_pool, fc, pooled_features)``.
    """
    dd = {'device': device, 'dtype': dtype}
    if pool_type not in POOL_TYPES:  # timm asserts; say what is valid
        raise ValueError(f'Unknown global_pool {pool_type!r}; valid choices: {", ".join(map(repr, POOL_TYPES))}')
    if pool_type != 'isqrt':
        global_pool, fc = create_classifier(num_features, num_classes, pool_type=pool_type, **dd)
        return global_pool, fc, num_features * global_pool.feat_mult()
    global_pool = ISqrtCovPool(num_features, dim=isqrt_dim, num_iters=isqrt_iters, **dd)
    fc = nn.Linear(global_pool.out_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
    return global_pool, fc, global_pool.out_features
