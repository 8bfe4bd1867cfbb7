"""Pieces shared by the timm-gsop model files: pretrained-cfg defaults and the builder wrapper."""
import pickle
import re
from typing import Any, Callable, Dict, Optional, Sequence, Set, Type

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, get_pretrained_cfg, resolve_pretrained_cfg

from ..layers.cov_pool import ISqrtCovPool
from ..layers.second_order import skip_checks

__all__ = [
    'POOL_TYPES', 'InputCheckMixin', 'check_input', 'SecondOrderHeadMixin', 'check_choice', 'check_pool_type',
    'init_like_resnet', 'apply_bn_overrides',
    'HUB_NAMESPACE', 'PUBLISHED', 'CheckpointMismatchError', 'WeightsNotAvailableError', 'gsop_cfg', 'with_hub_ids',
    'has_published_weights', 'build_gsop_model', 'describe_load_error',
]

# Hugging Face Hub organisation the pretrained cfgs point at (repo ids are '<namespace>/<model>.<tag>').
HUB_NAMESPACE = 'timm-gsop'

# '<model>.<tag>' names whose weights have been pushed to '<HUB_NAMESPACE>/<model>.<tag>' (add a name here
# after `timm-gsop push`). Every cfg names its Hub repo; this set is what `timm-gsop list` reports as having
# weights, and what `pretrained=True` errors distinguish ("not published yet" vs "could not download").
PUBLISHED: Set[str] = set()

GSOP_PAPER = dict(
    paper_ids='arXiv:1811.12006',
    paper_name='Global Second-order Pooling Convolutional Networks',
    origin_url='https://github.com/ZilinGao/Global-Second-order-Pooling-Convolutional-Networks',
)


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


class WeightsNotAvailableError(RuntimeError):
    """``pretrained=True`` found no weights on the Hub (none published yet, or the Hub out of reach)."""


# Pool types accepted as ``global_pool``: timm's adaptive pools, the iSQRT-COV head, or '' (none).
POOL_TYPES = ('avg', 'max', 'avgmax', 'catavgmax', 'fast', 'isqrt', '')


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """ValueError naming the bad value and the valid choices."""
    if value not in choices:
        raise ValueError(f'Unknown {name} {value!r}; valid choices: {", ".join(map(str, choices))}')


def check_pool_type(pool_type: str) -> None:
    if pool_type not in POOL_TYPES:
        raise ValueError(f'Unknown global_pool {pool_type!r}; valid choices: {", ".join(map(repr, POOL_TYPES))}')


def init_like_resnet(module: nn.Module) -> None:
    """The released code's (and timm ResNet's) init, for modules added after the network was built."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def apply_bn_overrides(model: nn.Module, bn_momentum: Optional[float], bn_eps: Optional[float]) -> None:
    """timm train.py's ``--bn-momentum`` / ``--bn-eps``: override every BatchNorm of the model."""
    if bn_momentum is None and bn_eps is None:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = m.momentum if bn_momentum is None else bn_momentum
            m.eps = m.eps if bn_eps is None else bn_eps


def check_input(model: nn.Module, x: torch.Tensor) -> None:
    """ValueError naming the expected shape for non-4-D input, a wrong channel count or a too small image."""
    if skip_checks(x):
        return
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    in_chans, min_size = model.in_chans, model.min_input_size
    expected = f'(B, {in_chans}, H, W) with H, W >= {min_size}'
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'{name} expects a tensor {expected}, got {type(x).__name__}')
    if x.dim() != 4:
        raise ValueError(f'{name} expects a 4-D input {expected}, got shape {tuple(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(
            f'{name} expects {in_chans} input channels {expected}, got shape {tuple(x.shape)} '
            f'(create the model with in_chans={x.shape[1]} for other channel counts)')
    if x.shape[-2] < min_size or x.shape[-1] < min_size:
        raise ValueError(f'{name} input is too small: expected {expected}, got shape {tuple(x.shape)}')


