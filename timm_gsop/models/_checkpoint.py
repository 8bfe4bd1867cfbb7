"""Checkpoints the model families load.

* :func:`detect_layout`: the ONE layout detector (``'timm'``: timm's / torchvision's / this package's names;
  ``'released-gsop'``: the released GSoP-Net code; ``'fast-mpn-cov'``: fast-MPN-COV's iSQRT-COV networks);
* :func:`checkpoint_filter_fn`: unwraps a training checkpoint, cleans wrapper prefixes as timm does
  (``clean_state_dict``: ``module.``, ``_orig_mod.``) and converts any layout to this package's names. It only
  transforms; whether missing tensors are an error is the caller's choice (``pretrained_strict``);
* :class:`CheckedLoadMixin`: the models' ``load_state_dict``. Strict: a :class:`CheckpointMismatchError`
  naming the model and the keys, from ``load_state_dict``'s own result. Not strict (timm's meaning: missing
  keys allowed): GSoP modules the checkpoint has no tensors for are initialised so that the model computes
  what the checkpoint's network computed (:func:`warm_start_gsop`), and one warning says so.
"""
import contextlib
import contextvars
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models import clean_state_dict
from timm.models.resnet import BasicBlock, Bottleneck

from ..layers.cov_pool import ISqrtCovPool
from ..layers.gsop import ChannelGSoP, GSoPFusion, PositionGSoP
from ..layers.second_order import triu_indices_flat

__all__ = [
    'LAYOUTS', 'CheckpointMismatchError', 'WarmStartWarning', 'checkpoint_entry', 'unwrap_state_dict', 'detect_layout',
    'checkpoint_filter_fn', 'fast_mpncov_to_triu_order', 'CheckedLoadMixin', 'load_request', 'warm_start_gsop',
    'gsop_modules',
]

LAYOUTS = ('timm', 'released-gsop', 'fast-mpn-cov')


class CheckpointMismatchError(RuntimeError, ValueError):
    """A checkpoint that does not fit the model it is loaded into (a RuntimeError like torch's own strict
    ``load_state_dict`` error, and a ValueError: it is bad input)."""


class WarmStartWarning(UserWarning):
    """GSoP modules were initialised function-preserving because the checkpoint had no tensors for them."""


# ---- layouts ---------------------------------------------------------------------------------------------

# released Bottleneck attribute -> (branch, our name inside the GSoP module); branch None = the fusion itself
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
# the covariance head, named alike in the released GSoP-Net code and fast-MPN-COV's MPNCOVResNet
_HEAD_KEYS = {'layer_reduce': 'global_pool.conv_reduce', 'layer_reduce_bn': 'global_pool.bn_reduce'}
# children of fast-MPN-COV's MPNCOVResNet, in order: its main.py's `features` is nn.Sequential(*children[:-k])
_FAST_MPNCOV_FEATURES: List[Optional[str]] = [
    'conv1', 'bn1', None, None, 'layer1', 'layer2', 'layer3', 'layer4', 'layer_reduce', 'layer_reduce_bn']
_FAST_MPNCOV_REPRESENTATION = {'conv_dr_block.0': 'layer_reduce', 'conv_dr_block.1': 'layer_reduce_bn'}


