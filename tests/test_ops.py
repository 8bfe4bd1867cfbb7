"""The second-order ops, GSoP modules, covariance heads and whole models against the released formulas
(``official_reference.py``), in float64; their float32 region under autocast; degenerate inputs."""
import copy
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import official_reference as released
from conftest import randomise_bn_, tiny_kwargs
from timm_gsop.layers import (
    GSOP_MANNERS, ChannelGSoP, CovarianceGate, CovPool, GSoPFusion, PositionGSoP, RowConv2d,
    covariance_pool, create_gsop, isqrt, position_gram, triu_vectorize)

F64 = dict(rtol=1e-9, atol=1e-11)
GSOP_TYPES = (ChannelGSoP, PositionGSoP, GSoPFusion)
# the released Bottleneck's attention attributes -> ours in a GSoPFusion (a single-branch module is the branch)
RELEASED_NAMES = dict(
    conv_for_DR='channel.conv_reduce', bn_for_DR='channel.bn_reduce', row_bn='channel.gate.bn_row',
    row_conv_group='channel.gate.conv_row', fc_adapt_channels='channel.gate.conv_expand',
    conv_for_DR_spatial='position.conv_reduce', bn_for_DR_spatial='position.bn_reduce',
    row_bn_for_spatial='position.gate.bn_row', row_conv_group_for_spatial='position.gate.conv_row',
    fc_adapt_channels_for_spatial='position.gate.conv_expand', dilate_conv_for_concat1='concat_channel',
    dilate_conv_for_concat2='concat_position', bn_for_concat='concat_bn')


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=dtype)


def our_name(attr, fusion):
    path = RELEASED_NAMES[attr]
    return path if fusion or not path.startswith(('channel.', 'position.')) else path.split('.', 1)[1]


def loss_of(out):
    return (out * rand(*out.shape, dtype=out.dtype)).sum() + out.square().sum()


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


OPS = {  # ours, the released formula, an input
    'covariance': (covariance_pool, released.released_channel_covariance, partial(rand, 2, 5, 7, 3)),
    'position': (position_gram, released.released_position_covariance, partial(rand, 2, 6, 4, 5)),
    **{f'isqrt{k}': (partial(isqrt, num_iters=k), partial(released.released_sqrtm, iterations=k),
                     lambda: covariance_pool(F.relu(rand(2, 6, 5, 4)) + 0.1)) for k in (2, 3, 4, 5)},
    'triu': (triu_vectorize, released.released_triu_vector, partial(rand, 2, 9, 9)),
}


@pytest.mark.parametrize('name', OPS)
def test_ops_equal_released_formulas(name):
    op, ref, make = OPS[name]
    x = make().requires_grad_()
    out, expected = op(x), ref(x)
    torch.testing.assert_close(out, expected, **F64)
    torch.testing.assert_close(grads(loss_of(out), x), grads(loss_of(expected), x), **F64)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # float32 input stays float32 (a bf16 bmm: ~1e-2 off)
        low = op(x.detach().float())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, op(x.detach().float()), rtol=1e-5, atol=1e-6)


def test_row_conv_is_the_grouped_conv_it_replaces():
    row = RowConv2d(6, 4, dtype=torch.float64)
    conv = nn.Conv2d(6, 24, (6, 1), groups=6, dtype=torch.float64)
    conv.load_state_dict(row.state_dict())  # the same parameters
    x = rand(2, 6, 6, 1).requires_grad_()
    torch.testing.assert_close(row(x), conv(x), **F64)
    torch.testing.assert_close(grads(loss_of(row(x)), [x, *row.parameters()]),
                               grads(loss_of(conv(x)), [x, *conv.parameters()]), **F64)


