"""What timm's train.py / validate.py do with a model, done with the installed timm on GSoP-Nets.

train.py itself lives in the timm repository, not in the wheel (and CI has no network), so each test makes
the calls train.py makes, in its order and with its arguments: the factory call with every kwarg it passes
(``--model-kwargs`` included), ``resolve_data_config``, ``create_dataset`` / ``create_loader`` on an
ImageFolder, ``create_optimizer_v2`` (``--layer-decay`` through ``group_matcher``), ``create_scheduler_v2``
(the shipped recipes' multistep schedules), bf16 autocast, ``ModelEmaV3`` through ``ClassificationTask``,
gradient checkpointing, channels_last, ``torch.compile``, ``CheckpointSaver`` and resume, and a few real
optimisation steps.

Tiny models keep it fast: the GSoP-Nets at 1/8 width (channels 8..64, d = 8) on 32x32 images.
"""
import argparse
import bisect
import copy
import math
import os

import pytest
import torch
import torch.nn as nn
import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset, create_loader, \
    resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.models import load_checkpoint
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import CheckpointSaver, ModelEmaV3, ParseKwargs

import timm_gsop
from timm_gsop import GSoPFusion, ISqrtCovPool, create_gsop
from timm_gsop.recipes import list_recipes, load_recipe, recipe_path
from conftest import write_image_folder

NET1, NET2 = 'gsop_resnet50', 'gsop2_resnet50'
# 1/8 width: ~0.4M parameters; every GSoP block and the iSQRT-COV head are still there
TINY_KWARGS = ['channels=(8,16,32,64)', 'stem_width=8', 'gsop_dim=8']
TINY = dict(channels=(8, 16, 32, 64), stem_width=8, gsop_dim=8)
TINY2 = dict(TINY, isqrt_dim=8)
TINY_RESNET = dict(channels=(8, 16, 32, 64))  # a ResNet-50 whose widths match TINY's
IMG = 32

# Every option of timm's train.py (its argparse dests): a recipe key outside this set would be silently
# ignored by train.py's `parser.set_defaults(**yaml)`.
TRAIN_PY_OPTIONS = {
    'aa', 'amp', 'amp_dtype', 'aug_repeats', 'aug_splits', 'batch_size', 'bce_loss', 'bce_pos_weight', 'bce_sum',
    'bce_target_thresh', 'bn_eps', 'bn_momentum', 'channels_last', 'checkpoint_hist', 'class_map', 'clip_grad',
    'clip_mode', 'color_jitter', 'color_jitter_prob', 'cooldown_epochs', 'crop_pct', 'cutmix', 'cutmix_minmax',
    'data', 'data_dir', 'dataset', 'dataset_download', 'dataset_trust_remote_code', 'decay_epochs',
    'decay_milestones', 'decay_rate', 'device', 'device_modules', 'dist_bn', 'drop', 'drop_block', 'drop_connect',
    'drop_path', 'epoch_repeats', 'epochs', 'eval_metric', 'experiment', 'fast_norm', 'fuser', 'gaussian_blur_prob',
    'gp', 'grad_accum_steps', 'grad_checkpointing', 'grayscale_prob', 'head_init_bias', 'head_init_scale', 'hflip',
    'img_size', 'in_chans', 'initial_checkpoint', 'input_img_mode', 'input_key', 'input_size', 'interpolation',
    'jsd_loss', 'layer_decay', 'layer_decay_min_scale', 'layer_decay_no_opt_scale', 'local_rank', 'log_interval',
    'lr', 'lr_base', 'lr_base_scale', 'lr_base_size', 'lr_cycle_decay', 'lr_cycle_limit', 'lr_cycle_mul',
    'lr_k_decay', 'lr_noise', 'lr_noise_pct', 'lr_noise_std', 'mean', 'min_lr', 'mixup', 'mixup_mode',
    'mixup_off_epoch', 'mixup_prob', 'mixup_switch_prob', 'model', 'model_dtype', 'model_ema', 'model_ema_decay',
    'model_ema_force_cpu', 'model_ema_warmup', 'model_kwargs', 'momentum', 'no_aug', 'no_ddp_bb', 'no_prefetcher',
    'no_resume_opt', 'num_classes', 'opt', 'opt_betas', 'opt_eps', 'opt_kwargs', 'output', 'patience_epochs',
    'pin_mem', 'pretrained', 'pretrained_path', 'ratio', 'recount', 'recovery_interval', 'remode', 'reprob',
    'resplit', 'resume', 'save_images', 'scale', 'sched', 'sched_on_updates', 'seed', 'smoothing', 'split_bn',
    'start_epoch', 'std', 'sync_bn', 'synchronize_step', 'target_key', 'torchcompile', 'torchcompile_mode',
    'torchscript', 'train_crop_mode', 'train_interpolation', 'train_num_samples', 'train_split', 'tta',
    'use_multi_epochs_loader', 'val_interval', 'val_num_samples', 'val_split', 'validation_batch_size', 'vflip',
    'warmup_epochs', 'warmup_lr', 'warmup_prefix', 'weight_decay', 'worker_seeding', 'workers',
}

