"""``timm-gsop export`` and ``push``: a checkpoint as the folder timm loads from the Hugging Face Hub, and its upload.

``export_checkpoint`` reads with timm's ``load_state_dict`` (safetensors or pickle, ``weights_only``, the EMA or
``state_dict`` entry), converts with the family's ``checkpoint_filter_fn``, loads strictly, writes with timm's
``save_for_hf`` and ``cards.render_card`` into a staging folder, reloads it through ``local-dir:`` and compares
outputs, and only then renames the files into place: a failed export never leaves a partial file where a good one
was. ``push_folder`` uploads such a folder with ``HfApi.upload_folder``.
"""
import argparse
import importlib
import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import timm
from timm.models import load_state_dict, model_entrypoint, save_for_hf, split_model_name_tag

from .cards import HUB_NAMESPACE, render_card
from .models.gsop_resnet import WarmStartWarning, checkpoint_layout
from .zoo import list_gsop_models

__all__ = ['FILES', 'export_checkpoint', 'push_folder']

FILES = ('model.safetensors', 'config.json', 'README.md')
# config.json's model_args that transformers' TimmWrapper passes itself (num_classes: the top-level one)
_WRAPPER_ARGS = ('num_classes', 'pretrained')
_DATA_ARGS = ('input_size', 'img_size', 'crop_pct', 'crop_mode', 'mean', 'std', 'interpolation')
# never uploaded: pickles (an export is a repo without them) and hidden files
IGNORE_PATTERNS = ['*.pth', '*.pt', '*.bin', '*.tar', '*.pkl', '*.ckpt', '.*', '**/.*']


