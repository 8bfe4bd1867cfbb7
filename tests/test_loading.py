"""Loading as timm loads (``load_pretrained`` with the family's ``checkpoint_filter_fn``): the filter transforms,
strictness is the caller's, timm's and torch's errors pass through; and the warm start from pretrained plain
networks (missing GSoP modules initialised so the model computes what the plain network computed), which
``pretrained=True`` does by itself.

Every checkpoint is made here (no download), in the layout of its source: timm's / torchvision's ResNets,
this package's iSQRT-COV and fast-MPN-COV's, the CIFAR pre-activation ResNet.
"""
import copy
import urllib.error
import warnings

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import timm
from timm.models.resnet import BasicBlock
from timm.utils import ParseKwargs

import timm_gsop
from conftest import randomise_bn_
from timm_gsop import WarmStartWarning, WeightsNotAvailableError
from timm_gsop.layers import ChannelGSoP, CovarianceGate
from timm_gsop.models.gsop_resnet import checkpoint_layout, fast_mpncov_to_triu_order

SMALL = dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128))
F64 = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _randomised(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    randomise_bn_(model, seed)
    return model


def _save(state_dict, path):
    if str(path).endswith('.safetensors'):
        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    return str(path)


def _load(name, path, overlay=None, **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(overlay or {}, file=path), **kwargs)


def _warm_start(name, path, overlay=None, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        model = _load(name, path, overlay, **kwargs)
    messages = [str(w.message) for w in caught if issubclass(w.category, WarmStartWarning)]
    assert len(messages) == 1, messages
    return model, messages[0]


def _outputs(model, x, train):
    """Outputs in train or eval mode, on a copy: a train-mode forward updates BN running statistics."""
    model = copy.deepcopy(model).train(train)
    with torch.no_grad():
        return model(x)


def _assert_same_function(model, source, x, exact_eval=True):
    """Equal outputs in eval mode (bit for bit in float32 when ``exact_eval``) and in train mode (batch
    statistics; the fused training path rounds differently), and in float64 to rounding."""
    out, ref = _outputs(model, x, False), _outputs(source, x, False)
    if exact_eval:
        assert torch.equal(out, ref), (out - ref).abs().max()
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_outputs(model, x, True), _outputs(source, x, True), rtol=1e-4, atol=1e-4)
    m64, s64 = copy.deepcopy(model).double(), copy.deepcopy(source).double()
    for train in (True, False):
        torch.testing.assert_close(_outputs(m64, x.double(), train), _outputs(s64, x.double(), train), **F64)


def _image(batch=3, size=64, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- warm start: sources ---------------------------------------------------------------------------------

WARM_STARTS = [
    # (plain source, its kwargs, GSoP target, what the target computes then: a model name + kwargs)
    ('resnet50', SMALL, 'gsop_resnet50', ('gsop_resnet50', dict(SMALL, gsop_stages=(0, 0, 0, 0)))),
    ('resnet101', SMALL, 'gsop_resnet101', ('gsop_resnet101', dict(SMALL, gsop_stages=(0, 0, 0, 0)))),
    ('resnet50', SMALL, 'gsopresnet50', ('resnet50', SMALL)),
    ('resnet101', SMALL, 'gsopresnet101', ('resnet101', SMALL)),
    ('resnet18', SMALL, 'gsopresnet18', ('resnet18', SMALL)),
    ('resnet34', SMALL, 'gsopresnet34', ('resnet34', SMALL)),
    ('resnet50d', SMALL, 'gsopresnet50d', ('resnet50d', SMALL)),
    ('resnext50_32x4d', SMALL, 'gsopresnext50_32x4d', ('resnext50_32x4d', SMALL)),
    ('isqrt_resnet50', dict(SMALL, isqrt_dim=32), 'gsop2_resnet50',
     ('isqrt_resnet50', dict(SMALL, isqrt_dim=32))),
    ('isqrt_resnet101', dict(SMALL, isqrt_dim=32), 'gsop2_resnet101',
     ('isqrt_resnet101', dict(SMALL, isqrt_dim=32))),
    ('preresnet164_cifar', dict(layers=(2, 2, 2)), 'gsop_preresnet164_cifar',
     ('preresnet164_cifar', dict(layers=(2, 2, 2)))),
    ('preresnet164_cifar', dict(layers=(2, 2, 2), global_pool='isqrt'), 'gsop2_preresnet164_cifar',
     ('preresnet164_cifar', dict(layers=(2, 2, 2), global_pool='isqrt'))),
]


def _target_kwargs(source, source_kwargs, target):
    kwargs = {k: v for k, v in source_kwargs.items() if k != 'global_pool'}
    if target.startswith('gsop2') and 'cifar' not in target:
        kwargs['isqrt_iters'] = 5  # the iSQRT-COV source's
    return kwargs


@pytest.mark.parametrize('source,source_kwargs,target,equivalent', WARM_STARTS,
                         ids=[f'{s}->{t}' for s, _, t, _ in WARM_STARTS])
def test_warm_start_computes_what_the_plain_network_computed(source, source_kwargs, target, equivalent, tmp_path):
    plain = _randomised(source, **source_kwargs)
    path = _save(plain.state_dict(), tmp_path / 'plain.safetensors')
    model, message = _warm_start(target, path, **_target_kwargs(source, source_kwargs, target))
    num_gsop = sum(isinstance(m, CovarianceGate) for m in model.modules())  # one gate per channel module
    assert f'{num_gsop} GSoP module(s)' in message and path in message
    assert 'computes what the source network computed' in message
    reference = timm.create_model(equivalent[0], **equivalent[1])
    reference.load_state_dict(plain.state_dict())
    size = 32 if 'cifar' in target else 64
    _assert_same_function(model, reference, _image(size=size))


def test_warm_start_from_torchvision_resnet18(tmp_path):
    torchvision = pytest.importorskip('torchvision')
    torch.manual_seed(0)
    plain = randomise_bn_(torchvision.models.resnet18(num_classes=10))
    path = _save(plain.state_dict(), tmp_path / 'resnet18-tv.pth')
    model, _ = _warm_start('gsopresnet18', path, overlay=dict(num_classes=10), num_classes=10)
    _assert_same_function(model, plain, _image())


def test_warm_start_from_fast_mpncov_layout_reorders_the_classifier(tmp_path):
    source = _randomised('isqrt_resnet50', **SMALL, isqrt_dim=32)
    theirs = {}
    for k, v in source.state_dict().items():
        k = k.replace('global_pool.conv_reduce', 'layer_reduce').replace('global_pool.bn_reduce', 'layer_reduce_bn')
        theirs[k] = v
    fc = torch.empty_like(theirs['fc.weight'])
    fc[:, fast_mpncov_to_triu_order(32)] = theirs['fc.weight']  # fast-MPN-COV's upper-triangle order
    theirs['fc.weight'] = fc
    assert checkpoint_layout(theirs) == 'fast-mpn-cov'
    path = _save({'state_dict': {f'module.{k}': v for k, v in theirs.items()}}, tmp_path / 'mpncov.pth.tar')
    model, _ = _warm_start('gsop2_resnet50', path, **SMALL, isqrt_dim=32, isqrt_iters=5)
    _assert_same_function(model, source, _image())
    # the same file into gsop2 without GSoP stages is iSQRT-COV itself: reordered there too
    exact = _load('gsop2_resnet50', path, **SMALL, isqrt_dim=32, isqrt_iters=5, gsop_stages=(0, 0, 0, 0))
    _assert_same_function(exact, source, _image())


def test_plain_resnet_into_gsop2_keeps_the_backbone_and_says_head_and_classifier_are_new(tmp_path):
    plain = _randomised('resnet50', **SMALL)
    path = _save(plain.state_dict(), tmp_path / 'r50.safetensors')
    model, message = _warm_start('gsop2_resnet50', path, **SMALL, isqrt_dim=32)
    assert 'Newly initialised (not in the checkpoint, or trained for another head): fc, global_pool.bn_reduce, ' \
        'global_pool.conv_reduce.' in message
    backbone = timm.create_model('gsop2_resnet50', **SMALL, isqrt_dim=32, gsop_stages=(0, 0, 0, 0))
    backbone.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith('fc.')}, strict=False)
    x = _image()
    for train in (False, True):
        model.train(train)
        backbone.train(train)
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(x), backbone.forward_features(x), rtol=1e-5, atol=1e-5)


