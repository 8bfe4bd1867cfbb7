""" GSoP-Net: Global Second-order Pooling Convolutional Networks, on timm's ResNet

Zilin Gao, Jiangtao Xie, Qilong Wang, Peihua Li, CVPR 2019 (arXiv:1811.12006). Released code (MIT):
https://github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks

* GSoP-Net1 (``gsop_resnet*``): a GSoP module in the last bottleneck of each stage, average pooling. GSoP-Net2
  (``gsop2_resnet*``): GSoP modules in stages 1-3 and an iSQRT-COV head. Both on a torchvision-style ResNet whose
  last stage has stride 1 *without* dilation (14x14 at 224), as released; timm's ``output_stride=16`` dilates it.
* ``gsopresnet*``: GSoP in every block of timm's stride-32 ResNet / ResNeXt, as ``seresnet*`` places SE.
* ``isqrt_resnet*``: iSQRT-COV (Li et al., CVPR 2018, https://github.com/jiangtaoxie/fast-MPN-COV): GSoP-Net2
  without GSoP modules, 5 iterations.
* ``cbamresnet*``: timm's ResNet with timm's CBAM in every bottleneck, the paper's attention baseline.

The GSoP module sits in timm's bottleneck attention slot (``block.se``): it scales ``bn3`` before the residual add,
as released.
"""
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, clean_state_dict, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, _create_resnet

from ..layers.cov_pool import CovPool, reset_cov_classifier
from ..layers.gsop import GSOP_MANNERS, ChannelGSoP, GSoPFusion, PositionGSoP, create_gsop
from ..layers.second_order import triu_indices_flat

__all__ = ['GSoPResNet', 'WarmStartWarning', 'checkpoint_layout']


class WarmStartWarning(UserWarning):
    """A checkpoint of a network without some of the model's modules was loaded: those were initialised."""


