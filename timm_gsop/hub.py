"""Publish timm-gsop weights on the Hugging Face Hub: export, model cards, push.

* ``export_checkpoint`` (``timm-gsop export``) turns a training checkpoint into the Hub layout timm reads:
  ``model.safetensors`` (no pickle), ``config.json`` (written by timm's own ``save_for_hf``:
  architecture, num_classes, model_args, pretrained_cfg) and ``README.md`` (the model card). It accepts
  timm ``train.py`` checkpoints (EMA weights by default when present), checkpoints and state dicts of
  the released GSoP-Net code and of fast-MPN-COV (iSQRT-COV), plain state dicts and safetensors files.
  Pickles are read with ``torch.load(weights_only=True)``, allowing ``argparse.Namespace`` (train.py's
  ``args``) and nothing else: a pickle that would run code is refused. No network is needed.
* ``render_card`` (``timm-gsop card``) renders a card from ``hub_cards/``: one template plus per-family
  facts (``hub_cards/families/*.yaml``); a model of a family without a facts file gets generic facts
  from its pretrained cfg. Params, GMACs and activations are measured on the model (meta device).
* ``push_folder`` (``timm-gsop push``) uploads an exported folder with huggingface_hub (token from
  ``HF_TOKEN`` or ``hf auth login``). Retrying is safe: the repo and branch are created only if
  missing, files already on the Hub are not uploaded again and an unchanged folder makes no commit.

Loading needs nothing from this module: ``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` (after
``import timm_gsop``), ``'local-dir:PATH'``, ``pretrained_cfg_overlay=dict(file=...)``, or
``pretrained=True`` with the default cfg, whose ``hf_hub_id`` is ``HUB_NAMESPACE/<model>.<tag>``.
"""
import argparse
import fnmatch
import json
import os
import pickle
import re
import shutil
import string
import sys
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import timm
import yaml

from . import __version__
from .cli import count_gflops, count_params, list_gsop_models, parse_model_kwargs
from .models._cfg import HUB_NAMESPACE, PUBLISHED
from .models._checkpoint import detect_layout

__all__ = [
    'UnsafeCheckpointError', 'CheckpointReadError', 'ExportFolderError', 'Checkpoint', 'ModelStats',
    'read_checkpoint', 'export_checkpoint', 'measure_model', 'render_card', 'check_export_folder',
    'push_folder', 'parse_model_kwargs', 'add_parser',
]

WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
CARD_FILE = 'README.md'
# never uploaded by `push`: pickles (the point of the export is a repo without them) and hidden files
_PICKLE_SUFFIXES = ('.pth', '.pt', '.bin', '.tar', '.pkl', '.pickle', '.ckpt')


class UnsafeCheckpointError(RuntimeError):
    """A pickle that needs more than tensors, plain containers and argparse.Namespace to load."""


class CheckpointReadError(RuntimeError):
    """A file that is not a readable checkpoint (truncated, corrupted, or another format)."""


class ExportFolderError(ValueError):
    """A folder that is not a complete, consistent export (``timm-gsop push`` refuses it)."""


# ---- reading checkpoints -------------------------------------------------------------------------------

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
    sd = None
    for key in ('state_dict', 'model'):
        if isinstance(obj.get(key), Mapping):
            sd = _tensors(obj[key])
            break
    ema = None
    for key in ('state_dict_ema', 'model_ema'):
        if isinstance(obj.get(key), Mapping):
            ema = _tensors(obj[key])
            break
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


# ---- state-dict layouts ---------------------------------------------------------------------------------