def test_gates_start_at_the_steepest_point_and_all_move_in_one_step(tmp_path):
    path = _save(_randomised('resnet50', **SMALL).state_dict(), tmp_path / 'r50.safetensors')
    model, _ = _warm_start('gsop_resnet50', path, **SMALL, num_classes=5)
    gates = []
    for gate in (m for m in model.modules() if isinstance(m, CovarianceGate)):
        gate.register_forward_hook(lambda m, i, o: gates.append(o))
    model.train()
    out = model(_image())
    assert len(gates) == 4 and all(torch.equal(a, torch.full_like(a, 0.5)) for a in gates)
    # slope of the sigmoid at 0.5: a (1 - a) = 0.25, its maximum
    assert all(torch.equal(a * (1 - a), torch.full_like(a, 0.25)) for a in gates)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if 'gate.conv_expand' in n}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    opt.step()
    assert len(before) == 8
    for n, p in model.named_parameters():
        if n in before:
            assert not torch.equal(p, before[n]), f'{n} did not move'


@pytest.mark.parametrize('manner', ['position', 'fusion_avg', 'fusion_max', 'fusion_concat'])
def test_warm_start_of_other_manners_keeps_the_weights_and_says_the_function_differs(manner, tmp_path):
    plain = _randomised('resnet50', **SMALL)
    path = _save(plain.state_dict(), tmp_path / 'r50.safetensors')
    model, message = _warm_start('gsopresnet50', path, **SMALL, gsop_manner=manner)
    assert f"gsop_manner={manner!r} adds a ReLU" in message and "weights are kept, not its function" in message
    x = _image()
    with torch.no_grad():
        diff = (_outputs(model, x, False) - _outputs(plain, x, False)).abs().max()
    assert torch.isfinite(diff) and diff > 0  # not the same function: documented, not hidden


