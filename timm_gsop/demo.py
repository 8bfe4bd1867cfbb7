"""``timm-gsop demo``: GSoP-Nets against a same-size first-order ResNet on data that only second-order statistics
separate, then export, warm start and covariance heads, on CPU with no data or network. A worked example: read
``run_demo`` top to bottom. The data (``correlation_images``): smooth 3-channel noise mixed so that corr(ch0, ch1)
and corr(ch1, ch2) are each +r or -r, every channel of every image standardised; the label is whether the two
share a sign. The networks (``DEMO_MODELS``) are timm_gsop's CIFAR ResNet with one bottleneck per stage, within 1%
of the same parameter count, trained with timm's optimiser, scheduler and task on the same batches.
"""
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, TextIO, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm

from .zoo import format_table

__all__ = ['DemoModel', 'DEMO_MODELS', 'DemoConfig', 'correlation_images', 'train_classifier', 'evaluate', 'run_demo']

LABEL_NAMES = ('same sign', 'opposite sign')
_SIGN_PATTERNS = ((1, 1), (-1, -1), (1, -1), (-1, 1))  # signs of (corr(ch0, ch1), corr(ch1, ch2)); label = index // 2


@dataclass(frozen=True)
class DemoModel:
    label: str
    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)


# three stages of one pre-activation bottleneck each: ~54k parameters
_TINY = dict(layers=(1, 1, 1), stem_width=16)
DEMO_MODELS: Tuple[DemoModel, ...] = (
    DemoModel('ResNet, first order (avg pool)', 'preresnet164_cifar', dict(_TINY, channels=(10, 21, 42))),
    DemoModel('GSoP-Net1 (GSoP blocks)', 'gsop_preresnet164_cifar', dict(_TINY, channels=(8, 16, 32), gsop_dim=16)),
    DemoModel('GSoP-Net2 (+ iSQRT-COV head)', 'gsop2_preresnet164_cifar',
              dict(_TINY, channels=(8, 16, 32), gsop_dim=24, isqrt_dim=32)),
)


@dataclass
class DemoConfig:
    """What the demo runs; the defaults are ``timm-gsop demo``'s."""
    epochs: int = 6
    seed: int = 0
    out: Optional[str] = 'timm-gsop-demo'  # where GSoP-Net1 is exported (None: no export)
    train_samples: int = 3000
    test_samples: int = 1000
    image_size: int = 16
    batch_size: int = 64
    corr: float = 0.25  # magnitude r of the two channel correlations (smaller is harder)
    threads: int = 1  # these small networks gain little from more, and lose much on a busy machine
    finetune_epochs: int = 3  # after the warm start (0: no warm start)
    heads: Tuple[str, ...] = ('avg', 'isqrt')  # covpool's global_pool per row of the last section (): none
    head_isqrt_dim: int = 32
    head_last_stride: int = 1  # a covariance head needs positions: 8x8 rather than 4x4 (docs/demo.md)
    models: Sequence[DemoModel] = DEMO_MODELS
    progress: bool = True


def correlation_images(num: int, size: int = 16, corr: float = 0.25, seed: int = 0,
                       smooth: float = 1.2) -> Tuple[torch.Tensor, torch.Tensor]:
    """``num`` images ``(num, 3, size, size)`` and labels; ``smooth``: the Gaussian blur (pixels) of the noise."""
    if not 0 < corr < 1 / math.sqrt(2):  # beyond it the correlation matrix is not positive definite
        raise ValueError(f'corr must be in (0, 0.707), got {corr}')
    g = torch.Generator().manual_seed(seed)
    mats = torch.eye(3).repeat(4, 1, 1)
    for mat, (a, b) in zip(mats, _SIGN_PATTERNS):
        mat[0, 1] = mat[1, 0] = a * corr
        mat[1, 2] = mat[2, 1] = b * corr
    pattern = (torch.arange(num) % 4)[torch.randperm(num, generator=g)]
    radius = max(1, int(math.ceil(2.5 * smooth)))
    noise = torch.randn(num * 3, 1, size + 2 * radius, size + 2 * radius, generator=g)
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * smooth ** 2))
    k = k / k.sum()
    noise = F.conv2d(F.conv2d(noise, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1)).view(num, 3, size, size)
    x = torch.einsum('nij,njhw->nihw', torch.linalg.cholesky(mats)[pattern], noise)
    return ((x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)).contiguous(), pattern // 2


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int = 64,
                     lr: float = 0.2, seed: int = 0, desc: Optional[str] = None) -> float:
    """Momentum SGD (wd 5e-4), cosine schedule after one warm-up epoch, stepped per update; the last epoch's loss."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.task import ClassificationTask
    from tqdm.auto import tqdm
    steps = len(x) // batch_size  # the last partial batch is dropped (BatchNorm, equal steps per epoch)
    optimizer = create_optimizer_v2(model, opt='momentum', lr=lr, weight_decay=5e-4, momentum=0.9)
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=epochs, warmup_epochs=1,
                                       warmup_lr=lr / 10, min_lr=lr / 100, updates_per_epoch=steps,
                                       step_on_epochs=False)
    task = ClassificationTask(model, nn.CrossEntropyLoss(), verbose=False)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps * epochs, desc=f'{desc or "":30.30s}', unit='step', file=sys.stderr, disable=not desc)
    for epoch in range(epochs):
        model.train()
        perm, losses = torch.randperm(len(x), generator=generator), []
        for i in range(steps):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = task(x[idx], y[idx])['loss']
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step_update(num_updates=epoch * steps + i + 1)
            losses.append(loss.item())
            bar.update(1)
        scheduler.step(epoch + 1)
    bar.close()
    return sum(losses) / len(losses)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.eval()(x[i:i + 250]) for i in range(0, len(x), 250)])


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in %, with timm's ``accuracy``."""
    from timm.utils import accuracy
    return accuracy(predict(model, x), y, topk=(1,))[0].item()


