"""Pretrained-cfg defaults of the timm-gsop model files, and which of their tags have weights."""
from typing import Any, Dict, Set

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg

__all__ = ['HUB_NAMESPACE', 'PUBLISHED', 'GSOP_PAPER', 'gsop_cfg', 'with_hub_ids', 'has_published_weights']

# Hugging Face Hub organisation the package's own weights are published under ('<namespace>/<model>.<tag>').
HUB_NAMESPACE = 'timm-gsop'

# '<model>.<tag>' names whose weights have been pushed to '<HUB_NAMESPACE>/<model>.<tag>' (add a name here after
# `timm-gsop push`). Only these cfgs get an hf_hub_id, so timm.list_models(pretrained=True) and `timm-gsop list`
# name only weights that exist, and pretrained=True on any other tag fails at once, without a network round trip.
PUBLISHED: Set[str] = set()

GSOP_PAPER = dict(
    paper_ids='arXiv:1811.12006',
    paper_name='Global Second-order Pooling Convolutional Networks',
    origin_url='https://github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks',
)


def gsop_cfg(**kwargs: Any) -> Dict[str, Any]:
    """ImageNet-1k defaults of the released training setup (bilinear, crop_pct 0.875, 14x14 final map)."""
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (14, 14),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'mit',
        **GSOP_PAPER,
        **kwargs,
    }


def with_hub_ids(cfgs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Point each published ``'model.tag'`` cfg (see :data:`PUBLISHED`) at its Hub repo
    ``'<HUB_NAMESPACE>/model.tag'`` (unless the cfg names one itself)."""
    return {name: ({'hf_hub_id': f'{HUB_NAMESPACE}/{name}', **cfg} if name in PUBLISHED else cfg)
            for name, cfg in cfgs.items()}


def has_published_weights(name: str) -> bool:
    """Whether ``pretrained=True`` has weights to load for ``'model.tag'``: a cfg with a Hub repo, a ``url`` or a
    ``file`` (weights published elsewhere, e.g. by a paper's authors)."""
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        return False
    return bool(cfg is not None and cfg.has_weights)
