"""Reading checkpoint files without running code, and what a timm train.py checkpoint says about its model.

``read_checkpoint`` accepts timm ``train.py`` checkpoints (with EMA weights and the run's ``args``), checkpoints and
state dicts of the released GSoP-Net code and of fast-MPN-COV, plain state dicts and safetensors files. Pickles
are read with ``torch.load(weights_only=True)``, allowing ``argparse.Namespace`` (train.py's ``args``) and
nothing else: a pickle that would run code is refused. Which layout the tensors use is the model family's
business (``models.gsop_resnet.checkpoint_layout``, the one detector).
"""
import argparse
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import timm

from .models.gsop_resnet import WarmStartWarning
from .zoo import list_gsop_models

__all__ = [
    'UnsafeCheckpointError', 'CheckpointReadError', 'Checkpoint', 'read_checkpoint', 'family_filter',
    'kwargs_from_train_args', 'data_config_from_train_args', 'resolve_model_name', 'infer_from_weights',
    'convert_state_dict', 'load_into',
]


class UnsafeCheckpointError(RuntimeError):
    """A pickle that needs more than tensors, plain containers and argparse.Namespace to load."""


class CheckpointReadError(RuntimeError):
    """A file that is not a readable checkpoint (truncated, corrupted, or another format)."""


@dataclass
class Checkpoint:
    """What ``read_checkpoint`` found in a file."""
    path: Path
    container: str  # 'timm-train', 'released-code', 'state-dict' or 'safetensors'
    state_dict: Dict[str, torch.Tensor]
    ema_state_dict: Optional[Dict[str, torch.Tensor]] = None
    args: Dict[str, Any] = field(default_factory=dict)  # train.py's argparse.Namespace, as a dict
    epoch: Optional[int] = None
    metric: Optional[float] = None      # train.py: the eval metric stored with the checkpoint
    best_prec1: Optional[float] = None  # released GSoP / fast-MPN-COV main.py: best top-1 accuracy
    arch: Optional[str] = None

    @property
    def description(self) -> str:
        return {
            'timm-train': "a checkpoint of timm's train.py",
            'released-code': 'a checkpoint of the released training code (main.py)',
            'state-dict': 'a PyTorch state dict',
            'safetensors': 'a safetensors file',
        }[self.container]


def _is_safetensors(path: Path) -> bool:
    if path.suffix == '.safetensors':
        return True
    with path.open('rb') as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object; pickles and zips start otherwise
    return len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < (1 << 32)


def _entry(checkpoint: Mapping[str, Any], keys: Tuple[str, ...]) -> Optional[Mapping[str, Any]]:
    """The first of ``keys`` holding a mapping: train.py and the released code keep the weights under
    ``state_dict`` or ``model``, the EMA under ``state_dict_ema`` or ``model_ema``."""
    return next((checkpoint[k] for k in keys if isinstance(checkpoint.get(k), Mapping)), None)


def _tensors(obj: Any) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_checkpoint(path: Union[str, Path]) -> Checkpoint:
    """Read a checkpoint without running code: safetensors, or a pickle loaded with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the pickle needs globals beyond tensors, containers and argparse.Namespace.
        CheckpointReadError: unreadable (truncated, corrupted) or holding no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'No checkpoint file at {path}')
    if _is_safetensors(path):
        import safetensors.torch
        try:
            state_dict = safetensors.torch.load_file(str(path), device='cpu')
        except Exception as e:
            raise CheckpointReadError(
                f'{path} is not a readable safetensors file ({e}); it may be truncated or corrupted.') from e
        return Checkpoint(path, 'safetensors', state_dict)

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(_unsafe_message(path, e)) from e
    except Exception as e:
        raise CheckpointReadError(
            f'Could not read {path} as a PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}). '
            'It may be truncated or corrupted, or not a checkpoint at all.') from e
    return _inspect(path, obj)


def _unsafe_message(path: Path, error: Exception) -> str:
    names = []
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        pass
    names = [n for n in names if n != 'argparse.Namespace'] or re.findall(r'GLOBAL ([\w.]+)', str(error))
    needs = f' It needs {", ".join(sorted(set(names)))}.' if names else ''
    return (
        f'Refusing to load {path}: unpickling it would import or call code beyond tensors, plain containers and '
        f'argparse.Namespace (torch.load(weights_only=True) blocked it).{needs} A checkpoint from an untrusted '
        'source can run arbitrary code this way. If you trust the file, load it yourself and save only its '
        "weights, e.g. torch.save(checkpoint['state_dict'], 'weights.pth'), then export that.")


def _inspect(path: Path, obj: Any) -> Checkpoint:
    if isinstance(obj, argparse.Namespace) or not isinstance(obj, Mapping):
        raise CheckpointReadError(f'{path} holds a {type(obj).__name__}, not a state dict or a checkpoint dict.')
    args = obj.get('args')
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}
    sd, ema = _entry(obj, ('state_dict', 'model')), _entry(obj, ('state_dict_ema', 'model_ema'))
    sd = None if sd is None else _tensors(sd)
    ema = None if ema is None else _tensors(ema)
    if sd is None:
        sd = _tensors(obj)
        container = 'state-dict'
    elif args or ema is not None or 'version' in obj:
        container = 'timm-train'
    else:
        container = 'released-code'
    if not sd:
        raise CheckpointReadError(f'{path} has no tensors under state_dict / model or at its top level.')

    def number(key, kind=float):
        value = obj.get(key)
        try:
            return kind(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    return Checkpoint(
        path, container, sd, ema, args, epoch=number('epoch', int), metric=number('metric'),
        best_prec1=number('best_prec1'), arch=obj.get('arch') if isinstance(obj.get('arch'), str) else None)


def family_filter(model_name: str) -> Optional[Callable]:
    """The ``checkpoint_filter_fn`` of the module that registers ``model_name`` (None if it has none)."""
    arch = timm.models.split_model_name_tag(model_name)[0]
    module = sys.modules.get(timm.models.model_entrypoint(arch).__module__)
    return getattr(module, 'checkpoint_filter_fn', None)


def kwargs_from_train_args(args: Mapping[str, Any]) -> Dict[str, Any]:
    """The create_model kwargs timm's train.py built its model with (training-only ones left out)."""
    kwargs = {}
    if args.get('num_classes') is not None:
        kwargs['num_classes'] = int(args['num_classes'])
    in_chans = args.get('in_chans') or (args.get('input_size') or (None,))[0]
    if in_chans is not None:
        kwargs['in_chans'] = int(in_chans)
    if args.get('gp'):
        kwargs['global_pool'] = args['gp']
    for key in ('bn_momentum', 'bn_eps'):
        if args.get(key) is not None:
            kwargs[key] = args[key]
    kwargs.update(dict(args.get('model_kwargs') or {}))
    kwargs.pop('pretrained_strict', None)  # how the training run loaded its start, not a model argument
    return kwargs


