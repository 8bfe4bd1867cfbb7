"""CBAM-ResNet: the CBAM baseline of the GSoP-Net comparison, on timm's own ResNet and CbamModule.

CBAM: "CBAM: Convolutional Block Attention Module", Woo, Park, Lee, Kweon, ECCV 2018 (arXiv:1807.06521).
timm ships the module (``attn_layer='cbam'``) but registers no CBAM ResNet. These are built exactly like
timm's ``seresnet50`` (a plain timm ``ResNet`` with ``block_args=dict(attn_layer=...)``, CBAM in every
bottleneck, on the bottleneck's ``bn3`` output), so the SE and CBAM baselines differ only in the attention
layer; every timm ``ResNet`` kwarg applies, including timm's default ``zero_init_last=True``.

timm's CbamModule: channel attention (shared MLP, reduction 16, no bias, on average- and max-pooled
features, summed, sigmoid) followed by spatial attention (channel mean and max, 7x7 conv + BN, sigmoid).
"""
from typing import Any, Dict

import torch.nn as nn

from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet

from ._builder import build_gsop_model
from ._cfg import gsop_cfg, with_hub_ids
from ._checkpoint import CheckedLoadMixin
from ._checkpoint import checkpoint_filter_fn as _convert_checkpoint

__all__ = ['CbamResNet', 'checkpoint_filter_fn']


class CbamResNet(CheckedLoadMixin, ResNet):
    """timm's ``ResNet``, unchanged, with this package's checked ``load_state_dict`` (mismatches name the model
    and the keys)."""


def checkpoint_filter_fn(state_dict, model: nn.Module):
    """Unwrap a training checkpoint (``state_dict`` / ``model`` entry, ``module.`` / ``_orig_mod.`` prefixes);
    timm's ResNet names are this model's. Transforms only."""
    return _convert_checkpoint(state_dict, model)


def _create_cbam_resnet(variant: str, pretrained: bool = False, **kwargs) -> CbamResNet:
    return build_gsop_model(CbamResNet, variant, pretrained, filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    # the GSoP-Net training recipe (bilinear, crop 0.875), for a comparison under one recipe
    return gsop_cfg(
        pool_size=(7, 7),
        paper_ids='arXiv:1807.06521',
        paper_name='CBAM: Convolutional Block Attention Module',
        origin_url='https://github.com/huggingface/pytorch-image-models',
        **kwargs)


default_cfgs = generate_default_cfgs(with_hub_ids({
    'cbamresnet50.in1k': _cfg(),
    'cbamresnet101.in1k': _cfg(),
}))


@register_model
def cbamresnet50(pretrained: bool = False, **kwargs) -> CbamResNet:
    """ResNet-50 with timm's CbamModule in every bottleneck."""
    return _create_cbam_resnet('cbamresnet50', pretrained, **dict(dict(
        block=Bottleneck, layers=(3, 4, 6, 3), block_args=dict(attn_layer='cbam')), **kwargs))


@register_model
def cbamresnet101(pretrained: bool = False, **kwargs) -> CbamResNet:
    """ResNet-101 with timm's CbamModule in every bottleneck."""
    return _create_cbam_resnet('cbamresnet101', pretrained, **dict(dict(
        block=Bottleneck, layers=(3, 4, 23, 3), block_args=dict(attn_layer='cbam')), **kwargs))
