""" Covariance pooling on any timm backbone: iSQRT-COV / plain covariance / average pooling heads

A timm model is the backbone: its ``forward_features``, then its own head up to the pooling (``forward_head(x,
pre_logits=True)`` with pooling off: ConvNeXt's head norm, MobileNetV3's 1x1 head conv, nothing for most), as a
``(B, C, H, W)`` map (a ViT's patch tokens on their grid, a Swin's NHWC map as NCHW), then global covariance
pooling and a linear classifier:

    timm.create_model('covpool_convnext_tiny', pretrained=True, num_classes=200)      # registered backbones
    timm.create_model('covpool', backbone='regnety_040.ra3_in1k', pretrained=True)   # any timm model

``pretrained=True`` loads the backbone's published weights (its tag: ``covpool_resnet50.a1_in1k`` or
``backbone='resnet50.a1_in1k'``) through timm's loader; ``checkpoint_filter_fn`` initialises the head and the
classifier, so the backbone computes what ``timm.create_model(backbone, pretrained=True)`` computes. The model's
pretrained cfg (mean, std, input size, crop) is that of the backbone's weights. No weights of the whole network
are published: ``timm.list_models(pretrained=True)`` lists none of these.

Heads (``global_pool``): 'isqrt' (iSQRT-COV: 1x1 conv to ``isqrt_dim``, BN, ReLU, covariance, ``isqrt_iters``
Newton-Schulz iterations, triangle vector), 'cov' (the same without the square root) or any timm pooling
('avg' ...), for comparisons.

iSQRT-COV: "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square Root
Normalization", Li, Xie, Wang, Gao, CVPR 2018 (https://github.com/jiangtaoxie/fast-MPN-COV, MIT).
"""
import inspect
import sys
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import register_notrace_function
from timm.models import PretrainedCfg, create_model, generate_default_cfgs, get_pretrained_cfg, \
    group_parameters, is_model, model_entrypoint, register_model, split_model_name_tag

from .gsop_resnet import WarmStartWarning, build_model_saying_why, describe_source, reset_cov_classifier, \
    set_bn_args, tensors_of_checkpoint

__all__ = ['CovPoolNet', 'backbone_pretrained_cfg']


