"""GSoP as a timm attention layer: SE-ResNet-style GSoP networks on timm's standard ResNet.

Paper: "Global Second-order Pooling Convolutional Networks", Zilin Gao, Jiangtao Xie, Qilong Wang,
Peihua Li, CVPR 2019 (arXiv:1811.12006).

The GSoP modules of ``timm_gsop.layers`` take the channel count as their first argument and
``device`` / ``dtype`` keywords, which is how timm's ``BasicBlock`` and ``Bottleneck`` build their
attention layer (``create_attn(attn_layer, channels, device=..., dtype=...)``). So any timm ResNet takes
them directly::

    from functools import partial
    from timm_gsop import create_gsop
    timm.create_model('resnet50', block_args=dict(attn_layer=create_gsop))          # channel GSoP, d = 128
    timm.create_model('resnet18', block_args=dict(attn_layer=partial(create_gsop, manner='position')))

The module lands in each block's ``se`` slot, i.e. on the last BN output before the residual add, where
GSoP-Net puts it. The reduced dimension is ``d = min(dim, channels)``: a GSoP block never expands. In a
64-channel block (resnet18/34 stage 1) that makes the "reduction" a full-rank 64 -> 64 1x1 conv + BN +
ReLU, so the 64 x 64 covariance is still taken over a learned non-negative re-projection of the block
output; every wider block gets the paper's d = 128.

The registered ``gsopresnet*`` models are that construction with GSoP in *every* residual block, like
timm's ``seresnet*`` (standard stride-32 ResNet, 7x7 final map at 224), plus two choices the paper makes
for its own placement:

* the first stage's GSoP reduces with stride 2 (``gsop_stage1_stride``; released code: the 56x56 stage-1
  covariance is taken at 28x28), so these models differ from the plain ``attn_layer`` construction there;
* ``gsop_placement='last'`` puts GSoP only in the last block of each stage, as GSoP-Net does (here on the
  stride-32 backbone; ``gsop_resnet*`` is the paper's stride-16 network).

SE-ResNet is timm's own ``seresnet50``; the CBAM and iSQRT-COV baselines are ``cbamresnet*`` and
``isqrt_resnet*`` in this package.
"""
from typing import Any, Dict, Optional, Tuple

import torch.nn as nn

from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..layers.gsop import GSOP_MANNERS, create_gsop
from ._blocks import GSoPBottleneck, set_fused
from ._builder import build_gsop_model
from ._cfg import gsop_cfg, with_hub_ids
from ._checkpoint import CheckedLoadMixin
from ._checkpoint import checkpoint_filter_fn as _convert_checkpoint
from ._mixins import InputCheckMixin, apply_bn_overrides, check_choice, init_like_resnet
from .gsop_resnet import block_out_channels

__all__ = ['GSoPAttnResNet', 'GSOP_PLACEMENTS', 'checkpoint_filter_fn']

# 'all': every residual block (SE-ResNet style); 'last': only the last block of each stage (GSoP-Net)
GSOP_PLACEMENTS = ('all', 'last')


class GSoPAttnResNet(CheckedLoadMixin, InputCheckMixin, ResNet):
    """timm ``ResNet`` (any block, stem or ResNeXt width) with a GSoP module in its residual blocks.

    Every timm ``ResNet`` argument is accepted (``stem_type``, ``avg_down``, ``cardinality``, ``drop_rate``,
    ``drop_path_rate`` ...). GSoP-specific arguments:

    Args:
        gsop_manner: 'channel' (default), 'position', 'fusion_avg', 'fusion_max', 'fusion_concat'.
        gsop_dim: reduced dimension d (paper: 128), clamped to each block's channels.
        gsop_placement: 'all' (every residual block, like SE-ResNet; default) or 'last' (last block of
            each stage, the paper's placement).
        gsop_stage1_stride: stride of the first stage's GSoP reduction (released: 2). 1 keeps the full map.
        gsop_pool_size: side of the position branch's grid (released: 8).
        bn_momentum, bn_eps: override every BatchNorm's momentum / eps (timm train.py's --bn-momentum ...).
        zero_init_last: zero-init each block's last BN. Off by default, as in the rest of this package and
            the released code (on, every GSoP block starts on an all-zero input and gets no gradient until
            that BN moves).
        gsop_fused: let :class:`GSoPBottleneck` blocks take their cheaper route (see ``GSoPResNet``).
    """

    def __init__(
            self,
            block: type = Bottleneck,
            layers: Tuple[int, ...] = (3, 4, 6, 3),
            gsop_manner: str = 'channel',
            gsop_dim: int = 128,
            gsop_placement: str = 'all',
            gsop_stage1_stride: int = 2,
            gsop_pool_size: int = 8,
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            zero_init_last: bool = False,
            gsop_fused: bool = True,
            device=None,
            dtype=None,
            **kwargs: Any,
    ) -> None:
        check_choice('gsop_manner', gsop_manner, GSOP_MANNERS)
        check_choice('gsop_placement', gsop_placement, GSOP_PLACEMENTS)
        if gsop_stage1_stride not in (1, 2):
            raise ValueError(f'gsop_stage1_stride must be 1 or 2, got {gsop_stage1_stride!r}')
        block_args = kwargs.get('block_args') or {}
        if block_args.get('attn_layer') is not None:
            raise ValueError(
                'GSoPAttnResNet places its own GSoP modules; for another attention layer use timm.create_model('
                "'resnet50', block_args=dict(attn_layer=...))")
        dd = {'device': device, 'dtype': dtype}
        super().__init__(block=block, layers=layers, zero_init_last=zero_init_last, **kwargs, **dd)
        self.gsop_manner = gsop_manner
        self.gsop_dim = gsop_dim
        self.gsop_placement = gsop_placement

        for stage_idx in range(len(layers)):
            stage = getattr(self, f'layer{stage_idx + 1}')
            blocks = list(stage) if gsop_placement == 'all' else [stage[-1]]
            for blk in blocks:
                gsop = create_gsop(
                    block_out_channels(blk), manner=gsop_manner, dim=gsop_dim, pool_size=gsop_pool_size,
                    stride=gsop_stage1_stride if stage_idx == 0 else 1, **dd)
                init_like_resnet(gsop)
                blk.se = gsop
        apply_bn_overrides(self, bn_momentum, bn_eps)
        set_fused(self, gsop_fused)