# train.py's defaults for the options these tests read (what a run without --config gets)
TRAIN_PY_DEFAULTS = dict(
    model='resnet50', pretrained=False, pretrained_path=None, initial_checkpoint='', num_classes=None, gp=None,
    img_size=None, in_chans=None, input_size=None, crop_pct=None, mean=None, std=None, interpolation='',
    batch_size=128, drop=0.0, drop_path=None, drop_block=None, bn_momentum=None, bn_eps=None, torchscript=False,
    model_kwargs={}, opt='sgd', opt_eps=None, opt_betas=None, momentum=0.9, weight_decay=2e-5, layer_decay=None,
    layer_decay_min_scale=0, layer_decay_no_opt_scale=None, opt_kwargs={}, sched='cosine', sched_on_updates=False,
    lr=None, lr_base=0.1, lr_base_size=256, lr_base_scale='', warmup_lr=1e-5, min_lr=0, epochs=300,
    decay_milestones=[90, 180, 270], decay_epochs=90, warmup_epochs=5, warmup_prefix=False, cooldown_epochs=0,
    patience_epochs=10, decay_rate=0.1, seed=42, no_aug=False, scale=[0.08, 1.0], ratio=[3. / 4., 4. / 3.],
    hflip=0.5, vflip=0.0, color_jitter=0.4, color_jitter_prob=None, grayscale_prob=None, gaussian_blur_prob=None,
    aa=None, reprob=0.0, remode='pixel', recount=1, resplit=False, mixup=0.0, cutmix=0.0, smoothing=0.1,
    train_interpolation='random', train_crop_mode=None, aug_repeats=0, workers=4, grad_accum_steps=1,
)



pytestmark = pytest.mark.usefixtures('one_thread')


def train_args(recipe=None, argv=(), **overrides):
    """train.py's argument namespace: defaults, then a recipe (--config), then `argv` / overrides."""
    values = dict(TRAIN_PY_DEFAULTS)
    if recipe:
        values.update(load_recipe(recipe))
    values.update(overrides)
    parser = argparse.ArgumentParser()
    parser.add_argument('--model-kwargs', nargs='*', default=values.pop('model_kwargs'), action=ParseKwargs)
    args = parser.parse_args(list(argv))
    for k, v in values.items():
        setattr(args, k, v)
    return args


def create_model_like_train_py(args, **factory_kwargs):
    """The exact `create_model(...)` call of train.py (in_chans from --in-chans / --input-size)."""
    in_chans = 3
    if args.in_chans is not None:
        in_chans = args.in_chans
    elif args.input_size is not None:
        in_chans = args.input_size[0]
    if args.pretrained_path:
        factory_kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    return timm.create_model(
        args.model,
        pretrained=args.pretrained,
        in_chans=in_chans,
        num_classes=args.num_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        drop_block_rate=args.drop_block,
        global_pool=args.gp,
        bn_momentum=args.bn_momentum,
        bn_eps=args.bn_eps,
        scriptable=args.torchscript,
        checkpoint_path=args.initial_checkpoint,
        **factory_kwargs,
        **args.model_kwargs,
    )


