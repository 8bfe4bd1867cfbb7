"""The builder every timm-gsop model file's ``_create_<family>`` goes through: timm's ``build_model_with_cfg``
with pretrained-weight failures reported as what really failed."""
import http.client
import pickle
import socket
import urllib.error
from typing import Any, Callable, Dict, Optional, Type

import torch.nn as nn
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from ._cfg import PUBLISHED
from ._checkpoint import CheckpointMismatchError, load_request

__all__ = ['WeightsNotAvailableError', 'build_gsop_model', 'describe_source']


class WeightsNotAvailableError(RuntimeError):
    """``pretrained=True`` found no weights: none published for the tag, or the place they are published could
    not be reached (and nothing is cached)."""


_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError, TimeoutError)


def build_gsop_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool,
        filter_fn: Optional[Callable] = None,
        **kwargs: Any,
) -> nn.Module:
    """timm's ``build_model_with_cfg``, with ``pretrained=True`` made explicit:

    * a tag without published weights (no Hub repo, url or file in its cfg or overlay) raises
      :class:`WeightsNotAvailableError` at once, before any network request;
    * the caller's ``pretrained_strict`` decides how missing tensors are handled (see ``_checkpoint``);
    * failures name the model and the source: :class:`WeightsNotAvailableError` when the Hub or a url cannot
      be reached or has nothing there, ``FileNotFoundError`` for a missing file, :class:`CheckpointMismatchError`
      for tensors that do not fit, a ``RuntimeError`` for a file that is not a readable checkpoint.
    """
    if not pretrained:
        return _with_pool_size(build_model_with_cfg(
            model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs))
    cfg = _resolved_cfg(variant, kwargs)
    source = describe_source(cfg, kwargs)
    if not _has_source(cfg, kwargs):
        raise WeightsNotAvailableError(_no_weights_message(variant, cfg, None))
    try:
        with load_request(kwargs.get('pretrained_strict', True), source, cfg, bool(kwargs.get('features_only'))):
            return _with_pool_size(build_model_with_cfg(
                model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs))
    except CheckpointMismatchError:
        raise
    except Exception as e:
        reason = _hub_failure(e)
        if reason is None and isinstance(e, _NETWORK_ERRORS) and not isinstance(e, FileNotFoundError):
            reason = f'{source} could not be downloaded ({type(e).__name__}: {e})'
        if reason is not None:
            raise WeightsNotAvailableError(_no_weights_message(variant, cfg, reason)) from e
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(
                f'Could not load pretrained weights for {variant}: no such file {e.filename or source}') from e
        if isinstance(e, pickle.UnpicklingError) or 'weights_only' in str(e):
            # timm loads with torch.load(weights_only=True): a pickle that needs more than tensors and plain
            # containers (argparse.Namespace allowed) is refused rather than executed
            raise RuntimeError(
                f'Refused to load pretrained weights for {variant} from {source}: the file is a pickle that '
                'references objects other than tensors and plain containers, which could run arbitrary code '
                f'({str(e).splitlines()[0]}). Re-save only its state dict, or convert it to safetensors.') from e
        if not isinstance(e, (RuntimeError, EOFError, OSError)) and type(e).__name__ != 'SafetensorError':
            raise
        raise RuntimeError(
            f'Could not load pretrained weights for {variant} from {source}: {e}. The file may be truncated, or '
            'not a PyTorch / safetensors checkpoint.') from e


def _with_pool_size(model: nn.Module) -> nn.Module:
    """Make the model's ``pretrained_cfg['pool_size']`` its final map at the cfg's input size, which model kwargs
    change (``last_stride=2`` halves GSoP-Net's 14x14)."""
    cfg, info = getattr(model, 'pretrained_cfg', None), getattr(model, 'feature_info', None)
    if cfg and isinstance(info, list) and info and cfg.get('input_size') and cfg.get('pool_size'):
        reduction = info[-1]['reduction']
        cfg['pool_size'] = tuple(-(-size // reduction) for size in cfg['input_size'][1:])
    return model


def _resolved_cfg(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    try:
        return resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay')).to_dict()
    except Exception:
        return {}


def _has_source(cfg: Dict[str, Any], kwargs: Dict[str, Any]) -> bool:
    return bool(cfg.get('state_dict') is not None or cfg.get('file') or cfg.get('url') or cfg.get('hf_hub_id'))


def describe_source(cfg: Dict[str, Any], kwargs: Dict[str, Any]) -> str:
    """Where ``pretrained=True`` loads from, for messages: a file, a url or ``hf-hub:ORG/NAME``."""
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    if overlay.get('state_dict') is not None or cfg.get('state_dict') is not None:
        return 'the state dict in pretrained_cfg_overlay'
    if overlay.get('file') or overlay.get('hf_hub_id'):
        return overlay.get('file') or f"hf-hub:{overlay['hf_hub_id']}"
    if cfg.get('source') == 'hf-hub' and cfg.get('hf_hub_id'):
        return f"hf-hub:{cfg['hf_hub_id']}"
    if cfg.get('source') == 'local-dir' and cfg.get('file'):
        return f"local-dir:{cfg['file']}"
    return cfg.get('file') or cfg.get('url') or (
        f"hf-hub:{cfg['hf_hub_id']}" if cfg.get('hf_hub_id') else 'its pretrained_cfg')


def _hub_failure(error: BaseException) -> Optional[str]:
    """Why a Hugging Face Hub download failed, or None if ``error`` is not a Hub download failure."""
    from huggingface_hub import errors as hf
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


def _no_weights_message(variant: str, cfg: Dict[str, Any], reason: Optional[str]) -> str:
    tag = cfg.get('tag')
    name = f'{variant}.{tag}' if tag else variant
    how = (f"Load a local file with timm.create_model('{variant}', pretrained=True, "
           "pretrained_cfg_overlay=dict(file='path/to/model.safetensors')), or a folder written by `timm-gsop export` "
           "with timm.create_model('local-dir:path/to/folder', pretrained=True).")
    notes = ' '.join(cfg.get('notes') or ())
    if reason is None:
        return (f'No published weights for {name}: the authors released none and none have been published for this '
                f'package yet (timm.list_models(pretrained=True) lists the ones that exist). {how}')
    if cfg.get('source') == 'hf-hub':
        return f"Could not load the weights of hf-hub:{cfg.get('hf_hub_id')} ({name}): {reason}. {how}"
    where = 'hf-hub ' + cfg['hf_hub_id'] if cfg.get('hf_hub_id') else cfg.get('url') or 'its source'
    published = ' published' if name in PUBLISHED or cfg.get('url') else ''
    return f'Could not download the{published} weights of {name} from {where}: {reason}. {notes + " " if notes else ""}{how}'