def checkpoint_entry(checkpoint: Mapping[str, Any], keys: Sequence[str] = ('state_dict', 'model')
                     ) -> Optional[Mapping[str, Any]]:
    """The first of ``keys`` whose value is a mapping (train.py / the released code keep the weights under
    ``state_dict`` or ``model``, the EMA under ``state_dict_ema`` or ``model_ema``), else None."""
    for key in keys:
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    return None


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors of a state dict or of a training checkpoint's ``state_dict`` / ``model`` entry, with
    wrapper prefixes removed by timm's ``clean_state_dict`` (DataParallel / DDP ``module.``, torch.compile
    ``_orig_mod.``)."""
    entry = checkpoint_entry(checkpoint)
    checkpoint = checkpoint if entry is None else entry
    return clean_state_dict({k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)})


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """Which naming ``state_dict`` (already unwrapped) uses; one of :data:`LAYOUTS`."""
    keys = list(state_dict)
    if any(len(parts) >= 4 and parts[0].startswith('layer') and parts[2] in _RELEASED_BLOCK_KEYS
           for parts in (k.split('.') for k in keys)):
        return 'released-gsop'
    if any(k.split('.')[0] in ('features', 'representation', 'classifier') + tuple(_HEAD_KEYS) for k in keys):
        return 'fast-mpn-cov'
    return 'timm'


def fast_mpncov_to_triu_order(dim: int) -> torch.Tensor:
    """Index ``p`` such that ``ours = theirs[..., p]`` for a ``dim x dim`` symmetric matrix's triangle.

    fast-MPN-COV: upper triangle row by row (``ones(d, d).triu()`` nonzeros). Ours (``triu_vectorize``, as
    the GSoP release): lower triangle row by row, i.e. our entry ``(i, j)``, ``j <= i`` is their ``(j, i)``.
    """
    upper = torch.triu_indices(dim, dim)
    position = torch.full((dim * dim,), -1, dtype=torch.long)
    position[upper[0] * dim + upper[1]] = torch.arange(upper.shape[1])
    ours = triu_indices_flat(dim)
    rows, cols = ours // dim, ours % dim
    return position[cols * dim + rows]


def _rename_head(key: str) -> str:
    parts = key.split('.')
    return '.'.join([_HEAD_KEYS[parts[0]]] + parts[1:]) if parts[0] in _HEAD_KEYS else key


def _fast_mpncov_to_timm(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """fast-MPN-COV (its main.py's features / representation / classifier, or MPNCOVResNet's names) -> ours,
    the classifier's columns permuted from its upper-triangle order to our lower-triangle order."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split('.')
        if parts[0] == 'features':
            parts = parts[1:]
            if parts and parts[0] == 'module':  # DataParallel around `features`
                parts = parts[1:]
            idx = int(parts[0]) if parts and parts[0].isdigit() else -1
            name = _FAST_MPNCOV_FEATURES[idx] if 0 <= idx < len(_FAST_MPNCOV_FEATURES) else None
            key = '.'.join([name] + parts[1:]) if name else key
        elif parts[0] == 'representation':
            head = '.'.join(parts[1:3])
            key = '.'.join([_FAST_MPNCOV_REPRESENTATION[head]] + parts[3:]) if head in _FAST_MPNCOV_REPRESENTATION \
                else key
        elif parts[0] == 'classifier':
            key = '.'.join(['fc'] + parts[1:])
        out[_rename_head(key)] = value
    reduce_w, fc_w = out.get('global_pool.conv_reduce.weight'), out.get('fc.weight')
    if reduce_w is not None and fc_w is not None and fc_w.dim() == 2:
        dim = reduce_w.shape[0]
        if fc_w.shape[1] == dim * (dim + 1) // 2:
            out['fc.weight'] = fc_w[:, fast_mpncov_to_triu_order(dim).to(fc_w.device)].contiguous()
    return out


def _released_gsop_to_timm(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        parts = key.split('.')
        if len(parts) >= 4 and parts[0].startswith('layer') and parts[2] in _RELEASED_BLOCK_KEYS:
            branch, name = _RELEASED_BLOCK_KEYS[parts[2]]
            gsop = _get_submodule(model, '.'.join(parts[:2] + ['se']))
            # a fusion module holds both branches; a single-branch module is the branch itself
            prefix = f'{branch}.' if branch is not None and (gsop is None or isinstance(gsop, GSoPFusion)) else ''
            key = '.'.join(parts[:2] + ['se', prefix + name] + parts[3:])
        out[_rename_head(key)] = value
    return out


def _get_submodule(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _names(value: Any) -> Tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


def _classifier_keys(model: nn.Module) -> Tuple[str, ...]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return tuple(f'{n}.{p}' for n in _names(cfg.get('classifier') or 'fc') for p in ('weight', 'bias'))


def _stem_keys(model: nn.Module) -> Tuple[str, ...]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return tuple(f'{n}.{p}' for n in _names(cfg.get('first_conv') or 'conv1') for p in ('weight', 'bias'))


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert a checkpoint of any known layout (:func:`detect_layout`) to ``model``'s names.

    Also: covariance-head tensors are left out for a model without that head (e.g. ``global_pool='avg'``); a
    classifier trained on another head's features (a plain network's average-pooled 2048-d vector vs the
    32,896-d covariance vector) is left out, since no model could use it; ``num_batches_tracked`` buffers that
    releases older than PyTorch 0.4.1 lack are added. Nothing is checked here: ``load_state_dict`` does that.
    """
    state_dict = unwrap_state_dict(state_dict)
    layout = detect_layout(state_dict)
    if layout == 'fast-mpn-cov':
        state_dict = _fast_mpncov_to_timm(state_dict)
    elif layout == 'released-gsop':
        state_dict = _released_gsop_to_timm(state_dict, model)
    has_head = any(k.startswith('global_pool.') for k in state_dict)
    model_has_head = isinstance(getattr(model, 'global_pool', None), ISqrtCovPool)
    if has_head != model_has_head:
        for key in _classifier_keys(model):
            state_dict.pop(key, None)
    if not model_has_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith('global_pool.')}
    for key, buf in model.named_buffers():
        if key.endswith('num_batches_tracked') and key not in state_dict and key.rsplit('.', 1)[0] + '.running_mean' \
                in state_dict:
            state_dict[key] = torch.zeros_like(buf, device='cpu')
    return state_dict


# ---- loading ---------------------------------------------------------------------------------------------

_GSOP_MODULES = (ChannelGSoP, PositionGSoP, GSoPFusion)


@dataclass
class _LoadRequest:
    strict: bool
    source: str
    cfg_num_classes: Optional[int] = None
    cfg_in_chans: Optional[int] = None
    features_only: bool = False

    def keys_timm_drops(self, model: nn.Module) -> Tuple[str, ...]:
        """What timm's ``load_pretrained`` removes from the checkpoint itself: the classifier when the model's
        classes differ from the weights' (``features_only`` counts as 0 classes; train.py's --pretrained-path
        overlay says -1), the stem when it cannot adapt it to the model's ``in_chans``."""
        out: Tuple[str, ...] = ()
        num_classes = 0 if self.features_only else getattr(model, 'num_classes', self.cfg_num_classes)
        if num_classes != self.cfg_num_classes:
            out += _classifier_keys(model)
        if getattr(model, 'in_chans', self.cfg_in_chans) != self.cfg_in_chans:
            out += _stem_keys(model)
        return out


