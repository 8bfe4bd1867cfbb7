"""The model zoo as a table (``timm-gsop list``): this package's models, their parameters and FLOPs."""
from typing import List, Sequence, Tuple

import torch
import timm
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['list_gsop_models', 'count_gflops', 'format_table', 'zoo_rows']


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
    lines = [header, ['-' * w for w in widths], *rows]
    return '\n'.join('  '.join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in lines)


def zoo_rows(pattern: str = '') -> List[Tuple[str, ...]]:
    """(model, params, GFLOPs, input size, tags with weights) for every model of this package matching ``pattern``."""
    rows = []
    for name in list_gsop_models(pattern):
        model = timm.create_model(name, device='meta')
        input_size = tuple(model.pretrained_cfg['input_size'])
        params, gflops = f'{sum(p.numel() for p in model.parameters()):,}', f'{count_gflops(model, input_size):.2f}'
        tags = [t.split('.', 1)[1] for t in timm.list_models(name, pretrained=True, include_tags=True) if '.' in t]
        rows.append((name, params, gflops, 'x'.join(map(str, input_size)), ', '.join(tags) or '-'))
    return rows
