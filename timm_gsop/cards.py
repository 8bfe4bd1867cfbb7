"""Model cards (README.md) for the Hub: ``render_card`` (``timm-gsop card``, and every export).

As timm's ``generate_readme`` does, a card is one dict of facts written out by one function. ``card_facts`` gathers
them: what is measured on the model (``measure_model``, on the meta device) and read from its modules
(``describe_model``), the family's prose and the papers' reported results (``hub_cards/families/*.yaml``; a model
without a family file gets its pretrained cfg's paper and its entrypoint's docstring), the weights, the dataset.
``render_card`` writes them into the card; the metadata is ``huggingface_hub``'s ``ModelCardData``
(``library_name: timm``, ``pipeline_tag: image-classification``, as timm's cards).
"""
import dataclasses
import fnmatch
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

__all__ = ['HUB_NAMESPACE', 'measure_model', 'count_activations_and_flops', 'describe_model', 'WeightsInfo',
           'cards_dir', 'card_facts', 'dataset_for_tag', 'render_card', 'initialisation_source']

# a pretrained tag (or its last '_'-separated part: 'a1_in1k' -> 'in1k') -> (the dataset's name, its Hub id)
_DATASETS = {'in1k': ('ImageNet-1k', 'imagenet-1k'), 'in12k': ('ImageNet-12k', 'imagenet-12k'),
             'in21k': ('ImageNet-21k', 'imagenet-21k'), 'in22k': ('ImageNet-22k', 'imagenet-22k'),
             'cifar100': ('CIFAR-100', 'cifar100'), 'c100': ('CIFAR-100', 'cifar100'),
             'cifar10': ('CIFAR-10', 'cifar10'), 'c10': ('CIFAR-10', 'cifar10')}

# every card cites timm, after the family's papers
_TIMM_CITATION = r"""@misc{rw2019timm,
  author = {Ross Wightman},
  title = {PyTorch Image Models},
  year = {2019},
  publisher = {GitHub},
  journal = {GitHub repository},
  doi = {10.5281/zenodo.4414861},
  howpublished = {\url{https://github.com/huggingface/pytorch-image-models}}
}"""

# train.py args a card lists for exported weights, with their labels
_TRAIN_ARGS = (
    ('epochs', 'epochs'), ('opt', 'optimizer'), ('lr', 'learning rate'), ('momentum', 'momentum'),
    ('weight_decay', 'weight decay'), ('batch_size', 'batch size (per process)'), ('sched', 'schedule'),
    ('decay_milestones', 'decay milestones'), ('decay_rate', 'decay rate'), ('warmup_epochs', 'warm-up epochs'),
    ('smoothing', 'label smoothing'), ('mixup', 'mixup'), ('cutmix', 'cutmix'), ('aa', 'auto-augment'),
    ('reprob', 'random erasing'), ('drop_path', 'drop path'), ('model_ema', 'model EMA'),
    ('model_ema_decay', 'EMA decay'), ('amp', 'mixed precision'), ('img_size', 'image size'),
    ('input_size', 'input size'), ('crop_pct', 'eval crop_pct'), ('interpolation', 'interpolation'),
    ('seed', 'seed'), ('world_size', 'processes'),
)


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


# ---- facts measured on / read from the model ----------------------------------------------------------------