def data_config_from_train_args(args: Mapping[str, Any]) -> Dict[str, Any]:
    """The preprocessing train.py evaluated with, where it overrode the model's defaults."""
    out = {}
    for key in ('input_size', 'img_size', 'crop_pct', 'crop_mode', 'mean', 'std', 'interpolation'):
        value = args.get(key)
        if value is not None and value != '':
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def resolve_model_name(model: Optional[str], ckpt: Checkpoint) -> str:
    name = model or ckpt.args.get('model')
    mpncov = re.fullmatch(r'mpncovresnet(\d+)', ckpt.arch or '')
    if not name and mpncov and timm.is_model(f'isqrt_resnet{mpncov.group(1)}'):
        name = f'isqrt_resnet{mpncov.group(1)}'  # fast-MPN-COV main.py's arch
    if not name:
        raise ValueError(f'{ckpt.path} does not say which model it is for: pass --model NAME.')
    if model and ckpt.args.get('model') and timm.models.split_model_name_tag(model)[0] != \
            timm.models.split_model_name_tag(str(ckpt.args['model']))[0]:
        raise ValueError(f"{ckpt.path} was trained as {ckpt.args['model']!r} (its args.model), not {model!r}.")
    if name.startswith(('hf-hub:', 'hf_hub:', 'local-dir:')):
        raise ValueError(f'{ckpt.path} was trained from {name!r}: pass the architecture with --model NAME.')
    arch, tag = timm.models.split_model_name_tag(name)
    if arch not in list_gsop_models():
        raise ValueError(f'{arch!r} is not a timm-gsop model (registered: {", ".join(list_gsop_models())}); '
                         "timm's push_to_hf_hub publishes other timm models.")
    if not tag:
        tag = timm.models.get_pretrained_cfg(arch).tag or ''
    return f'{arch}.{tag}' if tag else arch


def infer_from_weights(name: str, kwargs: Dict[str, Any], sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """num_classes / in_chans from the classifier / stem weights when neither the args nor the user set them."""
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    kwargs = dict(kwargs)
    classifier = cfg.get('classifier')
    classifier = classifier if isinstance(classifier, str) else (classifier or [None])[-1]
    weight = sd.get(f'{classifier}.weight') if classifier else None
    if 'num_classes' not in kwargs and weight is not None and weight.ndim >= 2:
        kwargs['num_classes'] = int(weight.shape[0])
    first = cfg.get('first_conv')
    first = first if isinstance(first, str) else (first or [None])[0]
    stem = sd.get(f'{first}.weight') if first else None
    if 'in_chans' not in kwargs and stem is not None and stem.ndim == 4 and stem.shape[1] != 3:
        kwargs['in_chans'] = int(stem.shape[1])
    return kwargs


def convert_state_dict(name: str, sd: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """``sd`` in ``model``'s names (the family's ``checkpoint_filter_fn``, its ``WarmStartWarning`` silenced: the
    caller judges what was completed)."""
    filter_fn = family_filter(name)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', WarmStartWarning)
        return filter_fn(dict(sd), model) if filter_fn is not None else dict(sd)


def load_into(model: nn.Module, name: str, sd: Mapping[str, torch.Tensor]) -> None:
    """Load a checkpoint into ``model`` strictly (torch's error names the missing, unexpected and mis-shaped keys).

    An export publishes trained weights, so a checkpoint the filter completed into a warm start (a plain network's)
    is refused: the filter fills what the checkpoint lacks with the model's own tensors, found by their storage.
    (BN step counters are left out: the released code predates them.)"""
    sd = convert_state_dict(name, sd, model)
    model.load_state_dict(sd, strict=True)
    own = {k: t.data_ptr() for k, t in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    filled = sorted({k.rsplit('.', 1)[0] for k, t in sd.items() if own.get(k) == t.data_ptr()})
    if filled:
        raise ValueError(f'The checkpoint has no tensors for {", ".join(filled)} of {name}: exported, they would '
                         'be untrained (a warm start). Train from it (train.py --pretrained-path), then export.')
