"""Model cards (README.md) for the Hub: ``render_card`` (``timm-gsop card``, and every export).

A card is rendered from ``hub_cards/``: one template plus per-family facts (``hub_cards/families/*.yaml``); a
model of a family without a facts file gets generic facts from its pretrained cfg. Every number and dimension
in a card is read from the model itself or measured on it (``describe_model``, ``measure_model``, on the meta
device); the papers' reported results are labelled as reported. The metadata is ``huggingface_hub``'s
``ModelCardData`` (``library_name: timm``, ``pipeline_tag: image-classification``, as timm's cards).
"""
import fnmatch
import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import timm
import yaml

from .zoo import count_gflops, count_params

# the Hugging Face Hub organisation this package's own weights are published under ('<namespace>/<model>.<tag>')
HUB_NAMESPACE = 'timm-gsop'

__all__ = ['HUB_NAMESPACE', 'ModelStats', 'measure_model', 'count_activations_and_flops', 'describe_model', 'WeightsInfo',
           'cards_dir', 'card_facts', 'dataset_for_tag', 'render_card', 'initialisation_source']


@dataclass
class ModelStats:
    params: int
    gmacs: float
    activations: int
    input_size: Tuple[int, int, int]
    feature_shapes: Optional[List[Tuple[int, ...]]]
    features_shape: Tuple[int, ...]
    embed_shape: Tuple[int, ...]


def count_activations_and_flops(model: nn.Module, input_size: Sequence[int]) -> Tuple[int, float]:
    """(activations, GFLOPs) of one forward pass at ``input_size`` (C, H, W).

    Activations: the number of elements output by the model's convolution and linear layers (forward
    hooks), the quantity timm's model cards list as "Activations" (fvcore's count, which additionally
    counts matrix products). GFLOPs: ``cli.count_gflops`` (torch.utils.flop_counter, multiply-add = 2).
    """
    total = [0]

    def hook(module, inputs, output):
        total[0] += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        gflops = count_gflops(model, input_size)
    finally:
        for h in handles:
            h.remove()
    return total[0], gflops


def measure_model(model_name: str, model_kwargs: Optional[Dict[str, Any]] = None,
                  input_size: Optional[Sequence[int]] = None, model: Optional[nn.Module] = None) -> ModelStats:
    """Params, GMACs and activations of ``model_name`` built with ``model_kwargs`` (on the meta device)
    at ``input_size`` (default: its pretrained cfg's), and the shapes its usage examples print. ``model``:
    that network already built on the meta device (it is not built again)."""
    kwargs = dict(model_kwargs or {})
    model = (model or timm.create_model(model_name, device='meta', **kwargs)).eval()
    input_size = tuple(input_size or timm.models.get_model_input_config(model)['input_size'])
    activations, gflops = count_activations_and_flops(model, input_size)
    x = torch.empty((1, *input_size), device='meta')
    with torch.no_grad():
        feats = model.forward_features(x)
        embed = model.forward_head(feats, pre_logits=True)
    feature_shapes = None
    try:
        kwargs.pop('num_classes', None)
        kwargs.pop('global_pool', None)
        fmodel = timm.create_model(model_name, device='meta', features_only=True, **kwargs).eval()
        with torch.no_grad():
            feature_shapes = [tuple(o.shape) for o in fmodel(x)]
    except Exception:  # a family without features_only support: the card says so
        pass
    return ModelStats(count_params(model), gflops / 2, activations, input_size, feature_shapes,
                      tuple(feats.shape), tuple(embed.shape))


# ---- model cards ---------------------------------------------------------------------------------------

@dataclass
class WeightsInfo:
    """Where a card's weights come from (export) and what was measured on them."""
    source: str
    description: str
    epoch: Optional[int] = None
    ema: bool = False
    layout: str = 'timm'
    train_args: Dict[str, Any] = field(default_factory=dict)
    measured: List[str] = field(default_factory=list)
    data_config: Dict[str, Any] = field(default_factory=dict)


def cards_dir() -> Path:
    """``hub_cards/``: in an installed wheel ``timm_gsop/hub_cards`` (package data), in a source checkout
    (or an editable install) the repository's ``hub_cards/``."""
    here = Path(__file__).resolve().parent
    for path in (here / 'hub_cards', here.parent / 'hub_cards'):
        if (path / 'template.md').is_file():
            return path
    raise FileNotFoundError(f'hub_cards/ (model card template and facts) not found next to {here}')


@lru_cache(maxsize=None)
def _load_yaml(path: str) -> Any:
    with open(path, encoding='utf-8') as f:
        return yaml.safe_load(f)


