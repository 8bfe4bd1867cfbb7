"""The covariance head on any timm backbone (``covpool*``): the backbone's own weights and its own map, exactly, on
every kind of backbone that can serve; a refusal at construction on every kind that cannot; the backbone resolved
once; the heads. References: timm's own models, computed here."""
import warnings

import pytest
import torch
import torch.nn.functional as F
import timm
from timm.models.resnet import ResNet

import timm_gsop  # noqa: F401 (registers the models)
from conftest import randomise_bn_
from timm_gsop.models.gsop_resnet import WarmStartWarning

TINY_RESNET = dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128))
DATA_KEYS = ('input_size', 'interpolation', 'crop_pct', 'mean', 'std', 'fixed_input_size', 'test_input_size',
             'test_crop_pct')


def image(size=64, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def source(backbone, seed=0, **kwargs):
    """timm's model with random weights (its classifier too, as a published checkpoint has it)."""
    torch.manual_seed(seed)
    return randomise_bn_(timm.create_model(backbone, **kwargs), seed).eval()


def build(name='covpool', pretrained=True, **kwargs):
    """timm.create_model; the model in eval mode and the texts of the WarmStartWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    return model.eval(), [str(w.message) for w in caught if issubclass(w.category, WarmStartWarning)]


# (backbone, kwargs that make it small, input side, what its pre-logits features are: an NCHW map, an NHWC map, or
# tokens after so many prefix tokens)
KINDS = [
    ('resnet50', TINY_RESNET, 64, 'nchw'),
    ('convnext_tiny', dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)), 64, 'nchw'),  # its head norm: pre-logits
    ('test_efficientnet', {}, 64, 'nchw'),
    ('mobilenetv3_small_050', {}, 64, 'nchw'),  # its 1x1 head conv: pre-logits
    ('regnety_002', {}, 64, 'nchw'),
    ('deit_tiny_patch16_224', dict(depth=2, embed_dim=32, num_heads=2, img_size=64), 64, 1),  # class token
    ('vit_small_patch14_reg4_dinov2', dict(depth=2, embed_dim=32, num_heads=2, img_size=56), 56, 5),  # + 4 registers
    ('swin_tiny_patch4_window7_224', dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2,
                                          img_size=64), 64, 'nhwc'),
    ('hiera_tiny_224', dict(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), img_size=64), 64, 0),  # tokens only
]


def own_map(net, x, layout):
    """The backbone's features up to its pooling as (B, C, H, W): its own head with pooling and classifier off."""
    net.reset_classifier(0, '')
    y = net.forward_head(net.forward_features(x), pre_logits=True)
    if layout == 'nhwc':
        return y.permute(0, 3, 1, 2)
    if layout == 'nchw':
        return y
    tokens = y[:, layout:]
    side = round(tokens.shape[1] ** 0.5)  # the patches, row by row
    return tokens.reshape(y.shape[0], side, side, y.shape[2]).permute(0, 3, 1, 2)


@pytest.mark.parametrize('backbone,kwargs,size,layout', KINDS, ids=[k[0] for k in KINDS])
def test_backbone_weights_and_map_are_the_backbones(backbone, kwargs, size, layout):
    net = source(backbone, **kwargs)
    state_dict = net.state_dict()
    model, warned = build(backbone=backbone, isqrt_dim=8, pretrained_cfg_overlay=dict(state_dict=state_dict), **kwargs)
    assert len(warned) == 1
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state_dict[key]), key
    x = image(size)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), own_map(net, x, layout))


REFUSED = [
    'pit_ti_224',  # class-token-only features
    'deit_tiny_distilled_patch16_224',  # pools its class and distillation tokens itself
    'vgg11',  # its pre-logits map is one position at its input size
    'coat_lite_tiny', 'efficientvit_b0', 'inception_next_atto',  # timm asserts its pooling cannot be turned off
    'volo_d1_224',  # tokens off the grid (class tokens appended by its post-network)
    'efficientvim_m1',  # forward_features returns a list
]


@pytest.mark.parametrize('backbone', REFUSED)
def test_backbones_that_cannot_serve_are_refused_at_construction(backbone):
    with pytest.raises(ValueError, match=backbone):
        timm.create_model('covpool', backbone=backbone, device='meta')


