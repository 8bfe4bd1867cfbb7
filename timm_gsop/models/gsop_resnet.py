""" GSoP-Net: Global Second-order Pooling Convolutional Networks, on timm's ResNet

Paper: "Global Second-order Pooling Convolutional Networks", Zilin Gao, Jiangtao Xie, Qilong Wang, Peihua Li,
CVPR 2019 (arXiv:1811.12006). Released code (MIT):
https://github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks

* GSoP-Net1 (``gsop_resnet*``): a GSoP module in the last bottleneck of each of the four stages, average
  pooling, linear classifier. GSoP-Net2 (``gsop2_resnet*``): GSoP modules in stages 1-3 only and an iSQRT-COV
  head (1x1 conv to 256, covariance, 3 Newton-Schulz iterations, 32,896-d triangle vector). Both on a
  torchvision-style ResNet whose last stage has stride 1 *without* dilation (14x14 final map at 224), as
  released; timm's ``output_stride=16`` dilates that stage instead, a different network.
* ``gsopresnet*``: GSoP in every residual block of timm's standard stride-32 ResNet / ResNeXt, as timm's
  ``seresnet*`` places SE.
* ``isqrt_resnet*``: iSQRT-COV ("Towards Faster Training of Global Covariance Pooling Networks by Iterative
  Matrix Square Root Normalization", Li et al., CVPR 2018; https://github.com/jiangtaoxie/fast-MPN-COV), the
  covariance-pooling baseline: GSoP-Net2 without GSoP modules, 5 iterations.
* ``cbamresnet*``: timm's ResNet with timm's CBAM in every bottleneck, the attention baseline of the paper's
  comparison (timm registers SE-ResNet, ``seresnet50``, but no CBAM ResNet).

The GSoP module sits in timm's bottleneck attention slot (``block.se``): it scales the ``bn3`` output before the
residual add, where the released code applies it.

``checkpoint_filter_fn`` loads checkpoints of the released GSoP-Net code and of fast-MPN-COV, and makes a plain
network's checkpoint (timm's / torchvision's ResNets, iSQRT-COV) an exact warm start: the GSoP modules it has
no tensors for start function-preserving, so the model first computes what that network computed.
"""
import os
import re
import urllib.error
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_device_dtype
from timm.models import build_model_with_cfg, clean_state_dict, generate_default_cfgs, register_model, \
    resolve_pretrained_cfg
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..layers.cov_pool import CovPool, create_cov_classifier
from ..layers.gsop import GSOP_MANNERS, ChannelGSoP, GSoPFusion, PositionGSoP, create_gsop
from ..layers.second_order import triu_indices_flat

__all__ = ['GSoPResNet', 'WarmStartWarning', 'FineTuneStartWarning', 'WeightsNotAvailableError', 'checkpoint_layout']

GSOP_PLACEMENTS = ('last', 'all')  # the last block of each stage (GSoP-Net), or every block (SE-ResNet style)


class WarmStartWarning(UserWarning):
    """Modules a checkpoint had no tensors for were initialised for a warm start (see ``checkpoint_filter_fn``)."""


class FineTuneStartWarning(UserWarning):
    """The weights loaded are published as a fine-tuning start only: their classifier does not classify the dataset
    it was trained on (the first iSQRT-COV files: the ``*.mpncov_finetune_start`` tags' notes)."""


class WeightsNotAvailableError(RuntimeError):
    """The place a tag's weights are published at could not be reached."""