def _families() -> List[Dict[str, Any]]:
    return [_load_yaml(str(p)) for p in sorted((cards_dir() / 'families').glob('*.yaml'))]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _stage_list(stages: Sequence[int]) -> str:
    if not stages:
        return 'none'
    if len(stages) > 2 and list(stages) == list(range(stages[0], stages[-1] + 1)):
        return f'{stages[0]}-{stages[-1]}'
    return ', '.join(map(str, stages[:-1])) + (' and ' if len(stages) > 1 else '') + str(stages[-1])


def describe_model(model: nn.Module) -> Dict[str, str]:
    """The numbers a card's text states, read from ``model`` (its modules and cfg; meta device is fine):
    ``gsop_dim``, ``gsop_placement`` (which blocks), ``gsop_count``, ``last_stage``, ``final_map``,
    ``num_features``, ``isqrt_dim``, ``isqrt_iters``, ``isqrt_features``. The family facts files refer to
    them as ``{name}``; a card never states a dimension the model does not have."""
    from .layers import ChannelGSoP, GSoPFusion, ISqrtCovPool, PositionGSoP
    facts: Dict[str, str] = {}
    stages = [(n, m) for n, m in model.named_children() if n.startswith('layer')]
    dims, per_stage = set(), []
    for idx, (_, stage) in enumerate(stages, start=1):
        blocks = list(stage)
        with_gsop = [i for i, b in enumerate(blocks) if isinstance(getattr(b, 'se', None),
                                                                       (ChannelGSoP, PositionGSoP, GSoPFusion))]
        for i in with_gsop:
            se = blocks[i].se
            dims.add((se.channel if isinstance(se, GSoPFusion) else se).dim)
        per_stage.append((idx, with_gsop, len(blocks)))
    enabled = [idx for idx, used, _ in per_stage if used]
    facts['gsop_count'] = str(sum(len(used) for _, used, _ in per_stage))
    facts['gsop_dim'] = ' / '.join(map(str, sorted(dims))) or '-'
    if enabled and all(used == [n - 1] for _, used, n in per_stage if used):
        facts['gsop_placement'] = f'the last block of stage{"s" if len(enabled) > 1 else ""} {_stage_list(enabled)}'
    else:
        facts['gsop_placement'] = f'every block of stage{"s" if len(enabled) > 1 else ""} {_stage_list(enabled)}'
    info = getattr(model, 'feature_info', None)
    if isinstance(info, list) and len(info) >= 2:
        facts['last_stage'] = ('stride 1 without dilation' if info[-1]['reduction'] == info[-2]['reduction']
                               else 'stride 2')
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if cfg.get('input_size') and cfg.get('pool_size'):
        h, w = cfg['input_size'][1:]
        facts['final_map'] = f"{cfg['pool_size'][0]}x{cfg['pool_size'][1]} final map at {h}x{w}"
    facts['num_features'] = str(getattr(model, 'num_features', '-'))
    pool = getattr(model, 'global_pool', None)
    if isinstance(pool, ISqrtCovPool):
        facts.update(isqrt_dim=str(pool.dim), isqrt_iters=str(pool.num_iters),
                     isqrt_features=f'{pool.out_features:,}')
    return facts


class _Facts(dict):
    """``str.format_map`` mapping that names an unknown placeholder instead of raising a bare KeyError."""

    def __missing__(self, key):
        raise KeyError(f'card facts use {{{key}}}, which describe_model does not provide for this model')


def _fill(value: Any, numbers: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return value.format_map(_Facts(numbers))
    if isinstance(value, list):
        return [_fill(v, numbers) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, numbers) for k, v in value.items()}
    return value