class GSoPResNet(ResNet):
    """timm ``ResNet`` with GSoP modules, an optional stride-1 last stage and an optional iSQRT-COV head.

    Takes every timm ``ResNet`` argument (``block``, ``layers``, ``stem_type``, ``block_args`` ...); in a
    ``BasicBlock`` a GSoP module reads ``bn2``.

    Args:
        gsop_manner: the released names: 'channel', 'position', 'fusion_avg', 'fusion_max', 'fusion_concat'.
        gsop_dim: reduced dimension d of the GSoP modules (paper: 128), at most a block's channels.
        gsop_stages: per stage, whether it gets GSoP modules (GSoP-Net1: all four, GSoP-Net2: 1-3).
        gsop_placement: 'last' (the last block of each stage, the paper's) or 'all' (every block).
        gsop_stage1_stride: stride of the first stage's GSoP reduction (released: 2, covariance at 28x28).
        gsop_pool_size: side of the position branch's grid (released: 8).
        global_pool: 'isqrt' (iSQRT-COV head), 'cov' (no square root), a timm pool type or '' (none).
        isqrt_dim, isqrt_iters: the covariance head's reduction (256 -> 32,896 features) and iterations.
        last_stride: stride of the last stage: 1 without dilation (released GSoP-Net / iSQRT-COV) or 2.
        zero_init_last: zero-init each block's last BN (off, as released: on, a GSoP module starts on zeros).
    """

    def __init__(
            self,
            block: type = Bottleneck,
            layers: Tuple[int, ...] = (3, 4, 6, 3),
            num_classes: int = 1000,
            global_pool: str = 'avg',
            gsop_manner: str = 'channel',
            gsop_dim: int = 128,
            gsop_stages: Sequence[bool] = (True, True, True, True),
            gsop_placement: str = 'last',
            gsop_stage1_stride: int = 2,
            gsop_pool_size: int = 8,
            isqrt_dim: int = 256,
            isqrt_iters: int = 3,
            last_stride: int = 1,
            zero_init_last: bool = False,
            device=None,
            dtype=None,
            **kwargs: Any,
    ) -> None:
        for name, value, choices in (
                ('gsop_manner', gsop_manner, GSOP_MANNERS), ('gsop_placement', gsop_placement, ('last', 'all')),
                ('gsop_stage1_stride', gsop_stage1_stride, (1, 2)), ('last_stride', last_stride, (1, 2))):
            if value not in choices:
                raise ValueError(f'Unknown {name} {value!r}; valid choices: {", ".join(map(repr, choices))}')
        if len(gsop_stages) != len(layers):
            raise ValueError(f'gsop_stages needs one flag per stage ({len(layers)}), got {tuple(gsop_stages)}')
        if any(gsop_stages) and (kwargs.get('block_args') or {}).get('attn_layer') is not None:
            raise ValueError('GSoPResNet places its own GSoP modules in the attention slot; for another attention '
                             "layer use a timm ResNet (block_args=dict(attn_layer=...)) or gsop_stages=(0, 0, 0, 0)")
        dd = {'device': device, 'dtype': dtype}
        # a parameter-free head first: the real one (maybe iSQRT-COV) is made by reset_classifier below
        super().__init__(block=block, layers=layers, num_classes=0, zero_init_last=zero_init_last, **kwargs, **dd)
        self.gsop_manner = gsop_manner
        self.isqrt_dim = isqrt_dim
        self.isqrt_iters = isqrt_iters
        stages = [getattr(self, f'layer{i + 1}') for i in range(len(layers))]
        if last_stride == 1:
            _remove_stage_stride(stages[-1])
            self.feature_info[-1]['reduction'] = self.feature_info[-2]['reduction']
        for stage_idx, (stage, enabled) in enumerate(zip(stages, gsop_stages)):
            for blk in (stage if gsop_placement == 'all' else stage[-1:]) if enabled else ():
                out_chs = blk.bn3.num_features if isinstance(blk, Bottleneck) else blk.bn2.num_features
                blk.se = create_gsop(out_chs, manner=gsop_manner, dim=gsop_dim, pool_size=gsop_pool_size,
                                     stride=gsop_stage1_stride if stage_idx == 0 else 1, **dd)
                for m in blk.se.modules():  # as ResNet.init_weights initialises the rest
                    if isinstance(m, nn.Conv2d):
                        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        self.reset_classifier(num_classes, global_pool)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier; the pooling (a trained covariance head too) stays when ``global_pool`` is None or same."""
        reset_cov_classifier(self, num_classes, global_pool)


def _remove_stage_stride(stage: nn.Sequential) -> None:
    """Make a timm ResNet stage stride 1 without dilation (the released GSoP-Net / iSQRT-COV layer4)."""
    first = stage[0]
    (first.conv1 if isinstance(first, BasicBlock) else first.conv2).stride = (1, 1)
    first.aa = nn.Identity()  # anti-aliased blocks downsample in `aa`
    for i, m in enumerate(first.downsample or ()):
        if isinstance(m, nn.AvgPool2d):
            first.downsample[i] = nn.Identity()  # avg_down: the pool is the stride
        elif isinstance(m, nn.Conv2d):
            m.stride = (1, 1)


# ---- checkpoints ---------------------------------------------------------------------------------------

# released Bottleneck attribute -> (branch, our name in the GSoP module); branch None: the fusion's own
_RELEASED_BLOCK_KEYS = {
    'conv_for_DR': ('channel', 'conv_reduce'), 'bn_for_DR': ('channel', 'bn_reduce'),
    'row_bn': ('channel', 'gate.bn_row'), 'row_conv_group': ('channel', 'gate.conv_row'),
    'fc_adapt_channels': ('channel', 'gate.conv_expand'),
    'conv_for_DR_spatial': ('position', 'conv_reduce'), 'bn_for_DR_spatial': ('position', 'bn_reduce'),
    'row_bn_for_spatial': ('position', 'gate.bn_row'), 'row_conv_group_for_spatial': ('position', 'gate.conv_row'),
    'fc_adapt_channels_for_spatial': ('position', 'gate.conv_expand'),
    'dilate_conv_for_concat1': (None, 'concat_channel'), 'dilate_conv_for_concat2': (None, 'concat_position'),
    'bn_for_concat': (None, 'concat_bn'),
}
# the covariance head, named alike by the released GSoP-Net code and fast-MPN-COV's MPNCOVResNet
_HEAD_KEYS = {'layer_reduce': 'global_pool.conv_reduce', 'layer_reduce_bn': 'global_pool.bn_reduce'}
# fast-MPN-COV main.py: `features` is nn.Sequential(*MPNCOVResNet children), `representation`, `classifier`
_FAST_MPNCOV_FEATURES = ('conv1', 'bn1', None, None, 'layer1', 'layer2', 'layer3', 'layer4', 'layer_reduce',
                         'layer_reduce_bn')
_FAST_MPNCOV_REPRESENTATION = {'conv_dr_block.0': 'layer_reduce', 'conv_dr_block.1': 'layer_reduce_bn'}


def checkpoint_layout(state_dict: Mapping[str, Any]) -> str:
    """Which code named a (cleaned) state dict's keys: 'released-gsop' (the released GSoP-Net code),
    'fast-mpn-cov' (fast-MPN-COV, its covariance head or its main.py's `features` / `representation`) or 'timm'."""
    if any(len(p) >= 4 and p[0].startswith('layer') and p[2] in _RELEASED_BLOCK_KEYS
           for p in (k.split('.') for k in state_dict)):
        return 'released-gsop'
    if any(k.split('.')[0] in ('features', 'representation', 'classifier', *_HEAD_KEYS) for k in state_dict):
        return 'fast-mpn-cov'
    return 'timm'


def _rename_head(key: str) -> str:
    first, _, rest = key.partition('.')
    return f'{_HEAD_KEYS[first]}.{rest}' if first in _HEAD_KEYS else key


def _released_gsop_to_timm(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        parts = key.split('.')
        if len(parts) >= 4 and parts[0].startswith('layer') and parts[2] in _RELEASED_BLOCK_KEYS:
            branch, name = _RELEASED_BLOCK_KEYS[parts[2]]
            gsop = getattr(getattr(model, parts[0], [None] * (int(parts[1]) + 1))[int(parts[1])], 'se', None)
            # a fusion module holds both branches, a single-branch module is the branch itself
            fusion = gsop is None or isinstance(gsop, GSoPFusion)
            key = '.'.join(parts[:2] + ['se', f'{branch}.{name}' if branch and fusion else name] + parts[3:])
        out[_rename_head(key)] = value
    return out


def fast_mpncov_to_triu_order(dim: int) -> torch.Tensor:
    """Index ``p`` with ``ours = theirs[..., p]`` for the triangle vector of a ``dim x dim`` symmetric matrix:
    fast-MPN-COV reads the upper triangle row by row, this package (as the GSoP release) the lower one."""
    upper = torch.triu_indices(dim, dim)
    position = torch.full((dim * dim,), -1, dtype=torch.long)
    position[upper[0] * dim + upper[1]] = torch.arange(upper.shape[1])
    ours = triu_indices_flat(dim)
    return position[(ours % dim) * dim + ours // dim]  # our (i, j), j <= i, is their (j, i)


def _fast_mpncov_to_timm(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        parts = key.split('.')
        if parts[0] == 'features':
            parts = parts[2:] if parts[1] == 'module' else parts[1:]  # DataParallel around `features`
            idx = int(parts[0]) if parts[0].isdigit() else -1
            name = _FAST_MPNCOV_FEATURES[idx] if 0 <= idx < len(_FAST_MPNCOV_FEATURES) else None
            key = '.'.join([name] + parts[1:]) if name else key
        elif parts[0] == 'representation' and '.'.join(parts[1:3]) in _FAST_MPNCOV_REPRESENTATION:
            key = '.'.join([_FAST_MPNCOV_REPRESENTATION['.'.join(parts[1:3])]] + parts[3:])
        elif parts[0] == 'classifier':
            key = '.'.join(['fc'] + parts[1:])
        out[_rename_head(key)] = value
    reduce_w, fc_w = out.get('global_pool.conv_reduce.weight'), out.get('fc.weight')
    if reduce_w is not None and fc_w is not None and fc_w.shape[-1] == reduce_w.shape[0] * (reduce_w.shape[0] + 1) // 2:
        out['fc.weight'] = fc_w[:, fast_mpncov_to_triu_order(reduce_w.shape[0])].contiguous()
    return out


def describe_source(model: nn.Module) -> str:
    """Where the weights timm's loader gives ``model`` come from (its pretrained cfg), for warnings."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if cfg.get('state_dict') is None and (cfg.get('file') or cfg.get('url') or cfg.get('hf_hub_id')):
        return cfg.get('file') or cfg.get('url') or f"hf-hub:{cfg['hf_hub_id']}"
    return 'the state dict given'


def _warm_start(state_dict: Dict[str, torch.Tensor], model: nn.Module, source_stride_1: bool):
    """A plain network's checkpoint (no tensor of any GSoP module) completed for ``model``: the GSoP modules from the
    model's own initialisation with each gate at exactly 0.5 and the module it scales doubled (``2y * 0.5 == y``), a
    covariance head and classifier it has nothing of from the initialisation. A checkpoint with some GSoP tensors is
    returned as it is (``load_state_dict`` names what it lacks). ``source_stride_1``: the source's last stage ran at
    stride 1 (iSQRT-COV's does)."""
    own = model.state_dict()
    gsop = []  # (GSoP module, the module whose output it scales: bn3, bn2 or the block's `gsop_input`)
    for name, block in model.named_modules():
        if isinstance(getattr(block, 'se', None), (ChannelGSoP, PositionGSoP, GSoPFusion)):
            host = 'bn2' if isinstance(block, BasicBlock) else getattr(block, 'gsop_input', 'bn3')
            gsop.append((f'{name}.se.', f'{name}.{host}.'))
    if any(k.startswith(tuple(g for g, _ in gsop)) for k in state_dict):
        return state_dict
    for prefix, host in gsop:
        for k, v in own.items():
            if k.startswith(prefix):  # the gates' last layer at zero: sigmoid(0) = 0.5
                state_dict[k] = torch.zeros_like(v) if '.gate.conv_expand.' in k else v
            elif k.startswith(host) and k in state_dict and not k.endswith(('_mean', '_var', '_tracked')):
                state_dict[k] = state_dict[k] * 2
    absent = tuple(p for p in ('global_pool.', 'fc.') if not any(k.startswith(p) for k in state_dict))
    new = {k: v for k, v in own.items() if absent and k.startswith(absent)}
    state_dict.update(new)
    if not gsop and not new:
        return state_dict

    text = f"Warm start of {model.pretrained_cfg.get('architecture')} from {describe_source(model)}"
    if gsop:
        text += f': {len(gsop)} GSoP modules start with each gate at 0.5 and the module it scales doubled'
        stride_1 = model.feature_info[-1]['reduction'] == model.feature_info[-2]['reduction']
        if model.gsop_manner != 'channel':
            text += f", but gsop_manner={model.gsop_manner!r} adds a ReLU the plain block lacks: the source " \
                    "network's weights are kept, not its function"
        elif stride_1 != source_stride_1:
            source = 'an iSQRT-COV network (stride 1)' if source_stride_1 else 'a plain ResNet (timm, torchvision: 2)'
            text += f", but the model's last stage runs at stride {1 if stride_1 else 2}, the source's, " \
                    f"{source}, does not: its weights are kept, not its function " \
                    f"(last_stride={1 if source_stride_1 else 2} keeps it)"
        elif new or isinstance(model.global_pool, CovPool):
            text += ", so its features are the source network's"
            if not new:
                text += f' (the logits too if its covariance head ran isqrt_iters={model.isqrt_iters})'
        else:
            text += ', so it computes what the source network computed'
    if new:
        modules = sorted({k.rsplit('.', 1)[0] for k in new})
        text += f"; newly initialised (not in the checkpoint, or trained for another head): {', '.join(modules)}"
    warnings.warn(text + '.', WarmStartWarning, stacklevel=3)
    return state_dict


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert a checkpoint to ``model``'s names: timm's / torchvision's / this package's layout, the released
    GSoP-Net code's (``main.py``'s ``model_best.pth.tar`` or a bare state dict, with or without DataParallel's
    ``module.``) and fast-MPN-COV's (its published files and ``main.py`` checkpoints; the classifier's columns
    reordered to this package's triangle order). A covariance head the model does not have is left out, and with it
    a classifier trained on another head's features; so is a classifier the model does not have (``num_classes=0``).
    A plain network's checkpoint is completed for the model as a warm start (``_warm_start``, announced by a
    ``WarmStartWarning``). Strictness is the caller's: ``load_state_dict`` checks what remains."""
    state_dict = state_dict.get('state_dict', state_dict.get('model', state_dict))
    state_dict = clean_state_dict({k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)})
    layout = checkpoint_layout(state_dict)
    if layout == 'released-gsop':
        state_dict = _released_gsop_to_timm(state_dict, model)
    elif layout == 'fast-mpn-cov':
        state_dict = _fast_mpncov_to_timm(state_dict)
    has_head = any(k.startswith('global_pool.') for k in state_dict)
    drop = ('global_pool.', 'fc.') if has_head != isinstance(getattr(model, 'global_pool', None), CovPool) else ()
    drop += () if isinstance(getattr(model, 'fc', None), nn.Linear) else ('fc.',)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(drop)} if drop else state_dict
    return _warm_start(state_dict, model, source_stride_1=has_head)


def _create_gsop_resnet(variant: str, pretrained: bool = False, **kwargs) -> GSoPResNet:
    return build_model_with_cfg(GSoPResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


_GSOP_PAPER = dict(paper_ids='arXiv:1811.12006', paper_name='Global Second-order Pooling Convolutional Networks',
                   origin_url='https://github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks')
_ISQRT_PAPER = dict(paper_ids='arXiv:1712.01034', origin_url='https://github.com/jiangtaoxie/fast-MPN-COV',
                    paper_name='Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix '
                               'Square Root Normalization')
_CBAM_PAPER = dict(paper_ids='arXiv:1807.06521', paper_name='CBAM: Convolutional Block Attention Module',
                   origin_url='https://github.com/huggingface/pytorch-image-models')


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (14, 14), 'license': 'mit',
        'crop_pct': 0.875, 'interpolation': 'bilinear',  # the released evaluation: resize 256, centre crop 224
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD, 'first_conv': 'conv1', 'classifier': 'fc',
        **_GSOP_PAPER, **kwargs,
    }


def _isqrt_cfgs(model: str, file: str, drive_id: str) -> Dict[str, Dict[str, Any]]:
    """An iSQRT-COV model's two tags: the authors' first upload (its classifier, trained with a private triangle
    order, scores 0.166% top-1 with their own code: fast-MPN-COV issue #20), as timm states such weights: headless
    (``num_classes=0``); and ``in1k``, the default, for the ImageNet weights a user brings."""
    retrained = (f'The authors re-trained {model} (fast-MPN-COV README, 2020-01-08): Google Drive id {drive_id}, '
                 'which timm does not download. Load it with pretrained_cfg_overlay=dict(file=PATH), or convert it '
                 f'with `timm-gsop export PATH --model {model} --out DIR`.')
    first = (f'{file}: the authors\' first upload, a fine-tuning start (backbone and covariance head; its classifier '
             'is not valid: https://github.com/jiangtaoxie/fast-MPN-COV/issues/20). The jtxie.com url is reported '
             'unreachable (fast-MPN-COV issue #19).')
    return {f'{model}.mpncov_finetune_start': _cfg(url=f'http://jtxie.com/models/{file}', num_classes=0,
                                                   notes=(first, retrained), **_ISQRT_PAPER),
            f'{model}.in1k*': _cfg(notes=(retrained,), **_ISQRT_PAPER)}  # the default, though it has no file


default_cfgs = generate_default_cfgs({
    'gsop_resnet50.in1k': _cfg(),
    'gsop_resnet101.in1k': _cfg(),
    'gsop2_resnet50.in1k': _cfg(),
    'gsop2_resnet101.in1k': _cfg(),
    'gsopresnet18.in1k': _cfg(pool_size=(7, 7)),
    'gsopresnet34.in1k': _cfg(pool_size=(7, 7)),
    'gsopresnet50.in1k': _cfg(pool_size=(7, 7)),
    'gsopresnet101.in1k': _cfg(pool_size=(7, 7)),
    'gsopresnet50d.in1k': _cfg(pool_size=(7, 7), first_conv='conv1.0'),
    'gsopresnext50_32x4d.in1k': _cfg(pool_size=(7, 7)),
    **_isqrt_cfgs('isqrt_resnet50', 'mpncovresnet50-15991845.pth', '19TWen7p9UDyM0Ueu9Gb22NtouR109C6j'),
    **_isqrt_cfgs('isqrt_resnet101', 'mpncovresnet101-ade9737a.pth', '1riur7v3rZ7vnrdj2UZ7EBaTKEGSccYwg'),
    'cbamresnet50.in1k': _cfg(pool_size=(7, 7), **_CBAM_PAPER),
    'cbamresnet101.in1k': _cfg(pool_size=(7, 7), **_CBAM_PAPER),
})

# GSoP-Net1 / GSoP-Net2 as released; GSoP in every block of timm's ResNet; iSQRT-COV
_NET1 = dict(gsop_stages=(1, 1, 1, 1), global_pool='avg')
_NET2 = dict(gsop_stages=(1, 1, 1, 0), global_pool='isqrt', isqrt_iters=3)
_ATTN = dict(gsop_placement='all', last_stride=2)
_ISQRT = dict(gsop_stages=(0, 0, 0, 0), global_pool='isqrt', isqrt_iters=5)


@register_model
def gsop_resnet50(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net1, ResNet-50: GSoP in the last block of all 4 stages, average pooling."""
    model_args = dict(_NET1, layers=(3, 4, 6, 3))
    return _create_gsop_resnet('gsop_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def gsop_resnet101(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net1, ResNet-101: GSoP in the last block of all 4 stages, average pooling."""
    model_args = dict(_NET1, layers=(3, 4, 23, 3))
    return _create_gsop_resnet('gsop_resnet101', pretrained, **dict(model_args, **kwargs))


@register_model
def gsop2_resnet50(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net2, ResNet-50: GSoP in stages 1-3, iSQRT-COV head (256-d, 3 iterations)."""
    model_args = dict(_NET2, layers=(3, 4, 6, 3))
    return _create_gsop_resnet('gsop2_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def gsop2_resnet101(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """GSoP-Net2, ResNet-101: GSoP in stages 1-3, iSQRT-COV head (256-d, 3 iterations)."""
    model_args = dict(_NET2, layers=(3, 4, 23, 3))
    return _create_gsop_resnet('gsop2_resnet101', pretrained, **dict(model_args, **kwargs))


@register_model
def gsopresnet18(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """ResNet-18 with GSoP in every basic block (d = 64 in the 64-channel stage)."""
    model_args = dict(_ATTN, block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_gsop_resnet('gsopresnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def gsopresnet34(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """ResNet-34 with GSoP in every basic block (d = 64 in the 64-channel stage)."""
    model_args = dict(_ATTN, block=BasicBlock, layers=(3, 4, 6, 3))
    return _create_gsop_resnet('gsopresnet34', pretrained, **dict(model_args, **kwargs))


@register_model
def gsopresnet50(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """ResNet-50 with GSoP in every bottleneck, as SE-ResNet-50 places SE."""
    model_args = dict(_ATTN, layers=(3, 4, 6, 3))
    return _create_gsop_resnet('gsopresnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def gsopresnet101(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """ResNet-101 with GSoP in every bottleneck."""
    model_args = dict(_ATTN, layers=(3, 4, 23, 3))
    return _create_gsop_resnet('gsopresnet101', pretrained, **dict(model_args, **kwargs))


@register_model
def gsopresnet50d(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """ResNet-50-D (deep stem, average-pool downsample) with GSoP in every bottleneck."""
    model_args = dict(_ATTN, layers=(3, 4, 6, 3), stem_width=32, stem_type='deep', avg_down=True)
    return _create_gsop_resnet('gsopresnet50d', pretrained, **dict(model_args, **kwargs))


@register_model
def gsopresnext50_32x4d(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """ResNeXt-50 32x4d with GSoP in every bottleneck."""
    model_args = dict(_ATTN, layers=(3, 4, 6, 3), cardinality=32, base_width=4)
    return _create_gsop_resnet('gsopresnext50_32x4d', pretrained, **dict(model_args, **kwargs))


@register_model
def isqrt_resnet50(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """iSQRT-COV ResNet-50 (fast-MPN-COV mpncovresnet50): stride-1 layer4, 256-d covariance head, 5 iterations."""
    model_args = dict(_ISQRT, layers=(3, 4, 6, 3))
    return _create_gsop_resnet('isqrt_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def isqrt_resnet101(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """iSQRT-COV ResNet-101 (fast-MPN-COV mpncovresnet101): stride-1 layer4, 256-d covariance head, 5 iterations."""
    model_args = dict(_ISQRT, layers=(3, 4, 23, 3))
    return _create_gsop_resnet('isqrt_resnet101', pretrained, **dict(model_args, **kwargs))


@register_model
def cbamresnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 with timm's CbamModule in every bottleneck (timm's defaults, as its seresnet50)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3), block_args=dict(attn_layer='cbam'))
    return _create_resnet('cbamresnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def cbamresnet101(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-101 with timm's CbamModule in every bottleneck."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 23, 3), block_args=dict(attn_layer='cbam'))
    return _create_resnet('cbamresnet101', pretrained, **dict(model_args, **kwargs))
