"""Pieces the model classes share: input checks, the head that may be iSQRT-COV, option checks."""
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import create_classifier

from ..layers.cov_pool import ISqrtCovPool
from ..layers.second_order import skip_checks

__all__ = [
    'POOL_TYPES', 'check_choice', 'check_pool_type', 'init_like_resnet', 'apply_bn_overrides', 'check_input', 'check_head',
    'InputCheckMixin', 'SecondOrderHeadMixin',
]

# Pool types accepted as ``global_pool``: timm's adaptive pools, the iSQRT-COV head, or '' (none).
POOL_TYPES = ('avg', 'max', 'avgmax', 'catavgmax', 'fast', 'isqrt', '')


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """ValueError naming the bad value and the valid choices."""
    if value not in choices:
        raise ValueError(f'Unknown {name} {value!r}; valid choices: {", ".join(map(str, choices))}')


def check_pool_type(pool_type: str) -> None:
    if pool_type not in POOL_TYPES:
        raise ValueError(f'Unknown global_pool {pool_type!r}; valid choices: {", ".join(map(repr, POOL_TYPES))}')


def init_like_resnet(module: nn.Module) -> None:
    """The released code's (and timm ResNet's) init, for modules added after the network was built."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def apply_bn_overrides(model: nn.Module, bn_momentum: Optional[float], bn_eps: Optional[float]) -> None:
    """timm train.py's ``--bn-momentum`` / ``--bn-eps``: override every BatchNorm of the model."""
    if bn_momentum is None and bn_eps is None:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = m.momentum if bn_momentum is None else bn_momentum
            m.eps = m.eps if bn_eps is None else bn_eps


def check_input(model: nn.Module, x: torch.Tensor) -> None:
    """ValueError naming the expected shape for non-4-D input, a wrong channel count or a too small image."""
    if skip_checks(x):
        return
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    in_chans, min_size = model.in_chans, model.min_input_size
    expected = f'(B, {in_chans}, H, W) with H, W >= {min_size}'
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'{name} expects a tensor {expected}, got {type(x).__name__}')
    if x.dim() != 4:
        raise ValueError(f'{name} expects a 4-D input {expected}, got shape {tuple(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(
            f'{name} expects {in_chans} input channels {expected}, got shape {tuple(x.shape)} '
            f'(create the model with in_chans={x.shape[1]} for other channel counts)')
    if x.shape[-2] < min_size or x.shape[-1] < min_size:
        raise ValueError(f'{name} input is too small: expected {expected}, got shape {tuple(x.shape)}')


def check_head(model: nn.Module) -> None:
    """ValueError if the model has a classifier but no pooling (``global_pool=''``): the classifier would be
    applied to a 4-D feature map."""
    pool = getattr(model, 'global_pool', None)
    if isinstance(getattr(model, 'fc', None), nn.Linear) and getattr(pool, 'pool_type', None) == '':
        raise ValueError(
            f"{type(model).__name__} has global_pool='' (no pooling) and a {model.fc.out_features}-class classifier, "
            "which cannot take the unpooled 4-D feature map: use reset_classifier(num_classes, global_pool='avg') "
            "(or 'isqrt'), or num_classes=0 for the feature map itself.")


class InputCheckMixin:
    """Checks the input of ``forward`` / ``forward_intermediates`` before any compute (see ``check_input``).

    The host sets ``in_chans`` and ``min_input_size`` and has timm's ``forward_features`` / ``forward_head``.
    """
    in_chans: int
    min_input_size: int = 32

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        check_input(self, x)
        return super().forward_intermediates(x, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_input(self, x)
            check_head(self)
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


class SecondOrderHeadMixin:
    """Head of a network whose ``global_pool`` may be the iSQRT-COV head (``'isqrt'``), a timm pool, or ''.

    The host sets ``num_features``, ``isqrt_dim`` and ``isqrt_iters`` and has parameters before
    ``_create_head`` is called; it uses ``global_pool`` / ``fc`` as timm models do.
    """
    num_features: int
    isqrt_dim: int
    isqrt_iters: int

    def _create_head(self, num_classes: int, global_pool: str, keep_pool: bool = False) -> None:
        p = next(self.parameters())
        dd = {'device': p.device, 'dtype': p.dtype}
        self.num_classes = num_classes
        if global_pool == 'isqrt':
            if not (keep_pool and isinstance(self.global_pool, ISqrtCovPool)):
                self.global_pool = ISqrtCovPool(
                    self.num_features, dim=self.isqrt_dim, num_iters=self.isqrt_iters, **dd)
                init_like_resnet(self.global_pool)
            pooled = self.global_pool.out_features
            self.fc = nn.Linear(pooled, num_classes, **dd) if num_classes > 0 else nn.Identity()
        else:
            # global_pool='' with a classifier is accepted as timm's ResNet accepts it (reset_classifier(0, '')
            # then reset_classifier(2) must work); forward names the problem if it is run that way
            self.global_pool, self.fc = create_classifier(
                self.num_features, num_classes, pool_type=global_pool, **dd)
            pooled = self.num_features * self.global_pool.feat_mult() if global_pool else self.num_features
        self.head_hidden_size = pooled

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier; keeps the pooling (and a trained iSQRT-COV head) when ``global_pool``
        is None or unchanged."""
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        check_pool_type(global_pool)
        self._create_head(num_classes, global_pool, keep_pool=True)
        self.global_pool.train(self.training)
        self.fc.train(self.training)
