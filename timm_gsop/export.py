"""``export_checkpoint`` (``timm-gsop export``): a checkpoint in the layout timm reads from the Hugging Face Hub.

The folder gets ``model.safetensors`` (no pickle), ``config.json`` (timm's own ``save_for_hf``: architecture,
num_classes, model_args, pretrained_cfg) and ``README.md`` (the model card, ``cards.render_card``). Everything is
written and verified (reloaded through timm's ``local-dir:`` source, outputs compared) in a staging folder beside
the target, then renamed into place: a failed or interrupted export never leaves a partial file where a good one
was. No network is needed.

``config.json`` is read by two loaders: timm (``local-dir:`` / ``hf-hub:``), which takes num_classes from its top
level, and transformers' ``TimmWrapper`` (``AutoModelForImageClassification``, ``pipeline``), which passes
``num_classes`` (the top-level one, as ``num_labels``) and ``pretrained=False`` to ``timm.create_model`` itself, with
``**model_args``. timm's ``save_for_hf`` also records num_classes in ``model_args``, which TimmWrapper then passes
twice (a TypeError): ``model_args`` here holds only what neither loader sets itself (``HF_OWN_ARGS``).
"""
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn
import timm
from timm.models import clean_state_dict

from .cards import HUB_NAMESPACE, WeightsInfo, render_card
from .checkpoints import Checkpoint, convert_state_dict, data_config_from_train_args, infer_from_weights, \
    kwargs_from_train_args, load_into, read_checkpoint, resolve_model_name
from .models.gsop_resnet import FINETUNE_START_TAG, FineTuneStartWarning, checkpoint_layout, finetune_start_file

__all__ = ['WEIGHTS_FILE', 'CONFIG_FILE', 'CARD_FILE', 'HF_OWN_ARGS', 'ExportResult', 'export_checkpoint',
           'hf_config_for_loaders']

WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
CARD_FILE = 'README.md'