def _clean(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    from timm.models import clean_state_dict
    return clean_state_dict(dict(state_dict))


def _family_filter(model_name: str) -> Optional[Callable]:
    """The ``checkpoint_filter_fn`` of the module that registers ``model_name`` (None if it has none)."""
    arch = timm.models.split_model_name_tag(model_name)[0]
    module = sys.modules.get(timm.models.model_entrypoint(arch).__module__)
    return getattr(module, 'checkpoint_filter_fn', None)


# ---- model kwargs --------------------------------------------------------------------------------------

def _kwargs_from_train_args(args: Mapping[str, Any]) -> Dict[str, Any]:
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


def _data_config_from_train_args(args: Mapping[str, Any]) -> Dict[str, Any]:
    """The preprocessing train.py evaluated with, where it overrode the model's defaults."""
    out = {}
    for key in ('input_size', 'img_size', 'crop_pct', 'crop_mode', 'mean', 'std', 'interpolation'):
        value = args.get(key)
        if value is not None and value != '':
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


# ---- export --------------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    out_dir: Path
    model_name: str
    model_args: Dict[str, Any]
    files: Dict[str, int]
    checkpoint: Checkpoint
    used_ema: bool
    layout: str
    repo_id: str


def _resolve_model_name(model: Optional[str], ckpt: Checkpoint) -> str:
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


def _infer_from_weights(name: str, kwargs: Dict[str, Any], sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
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


def _load_into(model: nn.Module, name: str, sd: Dict[str, torch.Tensor]) -> None:
    filter_fn = _family_filter(name)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    model.load_state_dict(sd, strict=True)  # the model's own check names model and keys


def export_checkpoint(
        checkpoint: Union[str, Path],
        out_dir: Union[str, Path],
        model: Optional[str] = None,
        use_ema: Optional[bool] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        repo_id: Optional[str] = None,
        results: Optional[Union[str, Path]] = None,
        dataset: Optional[str] = None,
        verify: bool = True,
) -> ExportResult:
    """Write ``model.safetensors``, ``config.json`` and ``README.md`` for ``checkpoint`` into ``out_dir``.

    Args:
        checkpoint: train.py checkpoint, released-code checkpoint, state dict (.pth) or .safetensors file.
        out_dir: folder to write (created; these three files are replaced).
        model: registered model name (``gsop_resnet50`` or ``gsop_resnet50.in1k``); default: train.py's args.model.
        use_ema: None: the EMA weights when the checkpoint has them; True: require them; False: the raw weights.
        model_kwargs: create_model kwargs over those in train.py's args (num_classes, model_kwargs, ...).
        repo_id: the Hub repo the card's usage examples point at (default ``HUB_NAMESPACE/<model>.<tag>``).
        results: a JSON or CSV of timm validate.py results for these weights, shown in the card as measured.
        dataset: the training dataset for the card (default: the tag's when num_classes matches it).
        verify: reload the written folder with ``timm.create_model('local-dir:...')`` and compare outputs.
    """
    ckpt = read_checkpoint(checkpoint)
    name = _resolve_model_name(model, ckpt)
    if use_ema and ckpt.ema_state_dict is None:
        raise ValueError(f'{ckpt.path} has no EMA weights (state_dict_ema / model_ema); drop --ema.')
    used_ema = ckpt.ema_state_dict is not None and use_ema is not False
    sd = _clean(ckpt.ema_state_dict if used_ema else ckpt.state_dict)
    layout = detect_layout(sd)
    if layout == 'fast-mpn-cov':
        # its triangle vector is ordered differently from GSoP-Net2's: only the iSQRT-COV family converts it
        if not timm.models.split_model_name_tag(name)[0].startswith('isqrt_'):
            raise ValueError(
                f'{ckpt.path} is a fast-MPN-COV (iSQRT-COV) checkpoint: export it as isqrt_resnet50 / '
                f'isqrt_resnet101 (--model), whose loader reorders its covariance vector, not as {name}.')
        if ckpt.arch and not ckpt.arch.startswith('mpncov') and 'last_stride' not in (model_kwargs or {}):
            raise ValueError(
                f'{ckpt.path} is a fast-MPN-COV {ckpt.arch!r} checkpoint: torchvision ResNets end at stride 2, unlike '
                'mpncovresnet (stride 1); export it with --model-kwargs last_stride=2 if that is what you trained.')

    kwargs = _kwargs_from_train_args(ckpt.args)
    kwargs.update(model_kwargs or {})
    # the family's filter names the tensors as ours (released layouts), then classifier / stem sizes tell
    # num_classes / in_chans where neither the args nor the caller set them
    filter_fn = _family_filter(name)
    canonical = filter_fn(dict(sd), timm.create_model(name, device='meta', **kwargs)) if filter_fn else sd
    kwargs = _infer_from_weights(name, kwargs, canonical)
    net = timm.create_model(name, **kwargs)
    _load_into(net, name, sd)
    net.eval()

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # write and verify everything in a staging folder beside out_dir, then rename the files into place:
    # an interrupted or failed export never leaves a partial file where a good one was
    staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.partial-', dir=out_dir.parent))
    try:
        from timm.models import save_for_hf
        save_for_hf(net, str(staging), safe_serialization=True,
                    data_config=_data_config_from_train_args(ckpt.args) or None)
        shutil.copymode(staging / CONFIG_FILE, staging / WEIGHTS_FILE)  # safetensors writes 0600: follow umask
        config = json.loads((staging / CONFIG_FILE).read_text())
        model_args = config.get('model_args', {})
        repo_id = repo_id or f'{HUB_NAMESPACE}/{name}'
        measured = _measured_results(ckpt, used_ema, results)
        weights = WeightsInfo(source=ckpt.path.name, description=ckpt.description, epoch=ckpt.epoch, ema=used_ema,
                              layout=layout, train_args=ckpt.args, measured=measured,
                              data_config=config.get('pretrained_cfg', {}))
        card = render_card(name, model_kwargs=model_args, repo_id=repo_id, weights=weights, dataset=dataset)
        (staging / CARD_FILE).write_text(card, encoding='utf-8')
        if verify:
            _verify_export(net, staging)
        out_dir.mkdir(exist_ok=True)
        for file in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE):
            os.replace(staging / file, out_dir / file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = {p: (out_dir / p).stat().st_size for p in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)}
    return ExportResult(out_dir, name, model_args, files, ckpt, used_ema, layout, repo_id)


def _verify_export(model: nn.Module, out_dir: Path) -> None:
    """The folder must rebuild the same network: create it from ``local-dir:`` and compare outputs."""
    reloaded = timm.create_model(f'local-dir:{out_dir.resolve()}', pretrained=True).eval()
    cfg = timm.models.get_model_input_config(model)
    chans, height, width = cfg['input_size']
    if not cfg['fixed_input_size']:
        height, width = min(height, 64), min(width, 64)
    x = torch.randn(1, chans, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(x), reloaded(x)
    if ref.shape != out.shape or not torch.equal(ref, out):
        raise RuntimeError(f'{out_dir} does not reproduce the exported model (max abs diff '
                           f'{(ref - out).abs().max().item() if ref.shape == out.shape else "shape"}).')


def _measured_results(ckpt: Checkpoint, used_ema: bool, results: Optional[Union[str, Path]]) -> List[str]:
    lines = []
    if results is not None:
        lines.extend(_read_validate_results(Path(results)))
    if ckpt.container == 'timm-train' and ckpt.metric is not None:
        name = ckpt.args.get('eval_metric') or 'top1'
        ema_run = bool(ckpt.args.get('model_ema')) or ckpt.ema_state_dict is not None
        if used_ema or not ema_run:
            epoch = f' after epoch {ckpt.epoch}' if ckpt.epoch is not None else ''
            lines.append(f'{name} {ckpt.metric:.2f}: the evaluation stored in `{ckpt.path.name}` by train.py{epoch} '
                         '(its validation set and preprocessing).')
    if ckpt.best_prec1 is not None:
        lines.append(f'top-1 accuracy {ckpt.best_prec1:.2f}: `best_prec1` stored in `{ckpt.path.name}` by the '
                     'released training code (its validation set and preprocessing).')
    return lines


def _read_validate_results(path: Path) -> List[str]:
    """Lines for timm validate.py results (``--results-file`` JSON or CSV): top-1 / top-5 and the setup."""
    text = path.read_text()
    if path.suffix == '.csv':
        import csv
        rows = list(csv.DictReader(text.splitlines()))
    else:
        data = json.loads(text)
        rows = data if isinstance(data, list) else data.get('results', [data]) if isinstance(data, dict) else []
    lines = []
    for row in rows:
        if not isinstance(row, Mapping) or row.get('top1') is None:
            continue
        setup = ', '.join(f'{k} {row[k]}' for k in ('img_size', 'crop_pct', 'interpolation') if row.get(k))
        top5 = f', top-5 {float(row["top5"]):.3f}' if row.get('top5') is not None else ''
        lines.append(f'top-1 {float(row["top1"]):.3f}{top5}: timm validate.py (`{path.name}`'
                     f'{", " + setup if setup else ""}).')
    if not lines:
        raise ValueError(f'{path} has no validate.py results (rows with top1 / top5)')
    return lines


# ---- measuring a model ---------------------------------------------------------------------------------

@dataclass
class ModelStats:
    params: int
    gmacs: float
    activations: int
    input_size: Tuple[int, int, int]
    feature_shapes: Optional[List[Tuple[int, ...]]]
    features_shape: Tuple[int, ...]
    embed_shape: Tuple[int, ...]


def count_activations_and_flops(model: nn.Module, input_size: Sequence[int]) -> Tuple[int, float]:
    """(activations, GFLOPs) of one forward pass at ``input_size`` (C, H, W).

    Activations: the number of elements output by the model's convolution and linear layers (forward
    hooks), the quantity timm's model cards list as "Activations" (fvcore's count, which additionally
    counts matrix products). GFLOPs: ``cli.count_gflops`` (torch.utils.flop_counter, multiply-add = 2).
    """
    total = [0]

    def hook(module, inputs, output):
        total[0] += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        gflops = count_gflops(model, input_size)
    finally:
        for h in handles:
            h.remove()
    return total[0], gflops


def measure_model(model_name: str, model_kwargs: Optional[Dict[str, Any]] = None,
                  input_size: Optional[Sequence[int]] = None) -> ModelStats:
    """Params, GMACs and activations of ``model_name`` built with ``model_kwargs`` (on the meta device)
    at ``input_size`` (default: its pretrained cfg's), and the shapes its usage examples print."""
    kwargs = dict(model_kwargs or {})
    model = timm.create_model(model_name, device='meta', **kwargs).eval()
    input_size = tuple(input_size or timm.models.get_model_input_config(model)['input_size'])
    activations, gflops = count_activations_and_flops(model, input_size)
    x = torch.empty((1, *input_size), device='meta')
    with torch.no_grad():
        feats = model.forward_features(x)
        embed = model.forward_head(feats, pre_logits=True)
    feature_shapes = None
    try:
        kwargs.pop('num_classes', None)
        kwargs.pop('global_pool', None)
        fmodel = timm.create_model(model_name, device='meta', features_only=True, **kwargs).eval()
        with torch.no_grad():
            feature_shapes = [tuple(o.shape) for o in fmodel(x)]
    except Exception:  # a family without features_only support: the card says so
        pass
    return ModelStats(count_params(model), gflops / 2, activations, input_size, feature_shapes,
                      tuple(feats.shape), tuple(embed.shape))


# ---- model cards ---------------------------------------------------------------------------------------

@dataclass
class WeightsInfo:
    """Where a card's weights come from (export) and what was measured on them."""
    source: str
    description: str
    epoch: Optional[int] = None
    ema: bool = False
    layout: str = 'timm'
    train_args: Dict[str, Any] = field(default_factory=dict)
    measured: List[str] = field(default_factory=list)
    data_config: Dict[str, Any] = field(default_factory=dict)


def cards_dir() -> Path:
    """``hub_cards/``: in an installed wheel ``timm_gsop/hub_cards`` (package data), in a source checkout
    (or an editable install) the repository's ``hub_cards/``."""
    here = Path(__file__).resolve().parent
    for path in (here / 'hub_cards', here.parent / 'hub_cards'):
        if (path / 'template.md').is_file():
            return path
    raise FileNotFoundError(f'hub_cards/ (model card template and facts) not found next to {here}')


@lru_cache(maxsize=None)
def _load_yaml(path: str) -> Any:
    with open(path, encoding='utf-8') as f:
        return yaml.safe_load(f)


def _families() -> List[Dict[str, Any]]:
    return [_load_yaml(str(p)) for p in sorted((cards_dir() / 'families').glob('*.yaml'))]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def card_facts(model_name: str) -> Dict[str, Any]:
    """Facts for ``model_name``'s card: the family file whose ``match`` fits merged with its first fitting
    variant, over generic facts derived from the model's pretrained cfg and docstring."""
    arch, _ = timm.models.split_model_name_tag(model_name)
    cfg = timm.models.get_pretrained_cfg(model_name).to_dict()
    doc = (timm.models.model_entrypoint(arch).__doc__ or arch).strip().splitlines()[0].strip().rstrip('.')
    generic = _load_yaml(str(cards_dir() / 'generic.yaml'))
    facts = {
        'family': None,
        'summary': generic['summary'].format(doc=doc),
        'architecture': generic['architecture'].format(doc=doc),
        'recipe': generic.get('recipe', ''),
        'license': cfg.get('license') or generic['license'],
        'papers': [],
        'original': cfg.get('origin_url'),
        'citation': [],
        'reported': [],
        'name': None,
        'schedule': None,
    }
    for paper_id in (cfg.get('paper_ids') or '').replace(';', ',').split(','):
        paper_id = paper_id.strip()
        if paper_id:
            url = f'https://arxiv.org/abs/{paper_id[6:]}' if paper_id.lower().startswith('arxiv:') else paper_id
            facts['papers'].append({'title': cfg.get('paper_name') or paper_id, 'url': url})
    family = next((f for f in _families() if _matches(arch, f.get('match'))), None)
    if family is not None:
        facts.update({k: v for k, v in family.items() if k not in ('match', 'variants', 'reported')})
        facts['reported'] = [r for r in family.get('reported', []) if _matches(arch, r.get('models'))]
        variant = next((v for v in family.get('variants', []) if _matches(arch, v.get('match'))), {})
        for key, value in variant.items():
            if key in ('papers', 'citation'):
                facts[key] = list(facts.get(key) or []) + list(value)
            elif key != 'match':
                facts[key] = value
    facts['citation'] = list(facts.get('citation') or []) + list(generic.get('citation') or [])
    return facts


def dataset_for_tag(tag: str) -> Optional[Dict[str, str]]:
    """The dataset of a pretrained tag (``datasets.yaml``: the tag, or its last '_'-separated part)."""
    table = _load_yaml(str(cards_dir() / 'datasets.yaml'))
    return (table.get(tag) or table.get(tag.rsplit('_', 1)[-1])) if tag else None


def _dataset(name: Optional[str], tag: str, num_classes: Any, cfg: Mapping[str, Any]) -> Optional[Dict[str, str]]:
    """An explicit dataset (a datasets.yaml key or a Hub dataset id), else the tag's dataset when the model
    keeps the tag's classes (a model with another num_classes was trained on something else)."""
    if name:
        return dataset_for_tag(name) or {'name': name, 'hub_id': name}
    if num_classes is not None and num_classes != cfg.get('num_classes'):
        return None
    return dataset_for_tag(tag)


def _fmt_shape(shape: Sequence[int]) -> str:
    return f"torch.Size([{', '.join(map(str, shape))}])"


def _reported_table(rows: List[Mapping[str, Any]]) -> str:
    derived = []

    def pct(row, metric):
        acc, err = row.get(f'{metric}_acc'), row.get(f'{metric}_err')
        if acc is None and err is None:
            return '-', '-'
        if acc is None:
            derived.append(1)
            return f'*{100 - float(err):.2f}*', f'{float(err):.2f}'
        if err is None:
            derived.append(1)
            return f'{float(acc):.2f}', f'*{100 - float(acc):.2f}*'
        return f'{float(acc):.2f}', f'{float(err):.2f}'

    lines = ['| dataset | top-1 acc. (%) | top-5 acc. (%) | top-1 err. (%) | top-5 err. (%) | reported by |',
             '|---|---|---|---|---|---|']
    for row in rows:
        (a1, e1), (a5, e5) = pct(row, 'top1'), pct(row, 'top5')
        lines.append(f"| {row['dataset']} | {a1} | {a5} | {e1} | {e5} | {' '.join(str(row['source']).split())} |")
    if derived:
        lines.append('\n*Italic*: 100 minus the reported accuracy or error.')
    return '\n'.join(lines)


def _non_default_args(model_name: str, model_args: Mapping[str, Any]) -> Dict[str, Any]:
    """The recorded model args that differ from what ``create_model(model_name)`` builds by default."""
    cfg = timm.models.get_pretrained_cfg(model_name).to_dict()
    defaults = {'num_classes': cfg.get('num_classes'), 'in_chans': (cfg.get('input_size') or (3,))[0]}
    out = {}
    for k, v in model_args.items():
        if k in defaults and v == defaults[k]:
            continue
        if k == 'global_pool':
            default_pool = timm.models.get_model_args(timm.create_model(model_name, device='meta')).get('global_pool')
            if v == default_pool:
                continue
        out[k] = v
    return out


_TRAIN_ARG_KEYS = (
    ('epochs', 'epochs'), ('opt', 'optimizer'), ('lr', 'learning rate'), ('momentum', 'momentum'),
    ('weight_decay', 'weight decay'), ('batch_size', 'batch size (per process)'), ('sched', 'schedule'),
    ('decay_milestones', 'decay milestones'), ('decay_rate', 'decay rate'), ('warmup_epochs', 'warm-up epochs'),
    ('smoothing', 'label smoothing'), ('mixup', 'mixup'), ('cutmix', 'cutmix'), ('aa', 'auto-augment'),
    ('reprob', 'random erasing'), ('drop_path', 'drop path'), ('model_ema', 'model EMA'),
    ('model_ema_decay', 'EMA decay'), ('amp', 'mixed precision'), ('img_size', 'image size'),
    ('input_size', 'input size'), ('crop_pct', 'eval crop_pct'), ('interpolation', 'interpolation'),
    ('seed', 'seed'),
)


def initialisation_source(args: Mapping[str, Any]) -> Optional[str]:
    """Where train.py started from, from its ``args``: ``--pretrained-path`` / ``--initial-checkpoint`` / the
    model's own pretrained weights, and whether GSoP modules missing there were warm-started
    (``--model-kwargs pretrained_strict=False``)."""
    strict = (args.get('model_kwargs') or {}).get('pretrained_strict', True)
    warm = (' (`pretrained_strict=False`: GSoP modules it lacks were initialised function-preserving, a warm '
            'start)') if strict is False else ''
    if args.get('pretrained') and args.get('pretrained_path'):
        return f"`{args['pretrained_path']}`{warm}"
    if args.get('initial_checkpoint'):
        return f"`{args['initial_checkpoint']}` (train.py --initial-checkpoint)"
    if args.get('pretrained'):
        return f"the model's pretrained weights{warm}"
    return None


def _training_section(facts: Mapping[str, Any], weights: Optional[WeightsInfo]) -> str:
    parts = []
    if weights is not None and weights.train_args:
        args = weights.train_args
        items = []
        for key, label in _TRAIN_ARG_KEYS:
            value = args.get(key)
            if value is None or value == '' or value is False:
                continue
            items.append(f'  - {label}: `{value}`')
        world = args.get('world_size')
        if world:
            items.append(f'  - processes: `{world}`')
        start = initialisation_source(args)
        if start:
            items.append(f'  - initialised from: {start}')
        if items:
            parts.append("- **These weights** (timm's train.py, from the `args` stored in the checkpoint):\n"
                         + '\n'.join(items))
    recipe = ' '.join(str(facts.get('recipe') or '').split())
    schedule = ' '.join(str(facts.get('schedule') or '').split())
    if recipe or schedule:
        parts.append('- **Published recipe** (for reference; not necessarily how these weights were trained): '
                     + ' '.join(p for p in (recipe, f'Schedule: {schedule}' if schedule else '') if p))
    return '\n'.join(parts) if parts else 'No training details are recorded for this model.'


def render_card(
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        repo_id: Optional[str] = None,
        weights: Optional[WeightsInfo] = None,
        dataset: Optional[str] = None,
) -> str:
    """The model card (README.md) of ``model_name`` built with ``model_kwargs``.

    The Hub metadata follows timm's cards (``library_name: timm``, ``tags: [image-classification, timm]``,
    ``license``, ``datasets``); params, GMACs and activations are measured on the model. ``repo_id`` is the
    repo the usage examples load (default: the pretrained cfg's ``hf_hub_id``); ``weights`` describes
    exported weights (source, EMA, measured results); ``dataset`` names the training dataset (a key of
    ``hub_cards/datasets.yaml`` or a Hub dataset id; default: the tag's, unless num_classes differs from it).
    """
    arch, tag = timm.models.split_model_name_tag(model_name)
    cfg = timm.models.get_pretrained_cfg(model_name).to_dict()
    tag = tag or cfg.get('tag') or ''
    full_name = f'{arch}.{tag}' if tag else arch
    model_kwargs = dict(model_kwargs or {})
    facts = card_facts(full_name)
    # exported weights: measured at the input size their config.json records (train.py's, if it set one)
    exported_size = (weights.data_config or {}).get('input_size') if weights is not None else None
    stats = measure_model(full_name, model_kwargs, input_size=exported_size)
    # usage examples load the repo of exported weights or an explicit repo, else the registry name (whose
    # pretrained cfg says where its weights are)
    model_ref = f'hf-hub:{repo_id}' if repo_id or weights is not None else full_name
    repo_id = repo_id or cfg.get('hf_hub_id') or f'{HUB_NAMESPACE}/{full_name}'
    dataset = _dataset(dataset, tag, model_kwargs.get('num_classes'), cfg)

    metadata = {'tags': ['image-classification', 'timm'], 'library_name': 'timm', 'license': facts['license']}
    if dataset and dataset.get('hub_id'):
        metadata['datasets'] = [dataset['hub_id']]
    metadata_text = yaml.safe_dump(metadata, sort_keys=False, default_flow_style=False).strip()

    chans, height, width = stats.input_size
    non_default = _non_default_args(full_name, model_kwargs)
    details = [
        '- **Model Type:** Image classification / feature backbone',
        '- **Model Stats:**',
        f'  - Params (M): {stats.params / 1e6:.1f}',
        f'  - GMACs: {stats.gmacs:.2f}',
        f'  - Activations (M): {stats.activations / 1e6:.1f}',
        f'  - Image size: {height} x {width}',
    ]
    arch_text = ' '.join(str(facts.get('architecture') or '').split())
    if facts.get('name') or arch_text:
        details.append(f"- **Architecture:** {facts.get('name') + ': ' if facts.get('name') else ''}{arch_text}")
    details.append(f'- **timm-gsop model:** `{full_name}`'
                   + (', built with ' + ', '.join(f'`{k}={v!r}`' for k, v in non_default.items())
                      if non_default else ''))
    if facts['papers']:
        details.append('- **Papers:**')
        details += [f"  - {' '.join(str(p['title']).split())}: {p['url']}" for p in facts['papers']]
    details.append(f"- **Dataset:** {dataset['name'] if dataset else 'not recorded'}")
    if facts.get('original'):
        details.append(f"- **Original:** {facts['original']}")
    stats_note = (
        f'Params: {stats.params:,} parameters. GMACs: multiply-accumulates of the convolutions and matrix products '
        f'in one forward pass at {chans}x{height}x{width} (torch.utils.flop_counter FLOPs / 2; `timm-gsop list` '
        'shows the same count as GFLOPs, x2). Activations: elements output by the convolution and linear layers in '
        'that pass, counted with forward hooks (timm cards count these too, with fvcore). All measured on the model '
        'by timm-gsop.')

    if weights is not None:
        ema = ', EMA weights' if weights.ema else ''
        epoch = f', epoch {weights.epoch}' if weights.epoch is not None else ''
        layout = {'released-gsop': ', in the layout of the released GSoP-Net code',
                  'fast-mpn-cov': ', in the layout of the fast-MPN-COV code'}
        weights_text = (f'The weights were exported by `timm-gsop export` from `{weights.source}` '
                        f'({weights.description}{epoch}{ema}{layout.get(weights.layout, "")}) to safetensors.')
    elif full_name in PUBLISHED:
        weights_text = f'The weights are published at `hf-hub:{repo_id}`.'
    elif cfg.get('url') or cfg.get('file'):
        weights_text = (f'`pretrained=True` loads the weights published by the original authors '
                        f"({cfg.get('url') or cfg.get('file')}), converted to this model on load.")
    else:
        weights_text = (f'No weights are published for `{full_name}` yet: this card describes the architecture. '
                        'Publish weights with `timm-gsop export` and `timm-gsop push`.')

    results = []
    if facts['reported']:
        note = (' This model is built with other arguments than the published configuration.'
                if non_default else '')
        results.append('### Reported by the papers (not measured on these weights)\n'
                       'Numbers the cited sources report for the published configuration of this architecture; '
                       f'timm-gsop did not measure them.{note}\n\n' + _reported_table(facts['reported']))
    else:
        results.append('### Reported by the papers\nThe papers report no results for this configuration.')
    if weights is not None:
        measured = '\n'.join(f'- {line}' for line in weights.measured) if weights.measured else \
            'No evaluation results accompany these weights.'
        results.append('### Measured on these weights\n' + measured)

    embed_note = ''
    if stats.feature_shapes is None:
        embed_note = '`features_only=True` is not supported by this model.'
    feature_shapes = '\n'.join(f'    #  {_fmt_shape(s)}' for s in (stats.feature_shapes or []))
    citation = '\n'.join(f'```bibtex\n{c.strip()}\n```' for c in facts['citation'])

    summary = ' '.join(str(facts['summary']).split())
    template = string.Template((cards_dir() / 'template.md').read_text(encoding='utf-8'))
    return template.substitute(
        metadata=metadata_text,
        title=repo_id.split('/')[-1],
        summary=summary,
        weights=weights_text,
        details='\n'.join(details),
        stats_note=stats_note,
        results='\n\n'.join(results),
        training=_training_section(facts, weights),
        model_ref=model_ref,
        feature_shapes=feature_shapes or '    #  (not supported)',
        embed_shape=f'({", ".join(map(str, stats.embed_shape))})',
        features_shape=f'({", ".join(map(str, stats.features_shape))})',
        embed_note=embed_note,
        citation=citation,
    )


# ---- push ----------------------------------------------------------------------------------------------

@dataclass
class FolderCheck:
    model_name: str
    model_args: Dict[str, Any]
    files: Dict[str, int]     # files to upload -> size
    skipped: List[str]        # files left out (pickles, hidden)


def check_export_folder(folder: Union[str, Path]) -> FolderCheck:
    """Check ``folder`` before a push: config.json names a registered model, model.safetensors is readable
    and holds exactly that model's tensors, README.md is there. Raises ``ExportFolderError``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportFolderError(f'{folder} is not a folder (export one with `timm-gsop export`)')
    for required in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE):
        if not (folder / required).is_file():
            raise ExportFolderError(f'{folder} has no {required}; `timm-gsop export` writes {WEIGHTS_FILE}, '
                                    f'{CONFIG_FILE} and {CARD_FILE}')
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        arch = config['architecture']
    except (ValueError, KeyError) as e:
        raise ExportFolderError(f'{folder / CONFIG_FILE} is not a timm config (no architecture): {e}') from e
    if not timm.is_model(arch):
        raise ExportFolderError(f'{folder / CONFIG_FILE} names {arch!r}, which is not a registered model '
                                '(is this timm-gsop version the one that exported it?)')
    model_args = dict(config.get('model_args') or {})
    tag = (config.get('pretrained_cfg') or {}).get('tag')
    try:
        import safetensors
        with safetensors.safe_open(str(folder / WEIGHTS_FILE), framework='pt') as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise ExportFolderError(
            f'{folder / WEIGHTS_FILE} is not a readable safetensors file ({e}); export again.') from e
    try:
        model = timm.create_model(f'{arch}.{tag}' if tag else arch, device='meta', **model_args)
    except Exception as e:
        raise ExportFolderError(
            f'{folder / CONFIG_FILE}: {arch} cannot be built with model_args {model_args}: {e}') from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f'{k}: file {shapes[k]} vs model {expected[k]}'
             for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        detail = '; '.join(f'{len(v)} {label}: {", ".join(v[:3])}' for label, v in
                           (('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong)) if v)
        raise ExportFolderError(f'{folder / WEIGHTS_FILE} does not hold the tensors of {arch} built from '
                                f'{CONFIG_FILE} ({detail})')
    files, skipped = {}, []
    for path in sorted(p for p in folder.rglob('*') if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith('.') for part in rel.split('/')) or rel.lower().endswith(_PICKLE_SUFFIXES):
            skipped.append(rel)
        else:
            files[rel] = path.stat().st_size
    return FolderCheck(arch, model_args, files, skipped)


_HUB_REF = re.compile(r'hf-hub:([\w.-]+/[\w.-]+)')


def _card_for_repo(card: str, repo_id: str) -> Tuple[str, Optional[str]]:
    """Point a card's usage examples (and title) at ``repo_id``; returns (card, previous repo id or None)."""
    ids = set(_HUB_REF.findall(card))
    if len(ids) != 1 or repo_id in ids:
        return card, None
    old = ids.pop()
    card = card.replace(f'hf-hub:{old}', f'hf-hub:{repo_id}')
    card = card.replace(f'# Model card for {old.split("/")[-1]}\n', f'# Model card for {repo_id.split("/")[-1]}\n', 1)
    return card, old


@dataclass
class PushResult:
    repo_id: str
    revision: str
    files: Dict[str, int]
    skipped: List[str]
    dry_run: bool
    commit_url: Optional[str] = None
    pr_url: Optional[str] = None
    changed: Optional[bool] = None
    card_retargeted_from: Optional[str] = None


def push_folder(
        folder: Union[str, Path],
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        create_pr: bool = False,
        dry_run: bool = False,
        commit_message: Optional[str] = None,
) -> PushResult:
    """Upload an exported folder to the Hub repo ``repo_id`` (``ORG/NAME``). Safe to retry: creates the repo
    (and branch) only if missing; the Hub skips files it has, and an unchanged folder makes no commit."""
    if not re.fullmatch(r'[\w.-]+/[\w.-]+', repo_id or ''):
        raise ValueError(f'--repo-id must be ORG/NAME, got {repo_id!r}')
    folder = Path(folder)
    check = check_export_folder(folder)
    card, old_repo = _card_for_repo((folder / CARD_FILE).read_text(encoding='utf-8'), repo_id)
    branch = revision or 'main'
    result = PushResult(repo_id, branch, check.files, check.skipped, dry_run, card_retargeted_from=old_repo)
    if dry_run:
        return result

    from huggingface_hub import CommitOperationAdd, HfApi
    api = HfApi(library_name='timm-gsop', library_version=__version__)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
    repo_id = result.repo_id = getattr(repo_url, 'repo_id', None) or repo_id
    if branch != 'main' and not create_pr:
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    before = api.repo_info(repo_id, revision=branch).sha
    operations = []
    for rel in check.files:
        content = card.encode('utf-8') if rel == CARD_FILE else str(folder / rel)
        operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=content))
    info = api.create_commit(
        repo_id, operations, commit_message=commit_message or f'Add {check.model_name} weights (timm-gsop export)',
        revision=branch, create_pr=create_pr)
    result.commit_url, result.pr_url = info.commit_url, info.pr_url
    result.changed = info.oid != before
    return result