class GSoPResNet(ResNet):
    """timm ``ResNet`` with GSoP modules, an optional stride-1 last stage and an optional iSQRT-COV head.

    Takes every timm ``ResNet`` argument (``block``, ``layers``, ``channels``, ``stem_type``, ``avg_down``,
    ``cardinality``, ``drop_rate``, ``drop_path_rate``, ``block_args`` ...). With timm's ``BasicBlock`` a GSoP
    module reads the block's last BN (``bn2``), as it reads ``bn3`` in a bottleneck.

    Args:
        gsop_manner: GSoP module, the released names: 'channel', 'position', 'fusion_avg', 'fusion_max',
            'fusion_concat'.
        gsop_dim: reduced dimension d of the GSoP modules (paper: 128), at most a block's channels.
        gsop_stages: per stage, whether it gets GSoP modules (GSoP-Net1: all four, GSoP-Net2: 1-3).
        gsop_placement: 'last' (the last block of each stage, the paper's) or 'all' (every block).
        gsop_stage1_stride: stride of the first stage's GSoP reduction (released: 2, covariance at 28x28).
        gsop_pool_size: side of the position branch's grid (released: 8).
        global_pool: 'isqrt' (the iSQRT-COV head), a timm pool type ('avg' ...) or '' (none).
        isqrt_dim, isqrt_iters: the iSQRT-COV head's reduction (256 -> 32,896 features) and iterations.
        last_stride: stride of the last stage: 1 without dilation (released GSoP-Net / iSQRT-COV) or 2.
        bn_momentum, bn_eps: every BatchNorm's momentum / eps (timm train.py's ``--bn-momentum`` ...).
        zero_init_last: zero-init each block's last BN (off by default, as released: on, every GSoP module
            starts on an all-zero input).
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
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            zero_init_last: bool = False,
            device=None,
            dtype=None,
            **kwargs: Any,
    ) -> None:
        check_choice('gsop_manner', gsop_manner, GSOP_MANNERS)
        check_choice('gsop_placement', gsop_placement, GSOP_PLACEMENTS)
        check_choice('gsop_stage1_stride', gsop_stage1_stride, (1, 2))
        check_choice('last_stride', last_stride, (1, 2))
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
            if not enabled:
                continue
            for blk in (stage if gsop_placement == 'all' else stage[-1:]):
                blk.se = create_gsop(
                    _block_out_channels(blk), manner=gsop_manner, dim=gsop_dim, pool_size=gsop_pool_size,
                    stride=gsop_stage1_stride if stage_idx == 0 else 1, **dd)
                init_like_resnet(blk.se)

        self.reset_classifier(num_classes, global_pool)
        set_bn_args(self, bn_momentum, bn_eps)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier; the pooling (and a trained iSQRT-COV head) is kept when ``global_pool`` is None or
        the same."""
        reset_cov_classifier(self, num_classes, global_pool)


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


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """A ValueError naming the kwarg, the value and the valid choices."""
    if value not in choices:
        raise ValueError(f'Unknown {name} {value!r}; valid choices: {", ".join(map(repr, choices))}')


def _block_out_channels(block: nn.Module) -> int:
    if isinstance(block, Bottleneck):
        return block.bn3.num_features
    if isinstance(block, BasicBlock):
        return block.bn2.num_features
    raise ValueError(f'GSoP modules need timm Bottleneck or BasicBlock blocks, got {type(block).__name__}')


def _remove_stage_stride(stage: nn.Sequential) -> None:
    """Make a timm ResNet stage stride 1 without dilation (the released GSoP-Net / iSQRT-COV layer4)."""
    first = stage[0]
    (first.conv1 if isinstance(first, BasicBlock) else first.conv2).stride = (1, 1)
    first.stride = 1
    if not isinstance(first.aa, nn.Identity):
        first.aa = nn.Identity()  # anti-aliased blocks downsample in `aa`
    for i, m in enumerate(first.downsample or ()):
        if isinstance(m, nn.AvgPool2d) or type(m).__name__ == 'AvgPool2dSame':
            first.downsample[i] = nn.Identity()  # avg_down: the pool is the stride
        elif isinstance(m, nn.Conv2d):
            m.stride = (1, 1)


def set_bn_args(model: nn.Module, momentum: Optional[float] = None, eps: Optional[float] = None) -> None:
    """timm train.py's ``--bn-momentum`` / ``--bn-eps``: set them on every BatchNorm (None keeps each)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = m.momentum if momentum is None else momentum
            m.eps = m.eps if eps is None else eps


def init_like_resnet(module: nn.Module) -> None:
    """timm ResNet's (and the released code's) init, for modules added after the network was built."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---- checkpoints ---------------------------------------------------------------------------------------

