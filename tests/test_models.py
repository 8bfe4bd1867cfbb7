"""timm's model contract, checked for every registered GSoP-Net (the properties timm's own
tests/test_models.py checks, plus the architecture facts of the paper's released code)."""
import math

import pytest
import torch
import torch.nn as nn
import timm
from timm.models import FeatureInfo
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

import timm_gsop
from timm_gsop import ChannelGSoP, CovarianceGate, GSoPFusion, GSoPResNet, ISqrtCovPool, PositionGSoP
from timm_gsop.zoo import list_gsop_models

MODELS = ['gsop_resnet50', 'gsop_resnet101', 'gsop2_resnet50', 'gsop2_resnet101']
MANNERS = ['channel', 'position', 'fusion_avg', 'fusion_max', 'fusion_concat']
# small inputs keep the suite fast; 64 still gives layer4 a 4x4 map (stride 16)
SMALL = (2, 3, 64, 64)


def _input(shape=SMALL, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _is_net2(name):
    return name.startswith('gsop2')


def test_registered_models():
    assert set(MODELS) <= set(list_gsop_models())
    assert set(timm.list_models('gsop*')) >= set(MODELS)
    for name in MODELS:
        assert timm.is_model(name)


@pytest.mark.parametrize('name, expected', [
    ('gsop_resnet50', 28_285_224), ('gsop_resnet101', 47_277_352),
    ('gsop2_resnet50', 58_278_568), ('gsop2_resnet101', 77_270_696),
])
def test_param_counts_match_released_code(name, expected):
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize('name', MODELS)
def test_architecture_as_released(name):
    model = timm.create_model(name, device='meta')
    depths = (3, 4, 23, 3) if '101' in name else (3, 4, 6, 3)
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert tuple(len(s) for s in stages) == depths
    # last stage: stride 1, no dilation anywhere in it
    for block in model.layer4:
        assert block.conv2.stride == (1, 1) and block.conv2.dilation == (1, 1)
    assert model.layer4[0].downsample[0].stride == (1, 1)
    # GSoP only in the last block of each stage; Net2 has none in layer4
    for stage_idx, stage in enumerate(stages):
        for block_idx, block in enumerate(stage):
            expect = block_idx == len(stage) - 1 and not (_is_net2(name) and stage_idx == 3)
            assert isinstance(block.se, ChannelGSoP) == expect, (stage_idx, block_idx)
            if expect:
                assert block.se.dim == 128
                assert block.se.conv_reduce.stride == ((2, 2) if stage_idx == 0 else (1, 1))
    if _is_net2(name):
        assert isinstance(model.global_pool, ISqrtCovPool)
        assert model.global_pool.dim == 256 and model.global_pool.num_iters == 3
        assert model.fc.in_features == 32_896
    else:
        assert model.global_pool.pool_type == 'avg'
        assert model.fc.in_features == 2048


@pytest.mark.parametrize('manner, cls', [
    ('channel', ChannelGSoP), ('position', PositionGSoP), ('fusion_avg', GSoPFusion),
    ('fusion_max', GSoPFusion), ('fusion_concat', GSoPFusion)])
def test_gsop_manner_kwarg(manner, cls):
    model = timm.create_model('gsop_resnet50', gsop_manner=manner, gsop_dim=64, device='meta')
    assert isinstance(model.layer3[5].se, cls)
    assert model.gsop_manner == manner


@pytest.mark.parametrize('name', MODELS)
def test_forward_backward_all_params_get_grad(name):
    model = timm.create_model(name, num_classes=42)
    model.train()
    out = model(_input())
    assert out.shape == (2, 42)
    assert torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing[:5]}'
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('net', ['gsop_resnet50', 'gsop2_resnet50'])
@pytest.mark.parametrize('manner', MANNERS)
def test_every_manner_trains(net, manner):
    model = timm.create_model(net, num_classes=5, gsop_manner=manner).train()
    out = model(_input())
    loss = nn.functional.cross_entropy(out, torch.tensor([1, 3]))
    loss.backward()  # the released code's in-place residual add breaks this in position modes
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing[:5]}'
    assert torch.isfinite(loss)