# ---- strictness ------------------------------------------------------------------------------------------

def test_plain_network_warm_starts_under_any_num_classes_without_strict_false(tmp_path):
    path = _save(_randomised('resnet50', **SMALL).state_dict(), tmp_path / 'r50.safetensors')
    for kwargs in ({}, dict(num_classes=10)):  # a new num_classes: timm drops the classifier, the filter the rest
        with pytest.warns(WarmStartWarning, match='4 GSoP module'):
            _load('gsop_resnet50', path, **SMALL, **kwargs)


def test_num_classes_change_reinitialises_only_the_classifier(tmp_path):
    plain = _randomised('resnet50', **SMALL)
    path = _save(plain.state_dict(), tmp_path / 'r50.safetensors')
    model, message = _warm_start('gsopresnet50', path, **SMALL, num_classes=10)
    # timm itself drops a classifier of another size (and logs it); the warning is about GSoP only
    assert 'Newly initialised' not in message and model.fc.out_features == 10
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_head(model.forward_features(x), pre_logits=True),
                                   plain.eval().forward_head(plain.forward_features(x), pre_logits=True))


def test_train_py_pretrained_path_route(tmp_path):
    """What timm's train.py does with --pretrained --pretrained-path FILE --model-kwargs ...: the overlay with
    num_classes=-1 (head adaptation) and ParseKwargs' model kwargs."""
    import argparse
    plain = _randomised('resnet50', **SMALL)
    path = _save(plain.state_dict(), tmp_path / 'r50.safetensors')
    parser = argparse.ArgumentParser()
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    args = parser.parse_args(['--model-kwargs', 'layers=(1,1,1,1)', 'channels=(16,32,64,128)'])
    with pytest.warns(WarmStartWarning, match='4 GSoP module'):
        model = timm.create_model('gsop_resnet50', pretrained=True, num_classes=None, in_chans=3,
                                  pretrained_cfg_overlay=dict(file=path, num_classes=-1), **args.model_kwargs)
    reference = timm.create_model('gsop_resnet50', **SMALL, gsop_stages=(0, 0, 0, 0))
    reference.load_state_dict(plain.state_dict())
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), reference.eval().forward_features(x))


def test_pretrained_strict_false_allows_missing_tensors_anywhere(tmp_path):
    model = _randomised('gsop_resnet50', **SMALL)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith('layer2.0.conv2')}
    path = _save(sd, tmp_path / 'partial.pth')
    with pytest.raises(RuntimeError, match='Missing key.*"layer2.0.conv2.weight"'):  # torch's strict load
        _load('gsop_resnet50', path, **SMALL)
    loaded = _load('gsop_resnet50', path, **SMALL, pretrained_strict=False)
    torch.testing.assert_close(loaded.layer3[0].conv1.weight, model.layer3[0].conv1.weight)


