"""The SE/CBAM-style variants and comparison baselines (issue #3): GSoP as a timm attention layer, the
gsopresnet* / cbamresnet* / isqrt_resnet* / CIFAR models, and `timm-gsop list --compare`.

Every new model runs timm's model contract (as tests/test_models.py does for GSoP-Net); the ResNet-101
variants run the expensive parts (TorchScript, fx, features) only with -m slow."""
import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import timm
from timm.layers.cbam import CbamModule
from timm.models import FeatureInfo
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

import timm_gsop  # noqa: F401 (registers the models)
from timm_gsop import ChannelGSoP, CovarianceGate, GSoPFusion, ISqrtCovPool, PositionGSoP, create_gsop
from timm_gsop.zoo import PAPER_COMPARISON, list_gsop_models
from timm_gsop_cli import main
from conftest import tiny_kwargs
from timm_gsop.models.gsop_attn_resnet import GSoPAttnResNet
from timm_gsop.models.isqrt_resnet import ISqrtResNet
from timm_gsop.models.preresnet_cifar import CIFAR100_MEAN, CIFAR100_STD, PreResNetCifar

_IMNET = dict(input=(3, 224, 224), pool=(7, 7), feat=2048, head=2048,
              chs=(64, 256, 512, 1024, 2048), red=(2, 4, 8, 16, 32))
_BASIC = dict(_IMNET, feat=512, head=512, chs=(64, 64, 128, 256, 512))
_ISQRT = dict(_IMNET, pool=(14, 14), head=32_896, red=(2, 4, 8, 16, 16))
_CIFAR = dict(input=(3, 32, 32), pool=(8, 8), feat=256, head=256, chs=(16, 64, 128, 256), red=(1, 1, 2, 4))

# parameters counted with the default number of classes (1000; CIFAR: 100)
SPECS = {
    'gsopresnet18': dict(_BASIC, params=13_313_320),
    'gsopresnet34': dict(_BASIC, params=25_074_472),
    'gsopresnet50': dict(_IMNET, params=36_305_704),
    'gsopresnet101': dict(_IMNET, params=67_590_056),
    'gsopresnet50d': dict(_IMNET, params=36_324_936),
    'gsopresnext50_32x4d': dict(_IMNET, params=35_777_576),
    'cbamresnet50': dict(_IMNET, params=28_073_576),
    'cbamresnet101': dict(_IMNET, params=49_295_628),
    'isqrt_resnet50': dict(_ISQRT, params=56_929_832),  # = fast-MPN-COV mpncovresnet50
    'isqrt_resnet101': dict(_ISQRT, params=75_921_960),
    'preresnet164_cifar': dict(_CIFAR, params=1_726_388),
    'gsop_preresnet164_cifar': dict(_CIFAR, params=1_921_076),
    'gsop2_preresnet164_cifar': dict(_CIFAR, head=8_256, params=2_654_964),
}
MODELS = list(SPECS)
BIG = {'gsopresnet101', 'cbamresnet101', 'isqrt_resnet101'}
# the big models' expensive contract checks only run with -m slow
MODELS_FAST_OR_SLOW = [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in MODELS]


def _small(name, batch=2):
    side = 32 if 'cifar' in name else 64
    return torch.randn((batch, 3, side, side), generator=torch.Generator().manual_seed(0))


def _gsop_modules(model):
    return [m for m in model.modules() if isinstance(m, (ChannelGSoP, PositionGSoP, GSoPFusion))]


# ---- registry, sizes, architecture -------------------------------------------------------------------

def test_registered_and_listed():
    listed = set(list_gsop_models())
    assert set(MODELS) <= listed
    for pattern, family in (('gsop*', 'gsopresnet'), ('cbam*', 'cbamresnet'), ('isqrt*', 'isqrt_resnet')):
        expected = {n for n in MODELS if n.startswith(family)}
        assert expected <= set(timm.list_models(pattern)), pattern
    assert {n for n in MODELS if 'cifar' in n} <= set(timm.list_models('*cifar'))
    # SE-ResNet is timm's own model, not duplicated here
    assert 'seresnet50' in timm.list_models('seresnet50') and 'seresnet50' not in listed