# released Bottleneck attribute -> (branch, our name in the GSoP module); branch None: the fusion's own
_RELEASED_BLOCK_KEYS = {
    'conv_for_DR': ('channel', 'conv_reduce'),
    'bn_for_DR': ('channel', 'bn_reduce'),
    'row_bn': ('channel', 'gate.bn_row'),
    'row_conv_group': ('channel', 'gate.conv_row'),
    'fc_adapt_channels': ('channel', 'gate.conv_expand'),
    'conv_for_DR_spatial': ('position', 'conv_reduce'),
    'bn_for_DR_spatial': ('position', 'bn_reduce'),
    'row_bn_for_spatial': ('position', 'gate.bn_row'),
    'row_conv_group_for_spatial': ('position', 'gate.conv_row'),
    'fc_adapt_channels_for_spatial': ('position', 'gate.conv_expand'),
    'dilate_conv_for_concat1': (None, 'concat_channel'),
    'dilate_conv_for_concat2': (None, 'concat_position'),
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
            try:
                gsop = model.get_submodule('.'.join(parts[:2] + ['se']))
            except AttributeError:
                gsop = None
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


def _gsop_modules(model: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """``(name, GSoP module, name of the module whose output it scales)`` for each GSoP module in a block."""
    out = []
    for name, block in model.named_modules():
        gsop = getattr(block, 'se', None)
        if isinstance(gsop, (ChannelGSoP, PositionGSoP, GSoPFusion)):
            # timm's Bottleneck scales bn3, BasicBlock bn2; other blocks name it (the CIFAR block: conv3)
            host = 'bn3' if isinstance(block, Bottleneck) else 'bn2' if isinstance(block, BasicBlock) else \
                getattr(block, 'gsop_input', None)
            prefix = f'{name}.' if name else ''
            out.append((f'{prefix}se', gsop, f'{prefix}{host}' if host else ''))
    return out


def describe_source(model: nn.Module) -> str:
    """Where the weights timm's loader gives ``model`` come from (its pretrained cfg's state dict, file, url or Hub
    repo), for warnings."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if cfg.get('state_dict') is not None:
        return 'the state dict given'
    return cfg.get('file') or cfg.get('url') or (f"hf-hub:{cfg['hf_hub_id']}" if cfg.get('hf_hub_id') else
                                                 'the state dict given')


def _warm_start(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Complete a plain network's state dict for ``model``: the model's own initialisation for the GSoP modules,
    the covariance head and the classifier it has no tensors for, each GSoP module's gate starting at exactly 0.5
    and the module it scales doubled (``2y * 0.5 == y``), so the model computes what that network computed."""
    own = model.state_dict()
    started = []
    for name, gsop, host in _gsop_modules(model):
        keys = [f'{name}.{k}' for k in gsop.state_dict()]
        host_keys = [f'{host}.{k}' for k, _ in model.get_submodule(host).named_parameters()] if host else []
        if any(k in state_dict for k in keys if not k.endswith('num_batches_tracked')) or \
                not host_keys or not all(k in state_dict for k in host_keys):
            continue
        state_dict.update({k: own[k] for k in keys})
        for k in keys:
            if '.gate.conv_expand.' in f'.{k}':  # the gate's last layer: sigmoid(0) = 0.5
                state_dict[k] = torch.zeros_like(own[k])
        state_dict.update({k: state_dict[k] * 2 for k in host_keys})
        started.append(name)
    # a head or classifier the checkpoint has nothing of (a part of one missing is for load_state_dict to name)
    absent = tuple(p for p in ('global_pool.', 'fc.') if not any(k.startswith(p) for k in state_dict))
    new = {k: v for k, v in own.items() if absent and k.startswith(absent)}
    if not started and not new:
        return state_dict
    state_dict.update(new)
    manner = getattr(model, 'gsop_manner', 'channel')
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture', type(model).__name__)
    text = f'Warm start of {name} from {describe_source(model)}: '
    if started:
        text += f'{len(started)} GSoP module(s) had no tensors there and were initialised with each gate 0.5 and ' \
                'the module it scales doubled: '
        text += 'it computes what the source network computed. ' if manner == 'channel' else (
            f"gsop_manner={manner!r} adds a ReLU the plain block lacks, so the source network's weights are kept, "
            'not its function. ')
    if new:
        modules = sorted({k.rsplit('.', 1)[0] for k in new})
        text += f'Newly initialised (not in the checkpoint, or trained for another head): {", ".join(modules)}.'
    warnings.warn(text.strip(), WarmStartWarning, stacklevel=3)
    return state_dict


def tensors_of_checkpoint(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """A checkpoint's state dict: a training checkpoint's ``state_dict`` / ``model`` entry (else the mapping itself),
    its tensors only, without DataParallel's ``module.`` (timm's ``clean_state_dict``)."""
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    return clean_state_dict({k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)})


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert a checkpoint to ``model``'s names.

    Accepts timm's / torchvision's / this package's layout, the released GSoP-Net code's (``main.py``'s
    ``model_best.pth.tar`` or a bare state dict, with or without DataParallel's ``module.``) and fast-MPN-COV's
    (its published files and ``main.py`` checkpoints; the classifier's columns reordered to this package's
    triangle order). A training checkpoint's ``state_dict`` / ``model`` entry is taken. A covariance head the model
    does not have is left out, and with it a classifier trained on another head's features. A plain network's
    checkpoint becomes a warm start (``_warm_start``, announced by a ``WarmStartWarning``). Transforms only:
    ``load_state_dict`` checks what remains.
    """
    state_dict = tensors_of_checkpoint(state_dict)
    layout = checkpoint_layout(state_dict)
    if layout == 'released-gsop':
        state_dict = _released_gsop_to_timm(state_dict, model)
    elif layout == 'fast-mpn-cov':
        state_dict = _fast_mpncov_to_timm(state_dict)
    has_head = any(k.startswith('global_pool.') for k in state_dict)
    if has_head != isinstance(getattr(model, 'global_pool', None), CovPool):
        # the classifier was trained on another head's features (2048-d average vs 32,896-d covariance)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(('global_pool.', 'fc.'))}
    return _warm_start(state_dict, model)


def cfg_pool_size_from_model(model: nn.Module) -> nn.Module:
    """Make ``pretrained_cfg['pool_size']`` the final map at the cfg's input size, which kwargs such as
    ``last_stride`` (or a backbone's patch size) decide."""
    cfg, info = model.pretrained_cfg, model.feature_info
    if isinstance(info, list) and info and cfg.get('input_size'):
        cfg['pool_size'] = tuple(-(-size // info[-1]['reduction']) for size in cfg['input_size'][1:])
    return model


def build_model_saying_why(model_cls: type, variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``build_model_with_cfg``, and where timm's error would not say what failed (an unreachable url, a missing
    file: timm raises a bare FileNotFoundError), an error that does."""
    try:
        model = build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except urllib.error.URLError as e:  # the authors' own servers: say where else their weights are
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        notes = ' '.join(cfg.notes or ())
        raise WeightsNotAvailableError(f'Could not download the weights of {variant} from {cfg.url}: {e}. {notes}') from e
    except FileNotFoundError as e:
        if str(e):
            raise
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        raise FileNotFoundError(f'{variant}: no such file {cfg.file}') from e
    return cfg_pool_size_from_model(model)


def _create_gsop_resnet(variant: str, pretrained: bool = False, **kwargs) -> GSoPResNet:
    return build_model_saying_why(GSoPResNet, variant, pretrained, pretrained_filter_fn=_pretrained_filter_fn, **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (14, 14),
        'crop_pct': 0.875, 'interpolation': 'bilinear',  # the released evaluation: resize 256, centre crop 224
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc', 'license': 'mit',
        'paper_ids': 'arXiv:1811.12006', 'paper_name': 'Global Second-order Pooling Convolutional Networks',
        'origin_url': 'https://github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks',
        **kwargs,
    }


def _isqrt_cfg(**kwargs) -> Dict[str, Any]:
    return _cfg(
        paper_ids='arXiv:1712.01034', origin_url='https://github.com/jiangtaoxie/fast-MPN-COV',
        paper_name='Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square Root '
                   'Normalization',
        **kwargs)


# The authors' first iSQRT-COV uploads, the files fast-MPN-COV's code names (`jtxie.com/models/...`; the suffix is
# the file's sha256 prefix, as in torch.hub names). They were trained with a private triangle vectorisation whose
# order differs from the released `Triuvec`: with the released code the ResNet-50 file scores 0.166% top-1 on
# ImageNet-1k (the authors, fast-MPN-COV issue #20). Backbone and covariance head are a fine-tuning start, the
# classifier classifies at chance: their tag says so (not `in1k`, which would list them in
# `timm.list_models(pretrained=True)` as ImageNet classifiers), and loading one with its classifier warns.
FINETUNE_START_TAG = 'mpncov_finetune_start'
_FINETUNE_START_FILES = {'15991845': 'mpncovresnet50-15991845.pth', 'ade9737a': 'mpncovresnet101-ade9737a.pth'}
# the re-trained files (README commit "update model", 2020-01-08): Google Drive only, which timm cannot download
_RETRAINED_DRIVE_IDS = {'isqrt_resnet50': '19TWen7p9UDyM0Ueu9Gb22NtouR109C6j',
                        'isqrt_resnet101': '1riur7v3rZ7vnrdj2UZ7EBaTKEGSccYwg'}

_FINETUNE_START_NOTE = (
    'A fine-tuning start only, not an ImageNet classifier: {file} (sha256 prefix {sha}) is the authors\' first '
    'upload, trained with a private triangle vectorisation whose order differs from the released code\'s; with '
    'their released code it scores 0.166% top-1 on ImageNet-1k '
    '(https://github.com/jiangtaoxie/fast-MPN-COV/issues/20). '
    'Its backbone and covariance head start a fine-tuning (a new classifier: num_classes=N); loaded with its '
    'classifier it warns (FineTuneStartWarning). The jtxie.com url is reported unreachable (fast-MPN-COV issue #19).')
_RETRAINED_NOTE = (
    'The authors re-trained {model} and link it from https://github.com/jiangtaoxie/fast-MPN-COV since 2020-01-08: '
    'Google Drive id {drive} (https://drive.google.com/file/d/{drive}), which timm does not download. Download '
    'it by hand and load it with pretrained_cfg_overlay=dict(file=PATH), or convert it to a Hub folder with '
    '`timm-gsop export PATH --model {model} --out DIR` (exported as {model}.in1k).')


def _isqrt_cfgs(model: str, sha: str) -> Dict[str, Dict[str, Any]]:
    """An iSQRT-COV model's two tags: the authors' first file (a fine-tuning start) and ``in1k``, for weights a
    user brings (the re-trained files)."""
    file = _FINETUNE_START_FILES[sha]
    retrained = _RETRAINED_NOTE.format(model=model, drive=_RETRAINED_DRIVE_IDS[model])
    return {
        f'{model}.{FINETUNE_START_TAG}': _isqrt_cfg(
            url=f'http://jtxie.com/models/{file}', notes=(_FINETUNE_START_NOTE.format(file=file, sha=sha), retrained)),
        f'{model}.in1k': _isqrt_cfg(notes=(retrained,)),
    }


_CBAM_PAPER = dict(paper_ids='arXiv:1807.06521', paper_name='CBAM: Convolutional Block Attention Module',
                   origin_url='https://github.com/huggingface/pytorch-image-models')


def finetune_start_file(name: Optional[str]) -> Optional[str]:
    """The published fine-tuning-start file that a path or url names (by the sha256 prefix of its torch.hub name,
    ``mpncovresnet50-15991845.pth``), else None."""
    base = os.path.basename(str(name or '').split('?')[0])
    return next((file for sha, file in _FINETUNE_START_FILES.items() if re.search(rf'-{sha}(?![0-9a-f])', base)), None)


def _warn_if_finetune_start(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """FineTuneStartWarning when timm's load_pretrained gives ``model`` a fine-tuning-start file with that file's
    classifier (timm drops a classifier of another num_classes): the file its cfg names (file, else url), or an
    exported folder of one (its tag)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    file = None
    if cfg.get('source') in ('local-dir', 'hf-hub'):
        if cfg.get('tag') == FINETUNE_START_TAG:
            file = f"an export of the {cfg.get('architecture', 'iSQRT-COV')} fine-tuning start"
    elif cfg.get('state_dict') is None:
        file = finetune_start_file(cfg.get('file') or cfg.get('url'))  # timm loads the file when both are set
    fc = state_dict.get('fc.weight')
    if file is None or fc is None or fc.shape[0] != getattr(model, 'num_classes', None):
        return
    arch = str(cfg.get('architecture') or 'isqrt_resnet50')
    drive = _RETRAINED_DRIVE_IDS.get(arch, _RETRAINED_DRIVE_IDS['isqrt_resnet50'])
    warnings.warn(
        f'{describe_source(model)} is {file}: a fine-tuning start only. Its classifier was trained with a triangle '
        'order the released code does not use and classifies ImageNet at chance (0.166% top-1 with the authors\' '
        'code, fast-MPN-COV issue #20); its backbone and covariance head are fine to fine-tune from (num_classes=N '
        f'gives a new classifier). The re-trained weights: Google Drive id {drive}, then '
        f'`timm-gsop export FILE --model {arch} --out DIR`.', FineTuneStartWarning, stacklevel=3)


def _pretrained_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """``checkpoint_filter_fn`` as timm's load_pretrained calls it (the file loaded is the one the cfg names):
    also says when that file is a fine-tuning start (``_warn_if_finetune_start``)."""
    state_dict = checkpoint_filter_fn(state_dict, model)
    _warn_if_finetune_start(state_dict, model)
    return state_dict


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
    # the authors' first files (fine-tuning start only); the re-trained ones, or any ImageNet-1k iSQRT-COV weights,
    # exported by `timm-gsop export` (no published file of their own: not in list_models(pretrained=True))
    **_isqrt_cfgs('isqrt_resnet50', '15991845'),
    **_isqrt_cfgs('isqrt_resnet101', 'ade9737a'),
    'cbamresnet50.in1k': _cfg(pool_size=(7, 7), **_CBAM_PAPER),
    'cbamresnet101.in1k': _cfg(pool_size=(7, 7), **_CBAM_PAPER),
})

# GSoP-Net1 / GSoP-Net2 as released; GSoP in every block of timm's ResNet; iSQRT-COV; timm's CBAM ResNet
_NET1 = dict(gsop_stages=(1, 1, 1, 1), global_pool='avg')
_NET2 = dict(gsop_stages=(1, 1, 1, 0), global_pool='isqrt', isqrt_iters=3)
_ATTN = dict(gsop_placement='all', last_stride=2)
_ISQRT = dict(gsop_stages=(0, 0, 0, 0), global_pool='isqrt', isqrt_iters=5)
_CBAM = dict(gsop_stages=(0, 0, 0, 0), last_stride=2, zero_init_last=True, block_args=dict(attn_layer='cbam'))


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
def cbamresnet50(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """ResNet-50 with timm's CbamModule in every bottleneck (timm's defaults, as its seresnet50)."""
    model_args = dict(_CBAM, layers=(3, 4, 6, 3))
    return _create_gsop_resnet('cbamresnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def cbamresnet101(pretrained: bool = False, **kwargs) -> GSoPResNet:
    """ResNet-101 with timm's CbamModule in every bottleneck."""
    model_args = dict(_CBAM, layers=(3, 4, 23, 3))
    return _create_gsop_resnet('cbamresnet101', pretrained, **dict(model_args, **kwargs))
