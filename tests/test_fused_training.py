"""The memory- and speed-saving training paths give the plain composition's values and gradients.

GSoP-Net blocks run ``bn3 -> GSoP -> + shortcut`` through ``ChannelGSoP.forward_bn_add`` (custom autograd
functions that recompute the ``bn3`` output in backward instead of keeping it), the GSoP branch's
``ReluConv2d`` saves its input instead of ``relu(input)``, and the covariance has a hand-written backward.
Each is checked here against timm's own ``Bottleneck`` order / plain autograd.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
import timm_gsop  # noqa: F401
from timm.models.resnet import Bottleneck

from conftest import randomise_bn_
from timm_gsop.layers import ChannelGSoP, covariance_pool
from timm_gsop.layers.gsop import ReluConv2d, row_conv
from timm_gsop.models._blocks import GSoPBottleneck

TINY = dict(layers=(1, 1, 1, 1), num_classes=7)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _as_timm_bottlenecks(model: nn.Module) -> nn.Module:
    """The same modules and parameters run by timm's own Bottleneck.forward (the reference order)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if type(m) is GSoPBottleneck:
            m.__class__ = Bottleneck
    return model


def _train_twice_and_compare(model, ref, x, rtol=None, atol=None):
    for step in range(2):
        torch.manual_seed(step)  # same drop-path draws in both
        out = model(x)
        torch.manual_seed(step)
        out_ref = ref(x)
        torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)
        grad = torch.randn_like(out)
        model.zero_grad()
        ref.zero_grad()
        out.backward(grad)
        out_ref.backward(grad)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=name)
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, msg=name)  # running stats and num_batches_tracked updated alike


@pytest.mark.parametrize('name,kwargs', [
    ('gsop_resnet50', {}),
    ('gsop2_resnet50', {}),
    ('gsopresnet50', {}),  # GSoP in every block
    ('gsop_resnet50', dict(gsop_manner='position')),  # not fused: timm's order
    ('gsop_resnet50', dict(drop_path_rate=0.2)),  # not fused: drop-path
])
def test_gsop_bottleneck_matches_timm_bottleneck_in_float64(name, kwargs):
    model = randomise_bn_(timm.create_model(name, **TINY, **kwargs)).double().train()
    fused = any(type(m) is GSoPBottleneck and isinstance(m.se, ChannelGSoP) for m in model.modules())
    assert fused == (kwargs.get('gsop_manner', 'channel') == 'channel')
    ref = _as_timm_bottlenecks(model)
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    _train_twice_and_compare(model, ref, x)


def test_fused_path_matches_in_channels_last():
    model = randomise_bn_(timm.create_model('gsop_resnet50', **TINY)).double().train()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64).to(memory_format=torch.channels_last)
    _train_twice_and_compare(model, _as_timm_bottlenecks(model), x)


def test_fused_path_handles_cumulative_bn_momentum_and_untracked_stats():
    model = timm.create_model('gsop_resnet50', **TINY).double().train()
    blocks = [s[-1] for s in (model.layer1, model.layer2, model.layer3, model.layer4)]
    blocks[0].bn3.momentum = None  # cumulative moving average, from num_batches_tracked
    blocks[1].bn3 = nn.BatchNorm2d(blocks[1].bn3.num_features, track_running_stats=False).double()
    blocks[2].bn3 = nn.BatchNorm2d(blocks[2].bn3.num_features, affine=False).double()
    ref = _as_timm_bottlenecks(model)
    _train_twice_and_compare(model, ref, torch.randn(2, 3, 64, 64, dtype=torch.float64))
    assert blocks[0].bn3.num_batches_tracked.item() == 2


def test_fused_path_in_float32_and_only_some_gradients():
    model = timm.create_model('gsop_resnet50', **TINY).train()
    ref = _as_timm_bottlenecks(model)
    x = torch.randn(2, 3, 64, 64)
    _train_twice_and_compare(model, ref, x, rtol=2e-4, atol=2e-5)
    # gradient of the input only, and of the GSoP parameters only (the rest frozen)
    xg = x.clone().requires_grad_()
    g1 = torch.autograd.grad(model(xg).square().sum(), xg)[0]
    g2 = torch.autograd.grad(ref(xg).square().sum(), xg)[0]
    torch.testing.assert_close(g1, g2, rtol=2e-4, atol=2e-5)
    for m in (model, ref):
        for n, p in m.named_parameters():
            p.requires_grad_('.se.' in n)
    model.zero_grad()
    ref.zero_grad()
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if '.se.' in n:
            torch.testing.assert_close(p.grad, q.grad, rtol=2e-4, atol=2e-5, msg=n)
        else:
            assert p.grad is None and q.grad is None