def tiny(name=NET1, num_classes=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes, **dict(TINY2 if name == NET2 else TINY, **kwargs))


def batch(n=8, num_classes=4, seed=0, size=IMG):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)


# ---- the factory call ---------------------------------------------------------------------------------

@pytest.mark.parametrize('name', [NET1, NET2])
def test_create_model_call_of_train_py_with_model_kwargs(name):
    extra = ['isqrt_dim=8'] if name == NET2 else []
    args = train_args(
        argv=['--model-kwargs', *TINY_KWARGS, *extra, 'gsop_manner=fusion_avg', 'gsop_stages=(1,1,0,0)'],
        model=name, num_classes=5, drop=0.25, drop_path=0.05, bn_momentum=0.01, bn_eps=1e-3)
    assert args.model_kwargs['gsop_manner'] == 'fusion_avg' and args.model_kwargs['channels'] == (8, 16, 32, 64)
    model = create_model_like_train_py(args)

    assert model.num_classes == 5 and model.drop_rate == 0.25
    assert model.gsop_manner == 'fusion_avg'
    # gsop_stages=(1,1,0,0): GSoP modules in the last block of stages 1-2 only
    assert [isinstance(stage[-1].se, GSoPFusion) for stage in (model.layer1, model.layer2, model.layer3,
                                                               model.layer4)] == [True, True, False, False]
    assert model.layer1[-1].se.channel.dim == 8
    assert isinstance(model.global_pool, ISqrtCovPool) == (name == NET2)
    # --bn-momentum / --bn-eps reach every BatchNorm, the GSoP blocks' included
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    gsop_bns = [m for m in model.layer1[-1].se.modules() if isinstance(m, nn.BatchNorm2d)]
    assert gsop_bns and all(m.momentum == 0.01 and m.eps == 1e-3 for m in bns)
    # --drop-path: stochastic depth in the blocks
    assert any(type(m).__name__ == 'DropPath' for m in model.modules())
    x, _ = batch(2)
    assert model(x).shape == (2, 5)


def test_create_model_defaults_of_train_py_and_gp_override():
    # train.py passes None for every unset option: the model's own defaults must stay in effect
    model = create_model_like_train_py(train_args(model=NET2, argv=['--model-kwargs', *TINY_KWARGS, 'isqrt_dim=8']))
    assert model.num_classes == 1000 and isinstance(model.global_pool, ISqrtCovPool)
    model = create_model_like_train_py(
        train_args(model=NET2, gp='avg', num_classes=3, argv=['--model-kwargs', *TINY_KWARGS]))
    assert model.global_pool.pool_type == 'avg' and model.fc.in_features == 64 * 4
    assert model(batch(2)[0]).shape == (2, 3)


def test_initial_checkpoint_and_pretrained_path(tmp_path):
    """--initial-checkpoint (checkpoint_path) loads a train.py checkpoint; --pretrained-path loads a file
    through the pretrained path with head adaptation (num_classes=-1 in the overlay)."""
    src = tiny(num_classes=4, seed=1)
    torch.save({'state_dict': src.state_dict(), 'epoch': 3}, tmp_path / 'ckpt.pth.tar')
    args = train_args(model=NET1, num_classes=4, initial_checkpoint=str(tmp_path / 'ckpt.pth.tar'),
                      argv=['--model-kwargs', *TINY_KWARGS])
    model = create_model_like_train_py(args)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)

    torch.save(src.state_dict(), tmp_path / 'weights.pth')
    args = train_args(model=NET1, num_classes=7, pretrained=True, pretrained_path=str(tmp_path / 'weights.pth'),
                      argv=['--model-kwargs', *TINY_KWARGS])
    model = create_model_like_train_py(args)
    assert model.fc.out_features == 7
    torch.testing.assert_close(model.layer3[-1].se.gate.conv_row.weight, src.layer3[-1].se.gate.conv_row.weight)
    torch.testing.assert_close(model.conv1.weight, src.conv1.weight)


# ---- data ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """A tiny ImageFolder: train/ and validation/, 2 classes, 40x48 RGB PNGs."""
    return write_image_folder(tmp_path_factory.mktemp('imagefolder'))


