"""ONNX export of timm-gsop models (``timm-gsop onnx MODEL OUT.onnx``).

Either exporter of torch, with a dynamic batch dimension: the dynamo-based one (``dynamo=True``, the default;
needs ``onnx`` and ``onnxscript``) or the TorchScript one (``dynamo=False``, what timm's ``onnx_export.py``
uses by default). Then, when onnxruntime is installed, the exported graph runs on random batches and is
compared with PyTorch. The file is written to a temporary name and renamed, so an interrupted export never
leaves a partial ``.onnx`` where a good one was.
"""
import os
import tempfile
from pathlib import Path
from typing import Dict, Sequence, Union

import torch

__all__ = ['export_onnx', 'check_onnx']


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
