"""``timm-gsop``: the command line of timm-gsop (also ``python -m timm_gsop``).

Parsing needs the standard library only, so ``timm-gsop -h`` answers at once; a command imports torch, timm and
the package when it runs (importing ``timm_gsop`` registers the models, which imports torch: seconds). Bad input
(values, names, files) ends in a one-line error and exit status 2, other failures in a one-line error and 1.
"""
import argparse
import contextlib
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

__all__ = ['main', 'build_parser']


def _model_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """``key=value`` strings as timm's train.py ``--model-kwargs`` parses them (``timm.utils.ParseKwargs``)."""
    from timm.utils import ParseKwargs
    bad = [item for item in items if not item.split('=', 1)[0].strip() or '=' not in item]
    if bad:
        raise ValueError(f'--model-kwargs takes KEY=VALUE pairs, got {bad[0]!r}')
    namespace = argparse.Namespace()
    ParseKwargs(option_strings=[], dest='kwargs')(None, namespace, list(items))
    return namespace.kwargs


def _cmd_list(args: argparse.Namespace) -> int:
    from timm_gsop.zoo import format_table, zoo_rows
    rows = zoo_rows(args.filter)
    if not rows:
        raise ValueError(f'no timm-gsop model matches {args.filter!r}')
    print(format_table(('model', 'params', 'GFLOPs', 'input', 'weights'), rows))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from timm_gsop.export import export_checkpoint
    result = export_checkpoint(args.checkpoint, args.out, model=args.model, use_ema=args.ema,
                               model_kwargs=_model_kwargs(args.model_kwargs), repo_id=args.repo_id,
                               results=args.results, dataset=args.dataset)
    print(f"Exported the {'EMA ' if result['used_ema'] else ''}weights of {args.checkpoint} as {result['model']} "
          f"to {args.out}: {', '.join(f'{f} ({size:,} bytes)' for f, size in result['files'].items())}")
    if result['model_args']:
        print(f"  model_args: {json.dumps(result['model_args'])}")
    print(f"Next: timm-gsop push {args.out} --repo-id {args.repo_id or 'YOUR_ORG/' + result['model']}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from timm_gsop.export import push_folder
    result = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                         create_pr=args.create_pr, dry_run=args.dry_run, commit_message=args.commit_message)
    print(f"{'Would upload' if args.dry_run else 'Uploaded'} to {args.repo_id}: "
          + ', '.join(f'{f} ({size:,} bytes)' for f, size in result['files'].items()))
    if result['commit'] is not None:
        print(f"{result['commit'].pr_url or result['commit'].commit_url}\n"
              f"Load with: timm.create_model('hf-hub:{args.repo_id}', pretrained=True)  # after import timm_gsop")
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from timm_gsop.cards import render_card
    from timm_gsop.zoo import list_gsop_models
    if args.model.split('.')[0] not in list_gsop_models():
        raise ValueError(f'{args.model!r} is not a timm-gsop model (`timm-gsop list` names them)')
    card = render_card(args.model, model_kwargs=_model_kwargs(args.model_kwargs), repo_id=args.repo_id)
    with open(args.out, 'w', encoding='utf-8') if args.out else contextlib.nullcontext(sys.stdout) as f:
        f.write(card)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """Import timm_gsop, then run SCRIPT as ``python SCRIPT ARGS`` would: its argv, its folder first on the path."""
    import importlib
    command = args.command[1:] if args.command[:1] == ['--'] else args.command
    if not command or not os.path.isfile(command[0]):
        print(f"timm-gsop run: error: no such script: {command[0] if command else '(none given)'}", file=sys.stderr)
        return 2
    import timm_gsop  # noqa: F401 (registers the models)
    for module in args.imports:
        importlib.import_module(module)
    sys.argv = command
    sys.path.insert(0, os.path.dirname(os.path.abspath(command[0])))
    try:
        runpy.run_path(command[0], run_name='__main__')
    except SystemExit as e:  # sys.exit(code) semantics
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    return 0


