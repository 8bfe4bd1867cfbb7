"""``timm-gsop demo``: train GSoP-Nets and a same-size first-order ResNet, export, reload. CPU, no network.

The data set is generated here (deterministic per seed), so nothing is downloaded. It is built so that
only second-order statistics carry the label:

* each image is a smooth 3-channel Gaussian noise field whose channels are mixed so that the correlation
  between channels 0 and 1 is +r or -r and the one between channels 1 and 2 is +r or -r (0 and 2 are
  uncorrelated); the four sign patterns are equally frequent;
* every channel of every image is then standardised (mean 0, variance 1 over the image's pixels), so no
  per-channel mean, variance or intensity carries anything;
* the label is whether the two correlations have the same sign (0) or opposite signs (1). Each class mixes
  two sign patterns, so no single correlation tells the class either: the network has to combine them.

Three networks of the same size (parameters within 1%) are trained with timm's training components
(``create_optimizer_v2``, ``create_scheduler_v2``, ``timm.task.ClassificationTask``, ``timm.utils.accuracy``)
and the same schedule, seed and batches, all of timm_gsop's CIFAR pre-activation ResNet with one bottleneck
per stage: a plain one with average pooling (first order; slightly wider, to match the parameter count),
GSoP-Net1 (a GSoP block in each stage, average pooling) and GSoP-Net2 (GSoP blocks in stages 1-2 and an
iSQRT-COV covariance head). GSoP-Net1 is then exported in Hugging Face Hub layout (``model.safetensors`` + ``config.json``, via
``timm.models.save_for_hf``), reloaded with ``timm.create_model('local-dir:...', pretrained=True)``, and
its predictions on the test set are compared with the trained model's.

Then the warm start (README: "Start from pretrained weights"): a GSoP-Net1 on the first-order network's own
backbone is created from the first-order network's weights with
``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))``; the model's checkpoint
filter starts the GSoP modules that file lacks function-preserving, so before any step it scores exactly what
the first-order network scores. It is fine-tuned for a few epochs and shown next to GSoP-Net1 trained from
scratch, with wall times.

Last, any timm backbone with a covariance head (``timm.create_model('covpool', backbone=...)``): the
first-order network's backbone, the same for every row, once per ``global_pool`` ('avg', 'isqrt' ...), trained
like the rows above. It answers whether a covariance head alone, at the end of this small backbone, recovers
what average pooling misses (docs/demo.md has the measured answer).
"""
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .zoo import count_params, format_table

__all__ = [
    'DemoModel', 'DEMO_MODELS', 'correlation_images', 'correlation_rule_accuracy', 'train_classifier', 'evaluate',
    'export_and_reload', 'warm_start_from', 'head_models', 'run_demo',
]

LABEL_NAMES = ('same sign', 'opposite sign')
# (sign of corr(ch0, ch1), sign of corr(ch1, ch2)) of the four patterns; label = patterns // 2
_SIGN_PATTERNS = ((1, 1), (-1, -1), (1, -1), (-1, 1))


@dataclass(frozen=True)
class DemoModel:
    label: str
    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)


# Three stages of one pre-activation bottleneck each (timm_gsop's CIFAR ResNet family): ~54k parameters.
_TINY = dict(layers=(1, 1, 1), stem_width=16)
DEMO_MODELS: Tuple[DemoModel, ...] = (
    DemoModel('ResNet, first order (avg pool)', 'preresnet164_cifar', dict(_TINY, channels=(10, 21, 42))),
    DemoModel('GSoP-Net1 (GSoP blocks)', 'gsop_preresnet164_cifar', dict(_TINY, channels=(8, 16, 32), gsop_dim=16)),
    DemoModel('GSoP-Net2 (+ iSQRT-COV head)', 'gsop2_preresnet164_cifar',
              dict(_TINY, channels=(8, 16, 32), gsop_dim=24, isqrt_dim=32)),
)
EXPORT_INDEX = 1  # GSoP-Net1
# The covariance-head section: covpool on the first-order network's backbone, one row per global_pool
HEAD_POOLS: Tuple[str, ...] = ('avg', 'isqrt')
HEAD_ISQRT_DIM = 32  # GSoP-Net2's above: 528 covariance features
_HEAD_LABELS = {'avg': 'avg pool', 'isqrt': 'iSQRT-COV head', 'cov': 'cov head (no sqrt)'}


