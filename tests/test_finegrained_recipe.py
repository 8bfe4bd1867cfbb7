"""The fine-grained recipe (``covpool_resnet50_cub200``) is fast-MPN-COV's fine-tuning protocol as timm's train.py
builds it: the optimiser create_optimizer_v2 makes from the recipe (classifier lr 5x the backbone's and the
covariance head's, weight decay 1e-3 on every parameter), the schedule (constant for 100 epochs) and the
448-px transforms (resize + centre crop + flip, nothing else). The model is built on the meta device."""
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from timm.data import create_transform, resolve_data_config
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from timm_gsop.recipes import list_recipes, load_recipe, recipe_path
from test_train_contract import TRAIN_PY_OPTIONS, create_model_like_train_py, dict_ns, train_args

RECIPE = 'covpool_resnet50_cub200'
LR, CLASSIFIER_FACTOR, WEIGHT_DECAY = 1.2e-3, 5, 1e-3  # fast-MPN-COV finetune.sh
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # fast-MPN-COV imagepreprocess.py

pytestmark = pytest.mark.usefixtures('one_thread')


def build(args):
    """train.py's model (on the meta device: the groups do not depend on the weights), its lr from lr_base
    (one process), its optimiser and scheduler."""
    model = create_model_like_train_py(dict_ns(args, pretrained=False), device='meta')
    if not args.lr:  # train.py: lr = lr_base * global batch / lr_base_size
        args = dict_ns(args, lr=args.lr_base * args.batch_size * args.grad_accum_steps / args.lr_base_size)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=False), updates_per_epoch=3)
    return model, optimizer, scheduler, num_epochs


def per_parameter(model, optimizer, key):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g[key] for g in optimizer.param_groups for p in g['params']}


def test_recipe_ships_with_train_py_keys():
    assert RECIPE in list_recipes()
    cfg = load_recipe(RECIPE)
    assert set(cfg) <= TRAIN_PY_OPTIONS, set(cfg) - TRAIN_PY_OPTIONS  # train.py would ignore any other key
    assert cfg['model'] == 'covpool_resnet50' and cfg['pretrained'] is True and cfg['num_classes'] == 200
    assert cfg['batch_size'] == 10 and cfg['epochs'] == 100
    # what the recipe leaves out of timm's defaults: warm-up, smoothing, colour jitter, mixup, erasing, EMA
    assert cfg['warmup_epochs'] == 0 and cfg['smoothing'] == 0 and cfg['color_jitter'] is None
    assert cfg['mixup'] == cfg['cutmix'] == cfg['reprob'] == 0 and cfg['aa'] is None and not cfg['model_ema']
    assert 'fast-MPN-COV' in open(recipe_path(RECIPE)).read()


def test_optimizer_groups_are_fast_mpncov_s():
    model, optimizer, _, _ = build(train_args(RECIPE))
    # plain momentum SGD
    assert type(optimizer) is torch.optim.SGD
    assert all(g['momentum'] == 0.9 and g['nesterov'] is False for g in optimizer.param_groups)
    lrs = per_parameter(model, optimizer, 'lr')
    wds = per_parameter(model, optimizer, 'weight_decay')
    assert set(lrs) == {n for n, _ in model.named_parameters()}  # every parameter, once
    backbone = {n: v for n, v in lrs.items() if n.startswith('backbone.')}
    head = {n: v for n, v in lrs.items() if n.startswith('global_pool.')}
    classifier = {n: v for n, v in lrs.items() if n.startswith('fc.')}
    assert len(backbone) == 159 and set(head) == {
        'global_pool.conv_reduce.weight', 'global_pool.bn_reduce.weight', 'global_pool.bn_reduce.bias'}
    assert set(classifier) == {'fc.weight', 'fc.bias'} and len(lrs) == 159 + 3 + 2
    # features and representation at 1.2e-3, the classifier at 5x (the scheduler applied the layer scales)
    for name, lr in {**backbone, **head}.items():
        assert lr == pytest.approx(LR, rel=1e-12), name
    for name, lr in classifier.items():
        assert lr == pytest.approx(LR * CLASSIFIER_FACTOR, rel=1e-12), name
    # weight decay 1e-3 on every parameter: conv and linear weights, BN weights and biases, the classifier's bias
    assert set(wds.values()) == {WEIGHT_DECAY}
    assert wds['backbone.bn1.bias'] == wds['global_pool.bn_reduce.weight'] == wds['fc.bias'] == WEIGHT_DECAY


def test_lr_is_the_released_one_at_batch_10_and_scales_linearly():
    args = train_args(RECIPE)
    assert args.lr is None and args.lr_base_scale == 'linear'
    assert args.lr_base * args.batch_size / args.lr_base_size == pytest.approx(LR * CLASSIFIER_FACTOR)
    # two processes of -b 10: the global batch doubles and so does every lr, the ratio stays 5
    model, optimizer, _, _ = build(dict_ns(args, grad_accum_steps=2))
    lrs = per_parameter(model, optimizer, 'lr')
    assert lrs['fc.weight'] == pytest.approx(2 * LR * CLASSIFIER_FACTOR)
    assert lrs['backbone.layer4.2.conv3.weight'] == lrs['global_pool.conv_reduce.weight'] == pytest.approx(2 * LR)