@pytest.mark.parametrize('name', MODELS)
def test_param_counts(name):
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == SPECS[name]['params']


@pytest.mark.parametrize('name', ['gsopresnet18', 'gsopresnet50', 'gsopresnet50d', 'gsopresnext50_32x4d'])
def test_gsop_in_every_block_like_seresnet(name):
    model = timm.create_model(name, device='meta')
    assert isinstance(model, GSoPAttnResNet) and model.gsop_placement == 'all'
    plain = timm.create_model(name.replace('gsop', ''), device='meta')  # timm's resnet18, resnet50d ...
    for stage_idx in range(4):
        ours, theirs = getattr(model, f'layer{stage_idx + 1}'), getattr(plain, f'layer{stage_idx + 1}')
        assert len(ours) == len(theirs)
        for blk in ours:
            assert isinstance(blk.se, ChannelGSoP)
            channels = (blk.bn3 if hasattr(blk, 'bn3') else blk.bn2).num_features
            assert blk.se.channels == channels and blk.se.dim == min(128, channels)
            # the released code's stage-1 rule: reduce with stride 2 there
            assert blk.se.conv_reduce.stride == ((2, 2) if stage_idx == 0 else (1, 1))
        # the backbone is timm's standard ResNet: stride 2 in every stage after the first, no dilation
        first = ours[0]
        assert (first.conv2 if hasattr(first, 'conv3') else first.conv1).stride == ((1, 1) if stage_idx == 0 else (2, 2))
    backbone = lambda m: {k: v.shape for k, v in m.state_dict().items() if '.se.' not in k}
    assert backbone(model) == backbone(plain)


def test_reduced_dim_never_expands_in_small_blocks():
    model = timm.create_model('gsopresnet18', device='meta')
    dims = [blk.se.dim for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for blk in stage]
    assert dims == [64, 64, 128, 128, 128, 128, 128, 128]
    assert model.layer1[0].se.conv_reduce.weight.shape == (64, 64, 1, 1)
    assert model.layer1[0].se.gate.conv_row.weight.shape == (256, 1, 64, 1)


def test_stagewise_placement_kwarg():
    model = timm.create_model('gsopresnet50', gsop_placement='last', device='meta')
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        assert [blk.se is not None for blk in stage] == [False] * (len(stage) - 1) + [True]
    # the paper's blocks on the stride-32 backbone: GSoP-Net1's parameter count (same blocks, same head)
    assert sum(p.numel() for p in model.parameters()) == 28_285_224
    model = timm.create_model('gsopresnet50', gsop_stage1_stride=1, gsop_manner='fusion_max', device='meta')
    assert model.layer1[0].se.channel.conv_reduce.stride == (1, 1)
    assert all(isinstance(blk.se, GSoPFusion) for blk in model.layer3)


def test_cbam_in_every_bottleneck():
    model = timm.create_model('cbamresnet50', device='meta')
    blocks = [blk for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for blk in stage]
    assert len(blocks) == 16 and all(isinstance(blk.se, CbamModule) for blk in blocks)
    assert model.layer4[0].conv2.stride == (2, 2)
    assert len(timm.create_model('cbamresnet101', device='meta').layer3) == 23


@pytest.mark.parametrize('name', ['isqrt_resnet50', 'isqrt_resnet101'])
def test_isqrt_architecture_as_fast_mpncov(name):
    model = timm.create_model(name, device='meta')
    assert isinstance(model, ISqrtResNet) and not _gsop_modules(model)
    assert len(model.layer3) == (23 if '101' in name else 6)
    for blk in model.layer4:
        assert blk.conv2.stride == (1, 1) and blk.conv2.dilation == (1, 1)
    assert model.layer4[0].downsample[0].stride == (1, 1)
    head = model.global_pool
    assert isinstance(head, ISqrtCovPool) and head.dim == 256 and head.num_iters == 5
    assert head.conv_reduce.bias is None and head.conv_reduce.weight.shape == (256, 2048, 1, 1)
    assert model.fc.in_features == 32_896


