"""Model cards (README.md) for the Hub: ``render_card`` (``timm-gsop card``, and every export). ``card_facts`` gathers
what is measured on the model (on the meta device) and read from its modules (``describe_model``), the family's
prose and reported results (``hub_cards/families/*.yaml``), the weights and the dataset; one template,
``hub_cards/model_card.md``, writes them through huggingface_hub's ``ModelCard`` / ``ModelCardData``.
"""
import fnmatch
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
import timm
import yaml

from .layers import ChannelGSoP, CovPool, GSoPFusion, ISqrtCovPool, PositionGSoP
from .zoo import count_gflops

__all__ = ['HUB_NAMESPACE', 'cards_dir', 'describe_model', 'card_facts', 'render_card']

# the Hugging Face Hub organisation this package's own weights are published under ('<namespace>/<model>.<tag>')
HUB_NAMESPACE = 'timm-gsop'
# a tag's last '_'-separated part -> (dataset name, Hub dataset id)
_DATASETS = {'in1k': ('ImageNet-1k', 'imagenet-1k'), 'in12k': ('ImageNet-12k', 'imagenet-12k'),
             'in21k': ('ImageNet-21k', 'imagenet-21k'), 'in22k': ('ImageNet-22k', 'imagenet-22k'),
             'cifar100': ('CIFAR-100', 'cifar100'), 'cifar10': ('CIFAR-10', 'cifar10')}
# train.py args a card lists for exported weights
_TRAIN_ARGS = ('epochs', 'opt', 'lr', 'lr_base', 'momentum', 'weight_decay', 'batch_size', 'sched', 'decay_milestones',
               'warmup_epochs', 'smoothing', 'mixup', 'cutmix', 'aa', 'drop_path', 'model_ema', 'model_ema_decay',
               'amp', 'img_size', 'input_size', 'crop_pct', 'seed', 'world_size', 'pretrained_path',
               'initial_checkpoint')


def cards_dir() -> Path:
    """``hub_cards/``: ``timm_gsop/hub_cards`` in a wheel, the repository's ``hub_cards/`` in a checkout."""
    here = Path(__file__).resolve().parent
    return next(p for p in (here / 'hub_cards', here.parent / 'hub_cards') if (p / 'model_card.md').is_file())


def describe_model(model: nn.Module) -> Dict[str, str]:
    """The numbers a card's prose states, read from ``model`` (meta device is fine); the family files name them
    as ``{placeholders}``, so a card never states a dimension its model does not have."""
    per_stage = [[b.se for b in stage if isinstance(getattr(b, 'se', None), (ChannelGSoP, PositionGSoP, GSoPFusion))]
                 for n, stage in model.named_children() if n.startswith('layer')]
    dims = sorted({(m.channel if isinstance(m, GSoPFusion) else m).dim for stage in per_stage for m in stage})
    enabled = [str(i) for i, stage in enumerate(per_stage, 1) if stage]
    everywhere = any(len(stage) > 1 for stage in per_stage)
    info, pool = model.feature_info, model.global_pool
    height, width = model.pretrained_cfg['input_size'][1:]
    facts = dict(
        gsop_count=str(sum(map(len, per_stage))), gsop_dim=' / '.join(map(str, dims)) or '-',
        gsop_placement=f"{'every block' if everywhere else 'the last block'} of stage(s) {', '.join(enabled) or '-'}",
        num_features=str(model.num_features), backbone=getattr(model, 'backbone_name', '-'),
        last_stage='stride 1 without dilation' if len(info) > 1 and info[-1]['reduction'] == info[-2]['reduction']
        else 'stride 2',
        final_map=f"{height // info[-1]['reduction']}x{width // info[-1]['reduction']} final map at {height}x{width}",
        head=f"{getattr(pool, 'pool_type', '') or 'no'} pooling of {model.num_features} channels")
    if isinstance(pool, CovPool):
        root = f', {pool.num_iters} Newton-Schulz iterations (iSQRT-COV)' if isinstance(pool, ISqrtCovPool) else \
            ' (no square root)'
        facts.update(isqrt_dim=str(pool.dim), isqrt_iters=str(getattr(pool, 'num_iters', '-')),
                     isqrt_features=f'{pool.out_features:,}',
                     head=f'1x1 conv {pool.in_chs} -> {pool.dim} (no bias), BN, ReLU, covariance{root}, '
                          f'{pool.out_features:,}-d triangle vector')
    return facts