def correlation_images(
        num: int, size: int = 16, corr: float = 0.25, seed: int = 0, smooth: float = 1.2,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``num`` images ``(num, 3, size, size)`` and labels ``(num,)`` of the demo's data set (module doc).

    ``corr`` is the magnitude r of the two channel correlations (|r| < 1/sqrt(2) keeps the correlation matrix
    positive definite); ``smooth`` the standard deviation, in pixels, of the Gaussian that makes the noise
    spatially smooth (the same for every channel, so it does not change the channel correlations).
    """
    if not 0 < corr < 1 / math.sqrt(2):
        raise ValueError(f'corr must be in (0, 0.707), got {corr}')
    g = torch.Generator().manual_seed(seed)
    mats = []
    for a, b in _SIGN_PATTERNS:
        c = torch.eye(3)
        c[0, 1] = c[1, 0] = a * corr
        c[1, 2] = c[2, 1] = b * corr
        mats.append(c)
    mix = torch.linalg.cholesky(torch.stack(mats))  # (4, 3, 3)
    pattern = torch.arange(num) % 4
    pattern = pattern[torch.randperm(num, generator=g)]
    radius = max(1, int(math.ceil(2.5 * smooth)))
    pad = 2 * radius
    noise = torch.randn(num * 3, 1, size + pad, size + pad, generator=g)
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * smooth ** 2))
    k = k / k.sum()
    noise = F.conv2d(F.conv2d(noise, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1)).view(num, 3, size, size)
    x = torch.einsum('nij,njhw->nihw', mix[pattern], noise)
    x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)
    return x.contiguous(), pattern // 2


def _batches(num: int, batch_size: int, generator: torch.Generator):
    perm = torch.randperm(num, generator=generator)
    for i in range(num // batch_size):  # drop the last partial batch (BatchNorm, equal steps per epoch)
        yield perm[i * batch_size:(i + 1) * batch_size]


def train_classifier(
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        epochs: int,
        batch_size: int = 64,
        lr: float = 0.2,
        weight_decay: float = 5e-4,
        seed: int = 0,
        progress: Optional[Any] = None,
) -> float:
    """Train with timm's components: momentum SGD (``create_optimizer_v2``), cosine schedule with one warm-up
    epoch stepped per update (``create_scheduler_v2``), cross-entropy through ``ClassificationTask``.

    ``progress`` is a tqdm bar advanced once per step (or None). Returns the last epoch's mean loss.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.task import ClassificationTask
    from timm.utils import AverageMeter

    steps = len(x) // batch_size
    if steps < 1:
        raise ValueError(f'need at least batch_size={batch_size} training images, got {len(x)}')
    optimizer = create_optimizer_v2(model, opt='momentum', lr=lr, weight_decay=weight_decay, momentum=0.9)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched='cosine', num_epochs=epochs, warmup_epochs=1, warmup_lr=lr / 10, min_lr=lr / 100,
        updates_per_epoch=steps, step_on_epochs=False)
    task = ClassificationTask(model, nn.CrossEntropyLoss(), verbose=False)
    generator = torch.Generator().manual_seed(seed)
    num_updates = 0
    loss_m = AverageMeter()
    for epoch in range(epochs):
        model.train()
        loss_m.reset()
        for idx in _batches(len(x), batch_size, generator):
            loss = task(x[idx], y[idx])['loss']
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            loss_m.update(loss.item(), len(idx))
            if progress is not None:
                progress.set_postfix_str(f'epoch {epoch + 1}/{epochs} loss {loss_m.avg:.3f}', refresh=False)
                progress.update(1)
        scheduler.step(epoch + 1)
    return loss_m.avg


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in %, with timm's ``accuracy``."""
    from timm.utils import accuracy
    return accuracy(predict(model, x), y, topk=(1,))[0].item()