def test_cifar_architecture():
    base = timm.create_model('preresnet164_cifar', device='meta')
    net1 = timm.create_model('gsop_preresnet164_cifar', device='meta')
    net2 = timm.create_model('gsop2_preresnet164_cifar', device='meta')
    for model in (base, net1, net2):
        assert isinstance(model, PreResNetCifar)
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
        stages = (model.layer1, model.layer2, model.layer3)
        assert [len(s) for s in stages] == [18, 18, 18]
        assert [s[0].conv2.stride for s in stages] == [(1, 1), (2, 2), (2, 2)]
        # 164 layers: the stem, 3 convs per block, the classifier
        assert 1 + 3 * sum(len(s) for s in stages) + 1 == 164
        assert model.fc.out_features == 100
    assert not _gsop_modules(base)
    for model, stages in ((net1, (True, True, True)), (net2, (True, True, False))):
        for stage, enabled in zip((model.layer1, model.layer2, model.layer3), stages):
            assert [blk.se is not None for blk in stage] == [False] * 17 + [enabled]
            if enabled:
                assert isinstance(stage[-1].se, ChannelGSoP) and stage[-1].se.dim == 64
                assert stage[-1].se.conv_reduce.stride == (1, 1)
    assert base.global_pool.pool_type == 'avg' and net1.global_pool.pool_type == 'avg'
    assert isinstance(net2.global_pool, ISqrtCovPool)
    assert net2.global_pool.dim == 128 and net2.global_pool.num_iters == 3 and net2.fc.in_features == 8_256


# ---- timm contract over every new model --------------------------------------------------------------

@pytest.mark.parametrize('name', MODELS)
def test_forward_backward_all_params_get_grad(name):
    model = timm.create_model(name, num_classes=7).train()
    out = model(_small(name))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing[:5]}'
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('name', MODELS)
def test_default_cfg_consistency(name):
    spec = SPECS[name]
    meta = timm.create_model(name, device='meta')
    cfg = meta.pretrained_cfg
    for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'first_conv', 'classifier',
                'pool_size', 'license', 'paper_ids', 'origin_url', 'num_classes', 'architecture', 'tag'):
        assert key in cfg and cfg[key] not in (None, ''), key
    assert cfg['input_size'] == spec['input'] and cfg['pool_size'] == spec['pool']
    assert cfg['num_classes'] == meta.num_classes
    if 'cifar' in name:
        assert cfg['mean'] == CIFAR100_MEAN and cfg['std'] == CIFAR100_STD and cfg['crop_pct'] == 1.0
        assert cfg['num_classes'] == 100 and cfg['tag'] == 'cifar100'
    else:
        assert cfg['crop_pct'] == 0.875 and cfg['interpolation'] == 'bilinear' and cfg['num_classes'] == 1000
    state_dict = meta.state_dict()
    assert cfg['first_conv'] + '.weight' in state_dict and cfg['classifier'] + '.weight' in state_dict
    # pool_size is the actual final map at the default input size
    with torch.no_grad():
        feats = meta.forward_features(torch.empty(1, *cfg['input_size'], device='meta'))
    assert feats.shape == (1, spec['feat'], *cfg['pool_size'])
    assert meta.num_features == spec['feat'] and meta.head_hidden_size == spec['head']

    model = timm.create_model(name).eval()
    x = _small(name, batch=1)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (1, spec['head'])
        model.reset_classifier(0)
        assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, '')
        assert model(x).shape == feats.shape