@pytest.mark.parametrize('name', MODELS)
def test_default_cfg_consistency(name):
    """Same checks as timm's test_model_default_cfgs, at the default input size."""
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'first_conv', 'classifier',
                'pool_size', 'license', 'paper_ids', 'origin_url', 'num_classes', 'architecture', 'tag'):
        assert key in cfg and cfg[key] not in (None, ''), key
    assert cfg['crop_pct'] == 0.875 and cfg['interpolation'] == 'bilinear'
    assert cfg['input_size'] == (3, 224, 224) and cfg['pool_size'] == (14, 14)
    assert cfg['license'] == 'mit' and cfg['paper_ids'] == 'arXiv:1811.12006'
    assert model.num_features == 2048
    assert model.head_hidden_size == (32_896 if _is_net2(name) else 2048)

    x = _input((1, *cfg['input_size']))
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape == (1, model.num_features, *cfg['pool_size'])
        assert pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre.shape
        torch.testing.assert_close(pooled, pre)
        model.reset_classifier(0, '')
        assert model(x).shape == feats.shape
    state_dict = model.state_dict()
    assert cfg['first_conv'] + '.weight' in state_dict
    assert cfg['classifier'] + '.weight' in timm.create_model(name, device='meta').state_dict()


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50'])
def test_num_classes_zero_and_no_pool_via_init(name):
    x = _input()
    with torch.no_grad():
        model = timm.create_model(name, num_classes=0).eval()
        out = model(x)
        assert out.shape == (2, 32_896 if _is_net2(name) else 2048)
        assert model.get_classifier().__class__ is nn.Identity
        model = timm.create_model(name, num_classes=0, global_pool='').eval()
        assert model(x).shape == (2, 2048, 4, 4)
    # accepted as timm's ResNet accepts it (reset_classifier(0, '') then reset_classifier(10)), named when run
    model = timm.create_model(name, num_classes=10, global_pool='').eval()
    with pytest.raises(ValueError, match="global_pool='' .* cannot take the unpooled 4-D feature map"):
        model(x)
    with pytest.raises(ValueError, match="Unknown global_pool 'bogus'.*'avg'"):
        timm.create_model(name, global_pool='bogus')


def test_global_pool_choices():
    x = _input()
    for pool, width in (('max', 2048), ('catavgmax', 4096), ('isqrt', 32_896)):
        model = timm.create_model('gsop_resnet50', num_classes=0, global_pool=pool).eval()
        assert model.head_hidden_size == width
        assert model(x).shape == (2, width)
    # Net2's head can be swapped for average pooling and back
    model = timm.create_model('gsop2_resnet50').eval()
    model.reset_classifier(3, 'avg')
    assert model(x).shape == (2, 3) and model.head_hidden_size == 2048


def test_reset_classifier_keeps_trained_cov_head_device_and_dtype():
    model = timm.create_model('gsop2_resnet50', dtype=torch.float64)
    head = model.global_pool
    weight = head.conv_reduce.weight.detach().clone()
    model.reset_classifier(10)
    assert model.global_pool is head  # the trained iSQRT-COV head survives a classifier change
    torch.testing.assert_close(model.global_pool.conv_reduce.weight, weight)
    assert model.fc.out_features == 10 and model.fc.weight.dtype == torch.float64
    assert model.get_classifier() is model.fc
    model.eval()
    model.reset_classifier(7, 'avg')
    assert model.fc.weight.dtype == torch.float64 and not model.fc.training
    with pytest.raises(ValueError, match='valid choices'):
        model.reset_classifier(7, 'median')


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet101'])
@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3, 4), (1, 3, 4)])
def test_features_only(name, out_indices):
    model = timm.create_model(name, features_only=True, out_indices=out_indices).eval()
    channels = model.feature_info.channels()
    reductions = model.feature_info.reduction()
    all_channels = (64, 256, 512, 1024, 2048)
    all_reductions = (2, 4, 8, 16, 16)  # stride-1 last stage
    assert channels == [all_channels[i] for i in out_indices]
    assert reductions == [all_reductions[i] for i in out_indices]
    x = _input((1, 3, 64, 96))
    with torch.no_grad():
        outs = model(x)
    assert len(outs) == len(out_indices)
    for o, c, r in zip(outs, channels, reductions):
        assert o.shape == (1, c, math.ceil(64 / r), math.ceil(96 / r))
        assert torch.isfinite(o).all()


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50'])
def test_forward_intermediates_and_prune(name):
    model = timm.create_model(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    x = _input()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [o.shape[1] for o in inter] == info.channels()
        assert [64 // o.shape[-1] for o in inter] == info.reduction()
        only = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        torch.testing.assert_close(only[0], inter[1])
        torch.testing.assert_close(only[1], inter[2])
        early = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[-1], inter[-1])

        kept = model.prune_intermediate_layers(indices=[1, 2])
        assert list(kept) == [1, 2]
        assert not list(model.layer4.parameters()) and model.num_classes == 0
        assert model.num_features == 512
        pruned = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        torch.testing.assert_close(pruned[1], inter[2])
        assert model(x).shape == (2, 512, 8, 8)


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50'])
def test_grad_checkpointing_same_outputs(name):
    model = timm.create_model(name, gsop_manner='fusion_avg').eval()
    x = _input()
    with torch.no_grad():
        ref = model(x)
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    model.train()
    model(x.requires_grad_()).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_group_matcher_covers_all_params_and_layer_decay():
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2
    model = timm.create_model('gsop2_resnet50')
    groups = group_parameters(model, model.group_matcher(coarse=False))
    grouped = {n for names in groups.values() for n in names}
    assert grouped == {n for n, _ in model.named_parameters()}
    # GSoP parameters go with their block, the covariance head with the classifier
    gsop_group = [g for g, names in groups.items() if 'layer3.5.se.conv_reduce.weight' in names][0]
    assert 'layer3.5.conv1.weight' in groups[gsop_group]
    head_group = [g for g, names in groups.items() if 'fc.weight' in names][0]
    assert 'global_pool.conv_reduce.weight' in groups[head_group]
    opt = create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=1e-4, layer_decay=0.7)
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize('name, manner', [
    ('gsop_resnet50', 'channel'), ('gsop_resnet50', 'fusion_concat'), ('gsop2_resnet50', 'position')])