def test_resolve_data_config_like_train_py():
    model = tiny()
    cfg = resolve_data_config(vars(train_args()), model=model)
    assert cfg['input_size'] == (3, 224, 224) and cfg['interpolation'] == 'bilinear'
    assert cfg['crop_pct'] == 0.875 and cfg['mean'] == IMAGENET_DEFAULT_MEAN and cfg['std'] == IMAGENET_DEFAULT_STD
    for recipe in ('gsop_resnet50_in1k', 'gsop2_resnet50_in1k'):  # the recipes restate the released values
        assert resolve_data_config(vars(train_args(recipe)), model=model) == cfg
    cfg = resolve_data_config(vars(train_args(img_size=IMG)), model=model)
    assert cfg['input_size'] == (3, IMG, IMG) and cfg['crop_pct'] == 0.875


@pytest.mark.parametrize('prefetcher', [True, False])
def test_dataset_and_loaders_like_train_py(image_folder, prefetcher):
    args = train_args('gsop_resnet50_in1k', img_size=IMG, batch_size=4, workers=0)
    model = tiny()
    data_config = resolve_data_config(vars(args), model=model)
    device = torch.device('cpu')
    dataset_train = create_dataset('', root=str(image_folder), split='train', is_training=True,
                                   batch_size=args.batch_size, seed=args.seed)
    dataset_eval = create_dataset('', root=str(image_folder), split='validation', is_training=False,
                                  batch_size=args.batch_size)
    assert len(dataset_train) == 12 and len(dataset_eval) == 6
    common = dict(mean=data_config['mean'], std=data_config['std'], pin_memory=False, img_dtype=torch.float32,
                  device=device, distributed=False, use_prefetcher=prefetcher)
    loader_train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        re_split=args.resplit, train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio,
        hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, num_aug_repeats=args.aug_repeats,
        num_aug_splits=0, interpolation=args.train_interpolation, num_workers=args.workers, **common)
    loader_eval = create_loader(
        dataset_eval, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], num_workers=args.workers, crop_pct=data_config['crop_pct'],
        **common)

    # the recipe's augmentation: RandomResizedCrop + flip only, bilinear
    train_tf = [type(t).__name__ for t in dataset_train.transform.transforms]
    assert train_tf[:2] == ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip']
    assert not {'ColorJitter', 'RandomErasing', 'AutoAugment', 'RandAugment'} & set(train_tf)
    assert dataset_train.transform.transforms[0].interpolation.value == 'bilinear'
    assert dataset_train.transform.transforms[0].size == (IMG, IMG)  # --img-size is not overridden
    # evaluation: resize to size / 0.875, centre crop
    eval_tf = dataset_eval.transform.transforms
    assert type(eval_tf[0]).__name__ == 'Resize' and eval_tf[0].size == math.floor(IMG / 0.875)
    assert type(eval_tf[1]).__name__ == 'CenterCrop'

    model.train()
    for loader in (loader_train, loader_eval):
        x, y = next(iter(loader))
        assert x.shape == (4, 3, IMG, IMG) and x.dtype == torch.float32 and y.shape == (4,)
        assert model(x).shape == (4, 4)


# ---- optimiser, schedule, recipes ----------------------------------------------------------------------

def test_layer_decay_through_group_matcher():
    model = tiny()
    args = train_args('gsop_resnet50_in1k', layer_decay=0.7)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=dict_ns(args, lr=0.1)), **args.opt_kwargs)
    params = {id(p): n for n, p in model.named_parameters()}
    seen = [params[id(p)] for g in optimizer.param_groups for p in g['params']]
    assert sorted(seen) == sorted(params.values())  # every parameter, once
    scale = {params[id(p)]: g['lr_scale'] for g in optimizer.param_groups for p in g['params']}
    # GSoP parameters share their bottleneck's layer; deeper layers get larger scales; the head gets 1
    assert scale['layer3.5.se.gate.conv_row.weight'] == scale['layer3.5.conv1.weight']
    assert scale['layer1.2.se.conv_reduce.weight'] == scale['layer1.2.bn3.weight']
    order = ['conv1.weight', 'layer1.0.conv1.weight', 'layer2.0.conv1.weight', 'layer3.5.se.conv_reduce.weight',
             'layer4.2.se.gate.conv_expand.weight', 'fc.weight']
    assert all(scale[a] < scale[b] for a, b in zip(order, order[1:]))
    assert scale['fc.weight'] == 1.0
    assert len(model.group_matcher()['blocks']) and len({g['lr_scale'] for g in optimizer.param_groups}) >= 5


