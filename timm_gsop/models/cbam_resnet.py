"""CBAM-ResNet: the CBAM baseline of the GSoP-Net comparison, on timm's own ResNet and CbamModule.

CBAM: "CBAM: Convolutional Block Attention Module", Woo, Park, Lee, Kweon, ECCV 2018 (arXiv:1807.06521).
timm ships the module (``attn_layer='cbam'``) but registers no CBAM ResNet. These are built exactly like
timm's ``seresnet50`` (a plain timm ``ResNet`` with ``block_args=dict(attn_layer=...)``, CBAM in every
bottleneck, on the bottleneck's ``bn3`` output), so the SE and CBAM baselines differ only in the attention
layer; every timm ``ResNet`` kwarg applies, including timm's default ``zero_init_last=True``.

timm's CbamModule: channel attention (shared MLP, reduction 16, no bias, on average- and max-pooled
features, summed, sigmoid) followed by spatial attention (channel mean and max, 7x7 conv + BN, sigmoid).
"""
from typing import Any, Dict, Mapping

import torch
import torch.nn as nn

from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet

from . import gsop_resnet as _gsop_resnet
from ._common import build_gsop_model, gsop_cfg, with_hub_ids

__all__ = ['checkpoint_filter_fn']


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Unwrap a training checkpoint (``state_dict`` / ``model`` entry, ``module.`` prefix) and check that it
    fits the model (raises :class:`~timm_gsop.CheckpointMismatchError` naming mismatching keys)."""
    return _gsop_resnet.checkpoint_filter_fn(state_dict, model)


def _create(variant: str, pretrained: bool = False, **kwargs) -> ResNet:
    return build_gsop_model(ResNet, variant, pretrained, filter_fn=checkpoint_filter_fn, **kwargs)


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
def cbamresnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 with timm's CbamModule in every bottleneck."""
    return _create('cbamresnet50', pretrained, **dict(dict(
        block=Bottleneck, layers=(3, 4, 6, 3), block_args=dict(attn_layer='cbam')), **kwargs))


@register_model
def cbamresnet101(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-101 with timm's CbamModule in every bottleneck."""
    return _create('cbamresnet101', pretrained, **dict(dict(
        block=Bottleneck, layers=(3, 4, 23, 3), block_args=dict(attn_layer='cbam')), **kwargs))