class CovPoolNet(nn.Module):
    """A timm backbone with a covariance pooling head.

    Args:
        backbone: a timm model name, with or without a pretrained tag ('resnet50', 'convnext_tiny.fb_in22k').
        num_classes: classes of the linear classifier (0: none).
        in_chans: image channels (the backbone's).
        global_pool: 'isqrt' (iSQRT-COV), 'cov' (plain covariance), a timm pool type ('avg' ...) or '' (none).
        isqrt_dim: channels after the covariance head's 1x1 reduction (256 -> 32,896 features; 0: none).
        isqrt_iters: Newton-Schulz iterations of the 'isqrt' head (iSQRT-COV: 5).
        drop_rate: dropout before the classifier.
        bn_momentum, bn_eps: every BatchNorm's momentum / eps (timm train.py's ``--bn-momentum`` ...).
        **backbone_args: for ``timm.create_model(backbone, ...)`` (``drop_path_rate``, ``img_size``,
            ``output_stride`` ...).
    """

    def __init__(
            self,
            backbone: str = 'resnet50',
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'isqrt',
            isqrt_dim: int = 256,
            isqrt_iters: int = 5,
            drop_rate: float = 0.,
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            device=None,
            dtype=None,
            **backbone_args: Any,
    ) -> None:
        super().__init__()
        check_backbone(backbone)
        dd = {k: v for k, v in (('device', device), ('dtype', dtype)) if v is not None}
        self.backbone = create_model(backbone, num_classes=0, in_chans=in_chans, **dd, **backbone_args)
        # the backbone's own head stays up to its pooling (ConvNeXt's norm, MobileNetV3's 1x1 conv are pretrained)
        self.backbone.reset_classifier(0, '')
        self.backbone_name = backbone
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.isqrt_dim = isqrt_dim
        self.isqrt_iters = isqrt_iters
        self.num_prefix_tokens: int = getattr(self.backbone, 'num_prefix_tokens', 0)
        self.backbone_nhwc: bool = getattr(self.backbone, 'output_fmt', 'NCHW') == 'NHWC'
        self.feature_info = [dict(info, module=f'backbone.{info["module"]}') for info in self.backbone.feature_info]
        self.reduction: int = self.feature_info[-1]['reduction']
        self.num_features = self.head_hidden_size = self.backbone.head_hidden_size
        # a parameter-free head first: the real one is made by reset_classifier
        self.global_pool, self.fc = nn.Identity(), nn.Identity()
        self.reset_classifier(num_classes, global_pool)
        set_bn_args(self, bn_momentum, bn_eps)

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
        """A new classifier; the pooling (and a trained covariance head) is kept when ``global_pool`` is None or
        the same."""
        reset_cov_classifier(self, num_classes, global_pool)

    def _to_map(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return features_to_map(x, height, width, self.reduction, self.num_prefix_tokens, self.backbone_nhwc)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        x = self.backbone.forward_features(x)
        return self._to_map(self.backbone.forward_head(x, pre_logits=True), height, width)

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
        height, width = x.shape[-2], x.shape[-1]
        out = self.backbone.forward_intermediates(
            x, indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only)
        if intermediates_only:
            return out
        final, intermediates = out
        return self._to_map(self.backbone.forward_head(final, pre_logits=True), height, width), intermediates

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
def features_to_map(
        x: torch.Tensor, height: int, width: int, reduction: int, num_prefix_tokens: int = 0, nhwc: bool = False,
) -> torch.Tensor:
    """A backbone's features of a ``height x width`` image as a ``(B, C, H, W)`` map: tokens ``(B, N, C)`` without
    the ``num_prefix_tokens`` (class, register) on their grid (``reduction``: the patch size), an NHWC map
    permuted."""
    if x.ndim == 3:
        x = x[:, num_prefix_tokens:]
        grid_h, grid_w = -(-height // reduction), -(-width // reduction)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid_h, grid_w)
    if nhwc:
        return x.permute(0, 3, 1, 2)
    return x


torch.fx.wrap('features_to_map')  # and for plain torch.fx.symbolic_trace


def check_backbone(backbone: Any) -> None:
    """A ValueError unless ``backbone`` names a timm model (with or without a tag)."""
    if not isinstance(backbone, str) or not is_model(split_model_name_tag(backbone)[0]):
        raise ValueError(f'backbone must name a timm model (timm.list_models() lists them, a pretrained tag may '
                         f'follow: "resnet50.a1_in1k"), got {backbone!r}')


# ---- the pretrained cfg: the backbone's data settings and weights ---------------------------------------------

_BACKBONE_DATA = ('input_size', 'test_input_size', 'min_input_size', 'fixed_input_size', 'interpolation', 'crop_pct',
                  'test_crop_pct', 'crop_mode', 'mean', 'std', 'num_classes', 'pool_size')
_BACKBONE_WEIGHTS = ('url', 'file', 'hf_hub_id', 'hf_hub_filename')


def _cfg(backbone: str, weights: bool = False, **kwargs) -> Dict[str, Any]:
    """This family's cfg of a model on ``backbone``: its paper and classifier, the backbone's data settings and,
    with ``weights``, where the backbone's weights are (timm's loader loads them, ``checkpoint_filter_fn`` adapts
    them)."""
    source = get_pretrained_cfg(backbone)  # RuntimeError for an unknown tag of a known model, naming it
    source = source.to_dict() if source is not None else {}
    cfg = {k: source[k] for k in _BACKBONE_DATA if source.get(k) is not None}
    if weights:
        cfg.update({k: source[k] for k in _BACKBONE_WEIGHTS if source.get(k)})
    first_conv = source.get('first_conv')
    if isinstance(first_conv, (tuple, list)):
        first_conv = tuple(f'backbone.{c}' for c in first_conv)
    elif first_conv:
        first_conv = f'backbone.{first_conv}'
    return {
        **cfg, 'first_conv': first_conv, 'classifier': 'fc', 'license': 'mit',
        'paper_ids': 'arXiv:1712.01034', 'origin_url': 'https://github.com/jiangtaoxie/fast-MPN-COV',
        'paper_name': 'Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square Root '
                      'Normalization',
        **kwargs,
    }


def _backbone_with_tag(backbone: str, tag: Optional[str]) -> str:
    """``backbone`` with the tag that names its weights: the model name's (``covpool_resnet50.a1_in1k``), the
    backbone's own, else the backbone's default tag."""
    check_backbone(backbone)
    arch, own = split_model_name_tag(backbone)
    if tag and own and tag != own:
        raise ValueError(f'Two pretrained tags for the backbone: {tag!r} (the model name) and {own!r} (backbone='
                         f'{backbone!r}); give one')
    tag = tag or own or getattr(get_pretrained_cfg(arch), 'tag', None)
    return f'{arch}.{tag}' if tag else arch


def backbone_pretrained_cfg(variant: str, backbone: str) -> PretrainedCfg:
    """The pretrained cfg ``create_model(variant, backbone=backbone)`` gets: the backbone's weights (its tag, else
    its default) and their data settings, this family's classifier and paper."""
    cfg = _cfg(backbone, weights=True, architecture=variant, tag=split_model_name_tag(backbone)[1] or None)
    return PretrainedCfg(**cfg)


def _own_args() -> Tuple[str, ...]:
    return tuple(inspect.signature(CovPoolNet.__init__).parameters)


def _backbone_out_indices(backbone: str, kwargs: Mapping[str, Any]) -> Tuple[int, ...]:
    """The feature levels ``timm.create_model(backbone, features_only=True)`` gives (every stage of a CNN, the last
    blocks of a ViT): built on the meta device, for its ``feature_info`` only."""
    own = set(_own_args()) | {'features_only', 'out_indices', 'feature_cls', 'pretrained_cfg_overlay'}
    args = {k: v for k, v in kwargs.items() if k not in own}
    features = create_model(backbone, features_only=True, device='meta', in_chans=kwargs.get('in_chans', 3), **args)
    return tuple(features.feature_info.out_indices)


# ---- checkpoints ---------------------------------------------------------------------------------------------

def _backbone_filter(backbone_name: str) -> Optional[Callable]:
    """The backbone family's ``checkpoint_filter_fn`` (timm's convention: original layouts, resized position
    embeddings), if it has one."""
    module = sys.modules.get(model_entrypoint(split_model_name_tag(backbone_name)[0]).__module__)
    return getattr(module, 'checkpoint_filter_fn', None)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert a checkpoint to ``model``'s names: this family's checkpoints as they are; a checkpoint of the
    backbone (timm's layout or one its family's filter converts) under ``backbone.``, without the backbone's
    classifier, with the head and classifier of the model's own initialisation (announced by one
    ``WarmStartWarning``). Transforms only: ``load_state_dict`` checks what remains.
    """
    state_dict = tensors_of_checkpoint(state_dict)
    if any(k.startswith('backbone.') for k in state_dict):
        return state_dict
    backbone = model.backbone
    family_filter = _backbone_filter(model.backbone_name)
    if family_filter is not None:
        state_dict = family_filter(state_dict, backbone)
    classifiers = backbone.pretrained_cfg.get('classifier') or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    dropped = {f'{c}.{p}' for c in classifiers for p in ('weight', 'bias')}
    out = {f'backbone.{k}': v for k, v in state_dict.items() if k not in dropped}
    new = {k: v for k, v in model.state_dict().items() if not k.startswith('backbone.')}
    out.update(new)
    if new:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        modules = sorted({k.rsplit('.', 1)[0] for k in new})
        warnings.warn(
            f"Warm start of {cfg.get('architecture', type(model).__name__)} from {describe_source(model)}, weights of "
            f'its backbone {model.backbone_name}: newly initialised (not in the checkpoint): {", ".join(modules)}.',
            WarmStartWarning, stacklevel=3)
    return out


def _create_covpool(variant: str, pretrained: bool = False, **kwargs) -> CovPoolNet:
    pretrained_cfg = kwargs.pop('pretrained_cfg', None)
    kwargs.setdefault('backbone', 'resnet50')
    if pretrained_cfg is None or isinstance(pretrained_cfg, str):
        # no cfg of this family's own weights (none are published): a tag names the backbone's weights
        kwargs['backbone'] = _backbone_with_tag(kwargs['backbone'], pretrained_cfg)
        pretrained_cfg = backbone_pretrained_cfg(variant, kwargs['backbone'])
    if kwargs.get('features_only') and 'out_indices' not in kwargs:
        kwargs['out_indices'] = _backbone_out_indices(kwargs['backbone'], kwargs)
    return build_model_saying_why(
        CovPoolNet, variant, pretrained, pretrained_cfg=pretrained_cfg, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter'), **kwargs)


default_cfgs = generate_default_cfgs({
    'covpool': _cfg('resnet50'),
    'covpool_resnet50': _cfg('resnet50'),
    'covpool_convnext_tiny': _cfg('convnext_tiny'),
    'covpool_efficientnet_b0': _cfg('efficientnet_b0'),
    'covpool_mobilenetv3_large_100': _cfg('mobilenetv3_large_100'),
    'covpool_regnety_016': _cfg('regnety_016'),
    'covpool_deit_small_patch16_224': _cfg('deit_small_patch16_224'),
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