_REQUEST: contextvars.ContextVar = contextvars.ContextVar('timm_gsop_load_request', default=None)


@contextlib.contextmanager
def load_request(strict: bool, source: str, cfg: Optional[Mapping[str, Any]] = None,
                 features_only: bool = False) -> Iterator[None]:
    """While a model is built with ``pretrained=True``: the caller's ``pretrained_strict``, a description of the
    weights and their cfg. timm's loader relaxes strictness for the whole load when it re-initialises the
    classifier or cannot adapt the stem; :meth:`CheckedLoadMixin.load_state_dict` still applies the caller's
    choice to every other tensor."""
    cfg = cfg or {}
    request = _LoadRequest(strict, source, cfg.get('num_classes'), (cfg.get('input_size') or (3,))[0], features_only)
    token = _REQUEST.set(request)
    try:
        yield
    finally:
        _REQUEST.reset(token)


def gsop_modules(model: nn.Module) -> List[Tuple[str, nn.Module, nn.Module]]:
    """``(name, gsop_module, block)`` for every GSoP module in a block's ``se`` slot."""
    out = []
    for name, block in model.named_modules():
        gsop = getattr(block, 'se', None)
        if isinstance(gsop, _GSOP_MODULES):
            out.append((f'{name}.se' if name else 'se', gsop, block))
    return out


def gsop_input_module(block: nn.Module) -> Optional[nn.Module]:
    """The module whose output a block's GSoP module reads and scales: timm's Bottleneck ``bn3``, BasicBlock
    ``bn2``, or what the block names in ``gsop_input`` (the CIFAR pre-activation block: ``conv3``)."""
    if isinstance(block, Bottleneck):
        return block.bn3
    if isinstance(block, BasicBlock):
        return block.bn2
    name = getattr(block, 'gsop_input', None)
    return getattr(block, name) if name else None