def export_and_reload(model: nn.Module, out_dir: str, x: torch.Tensor, image_size: int) -> Dict[str, Any]:
    """Save ``model`` in Hub layout, reload it through timm's ``local-dir:`` source with ``pretrained=True``
    and compare the predictions on ``x``."""
    import timm
    from timm.models import save_for_hf
    from .export import hf_config_for_loaders

    os.makedirs(out_dir, exist_ok=True)
    save_for_hf(
        model, out_dir, safe_serialization=True,
        model_config=dict(label_names=list(LABEL_NAMES)),
        # the images are already standardised: identity normalisation, no resize or crop
        data_config=dict(input_size=(3, image_size, image_size), mean=(0., 0., 0.), std=(1., 1., 1.),
                         crop_pct=1.0, interpolation='bilinear'),
    )
    hf_config_for_loaders(os.path.join(out_dir, 'config.json'))  # transformers' TimmWrapper loads it too
    # safetensors writes its file 0600; give it the permissions config.json got (the user's umask)
    shutil.copymode(os.path.join(out_dir, 'config.json'), os.path.join(out_dir, 'model.safetensors'))
    source = f'local-dir:{os.path.abspath(out_dir)}'
    reloaded = timm.create_model(source, pretrained=True)
    logits, logits_reloaded = predict(model, x), predict(reloaded, x)
    same = (logits.argmax(1) == logits_reloaded.argmax(1)).sum().item()
    return dict(
        source=source,
        files=sorted(os.listdir(out_dir)),
        same_predictions=same,
        total=len(x),
        max_abs_diff=(logits - logits_reloaded).abs().max().item(),
        ok=same == len(x) and torch.allclose(logits, logits_reloaded, rtol=1e-4, atol=1e-5),
        reloaded=reloaded,
    )


def warm_start_from(first_order: nn.Module, spec: DemoModel, out_dir: str) -> nn.Module:
    """GSoP-Net1 on ``first_order``'s backbone, warm-started from its weights the way a user would: save them,
    then ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))``.
    ``spec`` is the first-order model's; the GSoP blocks use its widths (``gsop_dim`` = its first stage's)."""
    import warnings

    import safetensors.torch
    import timm
    from .models import WarmStartWarning

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'first_order.safetensors')
    safetensors.torch.save_file(first_order.state_dict(), path)
    kwargs = dict(spec.kwargs, gsop_dim=spec.kwargs['channels'][0])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', WarmStartWarning)  # the demo prints its own line
        return timm.create_model(
            'gsop_preresnet164_cifar', pretrained=True, num_classes=len(LABEL_NAMES),
            pretrained_cfg_overlay=dict(file=path, num_classes=len(LABEL_NAMES)), **kwargs)


def head_models(
        pools: Sequence[str] = HEAD_POOLS, backbone: DemoModel = DEMO_MODELS[0], isqrt_dim: int = HEAD_ISQRT_DIM,
) -> Tuple[DemoModel, ...]:
    """One ``covpool`` model per pooling in ``pools`` on ``backbone``'s network (its name and kwargs; the first-order
    ResNet by default): the backbone is the same in every row, only ``global_pool`` differs."""
    from .layers.cov_pool import POOL_TYPES
    unknown = [p for p in pools if p not in POOL_TYPES or not p]
    if unknown:
        raise ValueError(f'unknown head pooling {unknown}; valid: {", ".join(p for p in POOL_TYPES if p)}')
    return tuple(
        DemoModel(f'Same backbone + {_HEAD_LABELS.get(pool, f"{pool} pool")}', 'covpool',
                  dict(backbone.kwargs, backbone=backbone.name, global_pool=pool, isqrt_dim=isqrt_dim))
        for pool in pools)


def correlation_rule_accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy (%) of the hand-written second-order rule: the sign of corr(ch0, ch1) * corr(ch1, ch2), each
    correlation measured over the image's pixels. No learning; a yardstick for the networks."""
    flat = x.flatten(2)
    flat = (flat - flat.mean(-1, keepdim=True)) / flat.std(-1, keepdim=True)
    corr = flat @ flat.transpose(1, 2) / (flat.shape[-1] - 1)
    predicted = (corr[:, 0, 1] * corr[:, 1, 2] < 0).long()
    return (predicted == y).float().mean().item() * 100