def card_facts(model_name: str, model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Facts for ``model_name``'s card: the family file whose ``match`` fits merged with its first fitting
    variant, over generic facts derived from the model's pretrained cfg and docstring. ``{placeholders}`` in
    the texts are filled from :func:`describe_model` of ``model`` (default: the registered model, on meta)."""
    arch, _ = timm.models.split_model_name_tag(model_name)
    cfg = timm.models.get_pretrained_cfg(model_name).to_dict()
    doc = (timm.models.model_entrypoint(arch).__doc__ or arch).strip().splitlines()[0].strip().rstrip('.')
    generic = _load_yaml(str(cards_dir() / 'generic.yaml'))
    facts = {
        'family': None,
        'summary': generic['summary'].format(doc=doc),
        'architecture': generic['architecture'].format(doc=doc),
        'recipe': generic.get('recipe', ''),
        'license': cfg.get('license') or generic['license'],
        'papers': [],
        'original': cfg.get('origin_url'),
        'citation': [],
        'reported': [],
        'name': None,
        'schedule': None,
    }
    for paper_id in (cfg.get('paper_ids') or '').replace(';', ',').split(','):
        paper_id = paper_id.strip()
        if paper_id:
            url = f'https://arxiv.org/abs/{paper_id[6:]}' if paper_id.lower().startswith('arxiv:') else paper_id
            facts['papers'].append({'title': cfg.get('paper_name') or paper_id, 'url': url})
    family = next((f for f in _families() if _matches(arch, f.get('match'))), None)
    if family is not None:
        facts.update({k: v for k, v in family.items() if k not in ('match', 'variants', 'reported')})
        facts['reported'] = [r for r in family.get('reported', []) if _matches(arch, r.get('models'))]
        variant = next((v for v in family.get('variants', []) if _matches(arch, v.get('match'))), {})
        for key, value in variant.items():
            if key in ('papers', 'citation'):
                facts[key] = list(facts.get(key) or []) + list(value)
            elif key != 'match':
                facts[key] = value
    facts['citation'] = list(facts.get('citation') or []) + list(generic.get('citation') or [])
    if model is None:
        model = timm.create_model(model_name, device='meta')
    numbers = describe_model(model)
    for key in ('summary', 'architecture', 'recipe', 'schedule', 'name'):
        facts[key] = _fill(facts.get(key), numbers)
    return facts


def dataset_for_tag(tag: str) -> Optional[Dict[str, str]]:
    """The dataset of a pretrained tag (``datasets.yaml``: the tag, or its last '_'-separated part)."""
    table = _load_yaml(str(cards_dir() / 'datasets.yaml'))
    return (table.get(tag) or table.get(tag.rsplit('_', 1)[-1])) if tag else None


def _dataset(name: Optional[str], tag: str, num_classes: Any, cfg: Mapping[str, Any]) -> Optional[Dict[str, str]]:
    """An explicit dataset (a datasets.yaml key or a Hub dataset id), else the tag's dataset when the model
    keeps the tag's classes (a model with another num_classes was trained on something else)."""
    if name:
        return dataset_for_tag(name) or {'name': name, 'hub_id': name}
    if num_classes is not None and num_classes != cfg.get('num_classes'):
        return None
    return dataset_for_tag(tag)


def _fmt_shape(shape: Sequence[int]) -> str:
    return f"torch.Size([{', '.join(map(str, shape))}])"


def _reported_table(rows: List[Mapping[str, Any]]) -> str:
    derived = []

    def pct(row, metric):
        acc, err = row.get(f'{metric}_acc'), row.get(f'{metric}_err')
        if acc is None and err is None:
            return '-', '-'
        if acc is None:
            derived.append(1)
            return f'*{100 - float(err):.2f}*', f'{float(err):.2f}'
        if err is None:
            derived.append(1)
            return f'{float(acc):.2f}', f'*{100 - float(acc):.2f}*'
        return f'{float(acc):.2f}', f'{float(err):.2f}'

    lines = ['| dataset | top-1 acc. (%) | top-5 acc. (%) | top-1 err. (%) | top-5 err. (%) | reported by |',
             '|---|---|---|---|---|---|']
    for row in rows:
        (a1, e1), (a5, e5) = pct(row, 'top1'), pct(row, 'top5')
        lines.append(f"| {row['dataset']} | {a1} | {a5} | {e1} | {e5} | {' '.join(str(row['source']).split())} |")
    if derived:
        lines.append('\n*Italic*: 100 minus the reported accuracy or error.')
    return '\n'.join(lines)


def _non_default_args(model_name: str, model_args: Mapping[str, Any]) -> Dict[str, Any]:
    """The recorded model args that differ from what ``create_model(model_name)`` builds by default."""
    cfg = timm.models.get_pretrained_cfg(model_name).to_dict()
    defaults = {'num_classes': cfg.get('num_classes'), 'in_chans': (cfg.get('input_size') or (3,))[0]}
    out = {}
    for k, v in model_args.items():
        if k in defaults and v == defaults[k]:
            continue
        if k == 'global_pool':
            default_pool = timm.models.get_model_args(timm.create_model(model_name, device='meta')).get('global_pool')
            if v == default_pool:
                continue
        out[k] = v
    return out


_TRAIN_ARG_KEYS = (
    ('epochs', 'epochs'), ('opt', 'optimizer'), ('lr', 'learning rate'), ('momentum', 'momentum'),
    ('weight_decay', 'weight decay'), ('batch_size', 'batch size (per process)'), ('sched', 'schedule'),
    ('decay_milestones', 'decay milestones'), ('decay_rate', 'decay rate'), ('warmup_epochs', 'warm-up epochs'),
    ('smoothing', 'label smoothing'), ('mixup', 'mixup'), ('cutmix', 'cutmix'), ('aa', 'auto-augment'),
    ('reprob', 'random erasing'), ('drop_path', 'drop path'), ('model_ema', 'model EMA'),
    ('model_ema_decay', 'EMA decay'), ('amp', 'mixed precision'), ('img_size', 'image size'),
    ('input_size', 'input size'), ('crop_pct', 'eval crop_pct'), ('interpolation', 'interpolation'),
    ('seed', 'seed'),
)


def initialisation_source(args: Mapping[str, Any]) -> Optional[str]:
    """Where train.py started from, from its ``args``: ``--pretrained-path`` / ``--initial-checkpoint`` / the
    model's own pretrained weights, and whether GSoP modules missing there were warm-started
    (``--model-kwargs pretrained_strict=False``)."""
    strict = (args.get('model_kwargs') or {}).get('pretrained_strict', True)
    warm = (' (`pretrained_strict=False`: GSoP modules it lacks were initialised function-preserving, a warm '
            'start)') if strict is False else ''
    if args.get('pretrained') and args.get('pretrained_path'):
        return f"`{args['pretrained_path']}`{warm}"
    if args.get('initial_checkpoint'):
        return f"`{args['initial_checkpoint']}` (train.py --initial-checkpoint)"
    if args.get('pretrained'):
        return f"the model's pretrained weights{warm}"
    return None


def _training_section(facts: Mapping[str, Any], weights: Optional[WeightsInfo]) -> str:
    parts = []
    if weights is not None and weights.train_args:
        args = weights.train_args
        items = []
        for key, label in _TRAIN_ARG_KEYS:
            value = args.get(key)
            if value is None or value == '' or value is False:
                continue
            items.append(f'  - {label}: `{value}`')
        world = args.get('world_size')
        if world:
            items.append(f'  - processes: `{world}`')
        start = initialisation_source(args)
        if start:
            items.append(f'  - initialised from: {start}')
        if items:
            parts.append("- **These weights** (timm's train.py, from the `args` stored in the checkpoint):\n"
                         + '\n'.join(items))
    recipe = ' '.join(str(facts.get('recipe') or '').split())
    schedule = ' '.join(str(facts.get('schedule') or '').split())
    if recipe or schedule:
        parts.append('- **Published recipe** (for reference; not necessarily how these weights were trained): '
                     + ' '.join(p for p in (recipe, f'Schedule: {schedule}' if schedule else '') if p))
    return '\n'.join(parts) if parts else 'No training details are recorded for this model.'


def render_card(
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        repo_id: Optional[str] = None,
        weights: Optional[WeightsInfo] = None,
        dataset: Optional[str] = None,
) -> str:
    """The model card (README.md) of ``model_name`` built with ``model_kwargs``.

    The Hub metadata follows timm's cards (``library_name: timm``, ``tags: [image-classification, timm]``,
    ``license``, ``datasets``); params, GMACs and activations are measured on the model. ``repo_id`` is the
    repo the usage examples load (default: the pretrained cfg's ``hf_hub_id``); ``weights`` describes
    exported weights (source, EMA, measured results); ``dataset`` names the training dataset (a key of
    ``hub_cards/datasets.yaml`` or a Hub dataset id; default: the tag's, unless num_classes differs from it).
    """
    arch, tag = timm.models.split_model_name_tag(model_name)
    cfg = timm.models.get_pretrained_cfg(model_name).to_dict()
    tag = tag or cfg.get('tag') or ''
    full_name = f'{arch}.{tag}' if tag else arch
    model_kwargs = dict(model_kwargs or {})
    model = timm.create_model(full_name, device='meta', **model_kwargs)
    facts = card_facts(full_name, model)
    # exported weights: measured at the input size their config.json records (train.py's, if it set one)
    exported_size = (weights.data_config or {}).get('input_size') if weights is not None else None
    stats = measure_model(full_name, model_kwargs, input_size=exported_size, model=model)
    # usage examples load the repo of exported weights or an explicit repo, else the registry name (whose
    # pretrained cfg says where its weights are)
    model_ref = f'hf-hub:{repo_id}' if repo_id or weights is not None else full_name
    repo_id = repo_id or cfg.get('hf_hub_id') or f'{HUB_NAMESPACE}/{full_name}'
    dataset = _dataset(dataset, tag, model_kwargs.get('num_classes'), cfg)

    from huggingface_hub import ModelCardData
    metadata_text = ModelCardData(
        tags=['image-classification', 'timm'], library_name='timm', pipeline_tag='image-classification',
        license=facts['license'], datasets=[dataset['hub_id']] if dataset and dataset.get('hub_id') else None,
    ).to_yaml()

    chans, height, width = stats.input_size
    non_default = _non_default_args(full_name, model_kwargs)
    details = [
        '- **Model Type:** Image classification / feature backbone',
        '- **Model Stats:**',
        f'  - Params (M): {stats.params / 1e6:.1f}',
        f'  - GMACs: {stats.gmacs:.2f}',
        f'  - Activations (M): {stats.activations / 1e6:.1f}',
        f'  - Image size: {height} x {width}',
    ]
    arch_text = ' '.join(str(facts.get('architecture') or '').split())
    if facts.get('name') or arch_text:
        details.append(f"- **Architecture:** {facts.get('name') + ': ' if facts.get('name') else ''}{arch_text}")
    details.append(f'- **timm-gsop model:** `{full_name}`'
                   + (', built with ' + ', '.join(f'`{k}={v!r}`' for k, v in non_default.items())
                      if non_default else ''))
    if facts['papers']:
        details.append('- **Papers:**')
        details += [f"  - {' '.join(str(p['title']).split())}: {p['url']}" for p in facts['papers']]
    details.append(f"- **Dataset:** {dataset['name'] if dataset else 'not recorded'}")
    if facts.get('original'):
        details.append(f"- **Original:** {facts['original']}")
    stats_note = (
        f'Params: {stats.params:,} parameters. GMACs: multiply-accumulates of the convolutions and matrix products '
        f'in one forward pass at {chans}x{height}x{width} (torch.utils.flop_counter FLOPs / 2; `timm-gsop list` '
        'shows the same count as GFLOPs, x2). Activations: elements output by the convolution and linear layers in '
        'that pass, counted with forward hooks (timm cards count these too, with fvcore). All measured on the model '
        'by timm-gsop.')

    if weights is not None:
        ema = ', EMA weights' if weights.ema else ''
        epoch = f', epoch {weights.epoch}' if weights.epoch is not None else ''
        layout = {'released-gsop': ', in the layout of the released GSoP-Net code',
                  'fast-mpn-cov': ', in the layout of the fast-MPN-COV code'}
        weights_text = (f'The weights were exported by `timm-gsop export` from `{weights.source}` '
                        f'({weights.description}{epoch}{ema}{layout.get(weights.layout, "")}) to safetensors.')
    elif cfg.get('hf_hub_id'):
        weights_text = f'The weights are published at `hf-hub:{repo_id}`.'
    elif cfg.get('url') or cfg.get('file'):
        weights_text = (f'`pretrained=True` loads the weights published by the original authors '
                        f"({cfg.get('url') or cfg.get('file')}), converted to this model on load.")
    else:
        weights_text = (f'No weights are published for `{full_name}` yet: this card describes the architecture. '
                        'Publish weights with `timm-gsop export` and `timm-gsop push`.')

    results = []
    if facts['reported']:
        note = (' This model is built with other arguments than the published configuration.'
                if non_default else '')
        results.append('### Reported by the papers (not measured on these weights)\n'
                       'Numbers the cited sources report for the published configuration of this architecture; '
                       f'timm-gsop did not measure them.{note}\n\n' + _reported_table(facts['reported']))
    else:
        results.append('### Reported by the papers\nThe papers report no results for this configuration.')
    if weights is not None:
        measured = '\n'.join(f'- {line}' for line in weights.measured) if weights.measured else \
            'No evaluation results accompany these weights.'
        results.append('### Measured on these weights\n' + measured)

    embed_note = ''
    if stats.feature_shapes is None:
        embed_note = '`features_only=True` is not supported by this model.'
    feature_shapes = '\n'.join(f'    #  {_fmt_shape(s)}' for s in (stats.feature_shapes or []))
    citation = '\n'.join(f'```bibtex\n{c.strip()}\n```' for c in facts['citation'])

    summary = ' '.join(str(facts['summary']).split())
    template = string.Template((cards_dir() / 'template.md').read_text(encoding='utf-8'))
    return template.substitute(
        metadata=metadata_text,
        title=repo_id.split('/')[-1],
        summary=summary,
        weights=weights_text,
        details='\n'.join(details),
        stats_note=stats_note,
        results='\n\n'.join(results),
        training=_training_section(facts, weights),
        model_ref=model_ref,
        feature_shapes=feature_shapes or '    #  (not supported)',
        embed_shape=f'({", ".join(map(str, stats.embed_shape))})',
        features_shape=f'({", ".join(map(str, stats.features_shape))})',
        embed_note=embed_note,
        citation=citation,
    )