@pytest.mark.parametrize('recipe, epochs, milestones, model_name', [
    ('gsop_resnet50_in1k', 95, (30, 60, 90), 'gsop_resnet50'),
    ('gsop2_resnet50_in1k', 65, (30, 45, 60), 'gsop2_resnet50'),
])
def test_imagenet_recipes_reproduce_the_released_schedule(recipe, epochs, milestones, model_name):
    cfg = load_recipe(recipe)
    assert set(cfg) <= TRAIN_PY_OPTIONS, set(cfg) - TRAIN_PY_OPTIONS
    assert cfg['model'] == model_name and timm.is_model(cfg['model'])
    # no warm-up, label smoothing, mixup, cutmix, random erasing, auto-augment, colour jitter, EMA
    assert cfg['warmup_epochs'] == 0 and cfg['smoothing'] == 0 and cfg['mixup'] == 0 and cfg['cutmix'] == 0
    assert cfg['reprob'] == 0 and cfg['aa'] is None and cfg['color_jitter'] is None and not cfg['model_ema']
    assert cfg['interpolation'] == cfg['train_interpolation'] == 'bilinear' and cfg['crop_pct'] == 0.875
    assert cfg['scale'] == [0.08, 1.0] and cfg['hflip'] == 0.5

    model = tiny(model_name)
    for processes, per_process, expected_lr in ((1, 256, 0.1), (8, 32, 0.1), (8, 64, 0.2), (4, 48, 0.075)):
        args = train_args(recipe, batch_size=per_process)
        # train.py: no --lr -> lr = lr_base * global batch / lr_base_size (linear for SGD)
        assert args.lr is None and args.lr_base_scale == 'linear'
        lr = args.lr_base * (per_process * processes * args.grad_accum_steps) / args.lr_base_size
        assert lr == pytest.approx(expected_lr)
    args = train_args(recipe)
    args.lr = args.lr_base * args.batch_size / args.lr_base_size
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    # the released optimiser: plain momentum SGD, weight decay 1e-4 on every parameter (BN and biases too)
    assert type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert group['nesterov'] is False and group['momentum'] == 0.9 and group['weight_decay'] == 1e-4
    assert group['lr'] == pytest.approx(0.1)

    updates_per_epoch = 10
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=False), updates_per_epoch=updates_per_epoch)
    assert num_epochs == epochs and type(scheduler).__name__ == 'MultiStepLRScheduler'
    # train.py: step(epoch) after each epoch and step_update(num_updates) after each update; the released code
    # sets lr = 0.1 * 0.1 ** (number of milestones <= epoch) at the start of each epoch
    lrs = []
    for epoch in range(num_epochs):
        for u in range(updates_per_epoch):
            scheduler.step_update(num_updates=epoch * updates_per_epoch + u + 1)
            lrs.append((epoch, optimizer.param_groups[0]['lr']))
        scheduler.step(epoch + 1)
    for epoch, value in lrs:
        assert value == pytest.approx(0.1 * 0.1 ** bisect.bisect_right(milestones, epoch)), epoch


