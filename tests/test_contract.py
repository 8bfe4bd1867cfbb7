"""timm's model contract on every registered model, one table: registry, sizes, architecture facts of the
released code, pretrained cfgs, heads, features, intermediates, TorchScript / fx, kwargs and their errors.

Full-size models are built on the meta device where no values are needed; tests that run a model use its
tiny version (``conftest.tiny_kwargs``: same modules and code paths), as timm's own suite
(``test_timm_suite.py``) runs the full-size ones."""
import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import timm
from timm.layers.cbam import CbamModule
from timm.models import FeatureInfo, group_parameters
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

import timm_gsop
from conftest import tiny_kwargs
from timm_gsop import ChannelGSoP, CovarianceGate, GSoPFusion, GSoPResNet, ISqrtCovPool, PositionGSoP, create_gsop
from timm_gsop.models.preresnet_cifar import CIFAR100_MEAN, CIFAR100_STD, PreResNetCifar
from timm_gsop.zoo import list_gsop_models

_IMNET = dict(input=(3, 224, 224), pool=(7, 7), feat=2048, head=2048,
              chs=(64, 256, 512, 1024, 2048), red=(2, 4, 8, 16, 32))
_RELEASED = dict(_IMNET, pool=(14, 14), red=(2, 4, 8, 16, 16))  # stride-1 last stage, no dilation
_COV = dict(_RELEASED, head=32_896)
_BASIC = dict(_IMNET, feat=512, head=512, chs=(64, 64, 128, 256, 512))
_CIFAR = dict(input=(3, 32, 32), pool=(8, 8), feat=256, head=256, chs=(16, 64, 128, 256), red=(1, 1, 2, 4))
# every registered model; parameters counted with the default classes (1000; CIFAR: 100). GSoP-Net1/2 and
# iSQRT-COV have the released networks' counts (the released code's resnet50/101, fast-MPN-COV's mpncovresnet)
SPECS = {
    'gsop_resnet50': dict(_RELEASED, params=28_285_224),
    'gsop_resnet101': dict(_RELEASED, params=47_277_352),
    'gsop2_resnet50': dict(_COV, params=58_278_568),
    'gsop2_resnet101': dict(_COV, params=77_270_696),
    'gsopresnet18': dict(_BASIC, params=13_313_320),
    'gsopresnet34': dict(_BASIC, params=25_074_472),
    'gsopresnet50': dict(_IMNET, params=36_305_704),
    'gsopresnet101': dict(_IMNET, params=67_590_056),
    'gsopresnet50d': dict(_IMNET, params=36_324_936),
    'gsopresnext50_32x4d': dict(_IMNET, params=35_777_576),
    'cbamresnet50': dict(_IMNET, params=28_073_576),
    'cbamresnet101': dict(_IMNET, params=49_295_628),
    'isqrt_resnet50': dict(_COV, params=56_929_832),
    'isqrt_resnet101': dict(_COV, params=75_921_960),
    'preresnet164_cifar': dict(_CIFAR, params=1_726_388),
    'gsop_preresnet164_cifar': dict(_CIFAR, params=1_921_076),
    'gsop2_preresnet164_cifar': dict(_CIFAR, head=8_256, params=2_654_964),
}
MODELS = list(SPECS)
MANNERS = ['channel', 'position', 'fusion_avg', 'fusion_max', 'fusion_concat']
GSOP_TYPES = (ChannelGSoP, PositionGSoP, GSoPFusion)


def _input(name, batch=2, seed=0):
    side = 32 if 'cifar' in name else 64
    return torch.randn((batch, 3, side, side), generator=torch.Generator().manual_seed(seed))


def _tiny(name, **kwargs):
    return timm.create_model(name, **dict(tiny_kwargs(name), **kwargs))


def _stages(model):
    return [getattr(model, f'layer{i}') for i in range(1, 5) if hasattr(model, f'layer{i}')]