def _double_output(module: nn.Module) -> bool:
    """Scale ``module``'s output by exactly 2 (a BN's or a linear conv's affine parameters times 2)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        params = (module.weight, module.bias)
    elif isinstance(module, nn.Conv2d):
        params = (module.weight, module.bias)
    else:
        return False
    with torch.no_grad():
        for p in params:
            if p is not None:
                p.mul_(2)
    return True


def _zero_last_gate_layers(gsop: nn.Module) -> None:
    with torch.no_grad():
        for name, m in gsop.named_modules():
            if name.endswith('gate.conv_expand') or name == 'gate.conv_expand':
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()


def warm_start_gsop(model: nn.Module, missing_keys: Sequence[str]) -> List[str]:
    """Initialise every GSoP module whose tensors are all in ``missing_keys`` (and whose input module's are not)
    so that its block computes what it computed without it: the gate's last layer zero (every gate is exactly
    0.5, the steepest point of its sigmoid) and the module it scales doubled (``2y * 0.5 == y`` in floating
    point). Exact for the channel manner; the position and fusion manners add a ReLU (and fusion_avg a second
    term) that the plain block lacks, so there it is the closest start, not an identity.

    Returns the names of the modules initialised.
    """
    missing = set(missing_keys)
    done = []
    for name, gsop, block in gsop_modules(model):
        # BatchNorm's loader fills in a missing num_batches_tracked itself (old checkpoints): not a sign of presence
        own = [f'{name}.{k}' for k in gsop.state_dict() if not k.endswith('num_batches_tracked')]
        host = gsop_input_module(block)
        if host is None or not own or not all(k in missing for k in own):
            continue
        host_name = next(n for n, m in model.named_modules() if m is host)
        if any(f'{host_name}.{k}' in missing for k in host.state_dict()):
            continue  # nothing loaded to preserve
        if not _double_output(host):
            continue
        _zero_last_gate_layers(gsop)
        done.append(name)
    return done


def _describe(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    name = cfg.get('architecture') or type(model).__name__
    manner = getattr(model, 'gsop_manner', None)
    return f'{name} (gsop_manner={manner!r})' if manner else name


def _listed(label: str, keys: Sequence[str]) -> str:
    more = f' ... and {len(keys) - 5} more' if len(keys) > 5 else ''
    return f'  {len(keys)} {label}: {", ".join(keys[:5])}{more}'


def _mismatch_message(model: nn.Module, missing: Sequence[str], unexpected: Sequence[str],
                      wrong: Sequence[Tuple[str, tuple, tuple]]) -> str:
    lines = [f'Checkpoint does not fit {_describe(model)}:']
    if missing:
        lines.append(_listed('missing', list(missing)))
    if unexpected:
        lines.append(_listed('unexpected', list(unexpected)))
    if wrong:
        lines.append(_listed('wrong shape', [f'{k}: checkpoint {a} vs model {b}' for k, a, b in wrong]))
    for key, a, b in wrong:
        if key in _classifier_keys(model) and key.endswith('weight') and a and b and a[0] != b[0]:
            lines.append(
                f"  The checkpoint's classifier has {a[0]} outputs: create the model with num_classes={a[0]} and "
                f'pretrained_cfg_overlay=dict(file=..., num_classes={a[0]}) to keep it, or pass that overlay with '
                'another num_classes to drop it.')
        elif key in _stem_keys(model) and len(a) == 4 and len(b) == 4 and a[1] != b[1]:
            lines.append(f"  The checkpoint's stem takes {a[1]} input channels: pass in_chans={a[1]}, or an "
                         f'overlay with input_size=({a[1]}, H, W) for timm to adapt it to another in_chans.')
    gsop_keys = {f'{n}.{k}' for n, g, _ in gsop_modules(model) for k in g.state_dict()}
    if missing and not unexpected and not wrong and gsop_keys & set(missing) and \
            all(k in gsop_keys or k.startswith('global_pool.') or k in _classifier_keys(model) for k in missing):
        lines.append(
            "  It is a plain network's checkpoint (no GSoP tensors). To warm-start from it, so that the GSoP-Net "
            'first computes what that network computed, load it with pretrained_strict=False: '
            "timm.create_model(..., pretrained=True, pretrained_strict=False, pretrained_cfg_overlay=dict(file=...)) "
            'or train.py --pretrained --pretrained-path FILE --model-kwargs pretrained_strict=False.')
    return '\n'.join(lines)


class CheckedLoadMixin:
    """``load_state_dict`` with this package's checks and warm start (see the module docstring).

    Inside ``timm.create_model(..., pretrained=True)`` the caller's ``pretrained_strict`` decides, also when
    timm relaxes strictness because it re-initialises the classifier (the classifier's keys may then be
    missing, and the stem's when timm could not adapt it to ``in_chans``).
    """

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        request = _REQUEST.get()
        allowed: Tuple[str, ...] = ()
        source = 'the state dict'
        if request is not None:
            strict, source, allowed = request.strict, request.source, request.keys_timm_drops(self)
        own = self.state_dict()
        wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
                 if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
        if wrong:  # torch would copy what fits and then raise; refuse before touching the model
            raise CheckpointMismatchError(_mismatch_message(self, [], [], wrong))
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k not in allowed]
        if strict and (missing or result.unexpected_keys):
            raise CheckpointMismatchError(_mismatch_message(self, missing, result.unexpected_keys, []))
        if not strict and result.missing_keys:
            started = warm_start_gsop(self, result.missing_keys)
            if started:
                warnings.warn(_warm_start_message(self, source, started, result.missing_keys), WarmStartWarning,
                              stacklevel=2)
        return result


def _warm_start_message(model: nn.Module, source: str, started: Sequence[str], missing: Sequence[str]) -> str:
    started_keys = {f'{n}.{k}' for n, g, _ in gsop_modules(model) if n in started for k in g.state_dict()}
    others = sorted({k.rsplit('.', 1)[0] for k in missing if k not in started_keys})
    manner = getattr(model, 'gsop_manner', 'channel')
    exact = ('it computes what the source network computed' if manner == 'channel' else
             f'gsop_manner={manner!r} adds a ReLU the plain block lacks, so its outputs are not the source '
             "network's (its weights are kept, not its function; README: Start from pretrained weights)")
    text = (f'Warm start of {_describe(model)} from {source}: {len(started)} GSoP module(s) had no tensors there and '
            f'were initialised function-preserving (each gate 0.5, the BN it scales doubled): {exact}.')
    if others:
        shown = ', '.join(others[:6]) + (f' ... and {len(others) - 6} more' if len(others) > 6 else '')
        text += f' Also not in the checkpoint, so newly initialised: {shown}.'
    return text
