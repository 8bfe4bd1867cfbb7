"""``timm-gsop``: the command line of timm-gsop (also ``python -m timm_gsop``).

Parsing the command line needs the standard library only, so ``timm-gsop -h`` and ``timm-gsop COMMAND -h``
answer at once; a command imports torch, timm and the library when it runs. Bad values and unknown models end
in a one-line error and exit status 2, other failures in a one-line error and exit status 1.

This module sits on top of the package (it is not inside ``timm_gsop`` because importing that package
registers the models with timm, which imports torch: seconds before any help could be printed).
"""
import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence

__all__ = ['main', 'build_parser', 'CommandError']

PROG = 'timm-gsop'


class CommandError(Exception):
    """A failure to report as ``timm-gsop COMMAND: error: MESSAGE`` with exit status ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default stated once, after its help; descriptions keep their line breaks.

    argparse's ArgumentDefaultsHelpFormatter appends ``(default: VALUE)`` to every option, also where the help
    already states the default in words (``(default: X) (default: None)``) and on flags (``--no-ema``'s
    ``(default: True)``). Here the value is appended only where the help does not state a default and the value
    means what it says: not for flags (off unless given), required arguments, or None / empty defaults, whose help
    says in words what happens (``build_parser`` states one for each: tests/test_cli.py checks it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        default = action.default
        if '(default' in text or action.nargs == 0 or action.required or default is argparse.SUPPRESS \
                or default is None or default in ('', []) or action.nargs == argparse.REMAINDER:
            return text
        shown = ' '.join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f'{text} (default: {shown.replace("%", "%%")})'


def _bounded_int(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}')
        if value < low:
            raise argparse.ArgumentTypeError(f'must be >= {low}, got {value}')
        return value
    parse.__name__ = f'integer >= {low}'
    return parse


def _corr(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number, got {text!r}')
    if not 0 < value < 0.7071:
        raise argparse.ArgumentTypeError(f'must be in (0, 0.707) for a valid correlation matrix, got {value}')
    return value


def _pool_list(text: str) -> Sequence[str]:
    # demo --heads: run_demo checks the names (before any training)
    return tuple(p.strip() for p in text.split(',') if p.strip())


def _add_model_kwargs(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help=f'{help_text}; values parsed as Python literals, as timm train.py --model-kwargs does '
                        '(default: none)')


def _model_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """``key=value`` strings -> kwargs, with timm's own parser (``timm.utils.ParseKwargs``, train.py's)."""
    from timm.utils import ParseKwargs
    for item in items:
        if '=' not in item or not item.split('=', 1)[0].strip():
            raise CommandError(f'model kwargs are key=value pairs, got {item!r}')
    namespace = argparse.Namespace()
    ParseKwargs(option_strings=[], dest='kwargs')(None, namespace, list(items))
    return namespace.kwargs


def _check_model(name: str) -> None:
    """CommandError for a name timm cannot create (after the plugin registered its models)."""
    import timm
    import timm_gsop  # noqa: F401 (registers the models)
    if name.startswith(('hf-hub:', 'hf_hub:', 'local-dir:')):
        return
    if not timm.is_model(timm.models.split_model_name_tag(name)[0]):
        raise CommandError(f'unknown model {name!r}; `timm-gsop list` names the registered ones')


def _check_gsop_model(name: str) -> None:
    from timm_gsop.zoo import list_gsop_models
    _check_model(name)
    import timm
    if timm.models.split_model_name_tag(name)[0] not in list_gsop_models():
        raise CommandError(f'{name!r} is not a timm-gsop model (see `timm-gsop list`)')


# ---- list ------------------------------------------------------------------------------------------------

def _cmd_list(args: argparse.Namespace) -> int:
    from timm_gsop.zoo import compare_rows, format_table, zoo_rows
    if args.compare:
        rows = compare_rows(args.filter)
        if not rows:
            raise CommandError(f'no model of the comparison matches {args.filter!r}')
        print(format_table(('model', 'method', 'params', 'GFLOPs', 'top-1 err (reported)', 'top-5 err (reported)',
                            'reported by'), rows))
        print('\nParams and GFLOPs (multiply-add = 2) counted here at 3x224x224, 1000 classes; errors (%, ImageNet-1k '
              'val, single 224 crop) as reported by the cited source, not measured by this package.')
        return 0
    rows = zoo_rows(args.filter)
    if not rows:
        raise CommandError(f'no timm-gsop model matches {args.filter!r}')
    print(format_table(('model', 'params', 'GFLOPs', 'input', 'weights'), rows))
    return 0


# ---- bench -----------------------------------------------------------------------------------------------

_AMP_CHOICES = ('bf16', 'bfloat16', 'fp16', 'float16')


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch
    import timm
    from timm_gsop import bench
    for spec in args.model + ([args.baseline] if args.baseline else []):
        name, _ = bench.parse_model_spec(spec)
        _check_model(name)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.amp_check:
        reports = [bench.check_amp_training(spec, bench.AMP_DTYPES[dtype], device=args.device, steps=args.steps,
                                            img_size=args.img_size, batch_size=args.batch_size[0],
                                            channels_last=args.channels_last)
                   for spec in args.model for dtype in args.amp_check]
        for r in reports:
            print(f"{r['model']} {r['amp']}: {r['steps']} steps, non-finite at {r['nonfinite_steps'] or 'none'}, "
                  f"final loss {r['final_loss']:.3f}, gates {', '.join(r['gate_dtypes'])}")
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(reports, f, indent=2)
        ok = all(not r['nonfinite_steps'] and r['gate_dtypes'] == ['float32->float32'] for r in reports)
        print('AMP training check:', 'OK' if ok else 'FAILED')
        return 0 if ok else 1
    log = (lambda msg: print(f'[bench] {msg}', file=sys.stderr, flush=True)) if not args.quiet else None
    results = bench.bench_models(
        args.model, baseline=args.baseline, batch_sizes=args.batch_size, img_size=args.img_size,
        modes=args.mode, warmup=args.warmup, steps=args.steps, repeats=args.repeats, device=args.device,
        channels_last=args.channels_last, compile_model=args.compile,
        amp_dtype=bench.AMP_DTYPES[args.amp] if args.amp else None, memory=not args.no_memory, progress=log)
    ops = bench.bench_ops(repeats=args.repeats) if args.ops else None
    # glibc's allocator settings change CPU timings (benchmarks/cpu.sh sets them): recorded with the results
    malloc = {k: v for k, v in sorted(os.environ.items()) if k.startswith('MALLOC_')}
    meta = {'torch': torch.__version__, 'timm': timm.__version__, 'threads': torch.get_num_threads(),
            'malloc_env': malloc, 'command': 'timm-gsop ' + ' '.join(sys.argv[1:]) if sys.argv else ''}
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'meta': meta, 'models': results, 'ops': ops}, f, indent=2)
    print(f'torch {meta["torch"]}, timm {meta["timm"]}, {meta["threads"]} threads, device {args.device}, '
          + ''.join(f'{k}={v}, ' for k, v in malloc.items())
          + f'{args.img_size}x{args.img_size}, medians [min, max] over {args.repeats} interleaved repeats')
    print(bench.format_results(results, ops))
    return 0


# ---- onnx ------------------------------------------------------------------------------------------------

def _cmd_onnx(args: argparse.Namespace) -> int:
    _check_model(args.model)
    if args.exporter == 'dynamo':
        import importlib.util
        missing = [m for m in ('onnx', 'onnxscript') if importlib.util.find_spec(m) is None]
        if missing:
            raise CommandError(f"the dynamo exporter needs {' and '.join(missing)}: pip install 'timm-gsop[onnx]' "
                               '(or use --exporter torchscript)', code=1)
    import timm
    from timm_gsop.onnx_export import check_onnx, export_onnx
    kwargs = _model_kwargs(args.model_kwargs)
    if args.checkpoint:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=args.checkpoint))
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    model = timm.create_model(args.model, **kwargs).eval()
    channels = kwargs.get('in_chans', model.pretrained_cfg['input_size'][0])
    size = tuple(args.img_size) if args.img_size else tuple(model.pretrained_cfg['input_size'][1:])
    input_size = (channels, *size)
    path = export_onnx(model, args.output, input_size, opset=args.opset, dynamic_batch=not args.static_batch,
                       exporter=args.exporter)
    print(f'wrote {path} ({path.stat().st_size / 1e6:.1f} MB), input x: (batch, {", ".join(map(str, input_size))})')
    if args.no_check:
        return 0
    try:
        errors = check_onnx(model, path, input_size, batch_sizes=(1,) if args.static_batch else (1, 3))
    except ImportError:
        print("onnxruntime is not installed: skipped the output check (pip install 'timm-gsop[onnx]')")
        return 0
    for batch, err in errors.items():
        print(f'onnxruntime vs torch, batch {batch}: max relative error {err:.2e}')
    if max(errors.values()) > args.rtol:
        raise CommandError(f'onnxruntime differs from torch by more than --rtol {args.rtol}', code=1)
    return 0


# ---- export / push / card --------------------------------------------------------------------------------

def _human(size: int) -> str:
    for unit in ('B', 'KB', 'MB', 'GB'):
        if size < 1000 or unit == 'GB':
            return f'{size:.0f} {unit}' if unit == 'B' else f'{size:.1f} {unit}'
        size /= 1000
    return str(size)


def _cmd_export(args: argparse.Namespace) -> int:
    if args.model:
        _check_gsop_model(args.model)
    from timm_gsop.export import export_checkpoint
    result = export_checkpoint(
        args.checkpoint, args.out, model=args.model, use_ema=args.ema, repo_id=args.repo_id,
        model_kwargs=_model_kwargs(args.model_kwargs), results=args.results, dataset=args.dataset,
        verify=not args.no_verify)
    ckpt = result.checkpoint
    which = 'EMA weights' if result.used_ema else ('weights (state_dict; EMA weights left out)'
                                                   if ckpt.ema_state_dict is not None else 'weights')
    print(f'Exported {which} of {ckpt.path} ({ckpt.description}) as {result.model_name} to {result.out_dir}:')
    for name, size in result.files.items():
        print(f'  {name:<18} {size:>14,} bytes ({_human(size)})')
    if result.model_args:
        print(f'  model_args: {json.dumps(result.model_args)}')
    repo = args.repo_id or f'YOUR_ORG/{result.model_name}'
    print(f'Next: timm-gsop push {result.out_dir} --repo-id {repo}'
          + ('   (YOUR_ORG: your Hub user or organisation)' if not args.repo_id else ''))
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from timm_gsop.push import ExportFolderError, explain_hub_error, push_folder
    try:
        result = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                             create_pr=args.create_pr, dry_run=args.dry_run, commit_message=args.commit_message)
    except (ValueError, FileNotFoundError, ExportFolderError):
        raise
    except Exception as e:
        raise CommandError(explain_hub_error(e), code=1) from e
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


def _cmd_card(args: argparse.Namespace) -> int:
    _check_gsop_model(args.model)
    from timm_gsop.cards import render_card
    card = render_card(args.model, model_kwargs=_model_kwargs(args.model_kwargs), repo_id=args.repo_id)
    if args.out:
        with open(args.out, 'w', encoding='utf-8') as f:
            f.write(card)
        print(f'Wrote {args.out}')
    else:
        sys.stdout.write(card)
    return 0


# ---- run / recipe / demo ---------------------------------------------------------------------------------

def _cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == '--':  # `timm-gsop run -- SCRIPT ...`: the separator is ours
        command = command[1:]
    if not command:
        raise CommandError('missing SCRIPT (usage: timm-gsop run [--import MODULE] SCRIPT [ARGS ...])')
    if not os.path.isfile(command[0]):
        raise CommandError(f'no such script: {command[0]}')
    from timm_gsop.run import run_script
    return run_script(command[0], command[1:], modules=args.imports)


def _cmd_recipe(args: argparse.Namespace) -> int:
    from timm_gsop.recipes import list_recipes, recipe_path
    if not args.name:
        for name in list_recipes():
            print(f'{name}  {recipe_path(name)}')
        return 0
    try:
        path = recipe_path(args.name)
    except KeyError as e:
        raise CommandError(e.args[0]) from e
    if args.show:
        with open(path) as f:
            sys.stdout.write(f.read())
    else:
        print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from timm_gsop.demo import run_demo
    start = time.perf_counter()
    result = run_demo(
        epochs=args.epochs, seed=args.seed, out=args.out, train_samples=args.train_samples,
        test_samples=args.test_samples, image_size=args.image_size, batch_size=args.batch_size,
        corr=args.corr, progress=not args.no_progress, threads=args.threads, finetune_epochs=args.finetune_epochs,
        head_pools=args.heads)
    print(f'\nDone in {time.perf_counter() - start:.0f} s.')
    export = result['export']
    return 0 if export is None or export['ok'] else 1


# ---- the parser ------------------------------------------------------------------------------------------

_DEMO_DESCRIPTION = '''\
Train three same-size networks on CPU on generated images whose classes differ only in how the colour
channels co-vary (no first-order statistic carries the label): a first-order ResNet (average pooling),
GSoP-Net1 and GSoP-Net2; export GSoP-Net1 in Hub layout and reload it through timm; then warm-start a
GSoP-Net1 from the first-order network's weights and fine-tune it; last, train the first-order network's
backbone with a covariance head (timm.create_model('covpool', backbone=...)) and with average pooling.
No data or network needed.'''


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description='GSoP-Net (Global Second-order Pooling) models for timm.', formatter_class=_Formatter)
    parser.add_argument('--version', action='store_true', help='print the version and exit')
    sub = parser.add_subparsers(dest='subcommand', metavar='COMMAND')

    def command(name: str, help_text: str, handler: Callable, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=kwargs.pop('description', help_text),
                           formatter_class=_Formatter, **kwargs)
        p.set_defaults(func=handler)
        return p

    p = command('list', 'print the model zoo: params, GFLOPs (multiply-add = 2), input size, published weights',
                _cmd_list)
    p.add_argument('filter', nargs='?', default='', help="fnmatch pattern of model names, e.g. 'gsop2*' (default: all)")
    p.add_argument('--compare', action='store_true',
                   help="the paper's ResNet-50 comparison (ResNet, SE, CBAM, iSQRT-COV, GSoP-Net1/2): params, "
                        'GFLOPs and the reported top-1 / top-5 errors')

    p = command('bench', 'side-by-side throughput and memory benchmark (one process, models interleaved)',
                _cmd_bench)
    p.add_argument('--model', nargs='+', default=['gsop_resnet50', 'gsop_resnet50:gsop_stages=(0,0,0,0)'],
                   metavar='SPEC', help="model specs: NAME or NAME:KEY=VALUE:... (e.g. gsop_resnet50:gsop_stages=(0,0,0,0), "
                                        "GSoP-Net1's backbone without GSoP blocks)")
    p.add_argument('--baseline', default=None, metavar='SPEC',
                   help='the spec the ratio column is measured against (default: none, no ratio column)')
    p.add_argument('--batch-size', type=_bounded_int(1), nargs='+', default=[8], metavar='N', help='batch sizes')
    p.add_argument('--img-size', type=_bounded_int(32), default=224, metavar='PX', help='input side')
    p.add_argument('--mode', nargs='+', default=['infer', 'train'], choices=['infer', 'train'],
                   help='what to time: inference (no grad) and / or a train step (forward, backward, SGD step)')
    p.add_argument('--warmup', type=_bounded_int(0), default=2, metavar='N', help='untimed steps per model and mode')
    p.add_argument('--steps', type=_bounded_int(1), default=3, metavar='N', help='steps per timed measurement')
    p.add_argument('--repeats', type=_bounded_int(1), default=5, metavar='N', help='interleaved measurements per model')
    p.add_argument('--device', default='cpu', help='torch device, e.g. cpu or cuda')
    p.add_argument('--threads', type=_bounded_int(0), default=0, metavar='N', help='torch.set_num_threads (0: as is)')
    p.add_argument('--channels-last', action='store_true', help='models and inputs in channels_last memory format')
    p.add_argument('--compile', action='store_true', help='torch.compile each model')
    p.add_argument('--amp', choices=_AMP_CHOICES, default=None, help='autocast dtype (default: none, float32)')
    p.add_argument('--ops', action='store_true', help='also compare the ops with the released formulations')
    p.add_argument('--amp-check', nargs='+', choices=_AMP_CHOICES, default=None, metavar='DTYPE',
                   help='instead of timing: train each model --steps steps under autocast with each DTYPE (fp16 with '
                        'a GradScaler), check every loss, output and gradient is finite and the GSoP gates run in '
                        'float32 (default: none, time the models)')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    p.add_argument('--json', default=None, metavar='FILE', help='also write the results as JSON (default: none)')
    p.add_argument('--quiet', action='store_true', help='no progress lines on stderr')

    p = command('onnx', 'export a model to ONNX (dynamic batch) and check it with onnxruntime', _cmd_onnx)
    p.add_argument('model', help='model name, e.g. gsop_resnet50 (or an hf-hub: / local-dir: name)')
    p.add_argument('output', help='the .onnx file to write (written to a temporary name, then renamed)')
    p.add_argument('--checkpoint', default=None, metavar='FILE',
                   help='weights to load, any checkpoint timm-gsop loads (default: none, random weights)')
    p.add_argument('--num-classes', type=_bounded_int(0), default=None, metavar='N',
                   help="classifier outputs (default: the model's)")
    p.add_argument('--img-size', type=_bounded_int(8), nargs=2, default=None, metavar=('H', 'W'),
                   help="input height and width (default: the model's pretrained cfg)")
    p.add_argument('--opset', type=_bounded_int(7), default=18, help='ONNX opset (the dynamo exporter needs >= 17)')
    p.add_argument('--exporter', choices=['dynamo', 'torchscript'], default='dynamo',
                   help="torch's ONNX exporter: 'dynamo' (needs onnx and onnxscript: the onnx extra) or "
                        "'torchscript' (timm onnx_export.py's default)")
    p.add_argument('--static-batch', action='store_true', help='fix the batch size to 2')
    _add_model_kwargs(p, 'create_model kwargs')
    p.add_argument('--no-check', action='store_true', help='skip the onnxruntime comparison')
    p.add_argument('--rtol', type=float, default=1e-4, help='max relative error the check accepts')

    p = command('export', 'write a checkpoint as a Hub repo folder: model.safetensors, config.json, README.md',
                _cmd_export,
                description='Export a checkpoint (timm train.py, the released GSoP-Net / fast-MPN-COV code, a state '
                            'dict or a safetensors file) to the folder layout timm loads from the Hugging Face Hub. '
                            'Pickles are loaded with weights_only=True (argparse.Namespace allowed); no network is '
                            'used.')
    p.add_argument('checkpoint', help='checkpoint-*.pth.tar, model_best.pth.tar, a .pth state dict or a .safetensors file')
    p.add_argument('--out', required=True, metavar='DIR', help='the folder to write')
    p.add_argument('--model', default=None, metavar='NAME',
                   help="registered model, e.g. gsop_resnet50 or gsop_resnet50.in1k; without a tag, its first tag "
                        "without a published file, e.g. isqrt_resnet50.in1k (default: the checkpoint's args.model)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument('--ema', dest='ema', action='store_true', default=None,
                     help='export the EMA weights (default: them when the checkpoint has them)')
    ema.add_argument('--no-ema', dest='ema', action='store_false', help='export the raw (non-EMA) weights')
    _add_model_kwargs(p, "create_model kwargs over those of train.py's args (e.g. num_classes=100)")
    p.add_argument('--repo-id', default=None, metavar='ORG/NAME',
                   help='the Hub repo the card\'s usage examples load (default: YOUR_ORG/MODEL.TAG until you push)')
    p.add_argument('--results', default=None, metavar='FILE',
                   help='timm validate.py --results-file output (JSON or CSV) for the card (default: none)')
    p.add_argument('--dataset', default=None,
                   help="training dataset for the card, e.g. imagenet-1k or cifar100 (default: the tag's when the "
                        'model keeps its num_classes)')
    p.add_argument('--no-verify', action='store_true', help='skip reloading the folder to compare outputs')

    p = command('push', 'upload an exported folder to the Hugging Face Hub', _cmd_push,
                description='Upload a folder written by `timm-gsop export` with huggingface_hub (token: HF_TOKEN or '
                            '`hf auth login`). Safe to retry: unchanged files are not uploaded again, an unchanged '
                            'folder makes no commit.')
    p.add_argument('folder', help='folder written by `timm-gsop export`')
    p.add_argument('--repo-id', required=True, metavar='ORG/NAME', help='your Hub user or organisation / repo name')
    p.add_argument('--private', action='store_true', help='create the repo private (when it does not exist)')
    p.add_argument('--revision', default=None, metavar='BRANCH', help='branch to push to, created if missing '
                                                                     '(default: main)')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    p.add_argument('--commit-message', default=None,
                   help='the commit message (default: "Add MODEL weights (timm-gsop export)")')
    p.add_argument('--dry-run', action='store_true', help='check the folder and list what would be uploaded')

    p = command('card', 'render the model card (README.md) of a model', _cmd_card)
    p.add_argument('model', help='registered model name, e.g. gsop_resnet50 or gsop2_resnet50.in1k')
    p.add_argument('--out', default=None, metavar='FILE', help='write to FILE (default: stdout)')
    p.add_argument('--repo-id', default=None, metavar='ORG/NAME', help='the Hub repo the usage examples load '
                                                                      "(default: the model's registry name)")
    _add_model_kwargs(p, 'create_model kwargs')

    p = command('run', "run a timm script (train.py, validate.py, benchmark.py, ...) with the GSoP models registered",
                _cmd_run, usage='timm-gsop run [--import MODULE] SCRIPT [ARGS ...]',
                description='Import timm_gsop, then run SCRIPT as __main__ with ARGS untouched (as `python SCRIPT '
                            'ARGS` would); the exit status is the script\'s. Example: timm-gsop run validate.py '
                            '/data/imagenet --model gsop_resnet50 --checkpoint model_best.pth.tar')
    p.add_argument('--import', dest='imports', action='append', default=[], metavar='MODULE',
                   help='also import MODULE before running (repeatable), e.g. a plugin of your own '
                        '(default: timm_gsop only)')
    # one REMAINDER for SCRIPT and its arguments: everything after SCRIPT reaches it untouched ('--', '-h' too)
    p.add_argument('command', nargs=argparse.REMAINDER, metavar='SCRIPT [ARGS ...]',
                   help='path of the script (e.g. train.py from the timm repository), then its own arguments')

    p = command('recipe', "print the path of a training recipe for timm's train.py --config (no NAME: list them)",
                _cmd_recipe,
                description='Training recipes for timm\'s train.py: python train.py /data/imagenet --device-modules '
                            'timm_gsop --config "$(timm-gsop recipe gsop_resnet50_in1k)"')
    p.add_argument('name', nargs='?', default='', metavar='NAME', help='e.g. gsop_resnet50_in1k (default: list all)')
    p.add_argument('--show', action='store_true', help="print the recipe's content instead of its path")

    p = command('demo', 'train GSoP-Nets and a same-size first-order ResNet on CPU (about a minute), export, reload',
                _cmd_demo, description=_DEMO_DESCRIPTION)
    p.add_argument('--epochs', type=_bounded_int(1), default=6, metavar='N', help='epochs per model')
    p.add_argument('--seed', type=int, default=0, help='seed of the data and of the training')
    p.add_argument('--out', default='timm-gsop-demo', metavar='DIR', help='where GSoP-Net1 is exported in Hub layout')
    p.add_argument('--train-samples', type=_bounded_int(64), default=3000, metavar='N', help='training images')
    p.add_argument('--test-samples', type=_bounded_int(1), default=1000, metavar='N', help='test images')
    p.add_argument('--image-size', type=_bounded_int(8), default=16, metavar='PX', help='image side')
    p.add_argument('--batch-size', type=_bounded_int(2), default=64, metavar='N', help='batch size')
    p.add_argument('--corr', type=_corr, default=0.25, metavar='R',
                   help='magnitude of the two channel correlations (smaller is harder)')
    p.add_argument('--threads', type=_bounded_int(1), default=1, metavar='N',
                   help='CPU threads for torch (these small networks gain little from more, and on a busy machine '
                        'several threads per process can be many times slower)')
    p.add_argument('--finetune-epochs', type=_bounded_int(0), default=3, metavar='N',
                   help='epochs of fine-tuning after the warm start from the first-order network (0: no warm start)')
    p.add_argument('--heads', type=_pool_list, default='avg,isqrt', metavar='POOLS',
                   help="global_pool of each row of the covariance-head section, comma-separated ('avg', 'isqrt', "
                        "'cov' ...; empty: no such section)")
    p.add_argument('--no-heads', dest='heads', action='store_const', const=(),
                   help='skip the covariance-head section (same as --heads "")')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version
        return version('timm-gsop')
    except Exception:  # a source checkout that is not installed
        import runpy
        return runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'timm_gsop', 'version.py'))[
            '__version__']


_BAD_INPUT = (ValueError, TypeError, KeyError, FileNotFoundError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f'{PROG} {_version()}')
        return 0
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    name = f'{PROG} {args.subcommand}'
    if args.subcommand == 'run':  # the script's own exceptions propagate, as with `python SCRIPT`
        try:
            return args.func(args)
        except CommandError as e:
            print(f'{name}: error: {e}', file=sys.stderr)
            return e.code
    try:
        return args.func(args)
    except CommandError as e:
        print(f'{name}: error: {e}', file=sys.stderr)
        return e.code
    except _BAD_INPUT as e:
        print(f'{name}: error: {_message(e)}', file=sys.stderr)
        return 2
    except (RuntimeError, OSError, ImportError) as e:
        code = 2 if 'Unknown model' in str(e) else 1
        print(f'{name}: error: {_message(e)}', file=sys.stderr)
        return code


def _message(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return text or type(e).__name__


if __name__ == '__main__':
    sys.exit(main())
