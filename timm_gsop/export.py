"""``timm-gsop export`` and ``push``: a checkpoint as the folder timm loads from the Hugging Face Hub, and its upload.

``export_checkpoint`` reads the weights with timm's ``load_state_dict`` (safetensors, or a pickle with
``weights_only``; the EMA or ``state_dict`` entry; ``clean_state_dict``) and train.py's ``args`` with
``torch.load(weights_only=True)``; converts them with the model family's ``checkpoint_filter_fn`` (released
layouts) and loads them strictly; writes ``model.safetensors`` and ``config.json`` with timm's ``save_for_hf`` and
``README.md`` with ``cards.render_card`` into a staging folder beside the target; reloads that folder through
timm's ``local-dir:`` source and compares outputs; only then renames the files into place, so a failed or
interrupted export never leaves a partial file where a good one was. ``push_folder`` uploads such a folder with
``HfApi.upload_folder``.
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
    """``state_dict`` in ``model``'s names by the ``checkpoint_filter_fn`` of the family that registers ``arch``.
    Exported weights are trained weights: a warm start (a plain network's checkpoint) raises its warning."""
    family = importlib.import_module(model_entrypoint(arch).__module__)
    with warnings.catch_warnings():
        warnings.simplefilter('error', WarmStartWarning)
        return family.checkpoint_filter_fn(dict(state_dict), model)


def _checkpoint_extras(path: Path) -> Dict[str, Any]:
    """What a pickled checkpoint says besides its weights: train.py's ``args``, ``epoch``, ``metric``, whether it
    has EMA weights; the released code's ``arch`` and ``best_prec1``. Memory-mapped where the format allows."""
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


def _key_diff(state_dict: Dict[str, torch.Tensor], arch: str, model: torch.nn.Module) -> Tuple[List[str], List[str]]:
    """(missing, unexpected) tensor names of ``state_dict`` for ``model`` (BN step counters aside: the released
    code predates them)."""
    try:
        have = set(_convert(arch, state_dict, model))
    except (KeyError, RuntimeError, ValueError, WarmStartWarning):  # not a checkpoint that family converts
        have = set(state_dict)
    want = set(model.state_dict())
    keep = lambda keys: sorted(k for k in keys if not k.endswith('num_batches_tracked'))
    return keep(want - have), keep(have - want)


def _measured(path: Path, extras: Dict[str, Any], used_ema: bool, results: Optional[Path]) -> List[str]:
    """The card's measured results: a validate.py ``--results-file`` (JSON or CSV) and the checkpoint's metric."""
    lines = []
    if results is not None:
        import csv
        text = results.read_text()
        rows = list(csv.DictReader(text.splitlines())) if results.suffix == '.csv' else json.loads(text)
        for row in rows if isinstance(rows, list) else [rows]:
            setup = ', '.join(f'{k} {row[k]}' for k in ('img_size', 'crop_pct', 'interpolation') if row.get(k))
            lines.append(f"top-1 {float(row['top1']):.3f}, top-5 {float(row['top5']):.3f}: timm validate.py "
                         f"(`{results.name}`{', ' + setup if setup else ''})")
    if extras.get('metric') is not None and (used_ema or not extras['ema']):
        lines.append(f"{extras['args'].get('eval_metric') or 'top1'} {float(extras['metric']):.2f}: the evaluation "
                     f"train.py stored in `{path.name}` after epoch {extras.get('epoch')} (its validation set)")
    if extras.get('best_prec1') is not None:
        lines.append(f"top-1 {float(extras['best_prec1']):.2f}: `best_prec1`, stored in `{path.name}` by the "
                     'released training code (its validation set)')
    return lines


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
        checkpoint: a timm train.py checkpoint, a released GSoP-Net or fast-MPN-COV checkpoint, a state dict or a
            ``.safetensors`` file.
        out_dir: the folder to write (created; these three files are replaced, nothing else is touched).
        model: a registered model name, with or without tag (default: train.py's ``args.model``).
        use_ema: None: the EMA weights when the checkpoint has them; True: require them; False: the raw weights.
        model_kwargs: create_model kwargs over those of train.py's args (``num_classes``, ``model_kwargs`` ...).
        repo_id: the Hub repo the card's usage examples load (default ``timm-gsop/<model>.<tag>``).
        results: a timm validate.py results file (JSON or CSV) for the card's measured results.
        dataset: the training dataset for the card (default: the tag's, when num_classes matches it).

    Returns ``dict(model, model_args, used_ema, files)``.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f'No checkpoint file at {path}')
    extras = dict(dict(args={}, ema=False), **_checkpoint_extras(path))
    if use_ema and not extras['ema']:
        raise ValueError(f'{path} has no EMA weights (state_dict_ema / model_ema)')
    name = _model_name(model, path, extras)
    args = extras['args']
    kwargs = {k: v for k, v in (('num_classes', args.get('num_classes')), ('in_chans', args.get('in_chans')),
                                ('global_pool', args.get('gp'))) if v is not None}
    kwargs.update({k: v for k, v in (args.get('model_kwargs') or {}).items() if k != 'pretrained_strict'})
    kwargs.update(model_kwargs or {})
    state_dict = load_state_dict(str(path), use_ema=use_ema is not False)
    arch = split_model_name_tag(name)[0]
    # num_classes / in_chans from the classifier / stem weights where neither the args nor the caller set them
    try:
        named = _convert(arch, state_dict, timm.create_model(name, device='meta', **kwargs))
    except WarmStartWarning:  # a plain network's checkpoint: the key check below refuses it
        named = state_dict
    if 'num_classes' not in kwargs and named.get('fc.weight') is not None:
        kwargs['num_classes'] = named['fc.weight'].shape[0]
    first_conv = timm.models.get_pretrained_cfg(name).first_conv
    stem = named.get(f'{first_conv}.weight') if isinstance(first_conv, str) else None
    if 'in_chans' not in kwargs and stem is not None and stem.ndim == 4 and stem.shape[1] != 3:
        kwargs['in_chans'] = stem.shape[1]
    net = timm.create_model(name, **kwargs).eval()
    missing, unexpected = _key_diff(state_dict, arch, net)
    if missing or unexpected:
        fits = []
        for arch in list_gsop_models():
            try:
                fits += [arch] if _key_diff(state_dict, arch, timm.create_model(arch, device='meta', **kwargs)) == \
                    ([], []) else []
            except (TypeError, ValueError):  # kwargs of another family
                pass
        raise ValueError(
            f"{path} does not hold the tensors of {name}{f' built with {kwargs}' if kwargs else ''}: "
            f"{len(missing)} missing ({', '.join(missing[:2])}{', ...' if len(missing) > 2 else ''}), "
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:2])}{', ...' if len(unexpected) > 2 else ''}); "
            + (f"its tensors fit {', '.join(fits)}" if fits else 'its tensors fit no timm-gsop model (a plain '
               "network's checkpoint is a warm start: train from it with train.py --pretrained-path, then export)"))
    net.load_state_dict(_convert(arch, state_dict, net))  # shapes: torch's own error

    out_dir = Path(out_dir)
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
        used_ema = extras['ema'] and use_ema is not False
        weights = dict(
            source=path.name, epoch=extras.get('epoch'), ema=used_ema, layout=checkpoint_layout(state_dict),
            description="a checkpoint of timm's train.py" if args else 'a checkpoint',
            train_args=args, measured=_measured(path, extras, used_ema, Path(results) if results else None))
        card = render_card(name, model_kwargs={'num_classes': net.num_classes, **model_args}, weights=weights,
                           repo_id=repo_id or f"{HUB_NAMESPACE}/{config['architecture']}.{net.pretrained_cfg['tag']}",
                           dataset=dataset)
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
    return dict(model=f"{config['architecture']}.{net.pretrained_cfg['tag']}", model_args=model_args,
                used_ema=used_ema, files={f: (out_dir / f).stat().st_size for f in FILES})


def push_folder(
        folder: Union[str, Path],
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        create_pr: bool = False,
        dry_run: bool = False,
        commit_message: Optional[str] = None,
) -> Dict[str, Any]:
    """Upload a folder written by :func:`export_checkpoint` to the Hub repo ``repo_id`` (token: ``HF_TOKEN`` or
    ``hf auth login``). It must load through timm first. Safe to retry: the repo and branch are created only if
    missing, and huggingface_hub uploads nothing the repo has already (an unchanged folder makes no commit).

    Returns ``dict(files, commit)`` (``commit``: huggingface_hub's ``CommitInfo``; None on a dry run)."""
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