def test_torchscript(name, manner):
    model = timm.create_model(name, gsop_manner=manner).eval()
    scripted = torch.jit.script(model)
    x = _input()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name, manner', [
    ('gsop_resnet50', 'fusion_max'), ('gsop2_resnet50', 'channel'), ('gsop2_resnet50', 'fusion_concat')])
def test_fx_timm_feature_extractor(name, manner):
    """As timm's test_model_forward_fx / backward_fx: trace with timm's fx helpers, same outputs."""
    model = timm.create_model(name, gsop_manner=manner, num_classes=42).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    x = _input()
    with torch.no_grad():
        assert torch.equal(tuple(fx_model(x).values())[0], model(x))
    # the float32 regions are leaves of the graph
    assert any('gate' in n for n in eval_nodes)
    fx_train = create_feature_extractor(model.train(), return_nodes=[train_nodes[-1]])
    out = tuple(fx_train(x).values())[0]
    out.mean().backward()
    assert all(p.grad is not None for p in fx_train.parameters())


def test_fx_plain_symbolic_trace():
    model = timm.create_model('gsop2_resnet50', gsop_manner='fusion_avg').eval()
    traced = torch.fx.symbolic_trace(model)
    x = _input()
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    targets = {str(n.target) for n in traced.graph.nodes if n.op == 'call_function'}
    assert any('covariance_pool' in t for t in targets) and any('isqrt' in t for t in targets)


def test_meta_device_and_dtype():
    model = timm.create_model('gsop2_resnet50', device='meta')
    assert all(p.device.type == 'meta' for p in model.parameters())
    out = model(torch.empty(2, 3, 224, 224, device='meta'))
    assert out.shape == (2, 1000) and out.device.type == 'meta'
    model = timm.create_model('gsop_resnet50', dtype=torch.float64).eval()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        out = model(_input().double())
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_model_runs_second_order_in_float32(dtype):
    model = timm.create_model('gsop2_resnet50', dtype=dtype).eval()
    seen = []
    model.global_pool.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        out = model(_input().to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert seen == [dtype]


@pytest.mark.parametrize('in_chans', [1, 4])
def test_in_chans(in_chans):
    model = timm.create_model('gsop_resnet50', in_chans=in_chans).eval()
    assert model.conv1.in_channels == in_chans
    with torch.no_grad():
        assert model(_input((1, in_chans, 64, 64))).shape == (1, 1000)


def test_train_py_kwargs_reach_the_model():
    # the exact call timm's train.py makes, with every option it forwards set
    model = timm.create_model(
        'gsop_resnet50', pretrained=False, in_chans=3, num_classes=10, drop_rate=0.2, drop_path_rate=0.1,
        drop_block_rate=0.1, global_pool='avgmax', bn_momentum=0.01, bn_eps=1e-3, scriptable=False,
        checkpoint_path='', **dict(gsop_manner='position', gsop_dim=64, isqrt_iters=5, isqrt_dim=128))
    assert model.drop_rate == 0.2
    assert model.layer4[2].drop_path.drop_prob > 0
    assert any(type(m).__name__ == 'DropBlock2d' for m in model.layer4.modules())
    assert model.global_pool.pool_type == 'avgmax'
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.momentum == 0.01 and m.eps == 1e-3 for m in bns)
    assert isinstance(model.layer1[2].se, PositionGSoP) and model.layer1[2].se.dim == 64
    net2 = timm.create_model('gsop2_resnet50', isqrt_iters=5, isqrt_dim=128, num_classes=10)
    assert net2.global_pool.num_iters == 5 and net2.fc.in_features == 128 * 129 // 2