# create_model kwargs that transformers' TimmWrapper passes itself (num_classes: the config's top-level num_classes)
HF_OWN_ARGS = ('num_classes', 'pretrained')


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
            Without a tag: the architecture's first tag without a published file (``_tag_for_weights``).
        use_ema: None: the EMA weights when the checkpoint has them; True: require them; False: the raw weights.
        model_kwargs: create_model kwargs over those in train.py's args (num_classes, model_kwargs, ...).
        repo_id: the Hub repo the card's usage examples point at (default ``HUB_NAMESPACE/<model>.<tag>``).
        results: a JSON or CSV of timm validate.py results for these weights, shown in the card as measured.
        dataset: the training dataset for the card (default: the tag's when num_classes matches it).
        verify: reload the written folder with ``timm.create_model('local-dir:...')`` and compare outputs.
    """
    ckpt = read_checkpoint(checkpoint)
    name = _tag_for_weights(resolve_model_name(model, ckpt), model, ckpt)
    if use_ema and ckpt.ema_state_dict is None:
        raise ValueError(f'{ckpt.path} has no EMA weights (state_dict_ema / model_ema); drop --ema.')
    used_ema = ckpt.ema_state_dict is not None and use_ema is not False
    sd = clean_state_dict(ckpt.ema_state_dict if used_ema else ckpt.state_dict)
    layout = checkpoint_layout(sd)
    if layout == 'fast-mpn-cov':
        # an iSQRT-COV network: exported under its own name (isqrt_resnet*), whose config and card describe it
        if not timm.models.split_model_name_tag(name)[0].startswith('isqrt_'):
            raise ValueError(
                f'{ckpt.path} is a fast-MPN-COV (iSQRT-COV) checkpoint: export it as isqrt_resnet50 / '
                f'isqrt_resnet101 (--model), whose loader reorders its covariance vector, not as {name}.')
        if ckpt.arch and not ckpt.arch.startswith('mpncov') and 'last_stride' not in (model_kwargs or {}):
            raise ValueError(
                f'{ckpt.path} is a fast-MPN-COV {ckpt.arch!r} checkpoint: torchvision ResNets end at stride 2, unlike '
                'mpncovresnet (stride 1); export it with --model-kwargs last_stride=2 if that is what you trained.')

    kwargs = kwargs_from_train_args(ckpt.args)
    kwargs.update(model_kwargs or {})
    # the family's filter names the tensors as ours (released layouts), then classifier / stem sizes tell
    # num_classes / in_chans where neither the args nor the caller set them (on the meta device: shapes only)
    with warnings.catch_warnings():  # _tag_for_weights said what a fine-tuning-start file is
        warnings.simplefilter('ignore', FineTuneStartWarning)
        canonical = convert_state_dict(name, sd, timm.create_model(name, device='meta', **kwargs))
        kwargs = infer_from_weights(name, kwargs, canonical)
        net = timm.create_model(name, **kwargs)
        load_into(net, name, sd)
    net.eval()

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # write and verify everything in a staging folder beside out_dir, then rename the files into place:
    # an interrupted or failed export never leaves a partial file where a good one was
    staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.partial-', dir=out_dir.parent))
    try:
        from timm.models import save_for_hf
        save_for_hf(net, str(staging), safe_serialization=True,
                    data_config=data_config_from_train_args(ckpt.args) or None)
        shutil.copymode(staging / CONFIG_FILE, staging / WEIGHTS_FILE)  # safetensors writes 0600: follow umask
        config = hf_config_for_loaders(staging / CONFIG_FILE)
        # the kwargs the model was built with: config.json's model_args and its top-level num_classes
        model_args = {'num_classes': config['num_classes'], **config.get('model_args', {})}
        repo_id = repo_id or f'{HUB_NAMESPACE}/{name}'
        measured = _measured_results(ckpt, used_ema, results)
        weights = WeightsInfo(source=ckpt.path.name, description=ckpt.description, epoch=ckpt.epoch, ema=used_ema,
                              layout=layout, train_args=ckpt.args, measured=measured,
                              data_config=config.get('pretrained_cfg', {}))
        card = render_card(name, model_kwargs=model_args, repo_id=repo_id, weights=weights, dataset=dataset)
        (staging / CARD_FILE).write_text(card, encoding='utf-8')
        if verify:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', FineTuneStartWarning)
                _verify_export(net, staging)
        out_dir.mkdir(exist_ok=True)
        for file in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE):
            os.replace(staging / file, out_dir / file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = {p: (out_dir / p).stat().st_size for p in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)}
    return ExportResult(out_dir, name, model_args, files, ckpt, used_ema, layout, repo_id)


def _has_published_file(name: str) -> bool:
    return bool(timm.models.get_pretrained_cfg(name).has_weights)  # timm's: a url, file or hf_hub_id


def _tag_for_weights(name: str, model: Optional[str], ckpt: Checkpoint) -> str:
    """The tag to export ``ckpt`` under. A tag whose cfg points at a published file describes that file: a
    fine-tuning-start file (``finetune_start_file``, by its name) is exported under FINETUNE_START_TAG, with a
    FineTuneStartWarning; other weights under a tag the caller named, else the architecture's first tag without a
    published file (``isqrt_resnet50.in1k``, not the default ``isqrt_resnet50.mpncov_finetune_start``)."""
    arch = timm.models.split_model_name_tag(name)[0]
    tags = [t.split('.', 1)[1] for t in timm.list_models(arch, include_tags=True) if '.' in t]
    started = finetune_start_file(ckpt.path.name)
    if started and FINETUNE_START_TAG in tags:
        warnings.warn(
            f'{ckpt.path.name} is {started}, published as a fine-tuning start only (its classifier classifies '
            f'ImageNet at chance: fast-MPN-COV issue #20): exported as {arch}.{FINETUNE_START_TAG}, whose card says '
            'so.', FineTuneStartWarning, stacklevel=3)
        return f'{arch}.{FINETUNE_START_TAG}'
    if (model and timm.models.split_model_name_tag(model)[1]) or not _has_published_file(name):
        return name
    own = next((t for t in tags if not _has_published_file(f'{arch}.{t}')), None)
    return f'{arch}.{own}' if own else name


def hf_config_for_loaders(path: Union[str, Path]) -> Dict[str, Any]:
    """Rewrite the ``config.json`` at ``path`` (timm's ``save_for_hf``'s) so that transformers' TimmWrapper loads it
    as timm does: ``HF_OWN_ARGS`` out of ``model_args`` (num_classes stays at the top level, where both loaders read
    it). Returns the config written."""
    path = Path(path)
    config = json.loads(path.read_text())
    if 'num_classes' not in config:
        raise ValueError(f'{path} has no top-level num_classes: not a config written by timm save_for_hf')
    model_args = {k: v for k, v in (config.get('model_args') or {}).items() if k not in HF_OWN_ARGS}
    if model_args:
        config['model_args'] = model_args
    else:
        config.pop('model_args', None)
    path.write_text(json.dumps(config, indent=2))
    return config


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
