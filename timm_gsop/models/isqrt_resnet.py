"""iSQRT-COV ResNets (fast MPN-COV): the covariance-pooling baseline of the GSoP-Net comparison.

Paper: "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square Root
Normalization", Peihua Li, Jiangtao Xie, Qilong Wang, Zilin Gao, CVPR 2018 (arXiv:1712.01034).
Released code and ImageNet weights (MIT): https://github.com/jiangtaoxie/fast-MPN-COV (``mpncovresnet50``,
``mpncovresnet101``).

The network is GSoP-Net2 without GSoP blocks: a torchvision-style ResNet whose last stage has stride 1
without dilation (14x14 final map at 224), then 1x1 conv 2048 -> 256 (no bias), BN, ReLU, the 256 x 256
covariance, 5 coupled Newton-Schulz iterations (trace pre-normalisation, sqrt(trace) post-compensation) and
the 32,896-d triangle vector, then the classifier. It is :class:`~timm_gsop.GSoPResNet` with no GSoP stage.

:func:`checkpoint_filter_fn` loads the released checkpoints into these models with the same outputs (up to
float rounding):

* the published ImageNet weights (``mpncovresnet50-15991845.pth`` / ``mpncovresnet101-ade9737a.pth``): the
  torchvision key layout plus ``layer_reduce`` / ``layer_reduce_bn`` and ``fc``;
* checkpoints of its ``main.py`` (``{'state_dict': ...}``): ``features.[module.]<i>.*`` (a Sequential of the
  ResNet's children, DataParallel inside), ``representation.conv_dr_block.{0,1}.*`` (training from scratch)
  or ``features.[module.]{8,9}.*`` (fine-tuned from the published weights), and ``classifier.*``.

fast-MPN-COV vectorises the *upper* triangle row by row, this package (as the GSoP release) the lower
triangle row by row: the same values in another order, so the classifier's input columns are permuted.
"""
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck

from ..layers.second_order import triu_indices_flat
from . import gsop_resnet as _gsop_resnet
from .gsop_resnet import GSoPResNet
from ._common import build_gsop_model, gsop_cfg, with_hub_ids

__all__ = ['ISqrtResNet', 'checkpoint_filter_fn', 'fast_mpncov_to_triu_order']

_GSOP_ONLY_KWARGS = ('gsop_manner', 'gsop_dim', 'gsop_stages', 'gsop_pool_size', 'gsop_fused')


class ISqrtResNet(GSoPResNet):
    """iSQRT-COV ResNet: stride-1 last stage and covariance head, no GSoP blocks.

    Takes every :class:`~timm_gsop.GSoPResNet` / timm ``ResNet`` argument except the ``gsop_*`` ones.

    Args:
        global_pool: 'isqrt' (default, the iSQRT-COV head), or a timm pool type / '' to replace it.
        isqrt_dim: channels of the head's 1x1 reduction (released: 256 -> 32,896 features).
        isqrt_iters: Newton-Schulz iterations (released training setup: 5).
    """

    def __init__(
            self,
            block: type = Bottleneck,
            layers: Tuple[int, ...] = (3, 4, 6, 3),
            global_pool: str = 'isqrt',
            isqrt_dim: int = 256,
            isqrt_iters: int = 5,
            **kwargs: Any,
    ) -> None:
        for name in _GSOP_ONLY_KWARGS:
            if name in kwargs:
                raise TypeError(
                    f'ISqrtResNet got an unexpected keyword argument {name!r} (iSQRT-COV ResNets have no GSoP '
                    'blocks; gsop2_resnet* is GSoP-Net2 with the same head)')
        super().__init__(
            block=block, layers=layers, global_pool=global_pool, isqrt_dim=isqrt_dim, isqrt_iters=isqrt_iters,
            gsop_stages=(False,) * len(layers), **kwargs)
        self.gsop_manner = ''  # no GSoP blocks (keeps the attribute's type for TorchScript)


# ---- fast-MPN-COV checkpoints ----------------------------------------------------------------------------

# children of fast-MPN-COV's MPNCOVResNet, in order: main.py's `features` is nn.Sequential(*children[:-k])
_FEATURE_CHILDREN: List[Optional[str]] = [
    'conv1', 'bn1', None, None, 'layer1', 'layer2', 'layer3', 'layer4', 'layer_reduce', 'layer_reduce_bn']
_REPRESENTATION_KEYS = {'conv_dr_block.0': 'layer_reduce', 'conv_dr_block.1': 'layer_reduce_bn'}


