"""ONNX export of timm-gsop models (``timm-gsop onnx MODEL OUT.onnx``).

Either exporter of torch, with a dynamic batch dimension: the dynamo-based one (``dynamo=True``, the default;
needs ``onnx`` and ``onnxscript``) or the TorchScript one (``dynamo=False``, what timm's ``onnx_export.py``
uses by default). Then, when onnxruntime is installed, the exported graph runs on random batches and is
compared with PyTorch. The file is written to a temporary name and renamed, so an interrupted export never
leaves a partial ``.onnx`` where a good one was.
"""
import argparse
import os
import tempfile
from pathlib import Path
from typing import Dict, Sequence, Tuple, Union

import torch
import timm

from .cli import parse_model_kwargs

__all__ = ['export_onnx', 'check_onnx', 'add_parser']


def export_onnx(
        model: torch.nn.Module,
        path: Union[str, Path],
        input_size: Sequence[int] = (3, 224, 224),
        opset: int = 18,
        dynamic_batch: bool = True,
        exporter: str = 'dynamo',
) -> Path:
    """Export ``model`` (put in eval mode) to ``path`` with input ``x`` (B, C, H, W) and output ``logits``.

    ``exporter``: ``'dynamo'`` (opset >= 17) or ``'torchscript'`` (torch's TorchScript-based exporter)."""
    if exporter not in ('dynamo', 'torchscript'):
        raise ValueError(f"Unknown ONNX exporter {exporter!r}; valid choices: dynamo, torchscript")
    if exporter == 'dynamo' and opset < 17:
        raise ValueError(f'opset must be >= 17 (dynamo exporter), got {opset}')
    path = Path(path)
    model = model.eval()
    example = torch.randn(2, *input_size)
    dynamic_shapes = {'x': {0: torch.export.Dim('batch', min=1, max=1024)}} if dynamic_batch else None
    fd, tmp = tempfile.mkstemp(suffix='.onnx', dir=path.parent if str(path.parent) else None)
    os.close(fd)
    try:
        with torch.no_grad():
            if exporter == 'dynamo':
                program = torch.onnx.export(
                    model, (example,), input_names=['x'], output_names=['logits'], opset_version=opset,
                    dynamo=True, dynamic_shapes=dynamic_shapes, external_data=False)
                program.save(tmp)
            else:
                torch.onnx.export(
                    model, (example,), tmp, input_names=['x'], output_names=['logits'], opset_version=opset,
                    dynamo=False, dynamic_axes={'x': {0: 'batch'}, 'logits': {0: 'batch'}} if dynamic_batch else None)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def check_onnx(
        model: torch.nn.Module,
        path: Union[str, Path],
        input_size: Sequence[int] = (3, 224, 224),
        batch_sizes: Sequence[int] = (1, 3),
        seed: int = 0,
) -> Dict[int, float]:
    """Max |onnxruntime - torch| / max |torch| per batch size (needs onnxruntime)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    gen = torch.Generator().manual_seed(seed)
    errors = {}
    for batch in batch_sizes:
        x = torch.randn((batch, *input_size), generator=gen)
        with torch.no_grad():
            ref = model.eval()(x)
        out = torch.from_numpy(session.run(None, {'x': x.numpy()})[0])
        errors[batch] = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    return errors


def _cmd_onnx(args: argparse.Namespace) -> int:
    kwargs = parse_model_kwargs(args.model_kwargs)
    if args.checkpoint:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=args.checkpoint))
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    model = timm.create_model(args.model, **kwargs).eval()
    channels = model.pretrained_cfg['input_size'][0] if 'in_chans' not in kwargs else kwargs['in_chans']
    size = tuple(args.img_size) if args.img_size else tuple(model.pretrained_cfg['input_size'][1:])
    input_size: Tuple[int, ...] = (channels, *size)
    path = export_onnx(model, args.output, input_size, opset=args.opset, dynamic_batch=not args.static_batch,
                       exporter=args.exporter)
    print(f'wrote {path} ({path.stat().st_size / 1e6:.1f} MB), input x: (batch, {", ".join(map(str, input_size))})')
    if args.no_check:
        return 0
    try:
        errors = check_onnx(model, path, input_size, batch_sizes=(1,) if args.static_batch else (1, 3))
    except ImportError:
        print('onnxruntime is not installed: skipped the output check (pip install onnxruntime)')
        return 0
    for batch, err in errors.items():
        print(f'onnxruntime vs torch, batch {batch}: max relative error {err:.2e}')
    if max(errors.values()) > args.rtol:
        print(f'error above --rtol {args.rtol}')
        return 1
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser('onnx', help='export a model to ONNX (dynamic batch) and check it with onnxruntime')
    p.add_argument('model', help='model name, e.g. gsop_resnet50 (or hf-hub:/local-dir: names)')
    p.add_argument('output', help='output .onnx file')
    p.add_argument('--checkpoint', help='weights to load (any checkpoint timm_gsop loads)')
    p.add_argument('--num-classes', type=int)
    p.add_argument('--img-size', type=int, nargs=2, metavar=('H', 'W'))
    p.add_argument('--opset', type=int, default=18)
    p.add_argument('--exporter', choices=['dynamo', 'torchscript'], default='dynamo',
                   help="torch's ONNX exporter: 'dynamo' (needs onnxscript) or 'torchscript' (timm onnx_export.py's default)")
    p.add_argument('--static-batch', action='store_true', help='fix the batch size to 2')
    p.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE')
    p.add_argument('--no-check', action='store_true', help='skip the onnxruntime comparison')
    p.add_argument('--rtol', type=float, default=1e-4, help='max relative error accepted by the check')
    p.set_defaults(func=_cmd_onnx)