def test_load_state_dict_is_torchs():
    model = timm.create_model('gsop_resnet50', **SMALL)
    sd = dict(model.state_dict())
    sd.pop('layer1.0.se.gate.conv_expand.bias')
    sd['layer9.weird'] = torch.zeros(1)
    with pytest.raises(RuntimeError, match='Missing key.*"layer1.0.se.gate.conv_expand.bias".*\n.*'
                                           'Unexpected key.*"layer9.weird"'):
        model.load_state_dict(sd)
    result = model.load_state_dict(sd, strict=False)
    assert result.missing_keys == ['layer1.0.se.gate.conv_expand.bias'] and result.unexpected_keys == ['layer9.weird']
    sd['fc.weight'] = torch.zeros(3, 2048)
    with pytest.raises(RuntimeError, match=r'size mismatch for fc.weight.*\[3, 2048\]'):
        model.load_state_dict(sd, strict=False)


@pytest.mark.parametrize('prefix', ['module.', '_orig_mod.', '_orig_mod.module.'])
def test_wrapper_prefixes_are_removed_as_timm_does(prefix, tmp_path):
    model = _randomised('gsop_resnet50', **SMALL)
    path = _save({'state_dict': {prefix + k: v for k, v in model.state_dict().items()}}, tmp_path / 'w.pth.tar')
    loaded = _load('gsop_resnet50', path, **SMALL).eval()
    x = _image()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


# ---- errors say what failed ------------------------------------------------------------------------------

def test_url_download_failure_is_reported_as_a_network_error(monkeypatch):
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', unreachable)
    monkeypatch.setenv('TORCH_HOME', '/nonexistent-torch-home-for-this-test')
    with pytest.raises(WeightsNotAvailableError) as info:
        timm.create_model('isqrt_resnet50', pretrained=True)
    message = str(info.value)
    assert 'Could not download the weights of isqrt_resnet50' in message and 'Name or service not known' in message
    assert 'truncated' not in message
    assert 'github.com/jiangtaoxie/fast-MPN-COV' in message and 'timm-gsop export' in message


def test_corrupt_file_gets_safetensors_error_not_a_network_error(tmp_path):
    path = tmp_path / 'broken.safetensors'
    path.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a": 1' + b'\x00' * 20)
    with pytest.raises(Exception, match='header') as info:
        _load('gsop_resnet50', str(path), **SMALL)
    assert not isinstance(info.value, WeightsNotAvailableError)


# ---- documented kwargs -----------------------------------------------------------------------------------

def test_gsop_resnet_with_timms_basic_block_puts_gsop_on_its_last_bn():
    model = timm.create_model('gsop_resnet50', block=BasicBlock, layers=(2, 2, 2, 2), num_classes=4)
    blocks = [stage[-1] for stage in (model.layer1, model.layer2, model.layer3, model.layer4)]
    assert all(isinstance(b, BasicBlock) and isinstance(b.se, ChannelGSoP) for b in blocks)
    assert [b.se.conv_reduce.in_channels for b in blocks] == [b.bn2.num_features for b in blocks] == [64, 128, 256, 512]
    assert model.layer4[0].conv1.stride == (1, 1)  # the last stage at stride 1, as GSoP-Net's
    out = model(_image(batch=2))
    assert out.shape == (2, 4)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('name,last_stride,pool', [
    ('gsop_resnet50', 1, (14, 14)), ('gsop_resnet50', 2, (7, 7)), ('gsop2_resnet50', 2, (7, 7)),
    ('isqrt_resnet50', 2, (7, 7)), ('preresnet164_cifar', 1, (16, 16))])
def test_pool_size_follows_last_stride(name, last_stride, pool):
    model = timm.create_model(name, last_stride=last_stride, device='meta')
    assert model.pretrained_cfg['pool_size'] == model.default_cfg['pool_size'] == pool
    size = model.pretrained_cfg['input_size']
    assert tuple(model.forward_features(torch.empty(1, *size, device='meta')).shape[-2:]) == pool