def test_cifar_recipe_is_train_py_config():
    cfg = load_recipe('gsop_preresnet164_cifar100')
    assert set(cfg) <= TRAIN_PY_OPTIONS, set(cfg) - TRAIN_PY_OPTIONS
    assert timm.is_model(cfg['model']) and cfg['num_classes'] == 100 and cfg['dataset'] == 'torch/cifar100'
    args = train_args('gsop_preresnet164_cifar100')
    assert args.lr_base * args.batch_size / args.lr_base_size == pytest.approx(0.1)
    model = timm.create_model(cfg['model'], num_classes=100, layers=(1, 1, 1), device='meta')
    assert resolve_data_config(vars(args), model=model)['input_size'] == (3, 32, 32)
    optimizer = create_optimizer_v2(nn.Linear(2, 2), **optimizer_kwargs(cfg=dict_ns(args, lr=0.1)),
                                    **args.opt_kwargs)
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=1)
    assert num_epochs == 164
    assert [scheduler._get_lr(e)[0] for e in (0, 81, 82, 122, 123, 163)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def dict_ns(args, **overrides):
    out = copy.copy(args)
    for k, v in overrides.items():
        setattr(out, k, v)
    return out


def test_recipes_ship_and_resolve(capsys):
    from timm_gsop_cli import main
    assert set(list_recipes()) >= {'gsop_resnet50_in1k', 'gsop2_resnet50_in1k', 'gsop_preresnet164_cifar100'}
    assert main(['recipe', 'gsop_resnet50_in1k']) == 0
    path = capsys.readouterr().out.strip()
    assert os.path.isfile(path) and path == recipe_path('gsop_resnet50_in1k.yaml')
    assert main(['recipe']) == 0 and 'gsop2_resnet50_in1k' in capsys.readouterr().out
    assert main(['recipe', 'nope']) == 2 and 'Unknown recipe' in capsys.readouterr().err


# ---- precision, memory layout, EMA, checkpointing, compile --------------------------------------------

@pytest.mark.parametrize('name', [NET1, NET2])
def test_bf16_autocast_training_step_on_cpu(name):
    model = tiny(name).train()
    x, y = batch()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize('name', [NET1, NET2])
def test_channels_last(name):
    ref = tiny(name).eval()
    model = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x, y = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), ref(x),
                                   rtol=1e-4, atol=1e-5)
    model.train()
    nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_ema_v3_through_the_task():
    model = tiny()
    task = ClassificationTask(model, nn.CrossEntropyLoss(), verbose=False)
    ema = task.setup_ema(decay=0.5)
    assert isinstance(ema, ModelEmaV3) and task.has_ema()
    optimizer = create_optimizer_v2(model, opt='momentum', lr=0.1)
    x, y = batch()
    k = 'layer3.5.se.gate.conv_row.weight'
    for step in (1, 2):  # train.py counts updates from 1; ModelEmaV3 copies the weights at the first one
        before = copy.deepcopy(ema.module.state_dict())
        task(x, y)['loss'].backward()
        optimizer.step()
        optimizer.zero_grad()
        task.update_ema(step=step)
        after = ema.module.state_dict()
        assert after.keys() == model.state_dict().keys()
        weight = 1.0 if step == 1 else 0.5
        torch.testing.assert_close(after[k], (1 - weight) * before[k] + weight * model.state_dict()[k])
    assert task.get_eval_model(ema=True)(x).shape == (8, 4)


def test_no_graph_breaks_in_the_gsop_ops():
    import torch._dynamo as dynamo
    cases = [(create_gsop(32, manner, dim=16), torch.randn(2, 32, 8, 8))
             for manner in ('channel', 'position', 'fusion_avg', 'fusion_max')]
    cases.append((create_gsop(128, 'fusion_concat', dim=16), torch.randn(2, 128, 8, 8)))
    cases.append((ISqrtCovPool(32, dim=16), torch.randn(2, 32, 8, 8)))
    cases.append((lambda t: timm_gsop.triu_vectorize(timm_gsop.isqrt(timm_gsop.covariance_pool(t), 5)),
                  torch.randn(2, 16, 6, 6)))
    for module, x in cases:
        for autocast in (False, True):
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
                dynamo.reset()
                explained = dynamo.explain(module)(x)
            assert explained.graph_break_count == 0, (module, autocast, explained.break_reasons)
            assert explained.graph_count == 1


