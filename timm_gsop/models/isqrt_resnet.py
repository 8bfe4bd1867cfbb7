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
from typing import Any, Dict, Tuple

import torch.nn as nn

from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck

from .gsop_resnet import GSoPResNet
from ._builder import build_gsop_model
from ._cfg import gsop_cfg, with_hub_ids
from ._checkpoint import checkpoint_filter_fn as _convert_checkpoint
from ._checkpoint import fast_mpncov_to_triu_order

__all__ = ['ISqrtResNet', 'checkpoint_filter_fn', 'fast_mpncov_to_triu_order']  # the last from _checkpoint

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


def checkpoint_filter_fn(state_dict, model: nn.Module):
    """Convert a fast-MPN-COV checkpoint (published weights or a ``main.py`` checkpoint, see the module doc;
    classifier columns reordered) or one of this package's to this model's names. Transforms only."""
    return _convert_checkpoint(state_dict, model)


# ---- builders and registrations --------------------------------------------------------------------------

def _create_isqrt_resnet(variant: str, pretrained: bool = False, **kwargs) -> ISqrtResNet:
    return build_gsop_model(ISqrtResNet, variant, pretrained, filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return gsop_cfg(
        paper_ids='arXiv:1712.01034',
        paper_name='Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square '
                   'Root Normalization',
        origin_url='https://github.com/jiangtaoxie/fast-MPN-COV',
        license='mit',
        **kwargs)


_DOWNLOAD_NOTE = (
    'The authors link the file from https://github.com/jiangtaoxie/fast-MPN-COV (Google Drive / Baidu) when this '
    'url is unreachable: download it by hand and pass pretrained_cfg_overlay=dict(file=PATH), or convert it to '
    'a Hub folder with `timm-gsop export PATH --model {model} --out DIR`.')

default_cfgs = generate_default_cfgs(with_hub_ids({
    # the authors' published ImageNet weights, converted on load by checkpoint_filter_fn (no Hub copy)
    'isqrt_resnet50.mpncov_in1k': _cfg(
        url='http://jtxie.com/models/mpncovresnet50-15991845.pth',
        notes=(_DOWNLOAD_NOTE.format(model='isqrt_resnet50'),)),
    'isqrt_resnet101.mpncov_in1k': _cfg(
        url='http://jtxie.com/models/mpncovresnet101-ade9737a.pth',
        notes=(_DOWNLOAD_NOTE.format(model='isqrt_resnet101'),)),
}))


@register_model
def isqrt_resnet50(pretrained: bool = False, **kwargs) -> ISqrtResNet:
    """iSQRT-COV ResNet-50 (fast-MPN-COV mpncovresnet50): stride-1 layer4, 256-d covariance head, 5 iterations."""
    return _create_isqrt_resnet('isqrt_resnet50', pretrained, **dict(dict(block=Bottleneck, layers=(3, 4, 6, 3)), **kwargs))


@register_model
def isqrt_resnet101(pretrained: bool = False, **kwargs) -> ISqrtResNet:
    """iSQRT-COV ResNet-101 (fast-MPN-COV mpncovresnet101): stride-1 layer4, 256-d head, 5 iterations."""
    return _create_isqrt_resnet('isqrt_resnet101', pretrained, **dict(dict(block=Bottleneck, layers=(3, 4, 23, 3)), **kwargs))
