"""The GSoP-family networks are the ones PAPER.md describes: parameters (shape by shape) as an independent build
(the released code's re-implementation, fast-MPN-COV's, timm's own ResNets), GSoP modules and head where the
released code puts them, the manners and placements, the modules as timm attention layers, and kwarg errors."""
from collections import Counter
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn

import official_reference as released
from conftest import tiny_kwargs
from timm_gsop.layers import GSOP_MANNERS, ChannelGSoP, GSoPFusion, ISqrtCovPool, PositionGSoP, create_gsop

GSOP_TYPES = (ChannelGSoP, PositionGSoP, GSoPFusion)
MODULE_TYPE = dict(channel=ChannelGSoP, position=PositionGSoP, fusion_avg=GSoPFusion, fusion_max=GSoPFusion,
                   fusion_concat=GSoPFusion)
IMAGE = torch.empty(1, 3, 224, 224, device='meta')


def shapes(model):
    return Counter(tuple(p.shape) for p in model.parameters())


def gsop_shapes(channels):
    """Parameter shapes of the released channel GSoP block on a ``channels`` output, d = min(128, channels)."""
    with torch.device('meta'):
        block = released.OfficialBottleneck(channels, channels // 4, attention='1', att_dim=min(128, channels))
    plain = {'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3'}
    return Counter(tuple(p.shape) for n, p in block.named_parameters() if n.split('.')[0] not in plain)


def timm_with_gsop(base):
    """timm's own ResNet of the same widths, plus the released GSoP block's parameters on every residual block."""
    model = timm.create_model(base, device='meta')
    counts = shapes(model)
    for block in (m for m in model.modules() if hasattr(m, 'se')):
        counts += gsop_shapes((block.bn3 if hasattr(block, 'bn3') else block.bn2).num_features)
    return counts


def on_meta(build, *args):
    with torch.device('meta'):
        return shapes(build(*args))


SPEC = {  # our model (-manner) -> an independent build's parameter shapes
    **{f'gsop{"2" if mode == 2 else ""}_{arch}': partial(on_meta, released.build_official, arch, mode)
       for arch in ('resnet50', 'resnet101') for mode in (1, 2)},
    **{f'gsop_resnet50-{m}': partial(on_meta, released.build_official, 'resnet50', 1, m) for m in GSOP_MANNERS
       if m != 'channel'},
    'gsop2_resnet50-fusion_concat': partial(on_meta, released.build_official, 'resnet50', 2, 'fusion_concat'),
    **{f'isqrt_resnet{depth}': partial(on_meta, released.mpncov_resnet, depth) for depth in (50, 101)},
    **{f'gsop{base}': partial(timm_with_gsop, base) for base in (
        'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet50d', 'resnext50_32x4d')},
}


@pytest.mark.parametrize('spec', SPEC)
def test_parameters_equal_an_independent_build(spec):
    name, _, manner = spec.partition('-')
    model = timm.create_model(name, device='meta', **(dict(gsop_manner=manner) if manner else {}))
    expected = SPEC[spec]()
    assert shapes(model) == expected
    assert sum(p.numel() for p in model.parameters()) == sum(n * torch.Size(s).numel() for s, n in expected.items())


@pytest.mark.parametrize('depth', [50, 101])
def test_cbam_baseline_is_timms_resnet_with_cbam(depth):
    ours = timm.create_model(f'cbamresnet{depth}', device='meta')
    theirs = timm.create_model(f'resnet{depth}', block_args=dict(attn_layer='cbam'), device='meta')
    assert repr(ours) == repr(theirs) and shapes(ours) == shapes(theirs)


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop_resnet101', 'gsop2_resnet50', 'gsop2_resnet101'])
def test_structure_as_released(name):
    model = timm.create_model(name, device='meta')
    arch, mode = name.split('_')[1], 2 if name.startswith('gsop2') else 1
    with torch.device('meta'):
        ref = released.build_official(arch, mode)
    for i, codes in enumerate(released.released_attention_layout(arch, mode, 'channel')):
        stage, ref_stage = getattr(model, f'layer{i + 1}'), getattr(ref, f'layer{i + 1}')
        # in the last block of each stage (Net2: not in the last stage), d = 128, stride 2 in stage 1 only
        assert [isinstance(b.se, GSOP_TYPES) for b in stage] == [c != '0' for c in codes]
        assert [(b.se.dim, b.se.stride) for b in stage if b.se is not None] == \
            [(b.conv_for_DR.out_channels, b.conv_for_DR.stride[0]) for b in ref_stage if b.attention != '0']
    assert model.layer1[-1].se.stride == 2
    # last stage at stride 1 without dilation: the released 14x14 map at 224
    assert all(m.dilation == (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d))
    feats = model.forward_features(IMAGE)
    assert feats.shape == ref.forward_features(IMAGE).shape == (1, 2048, 14, 14)
    assert model.feature_info[-1]['reduction'] == 16
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape[-1] == model.fc.in_features == ref.fc.in_features
    if mode == 2:  # the iSQRT-COV head: 1x1 conv to 256, 3 iterations, 256 * 257 / 2 = 32,896 features
        head = model.global_pool
        assert isinstance(head, ISqrtCovPool) and head.num_iters == 3
        assert head.conv_reduce.weight.shape == ref.layer_reduce.weight.shape == (256, 2048, 1, 1)
        assert pooled.shape[-1] == 256 * 257 // 2


@pytest.mark.parametrize('name', ['isqrt_resnet50', 'isqrt_resnet101'])
def test_isqrt_cov_as_fast_mpn_cov(name):
    model = timm.create_model(name, device='meta')
    with torch.device('meta'):
        ref = released.mpncov_resnet(int(name[len('isqrt_resnet'):]))
    assert not any(isinstance(m, GSOP_TYPES) for m in model.modules())
    assert isinstance(model.global_pool, ISqrtCovPool) and model.global_pool.num_iters == 5
    feats = model.forward_features(IMAGE)
    assert feats.shape == (1, 2048, 14, 14)
    assert model.forward_head(feats, pre_logits=True).shape[-1] == ref.fc.in_features


@pytest.mark.parametrize('manner', GSOP_MANNERS)
def test_every_manner_builds_and_trains(manner):
    torch.manual_seed(0)
    model = timm.create_model('gsop_resnet50', gsop_manner=manner, **tiny_kwargs('gsop_resnet50'))
    assert [type(b.se) for b in model.modules() if hasattr(b, 'se')] == [MODULE_TYPE[manner]] * 4
    out = model(torch.randn(2, 3, 64, 64))
    out.square().mean().backward()
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_placement_all_and_last_stride_2():
    model = timm.create_model('gsop_resnet50', gsop_placement='all', last_stride=2, device='meta')
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    assert all(isinstance(b.se, ChannelGSoP) for b in blocks)
    assert model.feature_info[-1]['reduction'] == 32
    assert model.forward_features(IMAGE).shape == timm.create_model('resnet50', device='meta').forward_features(
        IMAGE).shape == (1, 2048, 7, 7)


@pytest.mark.parametrize('attn', [partial(create_gsop, manner=m) for m in GSOP_MANNERS] + [ChannelGSoP],
                         ids=[*GSOP_MANNERS, 'ChannelGSoP'])
def test_gsop_modules_as_timm_attention_layers(attn):
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=7, block_args=dict(attn_layer=attn))
    assert all(isinstance(b.se, GSOP_TYPES) for b in model.modules() if hasattr(b, 'se'))
    out = model(torch.randn(2, 3, 64, 64))
    out.square().mean().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())
    # the device and dtype keywords reach the modules
    model = timm.create_model('resnet18', block_args=dict(attn_layer=attn), device='meta', dtype=torch.float64)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {('meta', torch.float64)}


