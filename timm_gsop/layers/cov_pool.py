""" Global covariance pooling heads: iSQRT-COV (of GSoP-Net2 and iSQRT-COV networks) and plain covariance pooling

"Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square Root Normalization",
Li, Xie, Wang, Gao, CVPR 2018 (arXiv:1712.01034). Code (MIT): https://github.com/jiangtaoxie/fast-MPN-COV
"""
from typing import Optional, Tuple, Type

import torch
import torch.nn as nn
from torch import Tensor

from timm.layers import create_classifier, get_device_dtype, register_notrace_function

from .second_order import covariance_pool, isqrt, triu_indices_flat, triu_vectorize

__all__ = ['POOL_TYPES', 'COV_POOL_TYPES', 'CovPool', 'ISqrtCovPool', 'create_cov_classifier', 'reset_cov_classifier']

# timm's SelectAdaptivePool2d types ('' is none), the iSQRT-COV head and plain covariance pooling
COV_POOL_TYPES = ('isqrt', 'cov')
POOL_TYPES = ('avg', 'max', 'avgmax', 'catavgmax', 'fast', 'fastavg', 'fastmax', 'fastavgmax', 'fastcatavgmax', '',
              *COV_POOL_TYPES)

# leaves for plain torch.fx.symbolic_trace: it patches the names in this module's globals
torch.fx.wrap('covariance_pool')
torch.fx.wrap('isqrt')
torch.fx.wrap('triu_vectorize')


@register_notrace_function  # a leaf for fx tracing: the check reads the shape
def check_positions(x: Tensor) -> Tensor:
    """``x``, after a ValueError if its map has one position, whose covariance is zero: a silent zero output and
    no gradient (a jit trace records shapes as constants: no check there)."""
    if not torch.jit.is_tracing() and x.shape[-1] * x.shape[-2] < 2:
        raise ValueError(f'covariance pooling needs a map of more than one position, got {list(x.shape)}')
    return x


torch.fx.wrap('check_positions')


class CovPool(nn.Module):
    """Global covariance pooling in the place of timm's ``global_pool``, without normalisation.

    ``(B, C, H, W)`` -> 1x1 conv to ``dim`` (no bias; ``0``: no reduction) -> BN -> ReLU -> covariance
    ``(B, dim, dim)`` -> triangle vector ``(B, dim (dim + 1) / 2)``. The covariance runs in float32; the output has
    the dtype of the reduced features, which is what an autocast caller expects for the classifier that follows.
    """
    pool_type: str = 'cov'

    def __init__(
            self,
            in_chs: int,
            dim: int = 256,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if not isinstance(dim, int) or dim < 0:
            raise ValueError(f'isqrt_dim must be a non-negative integer (0: no reduction), got {dim!r}')
        self.in_chs = in_chs
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

    def normalize(self, cov: Tensor) -> Tensor:
        return cov

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.bn_reduce(self.conv_reduce(check_positions(x))))
        return triu_vectorize(self.normalize(covariance_pool(y)), self.triu_index).to(y.dtype)

    def extra_repr(self) -> str:
        return f'in_chs={self.in_chs}, dim={self.dim}'


class ISqrtCovPool(CovPool):
    """:class:`CovPool` with iSQRT normalisation: the covariance's matrix square root by ``num_iters`` coupled
    Newton-Schulz steps (GSoP-Net2: 3, iSQRT-COV: 5) before the triangle vector (32,896 features at ``dim=256``, the
    reduction of iSQRT-COV and GSoP-Net2), in float32."""
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
        if not isinstance(num_iters, int) or num_iters < 1:
            raise ValueError(f'isqrt_iters must be a positive integer, got {num_iters!r}')
        super().__init__(in_chs, dim=dim, act_layer=act_layer, norm_layer=norm_layer, device=device, dtype=dtype)
        self.num_iters = num_iters

    def normalize(self, cov: Tensor) -> Tensor:
        return isqrt(cov, self.num_iters)

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
    """timm's ``create_classifier`` with two more ``pool_type``: ``'isqrt'`` (:class:`ISqrtCovPool`) and ``'cov'``
    (:class:`CovPool`), heads reducing to ``isqrt_dim``. Returns ``(global_pool, fc, pooled_features)``."""
    dd = {'device': device, 'dtype': dtype}
    if pool_type not in POOL_TYPES:  # timm asserts; say what is valid
        raise ValueError(f'Unknown global_pool {pool_type!r}; valid choices: {", ".join(map(repr, POOL_TYPES))}')
    if pool_type not in COV_POOL_TYPES:
        global_pool, fc = create_classifier(num_features, num_classes, pool_type=pool_type, **dd)
        return global_pool, fc, num_features * global_pool.feat_mult()
    if pool_type == 'isqrt':
        global_pool = ISqrtCovPool(num_features, dim=isqrt_dim, num_iters=isqrt_iters, **dd)
    else:
        global_pool = CovPool(num_features, dim=isqrt_dim, **dd)
    fc = nn.Linear(global_pool.out_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
    return global_pool, fc, global_pool.out_features


def reset_cov_classifier(model: nn.Module, num_classes: int, global_pool: Optional[str] = None) -> None:
    """``reset_classifier`` of a model with ``num_features``, ``global_pool``, ``fc``, ``isqrt_dim`` and
    ``isqrt_iters``: a new ``fc``, and a new pooling unless it stays the same (maybe trained) covariance head."""
    if global_pool is None:
        global_pool = model.global_pool.pool_type
    model.num_classes = num_classes
    pool, model.fc, model.head_hidden_size = create_cov_classifier(
        model.num_features, num_classes, global_pool, model.isqrt_dim, model.isqrt_iters, **get_device_dtype(model))
    if not (isinstance(model.global_pool, CovPool) and global_pool == model.global_pool.pool_type):
        model.global_pool = pool
    model.global_pool.train(model.training)
    model.fc.train(model.training)