@pytest.mark.parametrize('name', MODELS_FAST_OR_SLOW)
def test_features_only(name):
    spec = SPECS[name]
    model = timm.create_model(name, features_only=True).eval()
    assert tuple(model.feature_info.channels()) == spec['chs']
    assert tuple(model.feature_info.reduction()) == spec['red']
    x = _small(name, batch=1)[..., :-8]  # not square
    with torch.no_grad():
        outs = model(x)
    assert len(outs) == len(spec['chs'])
    for o, c, r in zip(outs, spec['chs'], spec['red']):
        assert o.shape == (1, c, math.ceil(x.shape[-2] / r), math.ceil(x.shape[-1] / r))
    sub = timm.create_model(name, features_only=True, out_indices=(1, 3)).eval()
    assert tuple(sub.feature_info.channels()) == (spec['chs'][1], spec['chs'][3])


@pytest.mark.parametrize('name', MODELS_FAST_OR_SLOW)
def test_forward_intermediates_and_prune(name):
    spec = SPECS[name]
    model = timm.create_model(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    x = _small(name)
    side = x.shape[-1]
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [o.shape[1] for o in inter] == info.channels() == list(spec['chs'])
        assert [side // o.shape[-1] for o in inter] == info.reduction()
        only = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        torch.testing.assert_close(only[1], inter[2])
        model.prune_intermediate_layers(indices=[1, 2])
        assert model.num_classes == 0 and model.num_features == spec['chs'][2]
        torch.testing.assert_close(model(x), inter[2])


# TorchScript and fx on the tiny version of every model (same modules and code paths, a fraction of the
# time); timm's own suite scripts and traces the full-size models with -m slow
@pytest.mark.parametrize('name', MODELS)
def test_torchscript(name):
    model = timm.create_model(name, **tiny_kwargs(name)).eval()
    scripted = torch.jit.script(model)
    x = _small(name)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', MODELS)
def test_fx_timm_feature_extractor(name):
    model = timm.create_model(name, **tiny_kwargs(name)).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    x = _small(name)
    with torch.no_grad():
        torch.testing.assert_close(tuple(fx_model(x).values())[0], model(x))
    if _gsop_modules(model):
        assert any('gate' in n for n in eval_nodes)  # the float32 gate is a leaf
    fx_train = create_feature_extractor(model.train(), return_nodes=[train_nodes[-1]])
    tuple(fx_train(x).values())[0].mean().backward()
    assert all(p.grad is not None for p in fx_train.parameters())


@pytest.mark.parametrize('name', MODELS)
def test_unknown_kwarg_is_type_error(name):
    with pytest.raises(TypeError):
        timm.create_model(name, not_an_arg=1, device='meta')


@pytest.mark.parametrize('name', ['gsopresnet50', 'gsop_preresnet164_cifar'])
def test_bad_choices_are_value_errors_naming_value_and_choices(name):
    with pytest.raises(ValueError, match="Unknown gsop_manner 'spatial'; valid choices: channel, position"):
        timm.create_model(name, gsop_manner='spatial', device='meta')
    with pytest.raises(ValueError, match="Unknown gsop_placement 'every'; valid choices: all, last"):
        timm.create_model(name, gsop_placement='every', device='meta')
    if 'cifar' in name:
        with pytest.raises(ValueError, match="Unknown global_pool 'median'; valid choices: 'avg'"):
            timm.create_model(name, global_pool='median', device='meta')
        with pytest.raises(ValueError, match='3 stages'):
            timm.create_model(name, gsop_stages=(1, 1), device='meta')


def test_isqrt_rejects_gsop_kwargs():
    with pytest.raises(TypeError, match="'gsop_manner'.*no GSoP"):
        timm.create_model('isqrt_resnet50', gsop_manner='position', device='meta')
    model = timm.create_model('isqrt_resnet50', isqrt_iters=3, num_classes=0, device='meta')
    assert model.global_pool.num_iters == 3 and model.head_hidden_size == 32_896


@pytest.mark.parametrize('name, kwargs', [
    ('gsopresnet18', dict(gsop_manner='position')),
    ('gsopresnext50_32x4d', dict(gsop_manner='fusion_concat', gsop_placement='last')),
    ('gsop_preresnet164_cifar', dict(gsop_manner='fusion_avg', gsop_placement='all', gsop_stages=(0, 1, 0))),
])
def test_other_manners_train(name, kwargs):
    model = timm.create_model(name, num_classes=3, **kwargs).train()
    out = model(_small(name))
    nn.functional.cross_entropy(out, torch.tensor([0, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_train_py_kwargs_reach_the_models():
    common = dict(pretrained=False, in_chans=3, num_classes=10, drop_rate=0.2, drop_path_rate=0.1,
                  global_pool='avgmax', bn_momentum=0.01, bn_eps=1e-3, scriptable=False, checkpoint_path='')
    for name in ('gsopresnet50', 'preresnet164_cifar'):
        model = timm.create_model(name, **common)
        assert model.drop_rate == 0.2 and model.global_pool.pool_type == 'avgmax'
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(m.momentum == 0.01 and m.eps == 1e-3 for m in bns)
        assert any(type(m).__name__ == 'DropPath' for m in model.modules())


def test_cifar_head_swap_and_group_matcher():
    from timm.models import group_parameters
    model = timm.create_model('gsop2_preresnet164_cifar', dtype=torch.float64)
    head = model.global_pool
    model.reset_classifier(10)
    assert model.global_pool is head and model.fc.weight.dtype == torch.float64
    model.reset_classifier(10, 'avg')
    assert model.head_hidden_size == 256
    groups = group_parameters(model, model.group_matcher())
    assert {n for names in groups.values() for n in names} == {n for n, _ in model.named_parameters()}
    model = timm.create_model('preresnet164_cifar', global_pool='')
    with pytest.raises(ValueError, match="global_pool=''"):
        model(torch.randn(1, 3, 32, 32))


def test_cifar_grad_checkpointing_same_outputs():
    model = timm.create_model('gsop2_preresnet164_cifar').eval()
    x = _small('cifar')
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), ref)
        torch.testing.assert_close(model.forward_intermediates(x)[0], model.forward_features(x))


# ---- GSoP as an attention layer inside timm's own ResNets ----------------------------------------------

ATTN_CASES = [
    ('resnet50', create_gsop, ChannelGSoP),
    ('resnext50_32x4d', ChannelGSoP, ChannelGSoP),
    ('resnet18', create_gsop, ChannelGSoP),
    ('resnet50d', partial(create_gsop, manner='position'), PositionGSoP),
    ('resnet18', partial(create_gsop, manner='fusion_avg', dim=32), GSoPFusion),
]


@pytest.mark.parametrize('arch, attn_layer, cls', ATTN_CASES)
def test_attn_layer_in_timm_resnets_trains(arch, attn_layer, cls):
    model = timm.create_model(arch, block_args=dict(attn_layer=attn_layer), num_classes=4)
    blocks = [blk for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for blk in stage]
    assert all(isinstance(blk.se, cls) for blk in blocks)
    for blk in blocks:
        channels = (blk.bn3 if hasattr(blk, 'bn3') else blk.bn2).num_features
        gsop = blk.se.channel if isinstance(blk.se, GSoPFusion) else blk.se
        assert gsop.dim == min(32 if cls is GSoPFusion else 128, channels)
    # timm's default zero_init_last zeroes the last BN: GSoP starts on a zero input and must stay finite
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = _small(arch)
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 3]))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    gsop_grads = [p.grad.abs().sum() for m in _gsop_modules(model) for p in m.parameters()]
    assert sum(gsop_grads) > 0  # after one step the zero-init BN moved and GSoP learns


