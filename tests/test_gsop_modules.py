"""Tests of the GSoP attention modules and the iSQRT-COV pooling head."""
import warnings

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from conftest import randomise_bn_
from timm_gsop.layers import (
    GSOP_MANNERS, ChannelGSoP, CovarianceGate, GSoPFusion, ISqrtCovPool, PositionGSoP, RowConv2d, create_gsop,
    covariance_pool, isqrt, triu_vectorize)


CHANNELS = 256


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(b=2, c=CHANNELS, h=14, w=14, seed=0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=_gen(seed))


def _make(manner: str, channels: int = CHANNELS, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_bn_(create_gsop(channels, manner, **kwargs), seed).eval()


def _gates(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, CovarianceGate)]


# --------------------------------------------------------------------------------------------------
# construction and semantics
# --------------------------------------------------------------------------------------------------

EXPECTED_TYPES = {
    'channel': ChannelGSoP, 'position': PositionGSoP,
    'fusion_avg': GSoPFusion, 'fusion_max': GSoPFusion, 'fusion_concat': GSoPFusion,
}


def test_manner_list():
    assert set(GSOP_MANNERS) == set(EXPECTED_TYPES)


@pytest.mark.parametrize('manner', GSOP_MANNERS)
@pytest.mark.parametrize('hw', [(14, 14), (7, 10), (5, 3)])
def test_shape_preserved_and_finite(manner, hw):
    module = _make(manner)
    assert type(module) is EXPECTED_TYPES[manner]
    x = _x(h=hw[0], w=hw[1])
    for mode in ('eval', 'train'):
        getattr(module, mode)()
        out = module(x)
        assert out.shape == x.shape
        assert out.dtype == x.dtype
        assert torch.isfinite(out).all()


@pytest.mark.parametrize('stride', [1, 2])
def test_channel_gsop_is_x_times_attention(stride):
    module = _make('channel', stride=stride)
    x = _x(h=14, w=11)
    a = module.attention(x)
    assert a.shape == (2, CHANNELS, 1, 1)
    assert a.dtype == torch.float32
    assert ((a > 0) & (a < 1)).all()
    assert torch.equal(module(x), x * a)
    # the weights depend on the sample
    assert not torch.allclose(a[0], a[1])