# ---- command line --------------------------------------------------------------------------------------

def _human(size: int) -> str:
    for unit in ('B', 'KB', 'MB', 'GB'):
        if size < 1000 or unit == 'GB':
            return f'{size:.0f} {unit}' if unit == 'B' else f'{size:.1f} {unit}'
        size /= 1000
    return str(size)


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        result = export_checkpoint(
            args.checkpoint, args.out, model=args.model, use_ema=args.ema, repo_id=args.repo_id,
            model_kwargs=parse_model_kwargs(args.model_kwargs), results=args.results, dataset=args.dataset,
            verify=not args.no_verify)
    except (FileNotFoundError, ValueError, RuntimeError, TypeError) as e:  # incl. mismatch, unsafe, unreadable
        print(f'timm-gsop export: {e}', file=sys.stderr)
        return 1
    ckpt = result.checkpoint
    which = 'EMA weights' if result.used_ema else ('weights (state_dict; EMA weights left out)'
                                                   if ckpt.ema_state_dict is not None else 'weights')
    print(f'Exported {which} of {ckpt.path} ({ckpt.description}) as {result.model_name} to {result.out_dir}:')
    for name, size in result.files.items():
        print(f'  {name:<18} {size:>14,} bytes ({_human(size)})')
    if result.model_args:
        print(f'  model_args: {json.dumps(result.model_args)}')
    print(f'Next: timm-gsop push {result.out_dir} --repo-id {result.repo_id}')
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    try:
        result = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                             create_pr=args.create_pr, dry_run=args.dry_run, commit_message=args.commit_message)
    except (ValueError, FileNotFoundError) as e:
        print(f'timm-gsop push: {e}', file=sys.stderr)
        return 1
    except Exception as e:
        print(f'timm-gsop push: {_explain_hub_error(e)}', file=sys.stderr)
        return 1
    target = f'{result.repo_id}@{result.revision}' + (' (as a pull request)' if args.create_pr else '')
    if result.card_retargeted_from:
        print(f'README.md: usage examples point at {result.repo_id} (exported for {result.card_retargeted_from})')
    if result.dry_run:
        print(f'Dry run: would upload to {target}:')
    for name, size in result.files.items():
        print(f'  {name:<18} {size:>14,} bytes ({_human(size)})')
    for name in result.skipped:
        print(f'  {name:<18} skipped (pickles and hidden files are never uploaded)')
    if result.dry_run:
        return 0
    if result.changed:
        print(f'Pushed to {target}: {result.pr_url or result.commit_url}')
    else:
        print(f'{target} already has these files: nothing to commit ({result.commit_url})')
    print(f"Load with: timm.create_model('hf-hub:{result.repo_id}', pretrained=True)  # after import timm_gsop")
    return 0