class InputCheckMixin:
    """Checks the input of ``forward`` / ``forward_intermediates`` before any compute (see ``check_input``).

    The host sets ``in_chans`` and ``min_input_size`` and has timm's ``forward_features`` / ``forward_head``.
    """
    in_chans: int
    min_input_size: int = 32

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        check_input(self, x)
        return super().forward_intermediates(x, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_input(self, x)
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


class SecondOrderHeadMixin:
    """Head of a network whose ``global_pool`` may be the iSQRT-COV head (``'isqrt'``), a timm pool, or ''.

    The host sets ``num_features``, ``isqrt_dim`` and ``isqrt_iters`` and has parameters before
    ``_create_head`` is called; it uses ``global_pool`` / ``fc`` as timm models do.
    """
    num_features: int
    isqrt_dim: int
    isqrt_iters: int

    def _create_head(self, num_classes: int, global_pool: str, keep_pool: bool = False) -> None:
        p = next(self.parameters())
        dd = {'device': p.device, 'dtype': p.dtype}
        self.num_classes = num_classes
        if global_pool == 'isqrt':
            if not (keep_pool and isinstance(self.global_pool, ISqrtCovPool)):
                self.global_pool = ISqrtCovPool(
                    self.num_features, dim=self.isqrt_dim, num_iters=self.isqrt_iters, **dd)
                init_like_resnet(self.global_pool)
            pooled = self.global_pool.out_features
            self.fc = nn.Linear(pooled, num_classes, **dd) if num_classes > 0 else nn.Identity()
        else:
            if not global_pool and num_classes > 0:
                raise ValueError(
                    f"global_pool='' (no pooling) needs num_classes=0, got num_classes={num_classes}")
            self.global_pool, self.fc = create_classifier(
                self.num_features, num_classes, pool_type=global_pool, **dd)
            pooled = self.num_features * self.global_pool.feat_mult() if global_pool else self.num_features
        self.head_hidden_size = pooled

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier; keeps the pooling (and a trained iSQRT-COV head) when ``global_pool``
        is None or unchanged."""
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        check_pool_type(global_pool)
        self._create_head(num_classes, global_pool, keep_pool=True)
        self.global_pool.train(self.training)
        self.fc.train(self.training)


def gsop_cfg(**kwargs: Any) -> Dict[str, Any]:
    """ImageNet-1k defaults of the released training setup (bilinear, crop_pct 0.875, 14x14 final map)."""
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (14, 14),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'mit',
        **GSOP_PAPER,
        **kwargs,
    }


def with_hub_ids(cfgs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Point each ``'model.tag'`` cfg at its Hub repo ``'<HUB_NAMESPACE>/model.tag'`` (unless set)."""
    return {name: {'hf_hub_id': f'{HUB_NAMESPACE}/{name}', **cfg} for name, cfg in cfgs.items()}


def has_published_weights(name: str) -> bool:
    """Whether ``pretrained=True`` has weights to load for ``'model.tag'``: listed in :data:`PUBLISHED`, or a
    cfg with its own ``url`` / ``file`` (weights published elsewhere, e.g. by a paper's authors)."""
    if name in PUBLISHED:
        return True
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        return False
    return bool(cfg is not None and (cfg.url or cfg.file))


def build_gsop_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool,
        filter_fn: Optional[Callable] = None,
        **kwargs: Any,
) -> nn.Module:
    """timm's ``build_model_with_cfg`` with load failures reported against the model and the source.

    With ``pretrained=True``: a Hub download that fails (no such repo / file / revision, or the Hub out of
    reach with nothing cached) raises :class:`WeightsNotAvailableError` saying so and how to load a local
    file instead; a checkpoint whose tensors do not fit raises :class:`CheckpointMismatchError`; an
    unreadable file raises a ``RuntimeError`` naming the model and the file.
    """
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
    except CheckpointMismatchError:
        raise
    except Exception as e:
        if not pretrained:
            raise
        cfg = _resolved_cfg(variant, kwargs)
        reason = _hub_failure(e)
        if reason is not None:
            raise WeightsNotAvailableError(_no_weights_message(variant, cfg, reason)) from e
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(
                f'Could not load pretrained weights for {variant}: no such file '
                f'{e.filename or _describe_source(cfg, kwargs)}') from e
        mismatch = describe_load_error(e, variant, cfg)
        if mismatch is not None:
            raise mismatch from e
        if isinstance(e, pickle.UnpicklingError) or 'weights_only' in str(e):
            # timm loads with torch.load(weights_only=True): a pickle that needs more than tensors and
            # plain containers (argparse.Namespace allowed) is refused rather than executed
            raise RuntimeError(
                f'Refused to load pretrained weights for {variant} from {_describe_source(cfg, kwargs)}: the '
                'file is a pickle that references objects other than tensors and plain containers, which '
                f'could run arbitrary code ({str(e).splitlines()[0]}). Re-save only its '
                'state dict, or convert it to safetensors.') from e
        if not isinstance(e, (RuntimeError, EOFError, OSError)) and type(e).__name__ != 'SafetensorError':
            raise
        raise RuntimeError(
            f'Could not load pretrained weights for {variant} from {_describe_source(cfg, kwargs)}: {e}. '
            'The file may be truncated, or not a PyTorch / safetensors checkpoint.') from e