def _gsop_modules(model):
    return [m for m in model.modules() if isinstance(m, GSOP_TYPES)]


# ---- registry and architecture ------------------------------------------------------------------------

def test_registry_is_the_table():
    # and the covariance head on timm backbones (covpool*), whose contract is tests/test_covpool.py
    assert sorted(n for n in list_gsop_models() if not n.startswith('covpool')) == sorted(MODELS)
    for pattern, family in (('gsop*', 'gsop'), ('cbam*', 'cbamresnet'), ('isqrt*', 'isqrt_resnet'),
                            ('*cifar', 'cifar')):
        assert {n for n in MODELS if family in n} <= set(timm.list_models(pattern)), pattern
    assert 'seresnet50' not in list_gsop_models()  # timm's own, not duplicated here


@pytest.mark.parametrize('name', MODELS)
def test_param_count(name):
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == SPECS[name]['params']


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop_resnet101', 'gsop2_resnet50', 'gsop2_resnet101'])
def test_gsop_nets_as_released(name):
    model = timm.create_model(name, device='meta')
    net2 = name.startswith('gsop2')
    stages = _stages(model)
    assert isinstance(model, GSoPResNet)
    assert tuple(len(s) for s in stages) == ((3, 4, 23, 3) if '101' in name else (3, 4, 6, 3))
    for block in model.layer4:  # stride-1 last stage without dilation
        assert block.conv2.stride == (1, 1) and block.conv2.dilation == (1, 1)
    assert model.layer4[0].downsample[0].stride == (1, 1)
    for stage_idx, stage in enumerate(stages):  # GSoP in the last block of each stage; Net2: none in layer4
        for block_idx, block in enumerate(stage):
            expect = block_idx == len(stage) - 1 and not (net2 and stage_idx == 3)
            assert isinstance(block.se, ChannelGSoP) == expect, (stage_idx, block_idx)
            if expect:
                assert block.se.dim == 128 and block.se.stride == (2 if stage_idx == 0 else 1)
    if net2:
        head = model.global_pool
        assert isinstance(head, ISqrtCovPool) and head.dim == 256 and head.num_iters == 3
        assert model.fc.in_features == 32_896
    else:
        assert model.global_pool.pool_type == 'avg' and model.fc.in_features == 2048


@pytest.mark.parametrize('name', ['gsopresnet18', 'gsopresnet50', 'gsopresnet50d', 'gsopresnext50_32x4d'])
def test_gsop_in_every_block_like_seresnet(name):
    model = timm.create_model(name, device='meta')
    plain = timm.create_model(name.replace('gsop', ''), device='meta')  # timm's resnet18, resnet50d ...
    for stage_idx, (ours, theirs) in enumerate(zip(_stages(model), _stages(plain))):
        assert len(ours) == len(theirs)
        for blk in ours:
            channels = (blk.bn3 if hasattr(blk, 'bn3') else blk.bn2).num_features
            assert isinstance(blk.se, ChannelGSoP) and blk.se.conv_reduce.in_channels == channels
            assert blk.se.dim == min(128, channels) and blk.se.stride == (2 if stage_idx == 0 else 1)
    backbone = lambda m: {k: v.shape for k, v in m.state_dict().items() if '.se.' not in k}
    assert backbone(model) == backbone(plain)  # timm's standard stride-32 backbone, tensor for tensor
    assert [blk.se.dim for s in _stages(timm.create_model('gsopresnet18', device='meta')) for blk in s] == \
        [64, 64] + [128] * 6  # the reduction never expands a narrow block


def test_placement_stage_and_stride_kwargs():
    model = timm.create_model('gsopresnet50', gsop_placement='last', device='meta')
    for stage in _stages(model):
        assert [blk.se is not None for blk in stage] == [False] * (len(stage) - 1) + [True]
    # the paper's blocks on the stride-32 backbone: GSoP-Net1's parameter count
    assert sum(p.numel() for p in model.parameters()) == 28_285_224
    model = timm.create_model('gsopresnet50', gsop_stage1_stride=1, gsop_manner='fusion_max', device='meta')
    assert model.layer1[0].se.channel.stride == 1
    assert all(isinstance(blk.se, GSoPFusion) for blk in model.layer3)