@pytest.mark.parametrize('channels', [256, 512])  # released: reduction stride 2 for planes <= 64
@pytest.mark.parametrize('manner', GSOP_MANNERS)
@pytest.mark.parametrize('train', [False, True])
def test_gsop_modules_equal_released_attention(manner, channels, train):
    block = released.OfficialBottleneck(channels, channels // 4, attention=released.MANNER_TO_CODE[manner], att_dim=16)
    released.randomize_(block.double(), calibration_input=rand(4, channels, 13, 11))
    ours = create_gsop(channels, manner, dim=16, stride=2 if channels // 4 <= 64 else 1, dtype=torch.float64)
    names = {k: f'{our_name(k.split(".")[0], "fusion" in manner)}.{k.split(".", 1)[1]}'
             for k in block.state_dict() if k.split('.')[0] in RELEASED_NAMES}
    ours.load_state_dict({names[k]: v for k, v in block.state_dict().items() if k in names})  # strict: same set
    block.train(train), ours.train(train)
    x = rand(2, channels, 13, 11).requires_grad_()
    out, expected = ours(x), block.apply_attention(x)
    torch.testing.assert_close(out, expected, **F64)
    pairs = [(ours.get_parameter(names[k]), p) for k, p in block.named_parameters() if k in names]
    torch.testing.assert_close(grads(loss_of(out), [x, *(a for a, _ in pairs)]),
                               grads(loss_of(expected), [x, *(b for _, b in pairs)]), **F64)
    torch.testing.assert_close(ours.state_dict(), {names[k]: v for k, v in block.state_dict().items() if k in names})


def plain_conv(conv, stride=None):
    """A plain ``nn.Conv2d`` sharing ``conv``'s parameters (a ``RowConv2d`` becomes the grouped conv)."""
    with torch.device('meta'):
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride or conv.stride,
                          conv.padding, groups=conv.groups, bias=conv.bias is not None)
    plain.weight, plain.bias = conv.weight, conv.bias
    return plain


class ReleasedGSoP(nn.Module):
    """Our GSoP module's parameters run by the released ``Bottleneck.apply_attention``."""

    def __init__(self, ours):
        super().__init__()
        fusion = isinstance(ours, GSoPFusion)
        code = released.MANNER_TO_CODE[f'fusion_{ours.mode}' if fusion else
                                       'channel' if isinstance(ours, ChannelGSoP) else 'position']
        reduce = ours.get_submodule('channel.conv_reduce' if fusion else 'conv_reduce')
        with torch.device('meta'):  # its own layers are replaced by ours
            self.block = released.OfficialBottleneck(
                reduce.in_channels, reduce.in_channels // 4, attention=code, att_dim=reduce.out_channels)
        for attr in (a for a in RELEASED_NAMES if hasattr(self.block, a)):
            mine = ours.get_submodule(our_name(attr, fusion))
            stride = (ours.channel if fusion else ours).stride if attr == 'conv_for_DR' else None
            setattr(self.block, attr, plain_conv(mine, stride) if isinstance(mine, nn.Conv2d) else mine)

    def forward(self, x):
        # a copy: the released ReLU output, modified by the residual's in-place add, breaks backward (PAPER.md)
        return self.block.apply_attention(x).clone()


class ReleasedHead(nn.Module):
    """Our covariance head's parameters run by the released formulas (iSQRT-COV, or no square root)."""

    def __init__(self, ours):
        super().__init__()
        self.conv, self.bn, self.iters = ours.conv_reduce, ours.bn_reduce, getattr(ours, 'num_iters', 0)

    def forward(self, x):
        cov = released.released_channel_covariance(F.relu(self.bn(self.conv(x))))
        return released.released_triu_vector(released.released_sqrtm(cov, self.iters) if self.iters else cov)


def released_copy(model):
    """A deep copy with our GSoP modules and covariance head run by the released formulas; its tensors by name."""
    ref = copy.deepcopy(model)
    params, buffers = dict(ref.named_parameters()), dict(ref.named_buffers())
    for block in [m for m in ref.modules() if isinstance(getattr(m, 'se', None), GSOP_TYPES)]:
        block.se = ReleasedGSoP(block.se)
    if isinstance(ref.global_pool, CovPool):
        ref.global_pool = ReleasedHead(ref.global_pool)
    return ref, params, buffers


# one of each distinct structure, small (conftest.tiny_kwargs)
MODELS = [
    ('gsop_resnet50', {}), ('gsop_resnet50', dict(gsop_manner='position')),
    ('gsop_resnet50', dict(gsop_manner='fusion_concat')), ('gsop2_resnet50', {}), ('gsopresnet50', {}),
    ('gsopresnet18', {}), ('isqrt_resnet50', {}), ('gsop_preresnet164_cifar', {}), ('gsop2_preresnet164_cifar', {}),
    ('covpool', dict(global_pool='isqrt')), ('covpool', dict(global_pool='cov')),
]
IDS = ['-'.join([name, *map(str, kw.values())]) for name, kw in MODELS]


def tiny(name, kwargs, dtype=torch.float32, random_bn=True):
    torch.manual_seed(0)
    model = timm.create_model(name, **dict(tiny_kwargs(name), **kwargs)).to(dtype)
    return randomise_bn_(model) if random_bn else model


def image(name, dtype=torch.float32, fill=None):
    x = rand(2, 3, *(2 * (32 if 'cifar' in name else 64,)), dtype=dtype)
    return (x if fill is None else torch.full_like(x, fill)).requires_grad_()


@pytest.mark.parametrize('name,kwargs', MODELS, ids=IDS)
@pytest.mark.parametrize('train', [True, False])
def test_model_gradients_equal_released_formulas(name, kwargs, train):
    # covers ISqrtCovPool and CovPool against the released head (covpool, gsop2, isqrt)
    model = tiny(name, kwargs, torch.float64).train(train)
    ref, params, buffers = released_copy(model)
    assert any(isinstance(m, (ReleasedGSoP, ReleasedHead)) for m in ref.modules())
    x, x_ref = image(name, torch.float64), image(name, torch.float64)
    loss_of(model(x)).backward()
    loss_of(ref(x_ref)).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **F64)
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, params[n].grad, **F64, msg=lambda m: f'{n}: {m}')
    for n, b in model.named_buffers():  # the same BN statistics updates
        torch.testing.assert_close(b, buffers[n], **F64, msg=lambda m: f'{n}: {m}')


