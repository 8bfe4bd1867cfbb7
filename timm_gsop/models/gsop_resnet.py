"""GSoP-Net: Global Second-order Pooling Convolutional Networks (ResNet backbones).

Paper: "Global Second-order Pooling Convolutional Networks", Zilin Gao, Jiangtao Xie, Qilong Wang,
Peihua Li, CVPR 2019 (arXiv:1811.12006). Released code (MIT):
https://github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks

* GSoP-Net1 (``gsop_resnet*``): a GSoP block in the last bottleneck of each of the four stages, global
  average pooling, linear classifier.
* GSoP-Net2 (``gsop2_resnet*``): GSoP blocks in stages 1-3 only, and an iSQRT-COV head (1x1 conv to 256,
  covariance, 3 Newton-Schulz iterations, 32,896-d triangle vector) before the classifier.

Both use a torchvision-style ResNet whose last stage has stride 1 *without* dilation (14x14 final map
at 224x224), as released. timm's ``output_stride=16`` dilates that stage instead: a different network.

The backbone is timm's own ``ResNet``/``Bottleneck``; the GSoP module sits in the bottleneck's attention
slot (``block.se``), which is applied to the ``bn3`` output before the residual add, exactly where the
released code applies it.
"""
from typing import Any, Optional, Sequence, Tuple

import torch.nn as nn

from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..layers.gsop import GSOP_MANNERS, create_gsop
from ._blocks import GSoPBottleneck, set_fused
from ._builder import build_gsop_model
from ._cfg import gsop_cfg, with_hub_ids
from ._checkpoint import CheckedLoadMixin, CheckpointMismatchError
from ._checkpoint import checkpoint_filter_fn as _convert_checkpoint
from ._mixins import POOL_TYPES, InputCheckMixin, SecondOrderHeadMixin, apply_bn_overrides, check_choice, \
    check_pool_type, init_like_resnet

__all__ = ['GSoPResNet', 'checkpoint_filter_fn', 'CheckpointMismatchError', 'POOL_TYPES', 'block_out_channels']


class GSoPResNet(CheckedLoadMixin, InputCheckMixin, SecondOrderHeadMixin, ResNet):
    """timm ``ResNet`` with GSoP blocks, a stride-1 last stage and an optional iSQRT-COV head.

    Every timm ``ResNet`` argument is accepted (``block``, ``layers``, ``drop_rate``, ``drop_path_rate``,
    ``drop_block_rate``, ``in_chans``, ``block_args`` ...). With timm's ``BasicBlock`` the GSoP module reads the
    block's last BN (``bn2``), as it reads ``bn3`` in a bottleneck. GSoP-specific arguments:

    Args:
        gsop_manner: GSoP block type, the released code's names: 'channel' (default), 'position',
            'fusion_avg', 'fusion_max', 'fusion_concat'.
        gsop_dim: reduced dimension d of the GSoP blocks (paper: 128).
        gsop_stages: per stage, whether its last block gets a GSoP module (Net1: all four, Net2: 1-3).
        gsop_pool_size: side of the position branch's grid (released: 8).
        global_pool: 'isqrt' for the iSQRT-COV head, a timm pool type ('avg', ...), or '' for none.
        isqrt_dim: channels of the iSQRT-COV head's 1x1 reduction (256 -> 32,896 features).
        isqrt_iters: Newton-Schulz iterations of the iSQRT-COV head (GSoP-Net2: 3).
        last_stride: stride of the last stage (released: 1, without dilation; 2 gives the usual ResNet).
        bn_momentum, bn_eps: override every BatchNorm's momentum / eps (timm train.py's --bn-momentum ...).
        zero_init_last: zero-init each bottleneck's last BN. Off by default: the released code does not,
            and it would start every GSoP block on an all-zero input.
        gsop_fused: let :class:`GSoPBottleneck` blocks take their cheaper route where it changes nothing
            observable (training keeps no copy of ``bn3``'s output; inference adds in place). False: timm's
            plain ``Bottleneck`` order everywhere.
    """
    min_input_size: int = 32  # the final map is then 2x2 (stride 16)

    def __init__(
            self,
            block: type = Bottleneck,
            layers: Tuple[int, ...] = (3, 4, 6, 3),
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            gsop_manner: str = 'channel',
            gsop_dim: int = 128,
            gsop_stages: Sequence[bool] = (True, True, True, True),
            gsop_pool_size: int = 8,
            isqrt_dim: int = 256,
            isqrt_iters: int = 3,
            last_stride: int = 1,
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            zero_init_last: bool = False,
            gsop_fused: bool = True,
            device=None,
            dtype=None,
            **kwargs: Any,
    ) -> None:
        check_choice('gsop_manner', gsop_manner, GSOP_MANNERS)
        check_pool_type(global_pool)
        if last_stride not in (1, 2):
            raise ValueError(f'last_stride must be 1 or 2, got {last_stride!r}')
        if len(gsop_stages) != len(layers):
            raise ValueError(f'gsop_stages needs one flag per stage ({len(layers)}), got {tuple(gsop_stages)}')
        dd = {'device': device, 'dtype': dtype}
        # build with a parameter-free head first; the real one (maybe iSQRT-COV) is made by _create_head
        super().__init__(
            block=block, layers=layers, num_classes=0, in_chans=in_chans, global_pool='avg',
            zero_init_last=zero_init_last,
            **kwargs, **dd)
        self.in_chans = in_chans
        self.gsop_manner = gsop_manner
        self.gsop_dim = gsop_dim
        self.gsop_stages = tuple(bool(s) for s in gsop_stages)
        self.isqrt_dim = isqrt_dim
        self.isqrt_iters = isqrt_iters

        stages = [getattr(self, f'layer{i + 1}') for i in range(len(layers))]
        if last_stride == 1:
            _remove_stage_stride(stages[-1])
            self.feature_info[-1]['reduction'] = self.feature_info[-2]['reduction']

        for stage_idx, (stage, enabled) in enumerate(zip(stages, self.gsop_stages)):
            if not enabled:
                continue
            last_block = stage[-1]
            gsop = create_gsop(
                block_out_channels(last_block),
                manner=gsop_manner,
                dim=gsop_dim,
                # released code: stride 2 in the first stage, so its covariance is taken at 28x28
                stride=2 if stage_idx == 0 else 1,
                pool_size=gsop_pool_size,
                **dd,
            )
            init_like_resnet(gsop)
            last_block.se = gsop

        self._create_head(num_classes, global_pool)
        apply_bn_overrides(self, bn_momentum, bn_eps)
        set_fused(self, gsop_fused)


