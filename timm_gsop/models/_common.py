"""Pieces shared by the timm-gsop model files: pretrained-cfg defaults and the builder wrapper."""
from typing import Any, Callable, Dict, Optional, Type

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg

__all__ = ['HUB_NAMESPACE', 'CheckpointMismatchError', 'gsop_cfg', 'with_hub_ids', 'build_gsop_model']

# Hugging Face Hub organisation the pretrained cfgs point at (repo ids are '<namespace>/<model>.<tag>').
HUB_NAMESPACE = 'timm-gsop'

GSOP_PAPER = dict(
    paper_ids='arXiv:1811.12006',
    paper_name='Global Second-order Pooling Convolutional Networks',
    origin_url='https://github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks',
)


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


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
    """Point each ``'model.tag'`` cfg at its Hub repo ``'<HUB_NAMESPACE>/model.tag'`` (unless set)."""
    return {name: {'hf_hub_id': f'{HUB_NAMESPACE}/{name}', **cfg} for name, cfg in cfgs.items()}


def build_gsop_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool,
        filter_fn: Optional[Callable] = None,
        **kwargs: Any,
) -> nn.Module:
    """timm's ``build_model_with_cfg`` with load failures reported against the model and the source."""
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
    except CheckpointMismatchError:
        raise
    except (RuntimeError, EOFError, OSError) as e:
        if not pretrained:
            raise
        overlay = kwargs.get('pretrained_cfg_overlay') or {}
        source = overlay.get('file') or overlay.get('hf_hub_id') or 'its pretrained_cfg'
        raise RuntimeError(
            f'Could not load pretrained weights for {variant} from {source}: {e}. '
            'The file may be truncated, or not a PyTorch / safetensors checkpoint.') from e
