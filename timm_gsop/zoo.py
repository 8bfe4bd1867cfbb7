"""The model zoo as tables: which models this package registers, their parameters and FLOPs, and the paper's
ResNet-50 comparison. Shared by the cards, the benchmarks, the demo and ``timm-gsop list``."""
import fnmatch
from typing import List, Optional, Sequence, Tuple

import torch
import timm
from torch.utils.flop_counter import FlopCounterMode


__all__ = ['list_gsop_models', 'count_params', 'count_gflops', 'format_table', 'published_tags', 'zoo_rows',
           'PAPER_COMPARISON', 'compare_rows']


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


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: columns padded to their widest cell, a dashed rule under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: '  '.join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return '\n'.join([line(header), line(['-' * w for w in widths])] + [line(r) for r in rows])


def published_tags(name: str) -> List[str]:
    """The tags of ``name`` with published weights (what ``timm.list_models(pretrained=True)`` lists)."""
    return [full.split('.', 1)[1] for full in timm.list_models(name, include_tags=True)
            if '.' in full and timm.models.get_pretrained_cfg(full).has_weights]


def zoo_rows(pattern: str = '') -> List[Tuple[str, ...]]:
    """(model, params, GFLOPs, input size, tags with weights) for every registered model matching ``pattern``."""
    rows = []
    for name in list_gsop_models(pattern):
        model = timm.create_model(name, device='meta')
        input_size = tuple(model.pretrained_cfg['input_size'])
        rows.append((name, f'{count_params(model):,}', f'{count_gflops(model, input_size):.2f}',
                     'x'.join(map(str, input_size)), ', '.join(published_tags(name)) or '-'))
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
    rows = []
    for name, method, top1, top5, source in PAPER_COMPARISON:
        if pattern and not fnmatch.fnmatch(name, pattern):
            continue
        model = timm.create_model(name, device='meta')
        fmt = lambda err: '-' if err is None else f'{err:.2f}'
        rows.append((name, method, f'{count_params(model):,}', f'{count_gflops(model, (3, 224, 224)):.2f}',
                     fmt(top1), fmt(top5), source))
    return rows