def fast_mpncov_to_triu_order(dim: int) -> torch.Tensor:
    """Index ``p`` such that ``ours = theirs[..., p]`` for a ``dim x dim`` symmetric matrix's triangle.

    fast-MPN-COV: upper triangle row by row (``ones(d, d).triu()`` nonzeros). Ours
    (:func:`~timm_gsop.triu_vectorize`): lower triangle row by row, i.e. entry ``(i, j)``, ``j <= i`` at our
    position ``k`` is entry ``(j, i)`` of the upper triangle.
    """
    upper = torch.triu_indices(dim, dim)
    position = torch.full((dim * dim,), -1, dtype=torch.long)
    position[upper[0] * dim + upper[1]] = torch.arange(upper.shape[1])
    ours = triu_indices_flat(dim)
    rows, cols = ours // dim, ours % dim
    return position[cols * dim + rows]


def _to_mpncovresnet_keys(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """fast-MPN-COV main.py layout (features / representation / classifier) -> MPNCOVResNet keys."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split('.')
        if parts[0] == 'features':
            parts = parts[1:]
            if parts and parts[0] == 'module':  # DataParallel around `features`
                parts = parts[1:]
            idx = int(parts[0]) if parts and parts[0].isdigit() else -1
            name = _FEATURE_CHILDREN[idx] if 0 <= idx < len(_FEATURE_CHILDREN) else None
            out['.'.join([name] + parts[1:]) if name else key] = value
        elif parts[0] == 'representation':
            head = '.'.join(parts[1:3])
            out['.'.join([_REPRESENTATION_KEYS[head]] + parts[3:]) if head in _REPRESENTATION_KEYS else key] = value
        elif parts[0] == 'classifier':
            out['.'.join(['fc'] + parts[1:])] = value
        else:
            out[key] = value
    return out


def _is_fast_mpncov_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.split('.')[0] in ('layer_reduce', 'layer_reduce_bn', 'features', 'representation', 'classifier')
               for k in state_dict)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map a fast-MPN-COV checkpoint (published weights or a ``main.py`` checkpoint, see the module doc) or
    one of ours onto an :class:`ISqrtResNet`, and check that it fits.

    Raises :class:`~timm_gsop.CheckpointMismatchError` naming the model and the first mismatching keys.
    """
    state_dict = _gsop_resnet._unwrap_state_dict(state_dict)
    if _is_fast_mpncov_layout(state_dict):
        state_dict = _to_mpncovresnet_keys(state_dict)
        reduce_w = state_dict.get('layer_reduce.weight')
        fc_w = state_dict.get('fc.weight')
        if reduce_w is not None and fc_w is not None and fc_w.dim() == 2:
            dim = reduce_w.shape[0]
            if fc_w.shape[1] == dim * (dim + 1) // 2:
                state_dict['fc.weight'] = fc_w[:, fast_mpncov_to_triu_order(dim).to(fc_w.device)].contiguous()
    # layer_reduce -> global_pool.conv_reduce etc., missing num_batches_tracked, the fit check
    return _gsop_resnet.checkpoint_filter_fn(state_dict, model)


# ---- builders and registrations --------------------------------------------------------------------------

def _create(variant: str, pretrained: bool = False, **kwargs) -> ISqrtResNet:
    return build_gsop_model(ISqrtResNet, variant, pretrained, filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return gsop_cfg(
        paper_ids='arXiv:1712.01034',
        paper_name='Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square '
                   'Root Normalization',
        origin_url='https://github.com/jiangtaoxie/fast-MPN-COV',
        license='mit',
        **kwargs)


default_cfgs = generate_default_cfgs(with_hub_ids({
    # the authors' published ImageNet weights, converted on load by checkpoint_filter_fn (no Hub copy)
    'isqrt_resnet50.mpncov_in1k': _cfg(
        url='http://jtxie.com/models/mpncovresnet50-15991845.pth', hf_hub_id=None),
    'isqrt_resnet101.mpncov_in1k': _cfg(
        url='http://jtxie.com/models/mpncovresnet101-ade9737a.pth', hf_hub_id=None),
}))


@register_model
def isqrt_resnet50(pretrained: bool = False, **kwargs) -> ISqrtResNet:
    """iSQRT-COV ResNet-50 (fast-MPN-COV mpncovresnet50): stride-1 layer4, 256-d covariance head, 5 iterations."""
    return _create('isqrt_resnet50', pretrained, **dict(dict(block=Bottleneck, layers=(3, 4, 6, 3)), **kwargs))


@register_model
def isqrt_resnet101(pretrained: bool = False, **kwargs) -> ISqrtResNet:
    """iSQRT-COV ResNet-101 (fast-MPN-COV mpncovresnet101): stride-1 layer4, 256-d head, 5 iterations."""
    return _create('isqrt_resnet101', pretrained, **dict(dict(block=Bottleneck, layers=(3, 4, 23, 3)), **kwargs))