def _train_rows(cfg: DemoConfig, models: Sequence[DemoModel], data) -> Tuple[list, list]:
    """Each model created after ``torch.manual_seed(cfg.seed)`` and trained on the same batches: rows, models."""
    (x_train, y_train), (x_test, y_test) = data
    rows, trained = [], []
    for spec in models:
        torch.manual_seed(cfg.seed)
        model = timm.create_model(spec.name, num_classes=len(LABEL_NAMES), **spec.kwargs)
        start = time.perf_counter()
        loss = train_classifier(model, x_train, y_train, cfg.epochs, cfg.batch_size, seed=cfg.seed,
                                desc=spec.label if cfg.progress else None)
        rows.append(dict(label=spec.label, name=spec.name, params=sum(p.numel() for p in model.parameters()),
                         accuracy=evaluate(model, x_test, y_test), seconds=time.perf_counter() - start, loss=loss))
        trained.append(model)
    return rows, trained


def _table(rows) -> str:
    return format_table(('model', 'timm name', 'params', 'test acc.', 'train time', 'final loss'), [
        (r['label'], r['name'], f"{r['params']:,}", f"{r['accuracy']:.1f}%", f"{r['seconds']:.1f} s",
         f"{r['loss']:.3f}") for r in rows])


def run_demo(cfg: DemoConfig = DemoConfig(), stream: Optional[TextIO] = None) -> Dict[str, Any]:
    """Run the demo, printing as it goes; returns ``dict(rows, models, export, warm_start, heads)``."""
    from .layers.cov_pool import POOL_TYPES
    say = lambda text='': print(text, file=stream or sys.stdout, flush=True)
    bad = [p for p in cfg.heads if p not in POOL_TYPES or not p]
    if bad or cfg.epochs < 1 or cfg.finetune_epochs < 0:  # before any training
        raise ValueError(f'bad demo settings: heads {bad} (valid: {", ".join(filter(None, POOL_TYPES))}), '
                         f'epochs {cfg.epochs}, finetune_epochs {cfg.finetune_epochs}')
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        x_test, y_test = correlation_images(cfg.test_samples, cfg.image_size, cfg.corr, seed=cfg.seed + 1_000_003)
        data = (correlation_images(cfg.train_samples, cfg.image_size, cfg.corr, seed=cfg.seed), (x_test, y_test))
        say(f'Data: {cfg.train_samples} train / {cfg.test_samples} test images, 3x{cfg.image_size}x{cfg.image_size}, '
            f'each channel standardised; label: do corr(ch0, ch1) and corr(ch1, ch2) (|r| = {cfg.corr}) share a sign? '
            f'{cfg.epochs} epochs (batch {cfg.batch_size}, momentum SGD, cosine), {cfg.threads} CPU thread(s).\n')
        rows, models = _train_rows(cfg, cfg.models, data)
        say(_table(rows))
        flat = x_test.flatten(2)  # the hand-written second-order rule on each test image's own pixels
        corr = flat @ flat.transpose(1, 2) / (flat.shape[-1] - 1)
        rule = ((corr[:, 0, 1] * corr[:, 1, 2] < 0).long() == y_test).float().mean().item() * 100
        say(f'Chance: 50.0%; no first-order statistic helps. The rule sign(corr(ch0, ch1) x corr(ch1, ch2)) on each '
            f"test image's pixels: {rule:.1f}%. GSoP-Net2's head pools a stride-1 last stage, as on ImageNet.")
        result = dict(rows=rows, models=models, export=None, warm_start=None, heads=[])

        # export GSoP-Net1 as a Hub folder (timm's save_for_hf) and reload it through timm's local-dir: source
        gsop1 = next((i for i, m in enumerate(cfg.models) if m.name == 'gsop_preresnet164_cifar'), None)
        if cfg.out is not None and gsop1 is not None:
            from timm.models import save_for_hf
            save_for_hf(models[gsop1], cfg.out, safe_serialization=True,
                        model_config=dict(label_names=list(LABEL_NAMES)),  # the images are standardised already:
                        data_config=dict(input_size=(3, cfg.image_size, cfg.image_size), mean=(0., 0., 0.),
                                         std=(1., 1., 1.), crop_pct=1.0, interpolation='bilinear'))
            source = f'local-dir:{os.path.abspath(cfg.out)}'
            reloaded = predict(timm.create_model(source, pretrained=True), x_test)
            result['export'] = dict(source=source, files=sorted(os.listdir(cfg.out)),
                                    ok=torch.equal(predict(models[gsop1], x_test), reloaded))
            say(f"\nExported GSoP-Net1 with timm's save_for_hf, reloaded with timm.create_model('{source}', "
                f"pretrained=True): {'the same logits' if result['export']['ok'] else 'OTHER LOGITS'}.")

        # warm start: GSoP-Net1 on the first-order network's backbone, from its file, as a user would
        first = cfg.models[0]
        if cfg.finetune_epochs and first.name == 'preresnet164_cifar':
            import safetensors.torch
            with tempfile.TemporaryDirectory() as tmp:  # its WarmStartWarning says what was initialised
                path = os.path.join(tmp, 'first_order.safetensors')
                safetensors.torch.save_file(models[0].state_dict(), path)
                torch.manual_seed(cfg.seed)  # the GSoP modules' initialisation, as each model's above
                model = timm.create_model(
                    'gsop_preresnet164_cifar', pretrained=True, num_classes=len(LABEL_NAMES),
                    pretrained_cfg_overlay=dict(file=path, num_classes=len(LABEL_NAMES)),
                    **dict(first.kwargs, gsop_dim=first.kwargs['channels'][0]))
            before = evaluate(model, x_test, y_test)
            train_classifier(model, *data[0], cfg.finetune_epochs, cfg.batch_size, seed=cfg.seed,
                             desc='GSoP-Net1, warm start' if cfg.progress else None)
            after = evaluate(model, x_test, y_test)
            result['warm_start'] = dict(model=model, accuracy_before=before, accuracy_after=after)
            say("\nWarm start: timm.create_model('gsop_preresnet164_cifar', pretrained=True, pretrained_cfg_overlay="
                "dict(file=...)) from the first-order network: gates at 0.5, what they scale doubled, same strides.")
            scratch = [(f"{r['label']} from scratch", f"{r['accuracy']:.1f}%") for r in rows if 'gsop_' in r['name']]
            say(format_table(('model', 'test acc.'), [
                (rows[0]['label'], f"{rows[0]['accuracy']:.1f}%"), ('GSoP-Net1, warm start, 0 steps', f'{before:.1f}%'),
                (f'GSoP-Net1, warm start + {cfg.finetune_epochs} epochs', f'{after:.1f}%'), *scratch]))

        # any timm backbone: the first-order network's backbone under covpool, once per head
        if cfg.heads:
            heads = [DemoModel(f'Same backbone + {pool} head', 'covpool', dict(
                first.kwargs, backbone=first.name, global_pool=pool, isqrt_dim=cfg.head_isqrt_dim,
                last_stride=cfg.head_last_stride)) for pool in cfg.heads]
            result['heads'], head_models = _train_rows(cfg, heads, data)
            final_map = tuple(head_models[0].eval().forward_features(x_test[:1]).shape[-2:])
            say(f"\nAny timm backbone: timm.create_model('covpool', backbone='{first.name}', global_pool=..., "
                f'last_stride={cfg.head_last_stride}), the first-order network trained with each head, which pools '
                f'its {final_map[0]}x{final_map[1]} map of {head_models[0].num_features} channels (a covariance '
                f'head reduces it to {cfg.head_isqrt_dim} first).')
            say(_table(result['heads']))
        return result
    finally:
        torch.set_num_threads(saved_threads)