def test_bad_kwargs():
    with pytest.raises(TypeError):
        timm.create_model('gsop_resnet50', not_an_arg=1)
    with pytest.raises(ValueError, match="Unknown gsop_manner 'spatial'.*channel, position"):
        timm.create_model('gsop_resnet50', gsop_manner='spatial')
    with pytest.raises(ValueError, match='isqrt_iters'):
        timm.create_model('gsop2_resnet50', isqrt_iters=0)
    with pytest.raises(ValueError, match='gsop_stages'):
        timm.create_model('gsop_resnet50', gsop_stages=(True,))
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('gsop_resnet9000')


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50'])
@pytest.mark.parametrize('hw', [(32, 32), (33, 47), (96, 40)])
def test_any_input_size_from_32(name, hw):
    model = timm.create_model(name, gsop_manner='fusion_concat').eval()
    with torch.no_grad():
        out = model(_input((1, 3, *hw)))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50'])
def test_bf16_autocast_keeps_second_order_in_float32(name):
    model = timm.create_model(name, gsop_manner='fusion_avg').eval()
    gate_dtypes, head_dtypes = [], []
    for m in model.modules():
        if isinstance(m, CovarianceGate):
            m.register_forward_hook(lambda mod, inp, out: gate_dtypes.append((inp[0].dtype, out.dtype)))
    x = _input()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
    assert gate_dtypes and all(i == torch.float32 and o == torch.float32 for i, o in gate_dtypes)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # bf16 convolutions drift, but the prediction structure holds
    assert torch.corrcoef(torch.stack([out.float().flatten(), ref.flatten()]))[0, 1] > 0.95


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50'])
@pytest.mark.parametrize('fill', [0.0, 0.7])
def test_blank_images_are_finite(name, fill):
    model = timm.create_model(name, gsop_manner='fusion_avg', num_classes=10)
    x = torch.full((2, 3, 64, 64), fill)
    for train in (True, False):
        model.train(train)
        model.zero_grad()
        out = model(x)
        assert torch.isfinite(out).all()
        out.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_zero_init_last_option():
    model = timm.create_model('gsop_resnet50', device='meta')
    assert isinstance(model, GSoPResNet)
    real = timm.create_model('gsop_resnet50', zero_init_last=True)
    assert torch.count_nonzero(real.layer1[0].bn3.weight) == 0
    assert torch.count_nonzero(timm.create_model('gsop_resnet50').layer1[0].bn3.weight) > 0


def test_version_and_public_api():
    assert isinstance(timm_gsop.__version__, str)
    for name in ('covariance_pool', 'isqrt', 'triu_vectorize', 'ChannelGSoP', 'PositionGSoP', 'GSoPFusion',
                 'create_gsop', 'ISqrtCovPool', 'checkpoint_filter_fn'):
        assert hasattr(timm_gsop, name), name


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet101', 'gsopresnet18', 'isqrt_resnet50', 'cbamresnet50'])
def test_entrypoint_defaults_can_be_overridden(name):
    # --model-kwargs layers=... in timm's train.py: user kwargs win over the entrypoint's defaults
    model = timm.create_model(name, layers=(1, 1, 1, 1), device='meta')
    assert [len(getattr(model, f'layer{i}')) for i in range(1, 5)] == [1, 1, 1, 1]