def test_features_only_builds_the_backbone_once_and_gives_its_features(monkeypatch):
    state_dict = source('resnet50', **TINY_RESNET).state_dict()
    built, init = [], ResNet.__init__
    monkeypatch.setattr(ResNet, '__init__', lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    features, _ = build(backbone='resnet50', features_only=True, pretrained_cfg_overlay=dict(state_dict=state_dict),
                        **TINY_RESNET)
    assert len(built) == 1
    own, _ = build('resnet50', features_only=True, pretrained_cfg_overlay=dict(state_dict=state_dict), **TINY_RESNET)
    with torch.no_grad():
        got, expected = features(image()), own(image())
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_whole_model_checkpoint_and_save_for_hf_export_round_trip(tmp_path):
    model = randomise_bn_(timm.create_model('covpool', backbone='resnet50', isqrt_dim=8, **TINY_RESNET)).eval()
    timm.models.save_for_hf(model, str(tmp_path), safe_serialization=True)
    with torch.no_grad():
        expected = model(image())
        for name, kwargs in (('covpool', dict(backbone='resnet50', isqrt_dim=8, **TINY_RESNET,
                                              pretrained_cfg_overlay=dict(state_dict=model.state_dict()))),
                             (f'local-dir:{tmp_path}', {})):
            loaded, warned = build(name, **kwargs)
            assert not warned and torch.equal(loaded(image()), expected), name


def test_conflicting_tags_are_named():
    with pytest.raises(ValueError, match=r'a1_in1k.*tv_in1k'):
        timm.create_model('covpool_resnet50.a1_in1k', backbone='resnet50.tv_in1k', device='meta')


@pytest.mark.parametrize('name', timm.list_models('covpool*'))
def test_registry_data_settings_are_the_backbones(name):
    backbone = 'resnet50' if name == 'covpool' else name[len('covpool_'):]
    ours, theirs = timm.models.get_pretrained_cfg(name), timm.models.get_pretrained_cfg(backbone)
    assert {k: getattr(ours, k) for k in DATA_KEYS} == {k: getattr(theirs, k) for k in DATA_KEYS}


def test_built_model_takes_data_settings_from_the_tagged_backbone():
    cfg = timm.create_model('covpool_resnet50.tv_in1k', device='meta').pretrained_cfg
    theirs = timm.models.get_pretrained_cfg('resnet50.tv_in1k')
    assert theirs.crop_pct != timm.models.get_pretrained_cfg('covpool_resnet50').crop_pct  # a tag that differs
    assert {k: cfg.get(k) for k in DATA_KEYS} == {k: getattr(theirs, k) for k in DATA_KEYS}


def test_avg_head_is_timms_resnet():
    net = source('resnet50', **TINY_RESNET)
    model, _ = build(backbone='resnet50', global_pool='avg', pretrained_cfg_overlay=dict(state_dict=net.state_dict()),
                     **TINY_RESNET)
    model.fc.load_state_dict(net.fc.state_dict())
    with torch.no_grad():
        assert torch.equal(model(image()), net(image()))


def test_cov_head_is_the_covariance_triangle_of_the_reduced_features():
    model, _ = build(backbone='resnet50', global_pool='cov', isqrt_dim=8, pretrained=False, **TINY_RESNET)
    head = randomise_bn_(model).global_pool
    with torch.no_grad():
        feats = model.forward_features(image())
        y = F.relu(head.bn_reduce(F.conv2d(feats, head.conv_reduce.weight))).flatten(2)
        centred = y - y.mean(-1, keepdim=True)
        cov = centred @ centred.transpose(1, 2) / y.shape[-1]
        rows, cols = torch.tril_indices(8, 8)  # the lower triangle, row by row (the released Triuvec)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), cov[:, rows, cols])


@pytest.mark.parametrize('head', ['isqrt', 'cov', 'avg'])
def test_one_train_step(head):
    model, _ = build(backbone='resnet50', global_pool=head, isqrt_dim=8, num_classes=5, pretrained=False,
                     **TINY_RESNET)
    randomise_bn_(model)  # no zero-initialised last BN of a block: every parameter on a path with a gradient
    loss = F.cross_entropy(model.train()(image(batch=4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_the_fine_grained_recipe_gives_the_classifier_five_times_the_rate():
    """fast-MPN-COV's classifier x5 through train.py's --layer-decay: CovPoolNet.group_matcher puts the classifier
    last and the head before it, so create_optimizer_v2 with the recipe's keys scales everything else by 0.2."""
    import yaml
    from timm.optim import create_optimizer_v2
    from timm_gsop.recipes import recipe_path
    recipe = yaml.safe_load(open(recipe_path('covpool_resnet50_cub200')))
    model, _ = build(recipe['model'], pretrained=False, num_classes=recipe['num_classes'], isqrt_dim=8, **TINY_RESNET)
    optimizer = create_optimizer_v2(
        model, opt=recipe['opt'], lr=recipe['lr_base'], weight_decay=recipe['weight_decay'],
        momentum=recipe['momentum'], layer_decay=recipe['layer_decay'],
        layer_decay_min_scale=recipe['layer_decay_min_scale'], **recipe['opt_kwargs'])
    scale = {id(p): g['lr_scale'] for g in optimizer.param_groups for p in g['params']}
    for name, p in model.named_parameters():
        assert scale[id(p)] == pytest.approx(1.0 if name.startswith('fc.') else 0.2), name
    assert {g['weight_decay'] for g in optimizer.param_groups} == {recipe['weight_decay']}