def _cmd_recipe(args: argparse.Namespace) -> int:
    from timm_gsop.recipes import list_recipes, recipe_path
    if not args.name:
        print('\n'.join(f'{name}  {recipe_path(name)}' for name in list_recipes()))
    else:
        print(Path(recipe_path(args.name)).read_text().rstrip('\n') if args.show else recipe_path(args.name))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from timm_gsop.demo import DemoConfig, run_demo
    heads = tuple(p.strip() for p in args.heads.split(',') if p.strip())
    result = run_demo(DemoConfig(epochs=args.epochs, seed=args.seed, out=args.out, threads=args.threads,
                                 finetune_epochs=args.finetune_epochs, heads=heads, progress=not args.no_progress))
    return 0 if result['export'] is None or result['export']['ok'] else 1


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version
    parser = argparse.ArgumentParser(prog='timm-gsop', description='GSoP-Net (Global Second-order Pooling) for timm.')
    parser.add_argument('--version', action='version', version=f"timm-gsop {version('timm-gsop')}")
    sub = parser.add_subparsers(dest='command_name', metavar='COMMAND')

    def command(name, handler, help_text, **kwargs):
        p = sub.add_parser(name, help=help_text, description=kwargs.pop('description', help_text), **kwargs)
        p.set_defaults(func=handler)
        return p

    p = command('list', _cmd_list, 'the model zoo: params, GFLOPs (multiply-add = 2), input size, tags with weights')
    p.add_argument('filter', nargs='?', default='', help="fnmatch pattern of model names, e.g. 'gsop2*'")

    p = command('export', _cmd_export, 'a checkpoint as a Hub folder: model.safetensors, config.json, README.md',
                description='Export a checkpoint (timm train.py, the released code, a state dict, safetensors) to the '
                            'folder timm loads from the Hub, reloaded and compared before it is written in place.')
    p.add_argument('checkpoint', help='model_best.pth.tar, a .pth state dict or a .safetensors file')
    p.add_argument('--out', required=True, metavar='DIR', help='the folder to write')
    p.add_argument('--model', metavar='NAME', help="registered model, with or without tag (default: args.model)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument('--ema', dest='ema', action='store_true', default=None, help='require the EMA weights')
    ema.add_argument('--no-ema', dest='ema', action='store_false', help='the raw (non-EMA) weights')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help="create_model kwargs over those of train.py's args, e.g. num_classes=100")
    p.add_argument('--repo-id', metavar='ORG/NAME', help="the repo the card's usage examples load")
    p.add_argument('--results', metavar='FILE', help='validate.py --results-file output (JSON or CSV) for the card')
    p.add_argument('--dataset', help="training dataset for the card, e.g. in1k or a Hub dataset id (default: tag's)")

    p = command('push', _cmd_push, 'upload an exported folder to the Hugging Face Hub (token: HF_TOKEN or `hf auth '
                'login`); safe to retry: unchanged files are not uploaded again')
    p.add_argument('folder')
    p.add_argument('--repo-id', required=True, metavar='ORG/NAME', help='your Hub user or organisation / repo name')
    p.add_argument('--private', action='store_true', help='create the repo private (when it does not exist)')
    p.add_argument('--revision', metavar='BRANCH', help='branch to push to, created if missing (default: main)')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    p.add_argument('--commit-message')
    p.add_argument('--dry-run', action='store_true', help='check the folder and list what would be uploaded')

    p = command('card', _cmd_card, 'print the model card (README.md) of a registered model')
    p.add_argument('model')
    p.add_argument('--out', metavar='FILE', help='write to FILE instead of stdout')
    p.add_argument('--repo-id', metavar='ORG/NAME', help='the Hub repo the usage examples load')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE', help='create_model kwargs')

    p = command('run', _cmd_run, 'run a timm script (train.py, validate.py, ...) with the models registered',
                usage='timm-gsop run [--import MODULE] SCRIPT [ARGS ...]',
                description='Import timm_gsop, then run SCRIPT as `python SCRIPT ARGS` would; the exit status is the '
                            "script's. Under torchrun: torchrun ... -m timm_gsop run train.py ARGS")
    p.add_argument('--import', dest='imports', action='append', default=[], metavar='MODULE',
                   help='also import MODULE first (repeatable)')
    p.add_argument('command', nargs=argparse.REMAINDER, metavar='SCRIPT [ARGS ...]')

    p = command('recipe', _cmd_recipe, "the path of a train.py --config recipe (no NAME: list them)")
    p.add_argument('name', nargs='?', default='')
    p.add_argument('--show', action='store_true', help="print the recipe's content instead of its path")

    p = command('demo', _cmd_demo, 'GSoP-Nets against a same-size ResNet on CPU (about 1.5 minutes), export, warm '
                'start, covariance heads; no data or network needed (docs/demo.md)')
    p.add_argument('--epochs', type=int, default=6)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='timm-gsop-demo', metavar='DIR', help='where GSoP-Net1 is exported')
    p.add_argument('--threads', type=int, default=1, help='CPU threads for torch')
    p.add_argument('--finetune-epochs', type=int, default=3, help='epochs after the warm start (0: none)')
    p.add_argument('--heads', default='avg,isqrt', help="the head section's global_pool values ('': none)")
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    if args.func is _cmd_run:  # the script's own exceptions propagate, as with `python SCRIPT`
        return _cmd_run(args)
    try:
        return args.func(args)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        print(f'timm-gsop {args.command_name}: error: {e.args[0] if e.args else type(e).__name__}', file=sys.stderr)
        return 2
    except (RuntimeError, OSError, ImportError) as e:
        print(f'timm-gsop {args.command_name}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}',
              file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
