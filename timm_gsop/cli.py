"""Command line: ``timm-gsop <command>`` or ``python -m timm_gsop <command>``."""
import argparse
import ast
import fnmatch
import importlib
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import timm
from torch.utils.flop_counter import FlopCounterMode

from . import __version__

__all__ = ['main', 'list_gsop_models', 'count_params', 'count_gflops', 'format_table', 'parse_model_kwargs']

_COMMAND_MODULES: List[str] = [
    'timm_gsop.onnx_export', 'timm_gsop.bench', 'timm_gsop.hub',
    'timm_gsop.run', 'timm_gsop.recipes', 'timm_gsop.demo',
]


def parse_model_kwargs(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``['gsop_manner=position', 'gsop_stages=(1,1,1,0)']`` -> kwargs, values parsed as Python literals
    when they are one (as timm's train.py parses ``--model-kwargs``), else kept as strings."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition('=')
        if not sep or not key.strip():
            raise ValueError(f'Model kwargs are key=value pairs, got {item!r}')
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def list_gsop_models(pattern: str = '') -> List[str]:
    """Names of the models this package registers with timm (optionally fnmatch-filtered)."""
    names = timm.list_models(pattern or '*')
    return [n for n in names if timm.models.model_entrypoint(n).__module__.startswith('timm_gsop.')]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: torch.nn.Module, input_size: Sequence[int]) -> float:
    """FLOPs (a multiply-add counts 2) of one forward at ``input_size`` (C, H, W), in G.

    Counted by torch's FlopCounterMode (convolutions and matrix products) on the model's device; build the
    model on the meta device to count without computing.
    """
    param = next(model.parameters())
    x = torch.empty((1, *input_size), device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops() / 1e9


def _pretrained_tags(name: str) -> str:
    """The tags of ``name`` with published weights (what ``timm.list_models(pretrained=True)`` lists)."""
    from .models._cfg import has_published_weights
    tags = [full.split('.', 1)[1] for full in timm.list_models(name, include_tags=True)
            if '.' in full and has_published_weights(full)]
    return ', '.join(tags) or '-'


def _zoo_rows(pattern: str) -> List[Tuple[str, ...]]:
    rows = []
    for name in list_gsop_models(pattern):
        model = timm.create_model(name, device='meta')
        input_size = tuple(model.pretrained_cfg['input_size'])
        rows.append((
            name,
            f'{count_params(model):,}',
            f'{count_gflops(model, input_size):.2f}',
            'x'.join(map(str, input_size)),
            _pretrained_tags(name),
        ))
    return rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: '  '.join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return '\n'.join([line(header), line(['-' * w for w in widths])] + [line(r) for r in rows])


# The paper's ImageNet-1k ResNet-50 comparison set: (model, method, top-1 err %, top-5 err %, reported by).
# Errors are the cited sources' single 224-crop numbers, never measured here; None where none is published.
PAPER_COMPARISON: Tuple[Tuple[str, str, Optional[float], Optional[float], str], ...] = (
    ('resnet50', 'ResNet-50 (timm)', None, None, '-'),
    ('seresnet50', 'SE-ResNet-50 (timm)', 23.29, None, 'ECA-Net Tab. 3 (acc. 76.71)'),
    ('cbamresnet50', 'CBAM-ResNet-50', 22.66, None, 'ECA-Net Tab. 3 (acc. 77.34)'),
    ('isqrt_resnet50', 'iSQRT-COV ResNet-50', 22.14, 6.22, 'fast-MPN-COV README (paper)'),
    ('gsop_resnet50', 'GSoP-Net1 ResNet-50', 22.02, 5.88, 'GSoP-Net paper'),
    ('gsop2_resnet50', 'GSoP-Net2 ResNet-50', 21.19, 5.64, 'GSoP-Net paper'),
)


def compare_rows(pattern: str = '') -> List[Tuple[str, ...]]:
    """Rows of ``timm-gsop list --compare``: params and GFLOPs at 3x224x224 (counted), errors (reported)."""
    rows = []
    for name, method, top1, top5, source in PAPER_COMPARISON:
        if pattern and not fnmatch.fnmatch(name, pattern):
            continue
        model = timm.create_model(name, device='meta')
        fmt = lambda err: '-' if err is None else f'{err:.2f}'
        rows.append((name, method, f'{count_params(model):,}', f'{count_gflops(model, (3, 224, 224)):.2f}',
                     fmt(top1), fmt(top5), source))
    return rows


def _cmd_compare(args: argparse.Namespace) -> int:
    rows = compare_rows(args.filter)
    if not rows:
        print(f'No model of the comparison matches {args.filter!r}', file=sys.stderr)
        return 1
    print(format_table(('model', 'method', 'params', 'GFLOPs', 'top-1 err (reported)', 'top-5 err (reported)',
                        'reported by'), rows))
    print('\nParams and GFLOPs (multiply-add = 2) counted here at 3x224x224, 1000 classes; errors (%, ImageNet-1k '
          'val, single 224 crop) as reported by the cited source, not measured by this package.')
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    if getattr(args, 'compare', False):
        return _cmd_compare(args)
    rows = _zoo_rows(args.filter)
    if not rows:
        print(f'No timm-gsop model matches {args.filter!r}', file=sys.stderr)
        return 1
    print(format_table(('model', 'params', 'GFLOPs', 'input', 'weights'), rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-gsop', description='GSoP-Net (Global Second-order Pooling) models for timm.')
    parser.add_argument('--version', action='version', version=f'timm-gsop {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    p = sub.add_parser('list', help='print the model zoo: params, GFLOPs (multiply-add = 2), input size, tags')
    p.add_argument('filter', nargs='?', default='', help="fnmatch pattern, e.g. 'gsop2*'")
    p.add_argument('--compare', action='store_true',
                   help="the paper's ResNet-50 comparison (ResNet, SE, CBAM, iSQRT-COV, GSoP-Net1/2): params, "
                        'GFLOPs and the reported top-1/top-5 errors')
    p.set_defaults(func=_cmd_list)
    # other commands live beside the code they drive; each module has add_parser(subparsers), which
    # registers its sub-command with set_defaults(func=handler) (handler: argparse.Namespace -> exit code)
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    return args.func(args)