class RegionDtypes(TorchDispatchMode):
    """The input dtypes of the bmm ops run while ``depth`` > 0 (inside a float32 region), as dispatched."""
    depth, seen = 0, frozenset()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.depth and func.overloadpacket.__name__ == 'bmm':
            self.seen = self.seen | {a.dtype for a in args}
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('name,kwargs', [MODELS[2], MODELS[3], MODELS[9]], ids=[IDS[2], IDS[3], IDS[9]])
def test_second_order_region_is_float32_under_autocast(name, kwargs, dtype):
    model, mode, inputs = tiny(name, kwargs).train(), RegionDtypes(), {}
    for m in model.modules():
        if isinstance(m, (CovarianceGate, CovPool)):  # the gates and the heads: every bmm inside in float32
            m.register_forward_pre_hook(lambda m, args: setattr(mode, 'depth', mode.depth + 1))
            m.register_forward_hook(lambda m, args, out: setattr(mode, 'depth', mode.depth - 1))
        if isinstance(m, (ChannelGSoP, PositionGSoP)):
            m.register_forward_pre_hook(lambda m, args: inputs.setdefault(m, args[0]))
    x = image(name)
    with torch.autocast('cpu', dtype=dtype), mode:
        out = model(x)
        weights = [m.attention(inp).dtype for m, inp in inputs.items()]  # documented: float32 (their docstrings)
    assert out.dtype == dtype and mode.seen == {torch.float32}  # autocast on; the regions in float32
    assert weights == [torch.float32] * len(inputs)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('name,kwargs', MODELS, ids=IDS)
@pytest.mark.parametrize('fill', [0.0, 0.7])
@pytest.mark.parametrize('train', [True, False])
def test_blank_images_give_finite_outputs_and_gradients(name, kwargs, fill, train):
    # at init an all-zero image stays zero up to the covariances: zero matrices (trace 0) in every module and head
    model = tiny(name, kwargs, random_bn=False).train(train)
    x = image(name, fill=fill)
    out = model(x)
    loss_of(out).backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize('iters', [1, 2, 3, 5])
def test_isqrt_of_zero_is_zero_with_finite_gradient(iters):
    x = torch.zeros(2, 5, 5, requires_grad=True)
    y = isqrt(x, iters)
    assert torch.equal(y, torch.zeros(2, 5, 5))
    loss_of(y).backward()
    assert torch.isfinite(x.grad).all()