def test_attention_layer_resnet50_has_gsopresnet50s_state_dict():
    # docs/models.md: the same state dict as gsopresnet50
    ours = timm.create_model('gsopresnet50', device='meta').state_dict()
    theirs = timm.create_model('resnet50', block_args=dict(attn_layer=create_gsop), device='meta').state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


NET = 'gsop2_resnet50'
CIFAR = 'gsop2_preresnet164_cifar'
ERRORS = [  # (models, bad kwargs, the name and value the message must mention)
    ((NET, CIFAR), dict(gsop_manner='spatial'), 'gsop_manner', 'spatial'),
    ((NET, CIFAR), dict(gsop_placement='first'), 'gsop_placement', 'first'),
    ((NET, CIFAR), dict(gsop_stage1_stride=3), 'gsop_stage1_stride', '3'),
    ((NET, CIFAR), dict(last_stride=4), 'last_stride', '4'),
    ((NET, CIFAR), dict(gsop_stages=(1, 1)), 'gsop_stages', None),
    ((NET, CIFAR), dict(global_pool='median'), 'global_pool', 'median'),
    ((NET, CIFAR), dict(isqrt_dim=-1), 'isqrt_dim', '-1'),
    ((NET, CIFAR), dict(isqrt_iters=0), 'isqrt_iters', '0'),
    ((NET,), dict(block_args=dict(attn_layer='se')), 'attn_layer', None),
    ((CIFAR,), dict(layers=(1, 1)), 'layers', None),
]


@pytest.mark.parametrize('name,bad,kwarg,value', [(n, *e[1:]) for e in ERRORS for n in e[0]])
def test_bad_kwargs_raise_value_error_naming_them(name, bad, kwarg, value):
    with pytest.raises(ValueError) as info:
        timm.create_model(name, **dict(tiny_kwargs(name), **bad))
    assert kwarg in str(info.value) and (value is None or value in str(info.value))