def test_schedule_is_constant_for_100_epochs():
    model, optimizer, scheduler, num_epochs = build(train_args(RECIPE))
    assert num_epochs == 100
    fc = next(g for g in optimizer.param_groups if any(p is model.fc.weight for p in g['params']))
    rest = [g for g in optimizer.param_groups if g is not fc]
    # train.py: step_update after each update, step(epoch + 1) after each epoch
    for epoch in range(num_epochs):
        for update in range(3):
            scheduler.step_update(num_updates=epoch * 3 + update + 1)
            assert fc['lr'] == pytest.approx(LR * CLASSIFIER_FACTOR), epoch
            assert all(g['lr'] == pytest.approx(LR) for g in rest), epoch
        scheduler.step(epoch + 1)


def test_swapped_backbone_keeps_the_classifier_factor():
    """--model covpool_convnext_tiny: the same groups (its stages first, then the head, then the classifier)."""
    model, optimizer, _, _ = build(train_args(RECIPE, model='covpool_convnext_tiny'))
    lrs = per_parameter(model, optimizer, 'lr')
    assert lrs['fc.weight'] == lrs['fc.bias'] == pytest.approx(LR * CLASSIFIER_FACTOR)
    others = {v for n, v in lrs.items() if not n.startswith('fc.')}
    assert max(others) == pytest.approx(LR) and min(others) == pytest.approx(LR)


def test_data_config_and_transforms_are_448_resize_and_centre_crop():
    args = train_args(RECIPE)
    model = create_model_like_train_py(dict_ns(args, pretrained=False), device='meta')
    data_config = resolve_data_config(vars(args), model=model)
    assert data_config == dict(input_size=(3, 448, 448), interpolation='bilinear', mean=MEAN, std=STD,
                               crop_pct=1.0, crop_mode='center')
    # what train.py's create_loader passes to create_transform (no prefetcher here: tensors out, normalised)
    common = dict(mean=data_config['mean'], std=data_config['std'], use_prefetcher=False)
    train_tf = create_transform(
        data_config['input_size'], is_training=True, no_aug=args.no_aug, train_crop_mode=args.train_crop_mode,
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, interpolation=args.train_interpolation,
        re_prob=args.reprob, **common)
    eval_tf = create_transform(data_config['input_size'], is_training=False,
                               interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'], **common)
    names = [type(t).__name__ for t in train_tf.transforms]
    assert names == ['ResizeKeepRatio', 'CenterCropOrPad', 'RandomHorizontalFlip', 'MaybeToTensor', 'Normalize']
    assert [type(t).__name__ for t in eval_tf.transforms] == ['Resize', 'CenterCrop', 'MaybeToTensor', 'Normalize']

    # the released CUB transforms: torchvision's Resize(448) (bilinear) makes the longer side
    # int(448 * long / short); timm's train-time ResizeKeepRatio makes it round(long / (short / 448)), up to 1 px
    # more. Evaluation (torchvision's Resize) is the released one exactly; training is exact where the two agree
    # and otherwise is the same pipeline with that size.
    def resize_crop(size, flip=False):
        return T.Compose([T.Resize(size), T.CenterCrop(448), *([T.RandomHorizontalFlip(1.0)] if flip else []),
                          T.ToTensor(), T.Normalize(MEAN, STD)])

    g = torch.Generator().manual_seed(0)
    exact = 0
    for w, h in ((500, 375), (448, 448), (333, 500), (1024, 683)):  # CUB-like sizes, landscape and portrait
        img = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
        torch.testing.assert_close(eval_tf(img), resize_crop(448)(img), rtol=0, atol=0)
        ratio = min(w, h) / 448
        timm_size = (round(h / ratio), round(w / ratio))
        released_size = T.Resize(448)(img).size[::-1]
        assert min(timm_size) == min(released_size) == 448
        assert 0 <= max(timm_size) - max(released_size) <= 1
        exact += timm_size == released_size
        torch.manual_seed(w)
        flips = set()
        for _ in range(8):  # random zoom / aspect are the identity at scale = ratio = [1, 1]; only the flip varies
            out = train_tf(img)
            for flip in (False, True):
                if torch.equal(out, resize_crop(timm_size, flip)(img)):
                    flips.add(flip)
                    break
            else:
                raise AssertionError(f'{w}x{h}: the train transform is not resize + centre crop + flip')
        assert flips == {False, True}
    assert exact == 2  # 500x375 and 448x448 exactly as released; 333x500 and 1024x683 1 px longer before the crop