def count_activations_and_flops(model: nn.Module, input_size: Sequence[int]) -> Tuple[int, float]:
    """(activations, GFLOPs) of one forward pass at ``input_size`` (C, H, W).

    Activations: the elements output by the convolution and linear layers (forward hooks), what timm's cards list
    as "Activations" (fvcore's count, which also counts matrix products). GFLOPs: ``zoo.count_gflops``.
    """
    total = [0]
    handles = [m.register_forward_hook(lambda mod, i, out: total.__setitem__(0, total[0] + out.numel()))
               for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        gflops = count_gflops(model, input_size)
    finally:
        for h in handles:
            h.remove()
    return total[0], gflops


def measure_model(model_name: str, model_kwargs: Optional[Dict[str, Any]] = None,
                  input_size: Optional[Sequence[int]] = None, model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """``params``, ``gmacs``, ``activations`` of ``model_name`` built with ``model_kwargs`` (on the meta device) at
    ``input_size`` (default: its pretrained cfg's), and the shapes its usage examples print (``feature_shapes``:
    None without ``features_only`` support). ``model``: that network, already built on the meta device."""
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
    except Exception:  # a model without features_only support: its card says so
        pass
    return dict(params=count_params(model), gmacs=gflops / 2, activations=activations, input_size=input_size,
                feature_shapes=feature_shapes, features_shape=tuple(feats.shape), embed_shape=tuple(embed.shape))


def _stage_list(stages: Sequence[int]) -> str:
    if len(stages) > 2 and list(stages) == list(range(stages[0], stages[-1] + 1)):
        return f'{stages[0]}-{stages[-1]}'
    return ', '.join(map(str, stages[:-1])) + (' and ' if len(stages) > 1 else '') + str(stages[-1])


def describe_model(model: nn.Module) -> Dict[str, str]:
    """The numbers a card's prose states, read from ``model`` (its modules and cfg; meta device is fine):
    ``gsop_dim``, ``gsop_placement``, ``gsop_count``, ``last_stage``, ``final_map``, ``num_features``,
    ``isqrt_dim``, ``isqrt_iters``, ``isqrt_features``, ``head`` (the pooling head, in words), ``backbone`` (a
    covariance-head model's timm backbone). The family files name them as ``{placeholders}``, so a
    card never states a dimension its model does not have."""
    from .layers import ChannelGSoP, CovPool, GSoPFusion, ISqrtCovPool, PositionGSoP
    dims, per_stage = set(), []  # per stage: (index, blocks with GSoP, number of blocks)
    for idx, stage in enumerate((m for n, m in model.named_children() if n.startswith('layer')), start=1):
        used = [i for i, b in enumerate(stage) if isinstance(getattr(b, 'se', None),
                                                             (ChannelGSoP, PositionGSoP, GSoPFusion))]
        dims.update((stage[i].se.channel if isinstance(stage[i].se, GSoPFusion) else stage[i].se).dim for i in used)
        per_stage.append((idx, used, len(stage)))
    enabled = [idx for idx, used, _ in per_stage if used]
    where = 'the last block' if enabled and all(used == [n - 1] for _, used, n in per_stage if used) else 'every block'
    facts = {'gsop_count': str(sum(len(used) for _, used, _ in per_stage)),
             'gsop_dim': ' / '.join(map(str, sorted(dims))) or '-',
             'gsop_placement': f'{where} of stage{"s" if len(enabled) > 1 else ""} '
                               f'{_stage_list(enabled) if enabled else "none"}',
             'num_features': str(getattr(model, 'num_features', '-'))}
    info = getattr(model, 'feature_info', None)
    if isinstance(info, list) and len(info) >= 2:
        same = info[-1]['reduction'] == info[-2]['reduction']
        facts['last_stage'] = 'stride 1 without dilation' if same else 'stride 2'
    if isinstance(info, list) and info:
        h, w = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224))[1:]
        r = info[-1]['reduction']  # the model's own stride, not the cfg's pool_size (which kwargs do not update)
        facts['final_map'] = f'{h // r}x{w // r} final map at {h}x{w}'
    pool = getattr(model, 'global_pool', None)
    if isinstance(pool, ISqrtCovPool):
        facts.update(isqrt_dim=str(pool.dim), isqrt_iters=str(pool.num_iters), isqrt_features=f'{pool.out_features:,}')
    if isinstance(pool, CovPool):
        root = f', {pool.num_iters} Newton-Schulz iterations (iSQRT-COV)' if isinstance(pool, ISqrtCovPool) else \
            ' (no square root)'
        facts['head'] = f'1x1 conv {pool.in_chs} -> {pool.dim} (no bias), BN, ReLU, covariance{root}, ' \
                        f'{pool.out_features:,}-d triangle vector'
    else:
        facts['head'] = f"{getattr(pool, 'pool_type', '') or 'no'} pooling of {facts['num_features']} channels"
    facts['backbone'] = getattr(model, 'backbone_name', '-')
    return facts


# ---- facts about the family, the dataset, the training run ----------------------------------------------------

def cards_dir() -> Path:
    """``hub_cards/``: in an installed wheel ``timm_gsop/hub_cards`` (package data), in a source checkout (or an
    editable install) the repository's ``hub_cards/``."""
    here = Path(__file__).resolve().parent
    for path in (here / 'hub_cards', here.parent / 'hub_cards'):
        if (path / 'families').is_dir():
            return path
    raise FileNotFoundError(f'hub_cards/ (the model families\' card facts) not found next to {here}')


