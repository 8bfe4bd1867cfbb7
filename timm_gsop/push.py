"""``push_folder`` (``timm-gsop push``): upload an exported folder to the Hugging Face Hub.

A pre-flight check (``check_export_folder``: config.json names a registered model, model.safetensors holds exactly
that model's tensors, README.md is there) runs first; then ``HfApi.upload_folder`` uploads it (pickles and hidden
files left out by its ignore patterns). Retrying is safe: the repo and branch are created only if missing, files
already on the Hub are not uploaded again and an unchanged folder makes no commit. The token comes from
``HF_TOKEN`` or ``hf auth login``.
"""
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import timm

from . import __version__
from .export import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE

__all__ = ['ExportFolderError', 'FolderCheck', 'check_export_folder', 'PushResult', 'push_folder',
           'explain_hub_error']

# never uploaded: pickles (the point of the export is a repo without them) and hidden files
IGNORED_PATTERNS = ('*.pth', '*.pt', '*.bin', '*.tar', '*.pkl', '*.pickle', '*.ckpt', '.*', '**/.*')


class ExportFolderError(ValueError):
    """A folder that is not a complete, consistent export (``timm-gsop push`` refuses it)."""


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
    if 'num_classes' in config:  # an export keeps it at the top level only (export.py: transformers' TimmWrapper)
        model_args.setdefault('num_classes', config['num_classes'])
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
    from huggingface_hub.utils import filter_repo_objects
    every = sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file())
    # the same filter upload_folder applies: what this lists is what a push uploads
    kept = set(filter_repo_objects(every, ignore_patterns=list(IGNORED_PATTERNS)))
    files = {rel: (folder / rel).stat().st_size for rel in every if rel in kept}
    return FolderCheck(arch, model_args, files, [rel for rel in every if rel not in kept])


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

    if old_repo is not None:  # keep the folder and the repo identical: the card names the repo it is in
        _replace_text(folder / CARD_FILE, card)
    from huggingface_hub import HfApi
    api = HfApi(library_name='timm-gsop', library_version=__version__)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
    repo_id = result.repo_id = getattr(repo_url, 'repo_id', None) or repo_id
    if branch != 'main' and not create_pr:
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    before = api.repo_info(repo_id, revision=branch).sha
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=branch, create_pr=create_pr,
        commit_message=commit_message or f'Add {check.model_name} weights (timm-gsop export)',
        ignore_patterns=list(IGNORED_PATTERNS))
    result.commit_url, result.pr_url = info.commit_url, info.pr_url
    result.changed = info.oid != before
    return result


def _replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a half-written file."""
    tmp = path.with_name(f'.{path.name}.partial')
    tmp.write_text(text, encoding='utf-8')
    os.replace(tmp, path)


def explain_hub_error(e: Exception) -> str:
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