def test_fused_path_under_bf16_autocast_is_as_accurate_as_the_plain_one():
    torch.manual_seed(0)
    model = timm.create_model('gsop_resnet50', **TINY).train()
    ref = _as_timm_bottlenecks(model)
    exact = copy.deepcopy(ref)
    x = torch.randn(4, 3, 64, 64)
    exact(x).float().square().sum().backward()
    for m in (model, ref):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = m(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
    for (n, p), q, e in zip(model.named_parameters(), ref.parameters(), exact.parameters()):
        assert torch.isfinite(p.grad).all(), n
        if e.grad.norm() > 1e-3:  # skip gradients that are zero up to rounding (a conv bias before its BN)
            err_fused = (p.grad - e.grad).norm() / e.grad.norm()
            err_plain = (q.grad - e.grad).norm() / e.grad.norm()
            assert err_fused <= 1.5 * err_plain + 0.02, n


def test_inference_adds_in_place_without_touching_the_block_input():
    model = randomise_bn_(timm.create_model('gsop_resnet50', **TINY)).eval()
    ref = _as_timm_bottlenecks(model)
    block = model.layer2[-1]
    x = torch.randn(2, block.conv1.in_channels, 16, 16)
    x_before = x.clone()
    with torch.inference_mode():
        out = block(x)
        out_ref = ref.layer2[-1](x)
    torch.testing.assert_close(out, out_ref)
    assert torch.equal(x, x_before)
    # forward_intermediates keeps every stage's output intact
    image = torch.randn(2, 3, 64, 64)
    final, feats = model.forward_intermediates(image)
    final_ref, feats_ref = ref.forward_intermediates(image)
    torch.testing.assert_close(final, final_ref)
    for f, g in zip(feats, feats_ref):
        torch.testing.assert_close(f, g)


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct activation storages (not parameters) autograd saves in one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


def test_training_keeps_no_copy_of_the_gsop_block_outputs():
    x = torch.randn(2, 3, 64, 64)
    gsop = timm.create_model('gsop_resnet50', **TINY).train()
    backbone = timm.create_model('gsop_resnet50', **TINY, gsop_stages=(0, 0, 0, 0)).train()
    extra = _saved_bytes(gsop, x) - _saved_bytes(backbone, x)
    sizes = []  # what keeping each GSoP block's bn3 output would cost
    for stage in (gsop.layer1, gsop.layer2, gsop.layer3, gsop.layer4):
        stage[-1].bn3.register_forward_hook(lambda m, i, o: sizes.append(o.numel() * o.element_size()))
    with torch.no_grad():
        gsop(x)
    block_outputs = sum(sizes)
    # timm's Bottleneck order keeps each block's bn3 output for the attention product's backward
    plain_extra = _saved_bytes(_as_timm_bottlenecks(gsop), x) - _saved_bytes(backbone, x)
    assert 0 < extra and plain_extra - extra >= block_outputs, (extra, plain_extra, block_outputs)


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('input_grad', [True, False])
def test_relu_conv_saves_its_input_and_matches_autograd(stride, input_grad):
    torch.manual_seed(0)
    conv = ReluConv2d(16, 8, kernel_size=1, stride=stride).double()
    x = torch.randn(3, 16, 9, 7, dtype=torch.float64, requires_grad=input_grad)
    out = conv(x)
    ref = F.conv2d(F.relu(x), conv.weight, conv.bias, stride=stride)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    wrt = ([x] if input_grad else []) + [conv.weight, conv.bias]
    for a, b in zip(torch.autograd.grad(out, wrt, grad), torch.autograd.grad(ref, wrt, grad)):
        torch.testing.assert_close(a, b)
    if input_grad:
        torch.autograd.gradcheck(lambda t: conv(t), (x[:1, :, :4, :4].detach().requires_grad_(),))


def test_relu_conv_under_autocast_returns_gradients_in_parameter_dtype():
    conv = ReluConv2d(16, 8, kernel_size=1)
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == conv.weight.grad.dtype == conv.bias.grad.dtype == torch.float32
    ref = F.conv2d(F.relu(x.detach()), conv.weight, conv.bias)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_covariance_backward_matches_autograd_of_the_centred_product():
    x = torch.relu(torch.randn(3, 6, 5, 4, dtype=torch.float64)).requires_grad_()
    grad = torch.randn(3, 6, 6, dtype=torch.float64)
    xc = x.flatten(2) - x.flatten(2).mean(2, keepdim=True)
    ref = xc @ xc.transpose(1, 2) / 20
    expected = torch.autograd.grad(ref, x, grad)[0]
    torch.testing.assert_close(torch.autograd.grad(covariance_pool(x), x, grad)[0], expected)
    torch.autograd.gradcheck(covariance_pool, (x,))


def test_row_conv_equals_the_released_grouped_conv():
    conv = nn.Conv2d(32, 128, kernel_size=(32, 1), groups=32)
    s = torch.randn(4, 32, 32)
    torch.testing.assert_close(row_conv(s, conv.weight, conv.bias), conv(s.unsqueeze(-1)).flatten(1), rtol=1e-5, atol=1e-5)