def block_out_channels(block: nn.Module) -> int:
    """Output channels of a timm ResNet block (what its attention slot ``se`` sees: bn3's or, in a
    ``BasicBlock``, bn2's output)."""
    if isinstance(block, Bottleneck):
        return block.bn3.num_features
    if isinstance(block, BasicBlock):
        return block.bn2.num_features
    raise ValueError(f'GSoP blocks need timm Bottleneck or BasicBlock blocks, got {type(block).__name__}')


def _remove_stage_stride(stage: nn.Sequential) -> None:
    """Make a timm ResNet stage stride 1 without dilation (released GSoP / iSQRT-COV layer4)."""
    first = stage[0]
    strided = first.conv1 if isinstance(first, BasicBlock) else first.conv2
    strided.stride = (1, 1)
    first.stride = 1
    if isinstance(first.aa, nn.Module) and not isinstance(first.aa, nn.Identity):
        first.aa = nn.Identity()
    down = first.downsample
    if down is not None:
        for i, m in enumerate(down):
            if isinstance(m, (nn.AvgPool2d,)) or type(m).__name__ == 'AvgPool2dSame':
                down[i] = nn.Identity()  # avg_down variants: the pool is the stride
            elif isinstance(m, nn.Conv2d):
                m.stride = (1, 1)


def checkpoint_filter_fn(state_dict, model: nn.Module):
    """Convert a checkpoint to this model's names: this package's / timm's / torchvision's layout, the released
    GSoP-Net code's (``main.py``'s ``model_best.pth.tar`` or a bare state dict) or fast-MPN-COV's (classifier
    columns reordered). Transforms only; ``pretrained_strict`` decides about missing tensors (``_checkpoint``)."""
    return _convert_checkpoint(state_dict, model)


# ---- builders and registrations ------------------------------------------------------------------------

def _create_gsop_resnet(variant: str, pretrained: bool = False, **kwargs) -> GSoPResNet:
    return build_gsop_model(GSoPResNet, variant, pretrained, filter_fn=checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs(with_hub_ids({
    'gsop_resnet50.in1k': gsop_cfg(),
    'gsop_resnet101.in1k': gsop_cfg(),
    'gsop2_resnet50.in1k': gsop_cfg(),
    'gsop2_resnet101.in1k': gsop_cfg(),
}))

_NET1 = dict(block=GSoPBottleneck, gsop_stages=(True, True, True, True), global_pool='avg')
_NET2 = dict(block=GSoPBottleneck, gsop_stages=(True, True, True, False), global_pool='isqrt', isqrt_dim=256, isqrt_iters=3)


@register_model
def gsop_resnet50(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net1, ResNet-50: GSoP in the last block of all 4 stages, average pooling."""
    return _create_gsop_resnet('gsop_resnet50', pretrained, **dict(dict(_NET1, layers=(3, 4, 6, 3)), **kwargs))


@register_model
def gsop_resnet101(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net1, ResNet-101: GSoP in the last block of all 4 stages, average pooling."""
    return _create_gsop_resnet('gsop_resnet101', pretrained, **dict(dict(_NET1, layers=(3, 4, 23, 3)), **kwargs))


@register_model
def gsop2_resnet50(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net2, ResNet-50: GSoP in stages 1-3, iSQRT-COV head (256-d, 3 iterations)."""
    return _create_gsop_resnet('gsop2_resnet50', pretrained, **dict(dict(_NET2, layers=(3, 4, 6, 3)), **kwargs))


@register_model
def gsop2_resnet101(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net2, ResNet-101: GSoP in stages 1-3, iSQRT-COV head (256-d, 3 iterations)."""
    return _create_gsop_resnet('gsop2_resnet101', pretrained, **dict(dict(_NET2, layers=(3, 4, 23, 3)), **kwargs))