def _family_facts(arch: str, numbers: Mapping[str, str]) -> Dict[str, Any]:
    """The first family file whose ``match`` fits ``arch``, its first fitting variant merged over it (a variant's
    ``papers`` / ``citation`` are added to the family's), its ``reported`` results for ``arch``; the prose's
    ``{placeholders}`` filled from ``numbers``."""
    fits = lambda patterns: any(fnmatch.fnmatchcase(arch, p) for p in patterns or ())
    families = [yaml.safe_load(p.read_text(encoding='utf-8')) for p in sorted(cards_dir().glob('families/*.yaml'))]
    family = next((f for f in families if fits(f['match'])), {})
    facts = {k: v for k, v in family.items() if k not in ('match', 'variants', 'reported')}
    for key, value in next((v for v in family.get('variants', []) if fits(v['match'])), {}).items():
        facts[key] = facts.get(key, []) + value if key in ('papers', 'citation') else value
    facts['reported'] = [r for r in family.get('reported', []) if fits(r['models'])]
    for row in facts['reported']:  # a paper gives accuracy or error: the other is 100 minus it
        for metric in ('top1', 'top5'):
            acc, err = row.get(f'{metric}_acc'), row.get(f'{metric}_err')
            row[f'{metric}_acc'] = acc if acc is not None or err is None else round(100 - err, 2)
            row[f'{metric}_err'] = err if err is not None or acc is None else round(100 - acc, 2)
    return {k: ' '.join(v.format_map(numbers).split()) if isinstance(v, str) else v for k, v in facts.items()}


def card_facts(model_name: str, model_kwargs: Optional[Dict[str, Any]] = None, repo_id: Optional[str] = None,
               weights: Optional[Dict[str, Any]] = None, dataset: Optional[str] = None) -> Dict[str, Any]:
    """Everything the card of ``model_name`` built with ``model_kwargs`` states (arguments: :func:`render_card`)."""
    model_kwargs = dict(model_kwargs or {})
    model = timm.create_model(model_name, device='meta', **model_kwargs).eval()
    cfg, arch = model.pretrained_cfg, model.pretrained_cfg['architecture']
    name = f"{arch}.{cfg['tag']}" if cfg.get('tag') else arch
    default = timm.create_model(name, device='meta')
    input_size = timm.models.get_model_input_config(model)['input_size']
    x = torch.empty((1, *input_size), device='meta')
    feature_kwargs = {k: v for k, v in model_kwargs.items() if k not in ('num_classes', 'global_pool')}
    with torch.no_grad():
        features = model.forward_features(x)
        embed = model.forward_head(features, pre_logits=True)
        feature_shapes = [tuple(o.shape) for o in timm.create_model(name, features_only=True, device='meta',
                                                                    **feature_kwargs)(x)]
    if dataset is None and model.num_classes == default.num_classes:
        dataset = _DATASETS.get(str(cfg.get('tag') or '').rsplit('_', 1)[-1])
    elif dataset is not None:
        dataset = _DATASETS.get(dataset, (dataset, dataset))
    model_args = {k: v for k, v in model_kwargs.items() if v != getattr(default, k, None)
                  and not (k == 'global_pool' and v == getattr(default.global_pool, 'pool_type', None))
                  and not (k == 'in_chans' and v == default.pretrained_cfg['input_size'][0])}
    doc = (timm.models.model_entrypoint(arch).__doc__ or arch).strip().splitlines()[0].rstrip('.')
    facts = dict(
        summary=f'A timm-gsop image classification model: {doc}.',
        architecture=arch, papers=[], citation=[], recipe='', schedule='', license=cfg.get('license') or 'mit',
        original=cfg.get('origin_url'))
    facts.update(_family_facts(arch, describe_model(model)))
    facts.update(
        model=name, model_args=model_args, dataset=dataset, input_size=input_size, weights=weights,
        params=sum(p.numel() for p in model.parameters()), gmacs=count_gflops(model, input_size) / 2,
        features_shape=tuple(features.shape), embed_shape=tuple(embed.shape),
        feature_shapes=feature_shapes,
        model_ref=f'hf-hub:{repo_id}' if repo_id or weights else name,
        repo_id=repo_id or cfg.get('hf_hub_id') or f'{HUB_NAMESPACE}/{name}',
        hf_hub_id=cfg.get('hf_hub_id'), weights_url=cfg.get('url') or cfg.get('file'),
        notes=[' '.join(str(n).split()) for n in cfg.get('notes') or ()],
        train_args={k: v for k, v in ((weights or {}).get('train_args') or {}).items()
                    if k in _TRAIN_ARGS and v not in (None, '', False)})
    return facts


def render_card(model_name: str, model_kwargs: Optional[Dict[str, Any]] = None, repo_id: Optional[str] = None,
                weights: Optional[Dict[str, Any]] = None, dataset: Optional[str] = None) -> str:
    """The model card (README.md) of ``model_name`` built with ``model_kwargs``.

    ``repo_id``: the repo the usage examples load (default: the registry name, whose pretrained cfg says where its
    weights are); ``weights``: exported weights (``source``, ``description``, ``epoch``, ``ema``, ``layout``,
    ``train_args``, ``measured`` lines); ``dataset``: the training dataset (a tag such as ``in1k`` or a Hub
    dataset id; default: the tag's, unless num_classes differs from it).
    """
    from huggingface_hub import ModelCard, ModelCardData
    facts = card_facts(model_name, model_kwargs, repo_id, weights, dataset)
    data = ModelCardData(library_name='timm', pipeline_tag='image-classification', license=facts['license'],
                         tags=['image-classification', 'timm'],
                         datasets=[facts['dataset'][1]] if facts['dataset'] else None)
    return str(ModelCard.from_template(data, template_path=str(cards_dir() / 'model_card.md'), **facts))