def checkpoint_filter_fn(state_dict, model: nn.Module):
    """Convert a checkpoint (this package's, timm's / torchvision's ResNet names, the released GSoP code's) to
    this model's names. Transforms only; ``pretrained_strict`` decides about missing tensors."""
    return _convert_checkpoint(state_dict, model)


def _create_gsop_attn_resnet(variant: str, pretrained: bool = False, **kwargs) -> GSoPAttnResNet:
    return build_gsop_model(GSoPAttnResNet, variant, pretrained, filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    # the released training recipe (bilinear, crop 0.875); standard stride-32 ResNet: 7x7 final map
    return gsop_cfg(pool_size=(7, 7), **kwargs)


default_cfgs = generate_default_cfgs(with_hub_ids({
    'gsopresnet18.in1k': _cfg(),
    'gsopresnet34.in1k': _cfg(),
    'gsopresnet50.in1k': _cfg(),
    'gsopresnet101.in1k': _cfg(),
    'gsopresnet50d.in1k': _cfg(first_conv='conv1.0'),
    'gsopresnext50_32x4d.in1k': _cfg(),
}))


@register_model
def gsopresnet18(pretrained: bool = False, **kwargs) -> GSoPAttnResNet:
    """ResNet-18 with GSoP in every basic block (d = 64 in the 64-channel stage)."""
    return _create_gsop_attn_resnet(
        'gsopresnet18', pretrained, **dict(dict(block=BasicBlock, layers=(2, 2, 2, 2)), **kwargs))


@register_model
def gsopresnet34(pretrained: bool = False, **kwargs) -> GSoPAttnResNet:
    """ResNet-34 with GSoP in every basic block (d = 64 in the 64-channel stage)."""
    return _create_gsop_attn_resnet(
        'gsopresnet34', pretrained, **dict(dict(block=BasicBlock, layers=(3, 4, 6, 3)), **kwargs))


@register_model
def gsopresnet50(pretrained: bool = False, **kwargs) -> GSoPAttnResNet:
    """ResNet-50 with GSoP in every bottleneck (as SE-ResNet-50)."""
    return _create_gsop_attn_resnet(
        'gsopresnet50', pretrained, **dict(dict(block=GSoPBottleneck, layers=(3, 4, 6, 3)), **kwargs))


@register_model
def gsopresnet101(pretrained: bool = False, **kwargs) -> GSoPAttnResNet:
    """ResNet-101 with GSoP in every bottleneck."""
    return _create_gsop_attn_resnet(
        'gsopresnet101', pretrained, **dict(dict(block=GSoPBottleneck, layers=(3, 4, 23, 3)), **kwargs))


@register_model
def gsopresnet50d(pretrained: bool = False, **kwargs) -> GSoPAttnResNet:
    """ResNet-50-D (deep stem, average-pool downsample) with GSoP in every bottleneck."""
    return _create_gsop_attn_resnet('gsopresnet50d', pretrained, **dict(dict(
        block=GSoPBottleneck, layers=(3, 4, 6, 3), stem_width=32, stem_type='deep', avg_down=True), **kwargs))


@register_model
def gsopresnext50_32x4d(pretrained: bool = False, **kwargs) -> GSoPAttnResNet:
    """ResNeXt-50 32x4d with GSoP in every bottleneck."""
    return _create_gsop_attn_resnet('gsopresnext50_32x4d', pretrained, **dict(dict(
        block=GSoPBottleneck, layers=(3, 4, 6, 3), cardinality=32, base_width=4), **kwargs))
