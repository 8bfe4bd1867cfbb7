"""The model zoo as tables (``timm-gsop list``): this package's models, their parameters and FLOPs, and the
paper's ResNet-50 comparison."""
import fnmatch
from typing import List, Optional, Sequence, Tuple

import torch
import timm
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['list_gsop_models', 'count_gflops', 'format_table', 'zoo_rows', 'PAPER_COMPARISON', 'compare_rows']


def list_gsop_models(pattern: str = '') -> List[str]:
    """Names of the models this package registers with timm (optionally fnmatch-filtered)."""
    names = timm.list_models(pattern or '*')
    return [n for n in names if timm.models.model_entrypoint(n).__module__.startswith('timm_gsop.')]


def count_gflops(model: torch.nn.Module, input_size: Sequence[int]) -> float:
    """FLOPs (a multiply-add counts 2) of one forward at ``input_size`` (C, H, W), in G, by torch's
    FlopCounterMode; a model on the meta device is counted without computing."""
    param = next(model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.empty((1, *input_size), device=param.device, dtype=param.dtype))
    return counter.get_total_flops() / 1e9


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: columns padded to their widest cell, a dashed rule under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: '  '.join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return '\n'.join([line(header), line(['-' * w for w in widths])] + [line(r) for r in rows])


def _counts(name: str, input_size: Optional[Sequence[int]] = None) -> Tuple[str, str, Tuple[int, ...]]:
    model = timm.create_model(name, device='meta')
    input_size = tuple(input_size or model.pretrained_cfg['input_size'])
    params = sum(p.numel() for p in model.parameters())
    return f'{params:,}', f'{count_gflops(model, input_size):.2f}', input_size


def zoo_rows(pattern: str = '') -> List[Tuple[str, ...]]:
    """(model, params, GFLOPs, input size, tags with weights) for every model of this package matching ``pattern``."""
    rows = []
    for name in list_gsop_models(pattern):
        params, gflops, input_size = _counts(name)
        tags = [t.split('.', 1)[1] for t in timm.list_models(name, pretrained=True, include_tags=True) if '.' in t]
        rows.append((name, params, gflops, 'x'.join(map(str, input_size)), ', '.join(tags) or '-'))
    return rows


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
    fmt = lambda err: '-' if err is None else f'{err:.2f}'
    return [(name, method, *_counts(name, (3, 224, 224))[:2], fmt(top1), fmt(top5), source)
            for name, method, top1, top5, source in PAPER_COMPARISON if not pattern or fnmatch.fnmatch(name, pattern)]