@pytest.mark.parametrize('manner, cls', list(zip(MANNERS, [ChannelGSoP, PositionGSoP] + [GSoPFusion] * 3)))
def test_gsop_manner_kwarg(manner, cls):
    model = timm.create_model('gsop_resnet50', gsop_manner=manner, gsop_dim=64, device='meta')
    assert isinstance(model.layer3[5].se, cls) and model.gsop_manner == manner


def test_cbam_in_every_bottleneck():
    model = timm.create_model('cbamresnet50', device='meta')
    blocks = [blk for stage in _stages(model) for blk in stage]
    assert len(blocks) == 16 and all(isinstance(blk.se, CbamModule) for blk in blocks)
    assert model.layer4[0].conv2.stride == (2, 2)
    assert torch.count_nonzero(timm.create_model('cbamresnet50').layer1[0].bn3.weight) == 0  # timm's zero_init_last


@pytest.mark.parametrize('name', ['isqrt_resnet50', 'isqrt_resnet101'])
def test_isqrt_as_fast_mpncov(name):
    model = timm.create_model(name, device='meta')
    assert not _gsop_modules(model) and len(model.layer3) == (23 if '101' in name else 6)
    for blk in model.layer4:
        assert blk.conv2.stride == (1, 1) and blk.conv2.dilation == (1, 1)
    head = model.global_pool
    assert isinstance(head, ISqrtCovPool) and head.dim == 256 and head.num_iters == 5
    assert head.conv_reduce.bias is None and head.conv_reduce.weight.shape == (256, 2048, 1, 1)
    assert model.fc.in_features == 32_896


def test_cifar_architecture():
    base, net1, net2 = (timm.create_model(n, device='meta') for n in
                        ('preresnet164_cifar', 'gsop_preresnet164_cifar', 'gsop2_preresnet164_cifar'))
    for model in (base, net1, net2):
        assert isinstance(model, PreResNetCifar)
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
        stages = _stages(model)
        assert [len(s) for s in stages] == [18, 18, 18]
        assert [s[0].conv2.stride for s in stages] == [(1, 1), (2, 2), (2, 2)]
        assert 1 + 3 * sum(len(s) for s in stages) + 1 == 164  # stem, 3 convs per block, classifier
        assert model.fc.out_features == 100
    assert not _gsop_modules(base)
    for model, enabled_stages in ((net1, (True, True, True)), (net2, (True, True, False))):
        for stage, enabled in zip(_stages(model), enabled_stages):
            assert [blk.se is not None for blk in stage] == [False] * 17 + [enabled]
            if enabled:
                assert isinstance(stage[-1].se, ChannelGSoP) and stage[-1].se.dim == 64 and stage[-1].se.stride == 1
    assert base.global_pool.pool_type == 'avg' and net1.global_pool.pool_type == 'avg'
    assert net2.global_pool.dim == 128 and net2.global_pool.num_iters == 3 and net2.fc.in_features == 8_256


# ---- timm's contract on every model -------------------------------------------------------------------