def _resolved_cfg(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    try:
        return resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay')).to_dict()
    except Exception:
        return {}


def _describe_source(cfg: Dict[str, Any], kwargs: Dict[str, Any]) -> str:
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    if overlay.get('file') or overlay.get('hf_hub_id'):
        return overlay.get('file') or overlay.get('hf_hub_id')
    if cfg.get('source') == 'hf-hub' and cfg.get('hf_hub_id'):
        return f"hf-hub:{cfg['hf_hub_id']}"
    if cfg.get('source') == 'local-dir' and cfg.get('file'):
        return f"local-dir:{cfg['file']}"
    return cfg.get('file') or cfg.get('url') or (
        f"hf-hub:{cfg['hf_hub_id']}" if cfg.get('hf_hub_id') else 'its pretrained_cfg')


def _hub_failure(error: BaseException) -> Optional[str]:
    """Why a Hugging Face Hub download failed, or None if ``error`` is not a Hub download failure."""
    try:
        from huggingface_hub import errors as hf
    except ImportError:  # pragma: no cover (a dependency)
        return None
    if isinstance(error, hf.GatedRepoError):
        return 'the repository is gated: accept its conditions on the Hub and log in (`hf auth login` or HF_TOKEN)'
    if isinstance(error, hf.RepositoryNotFoundError):
        return 'no such repository on the Hub (or it is private: log in with `hf auth login` or set HF_TOKEN)'
    if isinstance(error, hf.RevisionNotFoundError):
        return 'no such revision in the repository'
    if isinstance(error, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        return ('the Hub could not be reached (no network, or HF_HUB_OFFLINE=1) and the weights are not in the '
                'local Hugging Face cache')
    if isinstance(error, hf.EntryNotFoundError):
        return 'the repository has no model.safetensors or pytorch_model.bin'
    if isinstance(error, hf.HfHubHTTPError):
        status = getattr(getattr(error, 'response', None), 'status_code', None)
        return f'the Hub answered HTTP {status}' if status else f'the Hub request failed ({error})'
    if type(error).__module__.split('.')[0].startswith('httpx'):  # a connection error outside hf_hub_download
        return f'the Hub could not be reached ({type(error).__name__}: {error})'
    return None


def _no_weights_message(variant: str, cfg: Dict[str, Any], reason: str) -> str:
    tag = cfg.get('tag')
    name = f'{variant}.{tag}' if tag else variant
    hub_id = cfg.get('hf_hub_id') or '?'
    how = (f"Load a local file with timm.create_model('{variant}', pretrained=True, "
           "pretrained_cfg_overlay=dict(file='path/to/model.safetensors')), or a folder written by `timm-gsop export` "
           "with timm.create_model('local-dir:path/to/folder', pretrained=True).")
    if cfg.get('source') == 'hf-hub':
        return f'Could not load the weights of hf-hub:{hub_id} ({name}): {reason}. {how}'
    if name in PUBLISHED:
        return f'Could not download the published weights of {name} from hf-hub {hub_id}: {reason}. {how}'
    return f'No published weights yet for {name} at hf-hub {hub_id} ({reason}). {how}'


_SIZE_MISMATCH = re.compile(
    r'size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, '
    r'the shape in current model is torch\.Size\(\[([\d, ]*)\]\)')
_KEY_LIST = re.compile(r'(Missing|Unexpected) key\(s\) in state_dict: ((?:"[^"]+"(?:, )?)+)')


def describe_load_error(error: BaseException, variant: str, cfg: Optional[Dict[str, Any]] = None
                        ) -> Optional[CheckpointMismatchError]:
    """A :class:`CheckpointMismatchError` for torch's ``load_state_dict`` error ``error`` (None if it is not
    one), naming the model, the mismatching keys, and what to pass when the classifier or stem differs."""
    text = str(error)
    if not isinstance(error, RuntimeError) or 'Error(s) in loading state_dict' not in text:
        return None
    cfg = cfg or {}
    sizes = [(k, tuple(int(d) for d in a.split(',') if d.strip()), tuple(int(d) for d in b.split(',') if d.strip()))
             for k, a, b in _SIZE_MISMATCH.findall(text)]
    lists = {kind.lower(): re.findall(r'"([^"]+)"', keys) for kind, keys in _KEY_LIST.findall(text)}
    lines = [f'Checkpoint does not fit {variant}:']
    for label, keys in (('missing', lists.get('missing', [])), ('unexpected', lists.get('unexpected', []))):
        if keys:
            more = f' ... and {len(keys) - 5} more' if len(keys) > 5 else ''
            lines.append(f'  {len(keys)} {label}: {", ".join(keys[:5])}{more}')
    if sizes:
        shown = [f'{k}: checkpoint {a} vs model {b}' for k, a, b in sizes[:5]]
        more = f' ... and {len(sizes) - 5} more' if len(sizes) > 5 else ''
        lines.append(f'  {len(sizes)} wrong shape: {", ".join(shown)}{more}')
    names = lambda key: [key] if isinstance(key, str) else list(key or [])
    for k, a, b in sizes:
        module = k.rsplit('.', 1)[0]
        if module in names(cfg.get('classifier')) and k.endswith('weight') and a and b and a[0] != b[0]:
            lines.append(
                f'  The checkpoint\'s classifier has {a[0]} outputs: create the model with num_classes={a[0]} and '
                f'pretrained_cfg_overlay=dict(file=..., num_classes={a[0]}) to keep it, or pass that overlay with '
                'another num_classes to drop it.')
        elif module in names(cfg.get('first_conv')) and len(a) == 4 and len(b) == 4 and a[1] != b[1]:
            lines.append(f'  The checkpoint\'s stem takes {a[1]} input channels: pass in_chans={a[1]}, or an '
                         f'overlay with input_size=({a[1]}, H, W) for timm to adapt it to another in_chans.')
    return CheckpointMismatchError('\n'.join(lines)) if len(lines) > 1 else None