def test_position_gsop_gradient_passes_at_zero_input():
    # timm's zero_init_last starts a block's last BN at 0: the GSoP input is all zeros, and the block only
    # ever trains if the gradient reaches that BN through ReLU(x * a) at x * a == 0
    module = PositionGSoP(64).train()
    x = torch.zeros(2, 64, 8, 8, requires_grad=True)
    out = module(x)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert (x.grad > 0).all()
    y = torch.tensor([[-1.0, 0.0, 2.0, float('nan')]]).view(1, 1, 2, 2).expand(1, 64, 2, 2)
    a = module.attention(y)
    torch.testing.assert_close(module(y), torch.relu(y * a), equal_nan=True)


def test_gsopresnet_defaults():
    model = timm.create_model('gsopresnet50')
    assert torch.count_nonzero(model.layer1[0].bn3.weight) > 0  # zero_init_last=False, as the package
    assert torch.count_nonzero(timm.create_model('gsopresnet50', zero_init_last=True).layer1[0].bn3.weight) == 0
    with pytest.raises(ValueError, match='places its own GSoP'):
        timm.create_model('gsopresnet50', block_args=dict(attn_layer='se'), device='meta')


@pytest.mark.parametrize('arch, attn_layer', [('resnet18', create_gsop), ('resnet50d', partial(create_gsop, manner='position'))])
def test_attn_layer_script_fx_export(arch, attn_layer):
    model = timm.create_model(arch, block_args=dict(attn_layer=attn_layer), num_classes=4, layers=(1, 1, 1, 1),
                              channels=(32, 64, 128, 256)).eval()
    x = _small(arch)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), ref, rtol=1e-4, atol=1e-5)
        _, eval_nodes = get_graph_node_names(model)
        fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
        torch.testing.assert_close(tuple(fx_model(x).values())[0], ref)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_attn_layer_onnx_export(tmp_path):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    model = timm.create_model('resnet18', block_args=dict(attn_layer=create_gsop), num_classes=4).eval()
    x = _small('resnet18')
    path = tmp_path / 'gsop_resnet18.onnx'
    with torch.no_grad():
        torch.onnx.export(model, (x,), input_names=['x'], output_names=['logits'], dynamo=True,
                          external_data=False).save(str(path))
        ref = model(x).numpy()
    out = ort.InferenceSession(str(path), providers=['CPUExecutionProvider']).run(None, {'x': x.numpy()})[0]
    assert abs(out - ref).max() <= 1e-4 * abs(ref).max()