def _convert(arch: str, state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``state_dict`` in ``model``'s names by its family's ``checkpoint_filter_fn``; an export is of trained weights:
    a warm start (a plain network's checkpoint) raises its warning."""
    family = importlib.import_module(model_entrypoint(arch).__module__)
    with warnings.catch_warnings():
        warnings.simplefilter('error', WarmStartWarning)
        return family.checkpoint_filter_fn(dict(state_dict), model)


def _checkpoint_extras(path: Path) -> Dict[str, Any]:
    """A pickle's ``args``, ``epoch``, ``metric``, EMA (train.py), ``arch``, ``best_prec1`` (the released code)."""
    if path.suffix == '.safetensors':
        return {}
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(path))
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    args = ckpt.get('args')
    return dict(args=vars(args) if isinstance(args, argparse.Namespace) else dict(args or {}),
                ema=any(isinstance(ckpt.get(k), dict) for k in ('state_dict_ema', 'model_ema')),
                **{k: ckpt[k] for k in ('epoch', 'metric', 'best_prec1', 'arch') if k in ckpt})


def _model_name(model: Optional[str], path: Path, extras: Dict[str, Any]) -> str:
    trained = extras['args'].get('model') or ''
    if not (model or trained) and str(extras.get('arch', '')).startswith('mpncovresnet'):
        model = f"isqrt_resnet{extras['arch'][len('mpncovresnet'):]}"  # fast-MPN-COV main.py's arch
    if model and trained and split_model_name_tag(model)[0] != split_model_name_tag(trained)[0]:
        raise ValueError(f'{path} was trained as {trained!r} (its args.model), not {model!r}')
    name = model or trained
    if not name or name.startswith(('hf-hub:', 'hf_hub:', 'local-dir:')):
        raise ValueError(f'{path} does not name its architecture ({name or "no args.model"}): pass --model NAME')
    if split_model_name_tag(name)[0] not in list_gsop_models():
        raise ValueError(f'{name!r} is not a timm-gsop model (`timm-gsop list` names them); timm\'s '
                         'push_to_hf_hub publishes other timm models')
    return name


def _key_diff(state_dict: Dict[str, torch.Tensor], arch: str, model: torch.nn.Module) -> Tuple[Dict, List, List]:
    """``state_dict`` in ``model``'s names (as it is where the family does not convert it) and its (missing,
    unexpected) tensor names, BN step counters aside (the released code predates them)."""
    try:
        named = _convert(arch, state_dict, model)
    except (KeyError, RuntimeError, ValueError, WarmStartWarning):  # not a checkpoint that family converts
        named = state_dict
    have, want = set(named), set(model.state_dict())
    keep = lambda keys: sorted(k for k in keys if not k.endswith('num_batches_tracked'))
    return named, keep(want - have), keep(have - want)


def _measured(path: Path, extras: Dict[str, Any], used_ema: bool, results: Optional[Path]) -> List[str]:
    """The card's measured results: a validate.py ``--results-file`` (JSON or CSV) and the checkpoint's own."""
    lines = []
    if results is not None:
        import csv
        text = results.read_text()
        rows = list(csv.DictReader(text.splitlines())) if results.suffix == '.csv' else json.loads(text)
        for row in rows if isinstance(rows, list) else [rows]:
            setup = ''.join(f', {k} {row[k]}' for k in ('img_size', 'crop_pct', 'interpolation') if row.get(k))
            lines.append(f"top-1 {float(row['top1']):.3f}, top-5 {float(row['top5']):.3f}: timm validate.py "
                         f'(`{results.name}`{setup})')
    if extras.get('metric') is not None and (used_ema or not extras['ema']):
        lines.append(f"{extras['args'].get('eval_metric') or 'top1'} {float(extras['metric']):.2f}: the evaluation "
                     f"train.py stored in `{path.name}` after epoch {extras.get('epoch')} (its validation set)")
    if extras.get('best_prec1') is not None:
        lines.append(f"top-1 {float(extras['best_prec1']):.2f}: `best_prec1`, stored in `{path.name}` by the "
                     'released training code (its validation set)')
    return lines


def _load(path: Path, model: Optional[str], use_ema: Optional[bool], model_kwargs: Optional[Dict[str, Any]]):
    """The model a checkpoint holds, built and loaded strictly: (name, model, state dict, extras)."""
    if not path.is_file():
        raise FileNotFoundError(f'No checkpoint file at {path}')
    extras = dict(dict(args={}, ema=False), **_checkpoint_extras(path))
    if use_ema and not extras['ema']:
        raise ValueError(f'{path} has no EMA weights (state_dict_ema / model_ema)')
    name = _model_name(model, path, extras)
    arch, args = split_model_name_tag(name)[0], extras['args']
    kwargs = {k: v for k, v in (('num_classes', args.get('num_classes')), ('in_chans', args.get('in_chans')),
                                ('global_pool', args.get('gp'))) if v is not None}
    kwargs.update({k: v for k, v in (args.get('model_kwargs') or {}).items() if k != 'pretrained_strict'})
    kwargs.update(model_kwargs or {})
    state_dict = load_state_dict(str(path), use_ema=use_ema is not False)
    if 'num_classes' not in kwargs:  # the classifier's, in the family's names (shapes only: the meta device)
        try:
            named = _convert(arch, state_dict, timm.create_model(name, device='meta', **kwargs))
        except WarmStartWarning:  # a plain network's checkpoint: the key check below refuses it
            named = state_dict
        if named.get('fc.weight') is not None:
            kwargs['num_classes'] = named['fc.weight'].shape[0]
    net = timm.create_model(name, **kwargs).eval()
    named, missing, unexpected = _key_diff(state_dict, arch, net)
    if missing or unexpected:
        fits = []
        for other in list_gsop_models():
            try:
                candidate = timm.create_model(other, device='meta', **kwargs)
            except (TypeError, ValueError):  # kwargs of another family
                continue
            fits += [other] if _key_diff(state_dict, other, candidate)[1:] == ([], []) else []
        few = lambda keys: ', '.join(keys[:2]) + (', ...' if len(keys) > 2 else '')
        raise ValueError(
            f"{path} does not hold the tensors of {name}{f' built with {kwargs}' if kwargs else ''}: {len(missing)} "
            f'missing ({few(missing)}), {len(unexpected)} unexpected ({few(unexpected)}); its tensors fit '
            + (', '.join(fits) if fits else "no timm-gsop model (a plain network's checkpoint is a warm start: "
                                            'train from it with train.py --pretrained-path, then export)'))
    net.load_state_dict(named)  # shapes: torch's own error
    return name, net, state_dict, extras


def export_checkpoint(
        checkpoint: Union[str, Path],
        out_dir: Union[str, Path],
        model: Optional[str] = None,
        use_ema: Optional[bool] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        repo_id: Optional[str] = None,
        results: Optional[Union[str, Path]] = None,
        dataset: Optional[str] = None,
) -> Dict[str, Any]:
    """Write ``model.safetensors``, ``config.json`` and ``README.md`` for ``checkpoint`` into ``out_dir``.

    Args:
        checkpoint: timm train.py's, the released GSoP-Net or fast-MPN-COV code's, a state dict or safetensors.
        out_dir: the folder to write (created; these three files are replaced, nothing else is touched).
        model: a registered model name, with or without tag (default: train.py's ``args.model``).
        use_ema: None: the EMA weights when the checkpoint has them; True: require them; False: the raw weights.
        model_kwargs: create_model kwargs over those of train.py's args (``num_classes``, ``in_chans`` ...).
        repo_id, results, dataset: for the card: the Hub repo its examples load (default ``timm-gsop/<model>``), a
            validate.py results file (JSON or CSV), the training dataset (default: the tag's).

    Returns ``dict(model, model_args, used_ema, files)``.
    """
    path, out_dir = Path(checkpoint), Path(out_dir)
    name, net, state_dict, extras = _load(path, model, use_ema, model_kwargs)
    args, used_ema = extras['args'], extras['ema'] and use_ema is not False
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.partial-', dir=out_dir.parent))
    try:
        data_config = {k: args[k] for k in _DATA_ARGS if args.get(k) not in (None, '')}
        save_for_hf(net, str(staging), safe_serialization=True, data_config=data_config or None)
        shutil.copymode(staging / 'config.json', staging / 'model.safetensors')  # safetensors writes 0600
        config = json.loads((staging / 'config.json').read_text())
        model_args = {k: v for k, v in config.get('model_args', {}).items() if k not in _WRAPPER_ARGS}
        config['model_args'] = model_args  # as timm reads it and transformers' TimmWrapper passes it
        (staging / 'config.json').write_text(json.dumps(config, indent=2))
        full_name = f"{config['architecture']}.{net.pretrained_cfg['tag']}"
        weights = dict(
            source=path.name, epoch=extras.get('epoch'), ema=used_ema, layout=checkpoint_layout(state_dict),
            description="a checkpoint of timm's train.py" if args else 'a checkpoint',
            train_args=args, measured=_measured(path, extras, used_ema, Path(results) if results else None))
        card = render_card(name, model_kwargs={'num_classes': net.num_classes, **model_args}, weights=weights,
                           repo_id=repo_id or f'{HUB_NAMESPACE}/{full_name}', dataset=dataset)
        (staging / 'README.md').write_text(card, encoding='utf-8')
        reloaded = timm.create_model(f'local-dir:{staging}', pretrained=True).eval()
        x = torch.randn(1, *timm.models.get_model_input_config(net)['input_size'])
        with torch.no_grad():
            if not torch.equal(net(x), reloaded(x)):
                raise RuntimeError(f'{staging} does not reproduce the model: nothing was written to {out_dir}')
        out_dir.mkdir(exist_ok=True)
        for file in FILES:
            os.replace(staging / file, out_dir / file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dict(model=full_name, model_args=model_args, used_ema=used_ema,
                files={f: (out_dir / f).stat().st_size for f in FILES})


def push_folder(
        folder: Union[str, Path],
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        create_pr: bool = False,
        dry_run: bool = False,
        commit_message: Optional[str] = None,
) -> Dict[str, Any]:
    """Upload a folder written by :func:`export_checkpoint`, which must load through timm, to the Hub repo ``repo_id``
    (token: ``HF_TOKEN`` or ``hf auth login``). Safe to retry: the repo and branch are created only if missing and
    an unchanged folder makes no commit. Returns ``dict(files, commit)`` (``CommitInfo``; None on a dry run)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects
    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} has no {', '.join(missing)}: write it with `timm-gsop export`")
    timm.create_model(f'local-dir:{folder.resolve()}', pretrained=True)  # config and weights agree
    every = sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file())
    files = {f: (folder / f).stat().st_size for f in filter_repo_objects(every, ignore_patterns=IGNORE_PATTERNS)}
    if dry_run:
        return dict(files=files, commit=None)
    card = (folder / 'README.md').read_text(encoding='utf-8')
    old = re.search(r'hf-hub:([\w.-]+/[\w.-]+)', card)
    if old and old.group(1) != repo_id:  # the card's usage examples load the repo it is pushed to
        tmp = folder / '.README.md.partial'
        tmp.write_text(card.replace(old.group(1), repo_id), encoding='utf-8')
        os.replace(tmp, folder / 'README.md')
    exported_for = json.loads((folder / 'config.json').read_text())['architecture']
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=revision, create_pr=create_pr,
        commit_message=commit_message or f'Add {exported_for} weights (timm-gsop export)',
        ignore_patterns=IGNORE_PATTERNS)
    return dict(files=files, commit=commit)