def test_channel_gsop_attention_matches_paper_pipeline():
    """Reference: ReLU copy -> 1x1 conv -> BN -> ReLU -> covariance -> row BN -> row conv -> 1x1 conv ->
    sigmoid, with the row conv written as the paper's sum (q[i, k] = sum_j S[i, j] W[4i + k, j] + b)."""
    module = _make('channel', dim=32)
    x = _x(h=9, w=9, seed=1)
    y = F.relu(module.bn_reduce(module.conv_reduce(F.relu(x))))
    s = covariance_pool(y)  # (B, d, d)
    bn = module.gate.bn_row
    s = (s - bn.running_mean.view(1, -1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1) + bn.eps)
    s = s * bn.weight.view(1, -1, 1) + bn.bias.view(1, -1, 1)
    w_row = module.gate.conv_row.weight.reshape(32, 4, 32)  # (i, k, j)
    q = torch.einsum('bij,ikj->bik', s, w_row).reshape(2, 128) + module.gate.conv_row.bias
    expand = module.gate.conv_expand
    a = torch.sigmoid(q @ expand.weight.reshape(CHANNELS, 128).t() + expand.bias)
    torch.testing.assert_close(module.attention(x).reshape(2, CHANNELS), a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('stride', [1, 2])
def test_channel_reduction_is_the_released_strided_conv_of_relu(stride):
    # released: ReLU, then a strided 1x1 conv; subsampling first reads the same positions
    module = _make('channel', stride=stride).double()
    x = _x(h=28, w=27).double().requires_grad_()
    seen = []
    module.bn_reduce.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    module(x)
    conv = module.conv_reduce
    ref = F.conv2d(F.relu(x), conv.weight, conv.bias, stride=stride)
    torch.testing.assert_close(seen[0], ref)
    assert seen[0].shape[-2:] == ((14, 14) if stride == 2 else (28, 27))
    grad = torch.randn_like(ref)
    wrt = [x, conv.weight, conv.bias]
    for a, b in zip(torch.autograd.grad(seen[0], wrt, grad), torch.autograd.grad(ref, wrt, grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('hw', [(14, 14), (10, 6), (5, 5)])
def test_position_gsop_is_relu_x_times_attention(hw):
    module = _make('position')
    x = _x(h=hw[0], w=hw[1], seed=2)
    a = module.attention(x)
    assert a.shape == (2, 1, *hw)
    assert a.dtype == torch.float32
    assert ((a > 0) & (a < 1)).all()
    assert torch.equal(module(x), F.relu(x * a))


def test_position_attention_is_8x8_grid_resized():
    module = _make('position')
    x = _x(h=16, w=16, seed=3)
    a = module.attention(x)
    # 16x16 from 8x8 by adaptive average pooling: 2x2 blocks of equal values
    blocks = a.reshape(2, 1, 8, 2, 8, 2)
    assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))
    assert module.gate.conv_row.in_channels == 64


@pytest.mark.parametrize('manner', ['fusion_avg', 'fusion_max', 'fusion_concat'])
def test_fusions_combine_the_branches(manner):
    module = _make(manner)
    x = _x(h=12, w=12, seed=4)
    x_c = x * module.channel.attention(x)
    x_p = F.relu(x * module.position.attention(x))
    out = module(x)
    if manner == 'fusion_avg':
        expected = x_c + x_p  # a sum, despite the released name
    elif manner == 'fusion_max':
        expected = torch.maximum(x_c, x_p)
    else:
        expected = module.concat_bn(module.concat_channel(x_c) + module.concat_position(x_p))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.allclose(out, x_c) and not torch.allclose(out, x_p)


def test_fusion_concat_conv_shape_follows_released_code():
    module = create_gsop(CHANNELS, 'fusion_concat')
    # groups = C / 64 = 4, factor = log2(32 / 4) = 3, kernel = 2 * 3 + 5 = 11, padding = factor + 2 = 5
    for conv in (module.concat_channel, module.concat_position):
        assert conv.groups == 4
        assert conv.kernel_size == (11, 1)
        assert conv.padding == (5, 0)


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------

def test_unknown_manner_names_value_and_choices():
    with pytest.raises(ValueError) as info:
        create_gsop(CHANNELS, 'spatial')
    msg = str(info.value)
    assert "'spatial'" in msg
    for manner in GSOP_MANNERS:
        assert manner in msg


@pytest.mark.parametrize('manner', GSOP_MANNERS)
def test_wrong_channels_or_rank_get_torchs_error(manner):
    module = _make(manner)
    with pytest.raises(RuntimeError, match='256 channels'):
        module(_x(c=128))
    with pytest.raises(RuntimeError):
        module(torch.zeros(1, 2, CHANNELS, 4, 4))
    with pytest.raises(RuntimeError):
        CovarianceGate(16, 32)(torch.zeros(2, 8, 8))


# --------------------------------------------------------------------------------------------------
# degenerate inputs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('manner', GSOP_MANNERS)
@pytest.mark.parametrize('fill', [0.0, 2.5])  # all-zero, and constant with a non-zero ReLU branch
@pytest.mark.parametrize('batch', [1, 2])
@pytest.mark.parametrize('train', [True, False])
def test_constant_inputs_give_finite_outputs_and_gradients(manner, fill, batch, train):
    module = _make(manner).train(train)
    x = torch.full((batch, CHANNELS, 8, 8), fill, requires_grad=True)
    out = module(x)
    assert torch.isfinite(out).all()
    (out * torch.randn(out.shape, generator=_gen(5))).sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


# --------------------------------------------------------------------------------------------------
# autocast
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('manner', GSOP_MANNERS)
@pytest.mark.parametrize('in_dtype', [torch.float32, torch.bfloat16])
def test_bf16_autocast_keeps_gate_in_float32(manner, in_dtype):
    module = _make(manner)
    x = _x(h=10, w=10, seed=6)
    reference = module(x)
    gate_dtypes, gate_in_dtypes = [], []

    def hook(mod, inputs, output):  # returns None: must not replace the output
        gate_in_dtypes.append(inputs[0].dtype)
        gate_dtypes.append(output.dtype)

    for gate in _gates(module):
        gate.register_forward_hook(hook)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = module(x.to(in_dtype))
    assert len(gate_dtypes) == (2 if manner.startswith('fusion') else 1)
    assert all(d == torch.float32 for d in gate_dtypes)  # attention weights
    assert all(d == torch.float32 for d in gate_in_dtypes)  # second-order matrices
    if manner == 'fusion_concat':
        # the concat output comes from conv + BN, which autocast runs in bf16 like any conv
        assert out.dtype == torch.bfloat16
    else:
        assert out.dtype == in_dtype
    assert torch.isfinite(out).all()
    # bf16 convs before the covariance: close to the float32 result, not equal
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1)


# --------------------------------------------------------------------------------------------------
# scripting and tracing
# --------------------------------------------------------------------------------------------------

def _module_by_id(name: str) -> nn.Module:
    if name == 'isqrt_pool':
        torch.manual_seed(0)
        return randomise_bn_(ISqrtCovPool(CHANNELS, dim=32, num_iters=3)).eval()
    return _make(name)


