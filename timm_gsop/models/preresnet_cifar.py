"""Pre-activation ResNet-164 for CIFAR, plain and with GSoP (the paper's CIFAR-100 rows).

Backbone: "Identity Mappings in Deep Residual Networks", He, Zhang, Ren, Sun, ECCV 2016 (arXiv:1603.05027):
3x3 stem conv (16 channels, no BN/ReLU, no max-pool), three stages of 18 pre-activation bottlenecks (widths
16/32/64, outputs 64/128/256, strides 1/2/2), final BN-ReLU, global average pooling, classifier; 8x8 final map.

GSoP-Net on it ("Global Second-order Pooling Convolutional Networks", Gao et al., CVPR 2019) reports 20.86%
(GSoP-Net1) and 18.58% (GSoP-Net2) CIFAR-100 top-1 error. The released code has no CIFAR network; where the paper
is silent these models choose, each a kwarg (the reasons: docs/models.md): d = 64 (the narrowest stage's
width), the last block of each stage (Net2: all but the last), stage-1 stride 1, the module on the last conv's
output before the residual add, a 128-d head with 3 iterations; the standard stride-2 last stage, except for
GSoP-Net2, whose head pools a stride-1 last stage as on ImageNet.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..layers.cov_pool import reset_cov_classifier
from ..layers.gsop import GSOP_MANNERS, create_gsop
from .gsop_resnet import _GSOP_PAPER, checkpoint_filter_fn

__all__ = ['PreResNetCifar', 'PreActBottleneckCifar', 'CIFAR100_MEAN', 'CIFAR100_STD']

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class PreActBottleneckCifar(nn.Module):
    """Pre-activation bottleneck; ``se`` (an attention module, e.g. GSoP) acts on the conv3 output."""
    expansion = 4
    gsop_input = 'conv3'  # the module whose output ``se`` scales (a warm start doubles it)

    def __init__(
            self,
            in_chs: int,
            planes: int,
            stride: int = 1,
            drop_path: float = 0.,
            act_layer: type = nn.ReLU,
            norm_layer: type = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        out_chs = planes * self.expansion
        self.bn1 = norm_layer(in_chs, **dd)
        self.act1 = act_layer(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False, **dd)
        self.bn2 = norm_layer(planes, **dd)
        self.act2 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn3 = norm_layer(planes, **dd)
        self.act3 = act_layer(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False, **dd)
        self.se = None  # an attention module (GSoP) is set here by the model
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.downsample = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd) \
            if stride != 1 or in_chs != out_chs else None
        self.out_chs = out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.act1(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        x = self.conv2(self.act2(self.bn2(self.conv1(x_preact))))
        x = self.conv3(self.act3(self.bn3(x)))
        if self.se is not None:
            x = self.se(x)
        return self.drop_path(x) + shortcut


class PreResNetCifar(nn.Module):
    """Pre-activation bottleneck ResNet for 32x32 inputs, with optional GSoP blocks and iSQRT-COV head.

    Args:
        layers: blocks per stage (ResNet-164: 18, 18, 18; depth = 9 * sum / 3 + 2).
        channels: bottleneck widths per stage (outputs are 4x).
        stem_width: channels of the 3x3 stem conv.
        num_classes, in_chans, drop_rate, drop_path_rate: as timm.
        global_pool: 'avg' (default), another timm pool type, 'isqrt' (iSQRT-COV head) or '' (none).
        gsop_stages, gsop_placement: per stage, whether it gets GSoP blocks (default: none); in its last block
            ('last', default) or in every block ('all').
        gsop_manner, gsop_dim, gsop_stage1_stride, gsop_pool_size: the GSoP blocks (see the module doc).
        isqrt_dim, isqrt_iters, last_stride: the covariance head; the last stage's stride (2: an 8x8 map).
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (18, 18, 18),
            channels: Tuple[int, ...] = (16, 32, 64),
            stem_width: int = 16,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            gsop_stages: Sequence[bool] = (False, False, False),
            gsop_placement: str = 'last',
            gsop_manner: str = 'channel',
            gsop_dim: int = 64,
            gsop_stage1_stride: int = 1,
            gsop_pool_size: int = 8,
            isqrt_dim: int = 128,
            isqrt_iters: int = 3,
            last_stride: int = 2,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        for name, value, choices in (
                ('gsop_manner', gsop_manner, GSOP_MANNERS), ('gsop_placement', gsop_placement, ('last', 'all')),
                ('gsop_stage1_stride', gsop_stage1_stride, (1, 2)), ('last_stride', last_stride, (1, 2))):
            if value not in choices:
                raise ValueError(f'Unknown {name} {value!r}; valid choices: {", ".join(map(repr, choices))}')
        if not (len(layers) == len(channels) == len(gsop_stages) == 3):
            raise ValueError(f'layers, channels and gsop_stages need one entry per stage (3 stages), got '
                             f'{tuple(layers)}, {tuple(channels)}, {tuple(gsop_stages)}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.gsop_manner = gsop_manner
        self.isqrt_dim = isqrt_dim
        self.isqrt_iters = isqrt_iters

        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False, **dd)
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module='conv1')]
        in_chs, reduction, block_idx = stem_width, 1, 0
        num_blocks = sum(layers)
        self.stage_names = []
        for stage_idx, (depth, planes) in enumerate(zip(layers, channels)):
            stride = 1 if stage_idx == 0 else (last_stride if stage_idx == len(layers) - 1 else 2)
            blocks = []
            for i in range(depth):
                dpr = drop_path_rate * block_idx / max(num_blocks - 1, 1)
                blk = PreActBottleneckCifar(in_chs, planes, stride if i == 0 else 1, drop_path=dpr, **dd)
                in_chs = blk.out_chs
                blocks.append(blk)
                block_idx += 1
            reduction *= stride
            name = f'layer{stage_idx + 1}'
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=name))
        self.num_features = in_chs
        self.norm = nn.BatchNorm2d(in_chs, **dd)
        self.act = nn.ReLU(inplace=True)
        self.global_pool, self.fc = nn.Identity(), nn.Identity()  # parameter-free: reset_classifier makes the head
        _init_weights(self)
        for stage_idx, (name, enabled) in enumerate(zip(self.stage_names, gsop_stages)):
            stage = getattr(self, name)
            for blk in (stage if gsop_placement == 'all' else stage[-1:]) if enabled else ():
                blk.se = create_gsop(blk.out_chs, manner=gsop_manner, dim=gsop_dim, pool_size=gsop_pool_size,
                                     stride=gsop_stage1_stride if stage_idx == 0 else 1, **dd)
                _init_weights(blk.se)
        self.reset_classifier(num_classes, global_pool)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv1',
            blocks=r'^layer(\d+)' if coarse else [(r'^layer(\d+)\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier; the pooling (a trained covariance head too) stays when ``global_pool`` is None or same."""
        reset_cov_classifier(self, num_classes, global_pool)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stem and stage outputs (indices 0-3). ``norm=True`` applies the final BN-ReLU to the last one."""
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        num_taps = len(self.stage_names) + 1
        take_indices, max_index = feature_take_indices(num_taps, indices)
        last_idx = num_taps - 1
        x = self.conv1(x)
        if 0 in take_indices:
            intermediates.append(x)
        names = self.stage_names[:max_index] if stop_early else self.stage_names
        feat_idx = 0
        for feat_idx, name in enumerate(names, start=1):
            stage = getattr(self, name)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.act(self.norm(x)) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.act(self.norm(x))
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and final norm, head) not needed for the given intermediates."""
        num_taps = len(self.stage_names) + 1
        take_indices, max_index = feature_take_indices(num_taps, indices)
        for name in self.stage_names[max_index:]:
            setattr(self, name, nn.Sequential())
        prune_end = max_index < num_taps - 1
        if prune_norm or prune_end:
            self.norm, self.act = nn.Identity(), nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        else:
            x = self.layer3(self.layer2(self.layer1(x)))
        return self.act(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')


def _create_preresnet_cifar(variant: str, pretrained: bool = False, **kwargs) -> PreResNetCifar:
    return build_model_with_cfg(
        PreResNetCifar, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'mean': CIFAR100_MEAN, 'std': CIFAR100_STD, 'first_conv': 'conv1',
        'classifier': 'fc', 'license': 'mit', **_GSOP_PAPER, **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'preresnet164_cifar.cifar100': _cfg(
        paper_ids='arXiv:1603.05027', paper_name='Identity Mappings in Deep Residual Networks',
        origin_url='https://github.com/KaimingHe/resnet-1k-layers'),
    'gsop_preresnet164_cifar.cifar100': _cfg(),
    'gsop2_preresnet164_cifar.cifar100': _cfg(pool_size=(16, 16)),
})

_R164 = dict(layers=(18, 18, 18), channels=(16, 32, 64))


@register_model
def preresnet164_cifar(pretrained: bool = False, **kwargs) -> PreResNetCifar:
    """Pre-activation ResNet-164 for CIFAR (32x32, 3 stages of 18 bottlenecks), average pooling."""
    model_args = dict(_R164)
    return _create_preresnet_cifar('preresnet164_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def gsop_preresnet164_cifar(pretrained: bool = False, **kwargs) -> PreResNetCifar:
    """GSoP-Net1 on the CIFAR ResNet-164: GSoP (d = 64) in the last block of each stage, average pooling.

    The paper reports 20.86% CIFAR-100 top-1 error."""
    model_args = dict(_R164, gsop_stages=(1, 1, 1), global_pool='avg')
    return _create_preresnet_cifar('gsop_preresnet164_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def gsop2_preresnet164_cifar(pretrained: bool = False, **kwargs) -> PreResNetCifar:
    """GSoP-Net2 on the CIFAR ResNet-164: GSoP in stages 1-2, a stride-1 last stage, an iSQRT-COV head (128-d).

    3 iterations, 8,256 features, a 16x16 map at 32x32. The paper reports 18.58% CIFAR-100 top-1 error."""
    model_args = dict(_R164, gsop_stages=(1, 1, 0), global_pool='isqrt', last_stride=1)
    return _create_preresnet_cifar('gsop2_preresnet164_cifar', pretrained, **dict(model_args, **kwargs))