@lru_cache(maxsize=None)
def _families() -> Tuple[Dict[str, Any], ...]:
    files = sorted((cards_dir() / 'families').glob('*.yaml'))
    return tuple(yaml.safe_load(p.read_text(encoding='utf-8')) for p in files)


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _family_facts(arch: str, numbers: Mapping[str, str]) -> Dict[str, Any]:
    """The first family file whose ``match`` fits ``arch``, its first fitting variant merged over it (a variant's
    ``papers`` / ``citation`` are added to the family's) and its ``reported`` results for ``arch``; the prose's
    ``{placeholders}`` filled from ``numbers`` (:func:`describe_model`)."""
    family = next((f for f in _families() if _matches(arch, f.get('match'))), None)
    if family is None:
        return {}
    facts = {k: v for k, v in family.items() if k not in ('match', 'variants', 'reported')}
    facts['reported'] = [r for r in family.get('reported', []) if _matches(arch, r.get('models'))]
    variant = next((v for v in family.get('variants', []) if _matches(arch, v.get('match'))), {})
    for key, value in variant.items():
        if key != 'match':
            facts[key] = list(facts.get(key) or []) + list(value) if key in ('papers', 'citation') else value
    for key in ('summary', 'architecture', 'recipe', 'schedule', 'name'):
        if isinstance(facts.get(key), str):
            facts[key] = facts[key].format_map(numbers)
    return facts


def dataset_for_tag(tag: str) -> Optional[Dict[str, str]]:
    """``{'name', 'hub_id'}`` of a pretrained tag's dataset (the tag, or its last '_'-separated part), else None."""
    found = _DATASETS.get(tag) or _DATASETS.get(tag.rsplit('_', 1)[-1]) if tag else None
    return dict(name=found[0], hub_id=found[1]) if found else None


def initialisation_source(args: Mapping[str, Any]) -> Optional[str]:
    """Where train.py started from, by its ``args``: ``--pretrained-path``, ``--initial-checkpoint`` or the model's
    own pretrained weights (None: from scratch). ``pretrained=True`` loads through the family's
    ``checkpoint_filter_fn``, which makes a plain network's checkpoint a warm start: the card says so."""
    warm = ' (GSoP modules it had no tensors for were initialised function-preserving, a warm start)'
    if str(args.get('model') or '').startswith('covpool'):
        warm = " (the backbone's weights; the covariance head and the classifier newly initialised)"
    if args.get('pretrained') and args.get('pretrained_path'):
        return f"`{args['pretrained_path']}`{warm}"
    if args.get('initial_checkpoint'):
        return f"`{args['initial_checkpoint']}` (train.py --initial-checkpoint)"
    return f"the model's pretrained weights{warm}" if args.get('pretrained') else None