@pytest.mark.parametrize('name', MODELS)
def test_pretrained_cfg(name):
    spec = SPECS[name]
    meta = timm.create_model(name, device='meta')
    cfg = meta.pretrained_cfg
    for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'first_conv', 'classifier',
                'pool_size', 'license', 'paper_ids', 'origin_url', 'num_classes', 'architecture', 'tag'):
        assert key in cfg and cfg[key] not in (None, ''), key
    assert cfg['input_size'] == spec['input'] and cfg['pool_size'] == spec['pool']
    assert cfg['num_classes'] == meta.num_classes and cfg['license'] == 'mit'
    if 'cifar' in name:
        assert (cfg['mean'], cfg['std'], cfg['crop_pct']) == (CIFAR100_MEAN, CIFAR100_STD, 1.0)
        assert cfg['num_classes'] == 100 and cfg['tag'] == 'cifar100'
    else:  # the released evaluation: resize 256, centre crop 224, bilinear
        assert (cfg['crop_pct'], cfg['interpolation'], cfg['num_classes']) == (0.875, 'bilinear', 1000)
    if name.startswith('gsop'):
        assert cfg['paper_ids'] == 'arXiv:1811.12006'
    state_dict = meta.state_dict()
    assert cfg['first_conv'] + '.weight' in state_dict and cfg['classifier'] + '.weight' in state_dict
    with torch.no_grad():  # pool_size is the final map at the default input size
        feats = meta.forward_features(torch.empty(1, *cfg['input_size'], device='meta'))
    assert feats.shape == (1, spec['feat'], *cfg['pool_size'])
    assert meta.num_features == spec['feat'] and meta.head_hidden_size == spec['head']


@pytest.mark.parametrize('name', MODELS)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    model = _tiny(name).train()
    out = model(_input(name))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing[:5]}'
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('net', ['gsop_resnet50', 'gsop2_resnet50', 'gsopresnet18', 'gsop_preresnet164_cifar'])
@pytest.mark.parametrize('manner', MANNERS)
def test_every_manner_trains(net, manner):
    # the released code's in-place residual add breaks backward in its position modes
    model = _tiny(net, num_classes=5, gsop_manner=manner, gsop_dim=16).train()
    loss = nn.functional.cross_entropy(model(_input(net)), torch.tensor([1, 3]))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('name', MODELS)
def test_heads_and_reset_classifier(name):
    spec = SPECS[name]
    model = _tiny(name).eval()
    x = _input(name, batch=1)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size) and model.num_features == feats.shape[1]
        model.reset_classifier(0)
        assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, '')
        assert model(x).shape == feats.shape
        model.reset_classifier(3, 'avg')
        assert model(x).shape == (1, 3) and model.head_hidden_size == feats.shape[1]
    assert timm.create_model(name, num_classes=0, device='meta').head_hidden_size == spec['head']


