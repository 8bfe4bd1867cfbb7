""" Covariance pooling on any timm backbone: iSQRT-COV / plain covariance / average pooling heads

A timm model is the backbone: its ``forward_features``, then its own head up to the pooling (``forward_head(x,
pre_logits=True)`` with pooling off: ConvNeXt's head norm, MobileNetV3's 1x1 head conv, nothing for most), as a
``(B, C, H, W)`` map (a ViT's patch tokens on their grid, an NHWC map permuted), then global covariance pooling
('isqrt': iSQRT-COV; 'cov': without the square root; or any timm pooling, for comparisons) and a classifier:

    timm.create_model('covpool_convnext_tiny', pretrained=True, num_classes=200)      # registered backbones
    timm.create_model('covpool', backbone='regnety_040.ra3_in1k', pretrained=True)   # any timm model

A backbone that gives no such map at its input size is refused at construction. ``pretrained=True`` builds the
backbone with its own weights and loader (its tag, or a file / state dict of it: train.py's ``--pretrained-path``);
the head and classifier start new (``WarmStartWarning``). The model's pretrained cfg holds that backbone's data
settings. A checkpoint of the whole model (an export) loads through ``checkpoint_filter_fn``; none is published.

iSQRT-COV: "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square Root
Normalization", Li, Xie, Wang, Gao, CVPR 2018 (https://github.com/jiangtaoxie/fast-MPN-COV, MIT).
"""
import itertools
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_function
from timm.models import PretrainedCfg, build_model_with_cfg, clean_state_dict, create_model, \
    generate_default_cfgs, get_model_input_config, group_parameters, is_model, load_state_dict, register_model, \
    split_model_name_tag

from ..layers.cov_pool import reset_cov_classifier
from .gsop_resnet import _ISQRT_PAPER, WarmStartWarning

__all__ = ['CovPoolNet']