def _non_default_args(model_name: str, model_args: Mapping[str, Any], cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The model args that differ from what ``create_model(model_name)`` builds (an export's config.json records
    num_classes, in_chans and global_pool even when they are the defaults)."""
    defaults = {'num_classes': cfg.get('num_classes'), 'in_chans': (cfg.get('input_size') or (3,))[0]}
    if 'global_pool' in model_args:
        defaults['global_pool'] = timm.create_model(model_name, device='meta').global_pool.pool_type
    return {k: v for k, v in model_args.items() if k not in defaults or v != defaults[k]}


def card_facts(model_name: str, model_kwargs: Optional[Dict[str, Any]] = None, repo_id: Optional[str] = None,
               weights: Optional[WeightsInfo] = None, dataset: Optional[str] = None) -> Dict[str, Any]:
    """Everything the card of ``model_name`` built with ``model_kwargs`` states, as one dict (arguments as
    :func:`render_card`'s)."""
    arch, tag = timm.models.split_model_name_tag(model_name)
    cfg = timm.models.get_pretrained_cfg(model_name).to_dict()
    tag = tag or cfg.get('tag') or ''
    name = f'{arch}.{tag}' if tag else arch
    model_kwargs = dict(model_kwargs or {})
    model = timm.create_model(name, device='meta', **model_kwargs)
    doc = (timm.models.model_entrypoint(arch).__doc__ or arch).strip().splitlines()[0].strip().rstrip('.')
    papers = [p.strip() for p in (cfg.get('paper_ids') or '').replace(';', ',').split(',') if p.strip()]
    facts = {  # a model without a family file: what its pretrained cfg and docstring say
        'family': None, 'name': None, 'schedule': None, 'recipe': '', 'reported': [],
        'summary': f'A timm-gsop image classification model ({doc}), implemented on timm by timm-gsop.',
        'architecture': doc, 'license': cfg.get('license') or 'mit', 'original': cfg.get('origin_url'),
        'papers': [{'title': cfg.get('paper_name') or p,
                    'url': f'https://arxiv.org/abs/{p[6:]}' if p.lower().startswith('arxiv:') else p} for p in papers],
    }
    facts.update(_family_facts(arch, describe_model(model)))
    for key in ('summary', 'architecture', 'recipe', 'schedule', 'name'):
        if isinstance(facts[key], str):
            facts[key] = ' '.join(facts[key].split())  # YAML folding may leave line breaks
    facts['citation'] = list(facts.get('citation') or []) + [_TIMM_CITATION]
    # exported weights are measured at the input size their config.json records (train.py's, if it set one)
    input_size = (weights.data_config or {}).get('input_size') if weights else None
    facts.update(measure_model(name, model_kwargs, input_size=input_size, model=model))
    # an explicit dataset (a tag like 'in1k' or a Hub dataset id), else the tag's while the model keeps its classes
    if dataset:
        facts['dataset'] = dataset_for_tag(dataset) or {'name': dataset, 'hub_id': dataset}
    elif model_kwargs.get('num_classes') in (None, cfg.get('num_classes')):
        facts['dataset'] = dataset_for_tag(tag)
    else:
        facts['dataset'] = None
    facts.update(
        model=name, model_args=_non_default_args(name, model_kwargs, cfg),
        # the usage examples load the repo of exported weights or an explicit repo, else the registry name (whose
        # cfg says where its weights are)
        model_ref=f'hf-hub:{repo_id}' if repo_id or weights else name,
        repo_id=repo_id or cfg.get('hf_hub_id') or f'{HUB_NAMESPACE}/{name}',
        hf_hub_id=cfg.get('hf_hub_id'), weights_url=cfg.get('url') or cfg.get('file'),
        notes=[' '.join(str(n).split()) for n in cfg.get('notes') or ()],
        weights=dataclasses.asdict(weights) if weights else None)
    return facts


# ---- the card --------------------------------------------------------------------------------------------------

def _bullets(details: Mapping[str, Any]) -> str:
    """``- **key:** value`` lines; a list or dict value becomes indented sub-items (as timm's cards)."""
    lines = []
    for key, value in details.items():
        if isinstance(value, (list, dict)):
            items = value if isinstance(value, list) else [f'{k}: {v}' for k, v in value.items()]
            lines += [f'- **{key}:**'] + [f'  - {v}' for v in items]
        elif value:
            lines.append(f'- **{key}:** {value}')
    return '\n'.join(lines)


def _reported_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Reported results; a paper gives accuracy or error, the other (100 minus it) is shown in italics."""
    derived = False

    def pct(row, metric):
        nonlocal derived
        acc, err = row.get(f'{metric}_acc'), row.get(f'{metric}_err')
        if acc is None and err is None:
            return '-', '-'
        derived |= acc is None or err is None
        acc_text = f'{float(acc):.2f}' if acc is not None else f'*{100 - float(err):.2f}*'
        return acc_text, f'{float(err):.2f}' if err is not None else f'*{100 - float(acc):.2f}*'

    lines = ['| dataset | top-1 acc. (%) | top-5 acc. (%) | top-1 err. (%) | top-5 err. (%) | reported by |',
             '|---|---|---|---|---|---|']
    for row in rows:
        (a1, e1), (a5, e5) = pct(row, 'top1'), pct(row, 'top5')
        lines.append(f"| {row['dataset']} | {a1} | {a5} | {e1} | {e5} | {' '.join(str(row['source']).split())} |")
    return '\n'.join(lines) + ('\n\n*Italic*: 100 minus the reported accuracy or error.' if derived else '')


def _shape(shape: Sequence[int]) -> str:
    return f"({', '.join(map(str, shape))})"


def _transformers_usage(ref: str, image: str) -> str:
    """The card's transformers section: TimmWrapper reads an exported folder's config.json (export.py writes one it
    loads); it builds the model with timm, so ``import timm_gsop`` comes first."""
    text = ("### With transformers\n"
            "transformers' `TimmWrapper` (`AutoModelForImageClassification`, `AutoModel`, "
            "`pipeline('image-classification')`) loads a folder or Hub repo written by `timm-gsop export`. It builds "
            "the network with `timm.create_model`, so `import timm_gsop` must come first: without it transformers "
            "says the architecture \"is not supported in your version of timm\" and suggests upgrading timm, which "
            "does not help; `pip install timm-gsop` and import it before loading.\n")
    if not ref.startswith('hf-hub:'):
        return text + (f'\n`{ref}` names a registry entry, not such a folder: `timm-gsop export CHECKPOINT --model '
                       f"{ref.split('.')[0]} --out DIR` writes one from a checkpoint file.")
    return text + f"""
```python
from urllib.request import urlopen
from PIL import Image
import timm_gsop  # first: registers the timm-gsop architectures with timm, which transformers builds them with
from transformers import AutoModelForImageClassification, pipeline

{image}

classifier = pipeline('image-classification', model='{ref[len('hf-hub:'):]}')
print(classifier(img))

model = AutoModelForImageClassification.from_pretrained('{ref[len('hf-hub:'):]}').eval()  # logits as timm's
```"""


def render_card(model_name: str, model_kwargs: Optional[Dict[str, Any]] = None, repo_id: Optional[str] = None,
                weights: Optional[WeightsInfo] = None, dataset: Optional[str] = None) -> str:
    """The model card (README.md) of ``model_name`` built with ``model_kwargs``.

    ``repo_id``: the repo the usage examples load (default: the registry name, whose pretrained cfg says where its
    weights are); ``weights``: exported weights (source, EMA, measured results); ``dataset``: the training dataset
    (a tag such as ``in1k`` or a Hub dataset id; default: the tag's, unless num_classes differs from it).
    """
    from huggingface_hub import ModelCardData
    f = card_facts(model_name, model_kwargs, repo_id, weights, dataset)
    w, ds = f['weights'], f['dataset']
    metadata = ModelCardData(
        tags=['image-classification', 'timm'], library_name='timm', pipeline_tag='image-classification',
        license=f['license'], datasets=[ds['hub_id']] if ds and ds.get('hub_id') else None).to_yaml()

    if w:
        layout = {'released-gsop': ', in the layout of the released GSoP-Net code',
                  'fast-mpn-cov': ', in the layout of the fast-MPN-COV code'}.get(w['layout'], '')
        epoch = f", epoch {w['epoch']}" if w['epoch'] is not None else ''
        origin = (f"The weights were exported by `timm-gsop export` from `{w['source']}` ({w['description']}{epoch}"
                  f"{', EMA weights' if w['ema'] else ''}{layout}) to safetensors.")
    elif f['hf_hub_id']:
        origin = f"The weights are published at `hf-hub:{f['repo_id']}`."
    elif f['weights_url']:
        origin = (f"`pretrained=True` loads the weights published by the original authors ({f['weights_url']}), "
                  'converted to this model on load.')
    else:
        origin = (f"No weights are published for `{f['model']}` yet: this card describes the architecture. "
                  'Publish weights with `timm-gsop export` and `timm-gsop push`.')
    if f['notes'] and (not w or f['weights_url']):  # the tag's notes describe its published file
        origin += ''.join(f'\n\n**Note:** {note}' for note in f['notes'])

    chans, height, width = f['input_size']
    built_with = ', '.join(f'`{k}={v!r}`' for k, v in f['model_args'].items())
    details = _bullets({
        'Model Type': 'Image classification / feature backbone',
        'Model Stats': {'Params (M)': f"{f['params'] / 1e6:.1f}", 'GMACs': f"{f['gmacs']:.2f}",
                        'Activations (M)': f"{f['activations'] / 1e6:.1f}", 'Image size': f'{height} x {width}'},
        'Architecture': f"{f['name'] + ': ' if f['name'] else ''}{f['architecture']}",
        'timm-gsop model': f"`{f['model']}`" + (f', built with {built_with}' if built_with else ''),
        'Papers': [f"{' '.join(str(p['title']).split())}: {p['url']}" for p in f['papers']] or None,
        'Dataset': ds['name'] if ds else 'not recorded',
        'Original': f['original'],
    })

    if f['reported']:
        other = ' This model is built with other arguments than the published configuration.' if built_with else ''
        results = ('### Reported by the papers (not measured on these weights)\nNumbers the cited sources report for '
                   f'the published configuration of this architecture; timm-gsop did not measure them.{other}\n\n'
                   + _reported_table(f['reported']))
    else:
        results = '### Reported by the papers\nThe papers report no results for this configuration.'
    if w:
        results += '\n\n### Measured on these weights\n' + (
            '\n'.join(f'- {line}' for line in w['measured']) or 'No evaluation results accompany these weights.')

    training = []
    args = w['train_args'] if w else {}
    run = [f'  - {label}: `{args[key]}`' for key, label in _TRAIN_ARGS
           if args.get(key) is not None and args[key] != '' and args[key] is not False]
    if initialisation_source(args):
        run.append(f'  - initialised from: {initialisation_source(args)}')
    if run:
        training.append("- **These weights** (timm's train.py, from the `args` stored in the checkpoint):\n"
                        + '\n'.join(run))
    recipe = ' '.join(p for p in (f['recipe'], f"Schedule: {f['schedule']}" if f['schedule'] else '') if p)
    if recipe:
        training.append('- **Published recipe** (for reference; not necessarily how these weights were trained): '
                        + recipe)

    ref, embed = f['model_ref'], _shape(f['embed_shape'])
    feature_shapes = '\n'.join(f'    #  torch.Size([{", ".join(map(str, s))}])' for s in f['feature_shapes'] or ()) \
        or '    #  (not supported)'
    image = ("img = Image.open(urlopen(\n    'https://huggingface.co/datasets/huggingface/documentation-images/"
             "resolve/main/beignets-task-guide.png'\n))")
    transforms = ('model = model.eval()\n\n# get model specific transforms (normalization, resize)\n'
                  'data_config = timm.data.resolve_model_data_config(model)\n'
                  'transforms = timm.data.create_transform(**data_config, is_training=False)')
    citation = '\n'.join(f'```bibtex\n{c.strip()}\n```' for c in f['citation'])
    transformers = _transformers_usage(ref, image)
    return f"""---
{metadata}
---
# Model card for {f['repo_id'].split('/')[-1]}

{f['summary']}

{origin}

## Model Details
{details}

Params: {f['params']:,} parameters. GMACs: multiply-accumulates of the convolutions and matrix products in one \
forward pass at {chans}x{height}x{width} (torch.utils.flop_counter FLOPs / 2; `timm-gsop list` shows the same count \
as GFLOPs, x2). Activations: elements output by the convolution and linear layers in that pass, counted with forward \
hooks (timm cards count these too, with fvcore). All measured on the model by timm-gsop.

## Results
{results}

## Training
{chr(10).join(training) or 'No training details are recorded for this model.'}

## Model Usage
These weights need the `timm-gsop` package (`pip install timm-gsop`): `import timm_gsop` registers its
architectures with timm, after which the model loads like any timm model.

### Image Classification
```python
from urllib.request import urlopen
from PIL import Image
import torch
import timm
import timm_gsop  # registers the timm-gsop architectures with timm

{image}

model = timm.create_model('{ref}', pretrained=True)
{transforms}

output = model(transforms(img).unsqueeze(0))  # unsqueeze single image into batch of 1

top5_probabilities, top5_class_indices = torch.topk(output.softmax(dim=1) * 100, k=5)
```

### Feature Map Extraction
```python
from urllib.request import urlopen
from PIL import Image
import timm
import timm_gsop

{image}

model = timm.create_model(
    '{ref}',
    pretrained=True,
    features_only=True,
)
{transforms}

output = model(transforms(img).unsqueeze(0))  # unsqueeze single image into batch of 1

for o in output:
    # print shape of each feature map in output
    # e.g.:
{feature_shapes}
    print(o.shape)
```

### Image Embeddings
```python
from urllib.request import urlopen
from PIL import Image
import timm
import timm_gsop

{image}

model = timm.create_model(
    '{ref}',
    pretrained=True,
    num_classes=0,  # remove classifier nn.Linear
)
{transforms}

output = model(transforms(img).unsqueeze(0))  # output is {embed} shaped tensor

# or equivalently (without needing to set num_classes=0)

output = model.forward_features(transforms(img).unsqueeze(0))
# output is unpooled, a {_shape(f['features_shape'])} shaped tensor

output = model.forward_head(output, pre_logits=True)
# output is a {embed} shaped tensor
```
{'' if f['feature_shapes'] is not None else '`features_only=True` is not supported by this model.'}

{transformers}

## Citation
{citation}
"""