def test_global_pool_choices():
    x = _input('gsop_resnet50')
    for pool, width in (('max', 512), ('catavgmax', 1024), ('isqrt', 32 * 33 // 2)):
        model = _tiny('gsop_resnet50', num_classes=0, global_pool=pool, isqrt_dim=32).eval()
        assert model.head_hidden_size == width and model(x).shape == (2, width)
    model = _tiny('gsop_resnet50', num_classes=10, global_pool='').eval()
    with pytest.raises(RuntimeError, match='shapes cannot be multiplied'):  # torch's error, as timm's ResNet
        model(x)
    for name in ('gsop2_resnet50', 'preresnet164_cifar'):
        with pytest.raises(ValueError, match="Unknown global_pool 'median'.*'avg'"):
            timm.create_model(name, global_pool='median', device='meta')


@pytest.mark.parametrize('name', ['gsop2_resnet50', 'gsop2_preresnet164_cifar'])
def test_reset_classifier_keeps_the_trained_covariance_head(name):
    model = _tiny(name, dtype=torch.float64)
    head = model.global_pool
    weight = head.conv_reduce.weight.detach().clone()
    model.reset_classifier(10)
    assert model.global_pool is head and torch.equal(head.conv_reduce.weight, weight)
    assert model.fc.out_features == 10 and model.fc.weight.dtype == torch.float64
    assert model.get_classifier() is model.fc
    model.eval()
    model.reset_classifier(7, 'avg')
    assert model.fc.weight.dtype == torch.float64 and not model.fc.training
    with pytest.raises(ValueError, match='valid choices'):
        model.reset_classifier(7, 'median')


@pytest.mark.parametrize('name', MODELS)
def test_features_only(name):
    spec = SPECS[name]
    chs = timm.create_model(name, features_only=True, device='meta').feature_info.channels()
    assert tuple(chs) == spec['chs']
    model = _tiny(name, features_only=True).eval()
    assert tuple(model.feature_info.reduction()) == spec['red']
    x = _input(name, batch=1)[..., :-8]  # not square
    with torch.no_grad():
        outs = model(x)
    assert len(outs) == len(spec['chs'])
    for o, c, r in zip(outs, model.feature_info.channels(), spec['red']):
        assert o.shape == (1, c, math.ceil(x.shape[-2] / r), math.ceil(x.shape[-1] / r))
    sub = _tiny(name, features_only=True, out_indices=(1, 3))
    assert sub.feature_info.channels() == [model.feature_info.channels()[i] for i in (1, 3)]


@pytest.mark.parametrize('name', MODELS)
def test_forward_intermediates_and_prune(name):
    model = _tiny(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    x = _input(name)
    side = x.shape[-1]
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [o.shape[1] for o in inter] == info.channels()
        assert [side // o.shape[-1] for o in inter] == info.reduction() == list(SPECS[name]['red'])
        only = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        torch.testing.assert_close(only[0], inter[1])
        torch.testing.assert_close(only[1], inter[2])
        early = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[-1], inter[-1])
        assert list(model.prune_intermediate_layers(indices=[1, 2])) == [1, 2]
        assert model.num_classes == 0 and model.num_features == info.channels()[2]
        torch.testing.assert_close(model(x), inter[2])


@pytest.mark.parametrize('name', ['gsop2_resnet50', 'gsop2_preresnet164_cifar'])
def test_group_matcher_and_layer_decay(name):
    from timm.optim import create_optimizer_v2
    model = _tiny(name)
    groups = group_parameters(model, model.group_matcher(coarse=False))
    assert {n for names in groups.values() for n in names} == {n for n, _ in model.named_parameters()}
    head_group = next(g for g, names in groups.items() if 'fc.weight' in names)
    assert 'global_pool.conv_reduce.weight' in groups[head_group]  # the covariance head goes with the classifier
    if name == 'gsop2_resnet50':  # GSoP parameters go with their block
        gsop_group = next(g for g, names in groups.items() if 'layer3.0.se.conv_reduce.weight' in names)
        assert 'layer3.0.conv1.weight' in groups[gsop_group]
    opt = create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=1e-4, layer_decay=0.7)
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize('name', MODELS)
def test_torchscript(name):
    model = _tiny(name).eval()
    x = _input(name)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('manner', ['channel', 'fusion_concat', 'position'])
def test_torchscript_every_manner(manner):
    model = _tiny('gsop2_resnet50', gsop_manner=manner, gsop_dim=16).eval()
    x = _input('gsop2_resnet50')
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', MODELS)
def test_fx_feature_extractor(name):
    """As timm's test_model_forward_fx / backward_fx: traced with timm's fx helpers, same outputs; the float32
    regions (gates, ops) are leaves of the graph."""
    model = _tiny(name).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    x = _input(name)
    with torch.no_grad():
        assert torch.equal(tuple(fx_model(x).values())[0], model(x))
    if _gsop_modules(model):
        assert any('gate' in n for n in eval_nodes)
    fx_train = create_feature_extractor(model.train(), return_nodes=[train_nodes[-1]])
    tuple(fx_train(x).values())[0].mean().backward()
    assert all(p.grad is not None for p in fx_train.parameters())


def test_fx_plain_symbolic_trace_keeps_the_ops_as_leaves():
    model = _tiny('gsop2_resnet50', gsop_manner='fusion_avg').eval()
    traced = torch.fx.symbolic_trace(model)
    x = _input('gsop2_resnet50')
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    targets = {str(n.target) for n in traced.graph.nodes if n.op == 'call_function'}
    assert any('covariance_pool' in t for t in targets) and any('position_gram' in t for t in targets)
    assert any('isqrt' in t for t in targets)


def test_meta_device_and_dtype():
    model = timm.create_model('gsop2_resnet50', device='meta')
    assert all(p.device.type == 'meta' for p in model.parameters())
    out = model(torch.empty(2, 3, 224, 224, device='meta'))
    assert out.shape == (2, 1000) and out.device.type == 'meta'
    model = _tiny('gsop_resnet50', dtype=torch.float64).eval()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        out = model(_input('gsop_resnet50').double())
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsopresnet50', 'preresnet164_cifar'])
def test_train_py_kwargs_reach_the_model(name):
    # the call timm's train.py makes, with every option it forwards set, and --model-kwargs
    model = timm.create_model(
        name, pretrained=False, in_chans=3, num_classes=10, drop_rate=0.2, drop_path_rate=0.1,
        global_pool='avgmax', bn_momentum=0.01, bn_eps=1e-3, scriptable=False, checkpoint_path='',
        **(dict(drop_block_rate=0.1, gsop_manner='position', gsop_dim=64) if name == 'gsop_resnet50' else {}))
    assert model.drop_rate == 0.2 and model.global_pool.pool_type == 'avgmax'
    assert all(m.momentum == 0.01 and m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert any(type(m).__name__ == 'DropPath' for m in model.modules())
    if name == 'gsop_resnet50':
        assert any(type(m).__name__ == 'DropBlock2d' for m in model.layer4.modules())
        assert isinstance(model.layer1[2].se, PositionGSoP) and model.layer1[2].se.dim == 64
    net2 = timm.create_model('gsop2_resnet50', isqrt_iters=5, isqrt_dim=128, num_classes=10, device='meta')
    assert net2.global_pool.num_iters == 5 and net2.fc.in_features == 128 * 129 // 2


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet101', 'gsopresnet18', 'isqrt_resnet50', 'cbamresnet50'])
def test_entrypoint_defaults_can_be_overridden(name):
    # --model-kwargs layers=... in timm's train.py: user kwargs win over the entrypoint's
    model = timm.create_model(name, layers=(1, 1, 1, 1), device='meta')
    assert [len(s) for s in _stages(model)] == [1, 1, 1, 1]


def test_zero_init_last_option():
    assert torch.count_nonzero(timm.create_model('gsop_resnet50').layer1[0].bn3.weight) > 0  # as released
    assert torch.count_nonzero(timm.create_model('gsopresnet50', zero_init_last=True).layer1[0].bn3.weight) == 0


@pytest.mark.parametrize('name', MODELS)
def test_unknown_kwarg_is_a_type_error(name):
    with pytest.raises(TypeError):
        timm.create_model(name, not_an_arg=1, device='meta')


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsopresnet50', 'gsop_preresnet164_cifar'])
def test_bad_kwargs_are_value_errors_naming_value_and_choices(name):
    for kwarg, value, message in (
            ('gsop_manner', 'spatial', "Unknown gsop_manner 'spatial'; valid choices: 'channel', 'position', "
                                       "'fusion_avg', 'fusion_max', 'fusion_concat'"),
            ('gsop_placement', 'every', "Unknown gsop_placement 'every'; valid choices: 'last', 'all'"),
            ('last_stride', 3, 'Unknown last_stride 3; valid choices: 1, 2'),
            ('global_pool', 'covariance', "Unknown global_pool 'covariance'; valid choices: 'avg', .*'isqrt', 'cov'"),
            ('gsop_stages', (True,), 'gsop_stages'),
            ('gsop_dim', 0, 'dim must be a positive integer, got 0')):
        with pytest.raises(ValueError, match=message):
            timm.create_model(name, device='meta', **{kwarg: value})
    for iters in (0, 2.5):
        with pytest.raises(ValueError, match=f'isqrt_iters must be a positive integer, got {iters}'):
            timm.create_model(name, global_pool='isqrt', isqrt_iters=iters, device='meta')
    with pytest.raises(ValueError, match='isqrt_dim must be a non-negative integer .* got -4'):
        timm.create_model(name, global_pool='isqrt', isqrt_dim=-4, device='meta')
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('gsop_resnet9000')


def test_gsop_and_another_attention_layer_are_refused():
    with pytest.raises(ValueError, match='places its own GSoP'):
        timm.create_model('gsopresnet50', block_args=dict(attn_layer='se'), device='meta')
    model = timm.create_model('isqrt_resnet50', isqrt_iters=3, num_classes=0, device='meta')
    assert model.global_pool.num_iters == 3 and model.head_hidden_size == 32_896


# ---- GSoP as an attention layer inside timm's own ResNets ----------------------------------------------

@pytest.mark.parametrize('arch, attn_layer, cls', [
    ('resnet50', create_gsop, ChannelGSoP),
    ('resnext50_32x4d', ChannelGSoP, ChannelGSoP),
    ('resnet18', create_gsop, ChannelGSoP),
    ('resnet50d', partial(create_gsop, manner='position'), PositionGSoP),
    ('resnet18', partial(create_gsop, manner='fusion_avg', dim=32), GSoPFusion),
])
def test_attn_layer_in_timm_resnets_trains(arch, attn_layer, cls):
    model = timm.create_model(arch, block_args=dict(attn_layer=attn_layer), num_classes=4, layers=(1, 1, 1, 1))
    blocks = [blk for stage in _stages(model) for blk in stage]
    for blk in blocks:
        channels = (blk.bn3 if hasattr(blk, 'bn3') else blk.bn2).num_features
        gsop = blk.se.channel if isinstance(blk.se, GSoPFusion) else blk.se
        assert isinstance(blk.se, cls) and gsop.dim == min(32 if cls is GSoPFusion else 128, channels)
    # timm's default zero_init_last zeroes the last BN: GSoP starts on a zero input and must stay finite
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(_input(arch)), torch.tensor([1, 3]))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    assert sum(p.grad.abs().sum() for m in _gsop_modules(model) for p in m.parameters()) > 0


@pytest.mark.parametrize('arch, attn_layer', [('resnet18', create_gsop),
                                              ('resnet50d', partial(create_gsop, manner='position'))])
def test_attn_layer_script_fx_export(arch, attn_layer):
    model = timm.create_model(arch, block_args=dict(attn_layer=attn_layer), num_classes=4, layers=(1, 1, 1, 1),
                              channels=(32, 64, 128, 256)).eval()
    x = _input(arch)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), ref, rtol=1e-4, atol=1e-5)
        _, eval_nodes = get_graph_node_names(model)
        fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
        torch.testing.assert_close(tuple(fx_model(x).values())[0], ref)
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_attn_layer_onnx_export(tmp_path):
    ort = pytest.importorskip('onnxruntime')
    model = timm.create_model('resnet18', block_args=dict(attn_layer=create_gsop), num_classes=4).eval()
    x = _input('resnet18')
    path = tmp_path / 'gsop_resnet18.onnx'
    with torch.no_grad():
        torch.onnx.export(model, (x,), input_names=['x'], output_names=['logits'], dynamo=True,
                          external_data=False).save(str(path))
        ref = model(x).numpy()
    out = ort.InferenceSession(str(path), providers=['CPUExecutionProvider']).run(None, {'x': x.numpy()})[0]
    assert abs(out - ref).max() <= 1e-4 * abs(ref).max()


def test_public_api():
    assert isinstance(timm_gsop.__version__, str)
    for name in ('covariance_pool', 'position_gram', 'isqrt', 'triu_vectorize', 'ChannelGSoP', 'PositionGSoP',
                 'GSoPFusion', 'CovarianceGate', 'create_gsop', 'ISqrtCovPool', 'GSoPResNet', 'PreResNetCifar',
                 'checkpoint_filter_fn', 'WarmStartWarning', 'WeightsNotAvailableError'):
        assert hasattr(timm_gsop, name), name