# ---- `timm-gsop list` ---------------------------------------------------------------------------------

def _rows(text):
    return {line.split()[0]: line.split() for line in text.splitlines()[2:] if line.strip() and '  ' in line}


def test_list_shows_the_whole_family(capsys):
    assert main(['list', '*cifar']) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {'preresnet164_cifar', 'gsop_preresnet164_cifar', 'gsop2_preresnet164_cifar'}
    assert rows['preresnet164_cifar'][1:4] == ['1,726,388', '0.50', '3x32x32']
    assert main(['list', 'isqrt*']) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows['isqrt_resnet50'][1:4] == ['56,929,832', '13.11', '3x224x224']


def test_list_compare(capsys):
    assert main(['list', '--compare']) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert 'top-1 err (reported)' in header and 'top-5 err (reported)' in header
    rows = {line.split()[0]: line for line in out.splitlines()[2:8]}
    assert list(rows) == [name for name, *_ in PAPER_COMPARISON] == [
        'resnet50', 'seresnet50', 'cbamresnet50', 'isqrt_resnet50', 'gsop_resnet50', 'gsop2_resnet50']
    assert '25,557,032' in rows['resnet50'] and '8.18' in rows['resnet50']
    assert '56,929,832' in rows['isqrt_resnet50'] and '22.14' in rows['isqrt_resnet50']
    assert '28,285,224' in rows['gsop_resnet50'] and '12.79' in rows['gsop_resnet50']
    assert '22.02' in rows['gsop_resnet50'] and '5.88' in rows['gsop_resnet50']
    assert '21.19' in rows['gsop2_resnet50'] and '5.64' in rows['gsop2_resnet50']
    assert 'as reported by' in out
    assert main(['list', '--compare', 'gsop*']) == 0
    assert len(_rows(capsys.readouterr().out)) == 2
    assert main(['list', '--compare', 'nothing*']) == 2