MODULE_IDS = list(GSOP_MANNERS) + ['isqrt_pool']


@pytest.mark.parametrize('name', MODULE_IDS)
def test_torchscript_matches_eager(name):
    module = _module_by_id(name)
    x = _x(h=9, w=11, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.script deprecation notice
        scripted = torch.jit.script(module)
    torch.testing.assert_close(scripted(x), module(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', MODULE_IDS)
def test_fx_symbolic_trace_matches_eager(name):
    module = _module_by_id(name)
    x = _x(h=9, w=11, seed=8)
    traced = torch.fx.symbolic_trace(module)
    torch.testing.assert_close(traced(x), module(x), rtol=1e-6, atol=1e-6)
    # a different spatial size goes through the same graph (nothing shape-specific was baked in)
    x2 = _x(h=6, w=13, seed=9)
    torch.testing.assert_close(traced(x2), module(x2), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('manner', GSOP_MANNERS)
def test_every_parameter_gets_a_gradient(manner):
    module = _make(manner).train()
    x = _x(h=10, w=10, seed=10).requires_grad_(True)
    out = module(x)
    # a random projection rather than a plain sum: the sum of a train-mode BN output (fusion_concat ends
    # in BN) has an exactly-zero gradient upstream
    (out * torch.randn(out.shape, generator=_gen(11))).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize('manner', GSOP_MANNERS)
def test_plain_sum_backward_reaches_every_parameter(manner):
    module = _make(manner).train()
    module(_x(h=8, w=8, seed=12)).sum().backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None]
    assert not missing


# --------------------------------------------------------------------------------------------------
# ISqrtCovPool
# --------------------------------------------------------------------------------------------------

def test_isqrt_cov_pool_gsop_net2_head():
    torch.manual_seed(0)
    pool = randomise_bn_(ISqrtCovPool(2048, dim=256, num_iters=3)).eval()
    assert pool.out_features == 32896
    x = torch.rand(2, 2048, 7, 7, generator=_gen(13))
    out = pool(x)
    assert out.shape == (2, 32896)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    y = pool.act(pool.bn_reduce(pool.conv_reduce(x)))
    expected = triu_vectorize(isqrt(covariance_pool(y), 3))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not pool.is_identity()


def test_isqrt_cov_pool_dim_zero_skips_reduction():
    pool = ISqrtCovPool(24, dim=0, num_iters=5)
    assert pool.dim == 24 and pool.out_features == 24 * 25 // 2
    assert isinstance(pool.conv_reduce, nn.Identity) and isinstance(pool.bn_reduce, nn.Identity)
    assert sum(p.numel() for p in pool.parameters()) == 0
    x = torch.rand(3, 24, 6, 5, generator=_gen(14))
    torch.testing.assert_close(pool(x), triu_vectorize(isqrt(covariance_pool(x), 5)), rtol=0, atol=0)


@pytest.mark.parametrize('bad', [0, -1, 2.5, None])
def test_isqrt_cov_pool_rejects_bad_num_iters(bad):
    with pytest.raises(ValueError, match=r'isqrt_iters must be a positive integer'):
        ISqrtCovPool(64, dim=16, num_iters=bad)


def test_isqrt_cov_pool_rejects_negative_dim():
    with pytest.raises(ValueError, match=r'isqrt_dim'):
        ISqrtCovPool(64, dim=-1)


def test_isqrt_cov_pool_under_autocast_and_backward():
    torch.manual_seed(0)
    pool = ISqrtCovPool(64, dim=16, num_iters=3).train()
    x = torch.rand(2, 64, 7, 7, generator=_gen(15), requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = pool(x)
    assert out.shape == (2, 136)
    assert out.dtype == torch.bfloat16  # cast back to the reduced features' dtype for the classifier
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pool.parameters())


def test_isqrt_cov_pool_zero_input_is_finite():
    pool = ISqrtCovPool(32, dim=0, num_iters=3)
    x = torch.zeros(2, 32, 5, 5, requires_grad=True)
    out = pool(x)
    assert torch.equal(out, torch.zeros(2, 32 * 33 // 2))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_row_conv_is_the_released_grouped_conv():
    conv = RowConv2d(32, 4).double()
    s = torch.randn(4, 32, 32, 1, dtype=torch.float64, requires_grad=True)
    out, ref = conv(s), F.conv2d(s, conv.weight, conv.bias, groups=32)
    assert out.shape == ref.shape == (4, 128, 1, 1)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    wrt = [s, conv.weight, conv.bias]
    for a, b in zip(torch.autograd.grad(out, wrt, grad), torch.autograd.grad(ref, wrt, grad)):
        torch.testing.assert_close(a, b)