def _explain_hub_error(e: Exception) -> str:
    from huggingface_hub.errors import HfHubHTTPError
    if isinstance(e, HfHubHTTPError) and e.response is not None and e.response.status_code in (401, 403):
        return (f'the Hub refused the request (HTTP {e.response.status_code}): log in with `hf auth login` or set '
                f'HF_TOKEN to a token with write access to the namespace. ({str(e).splitlines()[0]})')
    if isinstance(e, HfHubHTTPError):
        return f'the Hub answered with an error: {e}'
    if 'connect' in type(e).__name__.lower() or isinstance(e, (ConnectionError, TimeoutError)):
        from huggingface_hub import constants
        return f'could not reach the Hub at {constants.ENDPOINT} ({e}); check the network or HF_ENDPOINT.'
    return f'{type(e).__name__}: {e}'


def _cmd_card(args: argparse.Namespace) -> int:
    try:
        name = args.model
        arch = timm.models.split_model_name_tag(name)[0]
        if arch not in list_gsop_models():
            raise ValueError(f'{arch!r} is not a timm-gsop model (see `timm-gsop list`)')
        card = render_card(name, model_kwargs=parse_model_kwargs(args.model_kwargs), repo_id=args.repo_id)
    except (ValueError, RuntimeError, TypeError) as e:
        print(f'timm-gsop card: {e}', file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).write_text(card, encoding='utf-8')
        print(f'Wrote {args.out}')
    else:
        sys.stdout.write(card)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'export', help='write a checkpoint as a Hub repo folder: model.safetensors, config.json, README.md',
        description='Export a checkpoint (timm train.py, the released GSoP-Net / fast-MPN-COV code, a state dict '
                    'or a safetensors file) to the folder layout timm loads from the Hub. Pickles are loaded '
                    'with weights_only=True (argparse.Namespace allowed); no network is used.')
    p.add_argument('checkpoint', help='checkpoint-*.pth.tar, model_best.pth.tar, a .pth state dict or .safetensors')
    p.add_argument('--model', default=None, help='registered model name, e.g. gsop_resnet50 or gsop_resnet50.in1k '
                                                 "(default: the checkpoint's args.model)")
    p.add_argument('--out', required=True, help='output folder')
    ema = p.add_mutually_exclusive_group()
    ema.add_argument('--ema', dest='ema', action='store_true', default=None,
                     help='export the EMA weights (the default when the checkpoint has them)')
    ema.add_argument('--no-ema', dest='ema', action='store_false', help='export the raw (non-EMA) weights')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help="create_model kwargs, over those of train.py's args "
                        '(e.g. num_classes=100 gsop_manner=position)')
    p.add_argument('--repo-id', default=None, help=f'Hub repo the card points at (default {HUB_NAMESPACE}/MODEL.TAG)')
    p.add_argument('--results', default=None, help='validate.py --results-file output (JSON or CSV) for the card')
    p.add_argument('--dataset', default=None,
                   help="training dataset for the card, e.g. imagenet-1k or cifar100 (default: the tag's, when the "
                        'model keeps its num_classes)')
    p.add_argument('--no-verify', action='store_true', help='skip reloading the folder to compare outputs')
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser(
        'push', help='upload an exported folder to the Hugging Face Hub',
        description='Upload an exported folder with huggingface_hub (token: HF_TOKEN or `hf auth login`). '
                    'Safe to retry: unchanged files are not uploaded again, an unchanged folder makes no commit.')
    p.add_argument('folder', help='folder written by `timm-gsop export`')
    p.add_argument('--repo-id', required=True, help='ORG/NAME')
    p.add_argument('--private', action='store_true', help='create the repo private (if it does not exist)')
    p.add_argument('--revision', default=None, help='branch to push to (created if missing; default main)')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    p.add_argument('--commit-message', default=None)
    p.add_argument('--dry-run', action='store_true', help='check the folder and list what would be uploaded')
    p.set_defaults(func=_cmd_push)

    p = subparsers.add_parser('card', help='render the model card (README.md) of a model')
    p.add_argument('model', help='registered model name, e.g. gsop_resnet50 or gsop2_resnet50.in1k')
    p.add_argument('--out', default=None, help='write to this file instead of stdout')
    p.add_argument('--repo-id', default=None, help='Hub repo the usage examples load (default: the cfg hf_hub_id)')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE', help='create_model kwargs')
    p.set_defaults(func=_cmd_card)