def run_demo(
        epochs: int = 6,
        seed: int = 0,
        out: Optional[str] = 'timm-gsop-demo',
        train_samples: int = 3000,
        test_samples: int = 1000,
        image_size: int = 16,
        batch_size: int = 64,
        corr: float = 0.25,
        models: Sequence[DemoModel] = DEMO_MODELS,
        export_index: Optional[int] = EXPORT_INDEX,
        progress: bool = True,
        stream=None,
        threads: Optional[int] = None,
        finetune_epochs: int = 3,
        head_pools: Sequence[str] = HEAD_POOLS,
) -> Dict[str, Any]:
    """Run the demo; returns ``dict(rows=[...], export=..., warm_start=..., heads=[...])``. Each row: label, name,
    params, accuracy (%), train_seconds, final_loss. ``export`` is None when ``out`` or ``export_index`` is None;
    ``warm_start`` (accuracy before any step and after ``finetune_epochs``, seconds) is None when
    ``finetune_epochs`` is 0 or the first model is not the first-order one. ``heads``: the rows of
    :func:`head_models` on the first model's backbone, one per pooling in ``head_pools`` (empty: no such
    section, ``[]``), plus global_pool and final_map (the map the head pools, ``(H, W)``). ``threads``: torch CPU
    threads while it runs (None: leave as is)."""
    if epochs < 1 or finetune_epochs < 0:
        raise ValueError(f'epochs must be >= 1 and finetune_epochs >= 0, got {epochs} and {finetune_epochs}')
    heads = head_models(head_pools, models[0]) if head_pools else ()  # bad names fail before any training
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_demo(epochs, seed, out, train_samples, test_samples, image_size, batch_size, corr, models,
                         export_index, progress, stream, finetune_epochs, heads)
    finally:
        torch.set_num_threads(saved_threads)


def _run_demo(epochs, seed, out, train_samples, test_samples, image_size, batch_size, corr, models, export_index,
              progress, stream, finetune_epochs, heads) -> Dict[str, Any]:
    import timm_gsop  # noqa: F401 (registers the models)

    stream = stream or sys.stdout
    say = lambda msg='': print(msg, file=stream, flush=True)
    x_train, y_train = correlation_images(train_samples, image_size, corr, seed=seed)
    x_test, y_test = correlation_images(test_samples, image_size, corr, seed=seed + 1_000_003)
    say(f'Data: {train_samples} train / {test_samples} test images, 3x{image_size}x{image_size}; each channel '
        f'standardised per image; label = whether corr(ch0, ch1) and corr(ch1, ch2) (|r| = {corr}) share a sign.')
    say(f'Training {len(models)} models for {epochs} epochs each (batch {batch_size}, momentum SGD, cosine '
        f'schedule) on {torch.get_num_threads()} CPU thread(s).')

    rows, trained = _train_rows(models, x_train, y_train, x_test, y_test, epochs, batch_size, seed, progress)
    say()
    say(_rows_table(rows))
    say(f'Chance: 50.0%. No first-order statistic helps: every channel has mean 0 and variance 1 in every image. '
        f'The hand-written rule sign(corr(ch0, ch1) x corr(ch1, ch2)), measured on each test image\'s pixels, '
        f'gets {correlation_rule_accuracy(x_test, y_test):.1f}%.')

    export = None
    if out is not None and export_index is not None:
        spec = models[export_index]
        export = export_and_reload(trained[export_index], out, x_test, image_size)
        say()
        say(f'Exported {spec.label} to {os.path.abspath(out)} ({", ".join(export["files"])}) with '
            f'timm.models.save_for_hf.')
        say(f"Reloaded with timm.create_model('{export['source']}', pretrained=True): "
            f"{export['same_predictions']}/{export['total']} test predictions identical, max |logit difference| "
            f"{export['max_abs_diff']:.2e} -> {'OK' if export['ok'] else 'MISMATCH'}")
    warm = None
    if finetune_epochs and models[0].name == 'preresnet164_cifar':
        warm = _warm_start_section(trained[0], models[0], rows, x_train, y_train, x_test, y_test, finetune_epochs,
                                   batch_size, seed, progress, say)
    head_rows = []
    if heads:
        head_rows = _heads_section(heads, x_train, y_train, x_test, y_test, epochs, batch_size, seed, progress, say)
    return dict(rows=rows, export=export, models=trained, rule_accuracy=correlation_rule_accuracy(x_test, y_test),
                warm_start=warm, heads=head_rows)