class _PreLogits(nn.Module):
    """A backbone's features up to its pooling, the map the head pools: the construction probe's forward."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)


class CovPoolNet(nn.Module):
    """A timm backbone with a covariance pooling head.

    Args:
        backbone: a timm model (``num_classes=0``), or the name of one.
        num_classes, in_chans, drop_rate: as timm's models (the backbone's ``in_chans``; dropout before the fc).
        global_pool: 'isqrt' (iSQRT-COV), 'cov' (plain covariance), a timm pool type ('avg' ...) or '' (none).
        isqrt_dim: channels after the covariance head's 1x1 reduction (256 -> 32,896 features; 0: none).
        isqrt_iters: Newton-Schulz iterations of the 'isqrt' head (iSQRT-COV: 5).
        **backbone_args: ``timm.create_model`` kwargs for a named backbone (``drop_path_rate``, ``img_size`` ...).
    """

    def __init__(
            self,
            backbone: Union[str, nn.Module] = 'resnet50',
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'isqrt',
            isqrt_dim: int = 256,
            isqrt_iters: int = 5,
            drop_rate: float = 0.,
            device=None,
            dtype=None,
            **backbone_args: Any,
    ) -> None:
        super().__init__()
        if isinstance(backbone, str):
            if not is_model(split_model_name_tag(backbone)[0]):
                raise ValueError(f'backbone must name a timm model (timm.list_models() lists them), got {backbone!r}')
            dd = {k: v for k, v in (('device', device), ('dtype', dtype)) if v is not None}
            backbone = create_model(backbone, num_classes=0, in_chans=in_chans, **dd, **backbone_args)
        self.backbone_name = backbone.pretrained_cfg.get('architecture') or type(backbone).__name__
        # the backbone's own head stays up to its pooling (ConvNeXt's norm, MobileNetV3's 1x1 conv are pretrained)
        try:
            backbone.reset_classifier(0, '')
        except AssertionError as e:  # timm asserts what its heads support (under -O the probe refuses it)
            raise ValueError(f'backbone {self.backbone_name} cannot turn its pooling off ({e})') from e
        self.backbone = backbone
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.isqrt_dim = isqrt_dim
        self.isqrt_iters = isqrt_iters
        self.num_prefix_tokens: int = getattr(backbone, 'num_prefix_tokens', 0) or 0
        self.backbone_nhwc: bool = getattr(backbone, 'output_fmt', 'NCHW') == 'NHWC'
        self.feature_info = [dict(info, module=f'backbone.{info["module"]}') for info in backbone.feature_info]
        self.reduction: int = self.feature_info[-1]['reduction']
        self.num_features = self.head_hidden_size = self._probe()
        # a parameter-free head first: the real one is made by reset_classifier
        self.global_pool, self.fc = nn.Identity(), nn.Identity()
        self.reset_classifier(num_classes, global_pool)

    def _probe(self) -> int:
        """The channels of the map the head pools, from a forward at the backbone's input size on the meta device (a
        real one where the backbone keeps tensors meta cannot replace); a ValueError naming what it gives otherwise."""
        chans, height, width = get_model_input_config(self.backbone)['input_size']
        training = self.backbone.training
        net = _PreLogits(self.backbone).eval()
        try:
            with torch.no_grad():
                try:
                    tensors = itertools.chain(net.named_parameters(), net.named_buffers())
                    meta = {k: torch.empty_like(v, device='meta') for k, v in tensors}
                    out = torch.func.functional_call(net, meta, (torch.empty(2, chans, height, width, device='meta'),))
                except (NotImplementedError, RuntimeError):
                    out = net(torch.zeros(2, chans, height, width))
        finally:
            self.backbone.train(training)
        grid = -(-height // self.reduction) * -(-width // self.reduction)
        if not isinstance(out, torch.Tensor):
            shape, why = f'a {type(out).__name__}', 'not a tensor'
        elif out.ndim == 2:
            shape, why = tuple(out.shape[1:]), 'pooled features: its head pools whatever global_pool says'
        elif out.ndim == 3 and (out.shape[1] != self.num_prefix_tokens + grid or grid < 2):
            shape, why = tuple(out.shape[1:]), f'tokens that are not {self.num_prefix_tokens} prefix token(s) + ' \
                f'a grid of {grid} (> 1) patches'
        elif out.ndim == 4 and (out.shape[1:3] if self.backbone_nhwc else out.shape[2:4]).numel() < 2:
            shape, why = tuple(out.shape[1:]), 'a map of one position, whose covariance is zero'
        elif out.ndim in (3, 4):
            return out.shape[-1] if out.ndim == 3 or self.backbone_nhwc else out.shape[1]
        else:
            shape, why = tuple(out.shape[1:]), 'not a map'
        raise ValueError(f'backbone {self.backbone_name} cannot feed a covariance head: at {height}x{width} its '
                         f'features up to the pooling are {shape}, {why}; the head needs a (C, H, W) map of more than '
                         'one position or patch tokens on a grid')

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """The backbone's groups, then the covariance head, then the classifier in a group of its own (so that
        ``--layer-decay`` with ``--layer-decay-min-scale`` gives the classifier its own learning rate)."""
        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse), reverse=True) \
            if hasattr(self.backbone, 'group_matcher') else {}
        top = max(groups.values(), default=0)

        def group_of(name: str) -> int:
            if name.startswith('backbone.'):
                return groups.get(name[len('backbone.'):], top)
            return top + (2 if name.startswith('fc.') else 1)
        return group_of

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        names = self.backbone.no_weight_decay() if hasattr(self.backbone, 'no_weight_decay') else ()
        return {f'backbone.{n}' for n in names}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier; the pooling (a trained covariance head too) stays when ``global_pool`` is None or same."""
        reset_cov_classifier(self, num_classes, global_pool)

    def _to_map(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return features_to_map(x, height, width, self.reduction, self.num_prefix_tokens, self.backbone_nhwc)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return self._to_map(features, x.shape[-2], x.shape[-1])

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The backbone's ``forward_intermediates``; the final features as ``forward_features`` gives them."""
        out = self.backbone.forward_intermediates(
            x, indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only)
        if intermediates_only:
            return out
        final, intermediates = out
        return self._to_map(self.backbone.forward_head(final, pre_logits=True), x.shape[-2], x.shape[-1]), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """The backbone's. The covariance head and the classifier go with ``prune_head`` or when the features no
        longer end at the last level."""
        take_indices = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if prune_head or max(take_indices) < len(self.feature_info) - 1:
            # the backbone's head (MobileNetV3's 1x1 conv, ConvNeXt's norm) went too
            self.num_features = self.head_hidden_size = self.backbone.num_features
            self.reset_classifier(0, '')
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_notrace_function  # a leaf for timm's fx feature extraction: its branches are on shapes
def features_to_map(x: torch.Tensor, height: int, width: int, reduction: int, num_prefix_tokens: int = 0,
                    nhwc: bool = False) -> torch.Tensor:
    """A backbone's features of a ``height x width`` image as a ``(B, C, H, W)`` map: tokens ``(B, N, C)`` without the
    ``num_prefix_tokens`` (class, register) on their grid (``reduction``: the patch size), an NHWC map permuted."""
    if x.ndim == 3:
        x = x[:, num_prefix_tokens:]
        grid_h, grid_w = -(-height // reduction), -(-width // reduction)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid_h, grid_w)
    return x.permute(0, 3, 1, 2) if nhwc else x


torch.fx.wrap('features_to_map')  # and for plain torch.fx.symbolic_trace

# ---- checkpoints and the pretrained cfg ------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert a checkpoint to ``model``'s names: this family's checkpoints as they are; a checkpoint of the backbone
    (timm's layout) under ``backbone.``, without its classifier (no head or classifier: a strict load names them)."""
    state_dict = state_dict.get('state_dict', state_dict.get('model', state_dict))
    state_dict = clean_state_dict({k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)})
    if any(k.startswith('backbone.') for k in state_dict):
        return state_dict
    classifiers = model.backbone.pretrained_cfg.get('classifier') or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    return {f'backbone.{k}': v for k, v in state_dict.items() if k.rsplit('.', 1)[0] not in classifiers}


# the backbone's cfg entries that describe its data, which the model takes as its own
_BACKBONE_DATA = ('input_size', 'test_input_size', 'min_input_size', 'fixed_input_size', 'interpolation', 'crop_pct',
                  'test_crop_pct', 'crop_mode', 'mean', 'std', 'tag')


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD, 'classifier': 'fc', 'license': 'mit',
        **_ISQRT_PAPER, **kwargs,
    }


def _create_covpool(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """The backbone's name and tag (the model name's, or ``backbone``'s) parsed once, the backbone built once by
    ``timm.create_model``, with its own loader when its weights are the source (see the module doc)."""
    pretrained_cfg, overlay = kwargs.pop('pretrained_cfg', None), dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    features_only = kwargs.pop('features_only', False)
    strict = {k: kwargs.pop(k) for k in ('pretrained_strict',) if k in kwargs}  # for whichever loads
    own = {k: kwargs.pop(k) for k in ('num_classes', 'global_pool', 'isqrt_dim', 'isqrt_iters', 'drop_rate')
           if k in kwargs}
    backbone, tag = split_model_name_tag(kwargs.pop('backbone', 'resnet50'))
    if not is_model(backbone):
        raise ValueError(f'backbone must name a timm model (timm.list_models() lists them), got {backbone!r}')
    if isinstance(pretrained_cfg, str) or pretrained_cfg is None:  # a tag names the backbone's weights
        if pretrained_cfg and tag and pretrained_cfg != tag:
            raise ValueError(f'Two pretrained tags for the backbone: {pretrained_cfg!r} (the model name) and {tag!r} '
                             f'(backbone={backbone}.{tag}); give one')
        backbone, pretrained_cfg = f'{backbone}.{pretrained_cfg or tag}' if pretrained_cfg or tag else backbone, None
    state_dict = overlay.pop('state_dict', None)
    if pretrained and overlay.get('file'):  # read once: a file of the whole model or of the backbone
        state_dict = load_state_dict(overlay.pop('file'))
    whole = pretrained and (pretrained_cfg is not None or any(k.startswith('backbone.') for k in state_dict or ()))
    if state_dict is not None and not whole:
        overlay['state_dict'] = state_dict
    if features_only:  # the model's features are the backbone's
        if whole:  # the backbone's tensors of this family's checkpoint
            overlay = dict(state_dict={k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith(
                'backbone.')} if state_dict is not None else _create_covpool(
                variant, True, pretrained_cfg=pretrained_cfg, backbone=backbone, **kwargs).backbone.state_dict())
        return create_model(backbone, pretrained=pretrained, features_only=True, pretrained_cfg_overlay=overlay or None,
                            **strict, **kwargs)
    net = create_model(backbone, pretrained=pretrained and not whole, num_classes=0,
                       pretrained_cfg_overlay=None if whole else overlay or None, **({} if whole else strict), **kwargs)
    if pretrained_cfg is None:  # the backbone's data settings are the model's
        source = net.pretrained_cfg
        first_conv = source.get('first_conv')
        first_conv = tuple(f'backbone.{c}' for c in first_conv) if isinstance(first_conv, (tuple, list)) else \
            f'backbone.{first_conv}' if first_conv else None
        input_size = get_model_input_config(net)['input_size']
        pretrained_cfg = PretrainedCfg(**_cfg(
            architecture=variant, first_conv=first_conv, **{k: source.get(k) for k in _BACKBONE_DATA},
            pool_size=tuple(-(-size // net.feature_info[-1]['reduction']) for size in input_size[1:]),
            **(overlay if whole else {})))
    model = build_model_with_cfg(
        CovPoolNet, variant, whole, pretrained_cfg=pretrained_cfg, **(strict if whole else {}),
        pretrained_cfg_overlay=dict(state_dict=state_dict) if whole and state_dict is not None else None,
        pretrained_filter_fn=checkpoint_filter_fn, backbone=net,
        **{k: v for k, v in kwargs.items() if k in ('in_chans', 'device', 'dtype')}, **own)
    if pretrained and not whole:
        where = 'the state dict given' if state_dict is not None else \
            net.pretrained_cfg.get('hf_hub_id') or net.pretrained_cfg.get('url') or net.pretrained_cfg.get('file')
        warnings.warn(f'Warm start of {variant} from the weights of its backbone {backbone} ({where}): its features '
                      "are the backbone's; newly initialised: global_pool, fc.", WarmStartWarning, stacklevel=3)
    return model


# each with its backbone's default weights' data settings, written out (a test keeps them the same); a built model
# takes them from the backbone it loads
_RESNET_DATA = dict(crop_pct=0.95, test_input_size=(3, 288, 288), test_crop_pct=1.0)
default_cfgs = generate_default_cfgs({
    'covpool': _cfg(**_RESNET_DATA),
    'covpool_resnet50': _cfg(**_RESNET_DATA),
    'covpool_convnext_tiny': _cfg(**_RESNET_DATA),
    'covpool_efficientnet_b0': _cfg(crop_pct=0.875),
    'covpool_mobilenetv3_large_100': _cfg(crop_pct=0.875),
    'covpool_regnety_016': _cfg(crop_pct=0.965),
    'covpool_deit_small_patch16_224': _cfg(crop_pct=0.9, fixed_input_size=True, pool_size=(14, 14)),
})


@register_model
def covpool(pretrained: bool = False, **kwargs) -> CovPoolNet:
    """iSQRT-COV head on the timm model ``backbone=`` names (default resnet50)."""
    return _create_covpool('covpool', pretrained, **kwargs)


@register_model
def covpool_resnet50(pretrained: bool = False, **kwargs) -> CovPoolNet:
    """iSQRT-COV head on timm's ResNet-50."""
    return _create_covpool('covpool_resnet50', pretrained, **dict(dict(backbone='resnet50'), **kwargs))


@register_model
def covpool_convnext_tiny(pretrained: bool = False, **kwargs) -> CovPoolNet:
    """iSQRT-COV head on timm's ConvNeXt-T."""
    return _create_covpool('covpool_convnext_tiny', pretrained, **dict(dict(backbone='convnext_tiny'), **kwargs))


@register_model
def covpool_efficientnet_b0(pretrained: bool = False, **kwargs) -> CovPoolNet:
    """iSQRT-COV head on timm's EfficientNet-B0."""
    return _create_covpool('covpool_efficientnet_b0', pretrained, **dict(dict(backbone='efficientnet_b0'), **kwargs))


@register_model
def covpool_mobilenetv3_large_100(pretrained: bool = False, **kwargs) -> CovPoolNet:
    """iSQRT-COV head on timm's MobileNetV3-Large 1.0."""
    model_args = dict(backbone='mobilenetv3_large_100')
    return _create_covpool('covpool_mobilenetv3_large_100', pretrained, **dict(model_args, **kwargs))


@register_model
def covpool_regnety_016(pretrained: bool = False, **kwargs) -> CovPoolNet:
    """iSQRT-COV head on timm's RegNetY-1.6GF."""
    return _create_covpool('covpool_regnety_016', pretrained, **dict(dict(backbone='regnety_016'), **kwargs))


@register_model
def covpool_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> CovPoolNet:
    """iSQRT-COV head on the patch tokens of timm's DeiT-S/16."""
    model_args = dict(backbone='deit_small_patch16_224')
    return _create_covpool('covpool_deit_small_patch16_224', pretrained, **dict(model_args, **kwargs))