def test_torch_compile_whole_model_fullgraph_forward_and_backward():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward (inductor's code
    generation on top is timm's and torch's business, and takes minutes on a CPU: see the slow test)."""
    model = tiny(NET2).train()
    ref = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    x, y = batch(4)
    out = compiled(x)
    nn.functional.cross_entropy(out, y).backward()
    nn.functional.cross_entropy(ref(x), y).backward()
    torch.testing.assert_close(out, ref(x).detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.layer2[-1].se.gate.conv_row.weight.grad,
                               ref.layer2[-1].se.gate.conv_row.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor_gsop_module():
    torch._dynamo.reset()
    module = create_gsop(32, 'channel', dim=16).train()
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, module(x), rtol=1e-4, atol=1e-5)


# ---- checkpoints, resume, and training that learns ------------------------------------------------------

def test_checkpoint_saver_resume_and_validate_load(tmp_path):
    args = train_args('gsop_resnet50_in1k', model=NET1, num_classes=4)
    model = tiny()
    task = ClassificationTask(model, nn.CrossEntropyLoss(), verbose=False)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=dict_ns(args, lr=0.05)), **args.opt_kwargs)
    task.setup_ema(decay=0.9)
    x, y = batch()
    for step in (1, 2):
        task(x, y)['loss'].backward()
        optimizer.step()
        optimizer.zero_grad()
        task.update_ema(step=step)
    saved = copy.deepcopy(model.state_dict())
    saved_ema = copy.deepcopy(task.get_trainable_module(ema=True).module.state_dict())
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, amp_scaler=None,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), decreasing=False,
                            max_history=2, task=task)
    best, best_epoch = saver.save_checkpoint(epoch=0, metric=50.0)
    assert best == 50.0 and best_epoch == 0
    assert {'last.pth.tar', 'model_best.pth.tar', 'checkpoint-0.pth.tar'} <= set(os.listdir(tmp_path))

    # --resume: a fresh model, optimiser and EMA restored from last.pth.tar
    model2 = tiny(seed=5)
    task2 = ClassificationTask(model2, nn.CrossEntropyLoss(), verbose=False)
    optimizer2 = create_optimizer_v2(model2, **optimizer_kwargs(cfg=dict_ns(args, lr=0.05)), **args.opt_kwargs)
    resume_epoch = resume_task_checkpoint(task2, str(tmp_path / 'last.pth.tar'), optimizer=optimizer2,
                                          log_info=False)
    assert resume_epoch == 1  # train.py starts at the next epoch
    task2.setup_ema(decay=0.9)
    load_task_ema_checkpoint(task2, str(tmp_path / 'last.pth.tar'))
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert not torch.equal(saved_ema['fc.weight'], saved['fc.weight'])
    for a, b in zip(task.get_trainable_module(ema=True).module.state_dict().values(),
                    task2.get_trainable_module(ema=True).module.state_dict().values()):
        torch.testing.assert_close(a, b)
    state, state2 = optimizer.state_dict()['state'], optimizer2.state_dict()['state']
    assert state.keys() == state2.keys()
    for k in state:
        torch.testing.assert_close(state[k]['momentum_buffer'], state2[k]['momentum_buffer'])
    # the resumed run continues identically
    for m, opt in ((model, optimizer), (model2, optimizer2)):
        opt.zero_grad()
        nn.functional.cross_entropy(m.train()(x), y).backward()
        opt.step()
    torch.testing.assert_close(model.fc.weight, model2.fc.weight)

    # validate.py: create_model(...) then load_checkpoint(model, path, use_ema)
    for use_ema in (False, True):
        model3 = tiny(seed=7)
        load_checkpoint(model3, str(tmp_path / 'model_best.pth.tar'), use_ema)
        for k, v in (saved_ema if use_ema else saved).items():
            torch.testing.assert_close(model3.state_dict()[k], v, msg=k)


@pytest.mark.parametrize('name', [NET1, NET2])
def test_a_few_steps_of_train_py_loop_lower_the_loss(name, image_folder):
    """train_one_epoch's steps (task forward under autocast, backward, optimizer step, EMA update,
    scheduler step_update) on the ImageFolder; the loss on the training batch goes down."""
    args = train_args('gsop_resnet50_in1k', img_size=IMG, batch_size=12, epochs=3, decay_milestones=[2])
    model = tiny(name, num_classes=2)
    dataset = create_dataset('', root=str(image_folder), split='train', is_training=True)
    loader = create_loader(dataset, input_size=(3, IMG, IMG), batch_size=12, is_training=True, no_aug=True,
                           interpolation='bilinear', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                           device=torch.device('cpu'), use_prefetcher=True, num_workers=0)
    x, y = next(iter(loader))
    task = ClassificationTask(model, nn.CrossEntropyLoss(), verbose=False)
    task.setup_ema(decay=0.9)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=dict_ns(args, lr=0.05)), **args.opt_kwargs)
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=5)

    def loss_now():
        model.train()  # batch statistics, as during training (eval-mode BN needs more steps to settle)
        with torch.no_grad():
            return nn.functional.cross_entropy(model(x), y).item()

    start = loss_now()
    torch.manual_seed(0)
    for step in range(15):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = task(x, y)['loss']
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        task.update_ema(step=step + 1)
        scheduler.step_update(num_updates=step + 1)
    end = loss_now()
    assert end < 0.7 * start, (start, end)


def test_sync_batchnorm_conversion():
    model = convert_sync_batchnorm(tiny(NET2))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    # the GSoP blocks' row BN (on the d x d matrix) and the covariance head's BN are converted too
    assert isinstance(model.layer1[-1].se.gate.bn_row, nn.SyncBatchNorm)
    assert isinstance(model.global_pool.bn_reduce, nn.SyncBatchNorm)
    with torch.no_grad():  # without a process group SyncBatchNorm runs as BatchNorm in eval mode
        assert model.eval()(batch(2)[0]).shape == (2, 4)


def test_finetune_recipe_warm_starts_from_the_hub_resnet50(tmp_path, monkeypatch):
    """The fine-tuning recipe (our choice, marked so) starts from timm/resnet50.a1_in1k through train.py's own
    create_model call: timm's (strict) pretrained load from the Hub (here: the offline cache), the GSoP modules the
    ResNet-50 lacks warm-started by the model's checkpoint filter."""
    from huggingface_hub import constants as hf_constants
    from timm_gsop import WarmStartWarning
    cfg = load_recipe('gsop_resnet50_in1k_from_resnet50')
    assert set(cfg) <= TRAIN_PY_OPTIONS, set(cfg) - TRAIN_PY_OPTIONS
    assert 'OUR CHOICE' in open(recipe_path('gsop_resnet50_in1k_from_resnet50')).read()
    repo = 'timm/resnet50.a1_in1k'
    assert cfg['pretrained'] and cfg['model_kwargs'] == {'pretrained_cfg_overlay': {'hf_hub_id': repo}}
    # a ResNet-50 of the recipe's model's width in the Hub cache layout, under that repo id
    source = timm.create_model('resnet50', **TINY_RESNET)
    snapshot = tmp_path / 'hub' / f"models--{repo.replace('/', '--')}" / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True)
    import safetensors.torch
    safetensors.torch.save_file(source.state_dict(), str(snapshot / 'model.safetensors'))
    (snapshot.parent.parent / 'refs').mkdir()
    (snapshot.parent.parent / 'refs' / 'main').write_text('0' * 40)
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    args = train_args('gsop_resnet50_in1k_from_resnet50',
                      argv=['--model-kwargs'] + [f'{k}={v!r}' for k, v in cfg['model_kwargs'].items()]
                      + ['channels=(8,16,32,64)'])
    with pytest.warns(WarmStartWarning, match=f'from hf-hub:{repo}: 4 GSoP module'):
        model = create_model_like_train_py(args)
    reference = timm.create_model('gsop_resnet50', **TINY_RESNET, gsop_stages=(0, 0, 0, 0))
    reference.load_state_dict(source.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference.eval()(x))
    # the recipe's schedule: lr 0.01 at 256, 30 epochs, cosine after one warm-up epoch
    assert args.lr_base * args.batch_size / args.lr_base_size == pytest.approx(0.01)
    optimizer = create_optimizer_v2(nn.Linear(2, 2), **optimizer_kwargs(cfg=dict_ns(args, lr=0.01)), **args.opt_kwargs)
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=10)
    assert num_epochs == 30
    lrs = [scheduler._get_lr(t)[0] for t in (0, 10, 150, 299)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[1] == pytest.approx(0.01, rel=0.01) and lrs[1] > lrs[2] > lrs[3]