def _train_rows(models, x_train, y_train, x_test, y_test, epochs, batch_size, seed, progress):
    """Each model of ``models`` created after ``torch.manual_seed(seed)`` and trained on the same batches: its row
    and the trained model."""
    import timm
    steps = len(x_train) // batch_size * epochs
    rows, trained = [], []
    for spec in models:
        torch.manual_seed(seed)
        model = timm.create_model(spec.name, num_classes=len(LABEL_NAMES), **spec.kwargs)
        params = count_params(model)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc=f'{spec.label[:30]:30s}', unit='step', leave=True, file=sys.stderr,
                       dynamic_ncols=True, mininterval=0.5)
        start = time.perf_counter()
        try:
            final_loss = train_classifier(model, x_train, y_train, epochs, batch_size=batch_size, seed=seed,
                                          progress=bar)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        acc = evaluate(model, x_test, y_test)
        rows.append(dict(label=spec.label, name=spec.name, params=params, accuracy=acc, train_seconds=seconds,
                         final_loss=final_loss))
        trained.append(model)
    return rows, trained


def _rows_table(rows) -> str:
    return format_table(
        ('model', 'timm name', 'params', 'test acc.', 'train time', 'final loss'),
        [(r['label'], r['name'], f"{r['params']:,}", f"{r['accuracy']:.1f}%", f"{r['train_seconds']:.1f} s",
          f"{r['final_loss']:.3f}") for r in rows])


def _heads_section(heads, x_train, y_train, x_test, y_test, epochs, batch_size, seed, progress, say):
    rows, trained = _train_rows(heads, x_train, y_train, x_test, y_test, epochs, batch_size, seed, progress)
    with torch.no_grad():  # the map the head pools: the backbone's output on one image
        final_map = tuple(trained[0].eval().forward_features(x_test[:1]).shape[-2:])
    for row, spec in zip(rows, heads):
        row.update(global_pool=spec.kwargs['global_pool'], final_map=final_map)
    backbone = heads[0].kwargs['backbone']
    say()
    say(f"Any timm backbone: covariance head vs average pooling. timm.create_model('covpool', backbone="
        f"'{backbone}', global_pool=...) on the first-order network's backbone (the same in every row, trained "
        f'as above); only the head differs. It pools a {final_map[0]}x{final_map[1]} map of '
        f"{trained[0].num_features} channels; the covariance heads reduce it to isqrt_dim="
        f"{heads[0].kwargs['isqrt_dim']} first.")
    say(_rows_table(rows))
    return rows


def _warm_start_section(first_order, spec, rows, x_train, y_train, x_test, y_test, epochs, batch_size, seed,
                        progress, say) -> Dict[str, Any]:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        torch.manual_seed(seed)  # the GSoP modules' initialisation, as each model's above: not the RNG's leftovers
        model = warm_start_from(first_order, spec, tmp)
        create_seconds = time.perf_counter() - start
    before = evaluate(model, x_test, y_test)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(x_train) // batch_size * epochs, desc=f'{"GSoP-Net1, warm start":30s}', unit='step',
                   file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    start = time.perf_counter()
    try:
        # the from-scratch schedule (one warm-up epoch, cosine), a few epochs: the backbone starts trained
        train_classifier(model, x_train, y_train, epochs, batch_size=batch_size, seed=seed, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    after = evaluate(model, x_test, y_test)
    first, scratch = rows[0], next((r for r in rows if r['name'] == 'gsop_preresnet164_cifar'), None)
    table = [(first['label'], f"{first['accuracy']:.1f}%", f"{first['train_seconds']:.1f} s"),
             ('GSoP-Net1, warm start, 0 steps', f'{before:.1f}%', f'{create_seconds:.1f} s (create + load)'),
             (f'GSoP-Net1, warm start + {epochs} epochs', f'{after:.1f}%', f'{seconds:.1f} s')]
    if scratch is not None:
        table.append(('GSoP-Net1 from scratch (above)', f"{scratch['accuracy']:.1f}%", f"{scratch['train_seconds']:.1f} s"))
    say()
    say("Warm start: GSoP-Net1 on the first-order network's backbone, created from its weights with "
        "timm.create_model('gsop_preresnet164_cifar', pretrained=True, pretrained_cfg_overlay=dict(file=...)): "
        'its GSoP gates start at 0.5 and what they scale is doubled, so before any step it computes what the '
        'first-order network computes.')
    say(format_table(('model', 'test acc.', 'time'), table))
    return dict(accuracy_before=before, accuracy_after=after, seconds=seconds, epochs=epochs,
                params=count_params(model), model=model)
