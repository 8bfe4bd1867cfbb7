"""Every registered model is a correct PyTorch module under every use of autograd.

Each test runs a model the way research code does (partial ``autograd.grad`` with ``retain_graph``, repeated
backward, double backward, ``torch.func``, checkpointing, frozen parameters, hooks) and compares, in float64
and train mode, with a reference composition of the same modules and parameters (:class:`ReferenceModel`):
the second-order ops replaced by the released code's formulas (``official_reference.py``: the M x M centring
matrix, the step-by-step iSQRT recursion, the mask-indexed triangle) and each gate's row convolution run as
the grouped convolution it stands for.
"""
import copy
from contextlib import ExitStack, contextmanager, nullcontext
from unittest import mock

import pytest
import torch
import torch.nn as nn
import timm

import official_reference as released
from conftest import distinct_tiny_models, randomise_bn_, tiny_kwargs
from timm_gsop.layers import ChannelGSoP, RowConv2d, cov_pool, gsop
from timm_gsop.models.preresnet_cifar import PreActBottleneckCifar
from timm_gsop.zoo import list_gsop_models

# every registered model, once per distinct network at test size (a *101 model is its *50 twin there); the
# covariance-head family on its default (ResNet) backbone only: the others are timm's networks, some of whose ops
# torch cannot differentiate twice (CPU flash attention, hardsigmoid)
ALL_MODELS = distinct_tiny_models([n for n in list_gsop_models() if not n.startswith('covpool_')])
# the models with GSoP modules (the hook tests need one)
GSOP_MODELS = [n for n in ALL_MODELS if 'gsop' in n]
F64 = dict(rtol=1e-7, atol=1e-9)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@contextmanager
def released_ops():
    """The package's ops swapped for the released formulas, where the modules look them up."""
    swaps = [
        (gsop, 'covariance_pool', released.released_channel_covariance),
        (gsop, 'position_gram', released.released_position_covariance),
        (cov_pool, 'covariance_pool', released.released_channel_covariance),
        (cov_pool, 'isqrt', lambda x, num_iters, *args: released.released_sqrtm(x, num_iters)),
        (cov_pool, 'triu_vectorize', lambda x, *args: released.released_triu_vector(x)),
        (RowConv2d, 'forward', nn.Conv2d.forward),  # the grouped convolution itself
    ]
    with ExitStack() as stack:
        for target, name, value in swaps:
            stack.enter_context(mock.patch.object(target, name, value))
        yield


class ReferenceModel(nn.Module):
    """The same modules and parameters (a deep copy), run with the released formulas."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)

    def forward(self, *args, **kwargs):
        with released_ops():
            return self.model(*args, **kwargs)


def plain_reference(model: nn.Module) -> ReferenceModel:
    return ReferenceModel(model)


def make(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    kw = dict(tiny_kwargs(name), **kwargs)
    return randomise_bn_(timm.create_model(name, **kw)).double().train()


def image(name, batch=3, seed=1, requires_grad=True):
    size = 32 if 'cifar' in name else 64
    x = torch.randn(batch, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(requires_grad)


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _loss(out):
    return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + out.square().sum()


def _assert_all_close(got, expected, names=None):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        name = names[i] if names else str(i)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, **F64, msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('name', ALL_MODELS)
def test_partial_grads_with_retain_graph_in_either_order(name):
    model = make(name)
    ref = plain_reference(model)
    x, xr = image(name), image(name)
    gsop_params = [p for n, p in model.named_parameters() if '.se.' in n or 'global_pool' in n]
    other_params = [p for n, p in model.named_parameters() if not ('.se.' in n or 'global_pool' in n)]
    expected = torch.autograd.grad(_loss(ref(xr)), [xr] + list(ref.parameters()))
    expected_x = expected[0]
    expected_p = dict(zip((n for n, _ in model.named_parameters()), expected[1:]))
    names = [n for n, _ in model.named_parameters()]
    gsop_names = [n for n in names if '.se.' in n or 'global_pool' in n]
    other_names = [n for n in names if n not in gsop_names]
    for order in ('params_first', 'input_first'):
        loss = _loss(model(x))
        if order == 'params_first':
            g_gsop = torch.autograd.grad(loss, gsop_params, retain_graph=True) if gsop_params else ()
            g_x, = torch.autograd.grad(loss, x, retain_graph=True)
            g_other = torch.autograd.grad(loss, other_params)
        else:
            g_x, = torch.autograd.grad(loss, x, retain_graph=True)
            g_other = torch.autograd.grad(loss, other_params, retain_graph=True)
            g_gsop = torch.autograd.grad(loss, gsop_params) if gsop_params else ()
        torch.testing.assert_close(g_x, expected_x, **F64)
        _assert_all_close(g_gsop, [expected_p[n] for n in gsop_names], gsop_names)
        _assert_all_close(g_other, [expected_p[n] for n in other_names], other_names)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_repeated_backward_over_one_graph_accumulates(name):
    model = make(name)
    ref = plain_reference(model)
    x, xr = image(name), image(name)
    loss = _loss(model(x))
    loss.backward(retain_graph=True)
    loss.backward()
    _loss(ref(xr)).backward()
    torch.testing.assert_close(x.grad, 2 * xr.grad, **F64)
    _assert_all_close([p.grad for p in model.parameters()], [2 * p.grad for p in ref.parameters()],
                      [n for n, _ in model.named_parameters()])


@pytest.mark.parametrize('name', ALL_MODELS)
def test_double_backward_gradient_penalty_and_hessian_vector_product(name):
    model = make(name)
    ref = plain_reference(model)
    names = [n for n, _ in model.named_parameters()]
    results = []
    for net in (model, ref):
        x = image(name)
        loss = _loss(net(x))
        # an R1-style input-gradient penalty, differentiated w.r.t. every parameter
        g_x, = torch.autograd.grad(loss, x, create_graph=True)
        penalty = torch.autograd.grad(g_x.square().sum(), list(net.parameters()), allow_unused=True)
        # a Hessian-vector product w.r.t. the parameters (PyHessian's building block)
        loss = _loss(net(image(name)))
        params = list(net.parameters())
        grads = torch.autograd.grad(loss, params, create_graph=True)
        vec = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i))
               for i, p in enumerate(params)]
        hvp = torch.autograd.grad(grads, params, vec, allow_unused=True)
        results.append((g_x.detach(), penalty, hvp))
    (gx, pen, hvp), (gx_ref, pen_ref, hvp_ref) = results
    torch.testing.assert_close(gx, gx_ref, **F64)
    _assert_all_close(pen, pen_ref, names)
    _assert_all_close(hvp, hvp_ref, names)


@pytest.mark.parametrize('name', ALL_MODELS)
def test_torch_func_functional_call_grad_and_vjp(name):
    """``torch.func.grad`` of a functional_call w.r.t. the parameters in train mode (the BN buffers, which train
    mode updates, passed as inputs as torch.func requires), and ``torch.func.vjp`` w.r.t. the input in eval
    mode, against plain autograd on the plain composition."""
    model = make(name)
    ref = plain_reference(model)

    def loss_fn(net, params, buffers, inp):
        return _loss(torch.func.functional_call(net, (params, buffers), (inp,)))

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    x = image(name, requires_grad=False)
    grads = torch.func.grad(lambda p, b: loss_fn(model, p, b, x))(params, buffers)
    xr = image(name)
    _loss(ref(xr)).backward()
    _assert_all_close([grads[k] for k in params], [p.grad for p in ref.parameters()], list(params))

    model.eval()
    ref.eval()
    _, vjp_fn = torch.func.vjp(lambda inp: loss_fn(model, params, buffers, inp), x)
    xr = image(name)
    _loss(ref(xr)).backward()
    torch.testing.assert_close(vjp_fn(torch.ones((), dtype=torch.float64))[0], xr.grad, **F64)


class Checkpointed(nn.Module):
    """Runs ``inner`` under ``torch.utils.checkpoint``: nothing inside is kept for backward, all recomputed."""

    def __init__(self, inner: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.inner = inner
        self.reentrant = reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize('name', ALL_MODELS)
@pytest.mark.parametrize('reentrant', [False, True])
def test_activation_checkpointing_gives_the_same_gradients(name, reentrant):
    model = make(name)
    ref = plain_reference(model)
    for stage in [n for n, _ in model.named_children() if n.startswith('layer')]:
        setattr(model, stage, Checkpointed(getattr(model, stage), reentrant))
    x, xr = image(name), image(name)
    _loss(model(x)).backward()
    _loss(ref(xr)).backward()
    torch.testing.assert_close(x.grad, xr.grad, **F64)
    _assert_all_close([p.grad for p in model.parameters()], [p.grad for p in ref.parameters()],
                      [n for n, _ in model.named_parameters()])


@pytest.mark.parametrize('name', ALL_MODELS)
def test_timm_grad_checkpointing_gives_the_same_gradients(name):
    model = make(name)
    ref = plain_reference(model)
    model.set_grad_checkpointing(True)
    x, xr = image(name), image(name)
    _loss(model(x)).backward()
    _loss(ref(xr)).backward()
    torch.testing.assert_close(x.grad, xr.grad, **F64)
    _assert_all_close([p.grad for p in model.parameters()], [p.grad for p in ref.parameters()],
                      [n for n, _ in model.named_parameters()])


FROZEN = {
    'bn3': lambda n: '.bn3.' in n or '.bn2.' in n,         # the BN the GSoP module reads (BasicBlock: bn2)
    'gsop': lambda n: '.se.' in n,
    'all_but_fc': lambda n: not n.startswith('fc.'),
    'all': lambda n: True,
    'reduction_conv': lambda n: 'conv_reduce' in n,
}


@pytest.mark.parametrize('name', ALL_MODELS)
@pytest.mark.parametrize('pattern', sorted(FROZEN))
@pytest.mark.parametrize('input_grad', [True, False])
def test_frozen_parameters_in_any_pattern(name, pattern, input_grad):
    model = make(name)
    ref = plain_reference(model)
    frozen = FROZEN[pattern]
    for net in (model, ref.model):
        for n, p in net.named_parameters():
            p.requires_grad_(not frozen(n))
    if pattern == 'all' and not input_grad:
        return  # nothing to differentiate
    x, xr = image(name, requires_grad=input_grad), image(name, requires_grad=input_grad)
    _loss(model(x)).backward()
    _loss(ref(xr)).backward()
    if input_grad:
        torch.testing.assert_close(x.grad, xr.grad, **F64)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if frozen(n):
            assert p.grad is None and q.grad is None, n
        else:
            torch.testing.assert_close(p.grad, q.grad, **F64, msg=lambda m: f'{n}: {m}')


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50', 'gsopresnet18'])
def test_module_state_matches_after_training_steps(name):
    # BN variants in the blocks GSoP reads: cumulative average, no running stats, no affine
    model = make(name)
    blocks = [m for m in model.modules() if isinstance(getattr(m, 'se', None), ChannelGSoP)]
    host = 'bn2' if name == 'gsopresnet18' else 'bn3'
    getattr(blocks[0], host).momentum = None
    channels = getattr(blocks[1], host).num_features
    setattr(blocks[1], host, nn.BatchNorm2d(channels, track_running_stats=False).double())
    channels = getattr(blocks[2], host).num_features
    setattr(blocks[2], host, nn.BatchNorm2d(channels, affine=False).double())
    ref = plain_reference(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(2):
        for net, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            _loss(net(image(name, seed=step, requires_grad=False))).backward()
            o.step()
    for (n, b), c in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, **F64, msg=lambda m: f'{n}: {m}')
    assert getattr(blocks[0], host).num_batches_tracked.item() == 2
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **F64, msg=lambda m: f'{n}: {m}')
    model.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(image(name)), ref(image(name)), **F64)


# ---- hooks ---------------------------------------------------------------------------------------------------




def _first_gsop_block(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(getattr(m, 'se', None), ChannelGSoP))


def _gsop_input_module(block: nn.Module) -> nn.Module:
    """The module whose output the block's GSoP module reads (Bottleneck: bn3, BasicBlock: bn2, CIFAR: conv3)."""
    if isinstance(block, PreActBottleneckCifar):
        return block.conv3
    return block.bn3 if hasattr(block, 'bn3') else block.bn2


def _run(net, name, mode):
    x = image(name, requires_grad=mode == 'train')
    net.train(mode in ('train', 'no_grad_train'))
    if mode == 'inference':
        with torch.inference_mode():
            return net(x).clone(), None
    if mode in ('eval_no_grad', 'no_grad_train'):
        with torch.no_grad():
            return net(x), None
    out = net(x)
    _loss(out).backward()
    return out.detach(), x.grad


@pytest.mark.parametrize('name', GSOP_MODELS)
@pytest.mark.parametrize('mode', ['train', 'eval', 'eval_no_grad', 'no_grad_train', 'inference'])
def test_forward_hooks_fire_once_and_their_results_are_used(name, mode):
    model = make(name)
    ref = plain_reference(model)
    results, counts = [], []
    for net in (model, ref.model):
        block = _first_gsop_block(net)
        count = {'input_module': 0, 'se': 0, 'se_pre': 0, 'reduce_pre': 0}

        def bump(key, value):
            count[key] += 1
            return value

        _gsop_input_module(block).register_forward_hook(lambda m, i, o: bump('input_module', o * 1.5))
        block.se.register_forward_pre_hook(lambda m, a: bump('se_pre', (a[0] - 0.125,)))
        block.se.register_forward_hook(lambda m, i, o: bump('se', o + 0.25))
        block.se.conv_reduce.register_forward_pre_hook(lambda m, a: bump('reduce_pre', (a[0] * 0.5,)))
        with released_ops() if net is ref.model else nullcontext():
            results.append(_run(net, name, mode))
        counts.append(count)
    assert counts[0] == counts[1] == {'input_module': 1, 'se': 1, 'se_pre': 1, 'reduce_pre': 1}
    (out, g), (out_ref, g_ref) = results
    torch.testing.assert_close(out, out_ref, **F64)
    if g is not None:
        torch.testing.assert_close(g, g_ref, **F64)
    # and the hooks changed the result: without them the output differs
    plain_out, _ = _run(make(name), name, mode)
    assert not torch.allclose(plain_out, out)


@pytest.mark.parametrize('name', GSOP_MODELS)
def test_full_backward_hooks_on_blocks_stages_and_bns(name):
    """What Grad-CAM and gradient taps register: full backward hooks on a block and a stage (and on the BN the
    GSoP module reads), with the values of the plain composition."""
    model = make(name)
    ref = plain_reference(model)
    captured = []
    for net in (model, ref.model):
        block = _first_gsop_block(net)
        stage = next(m for n, m in net.named_children() if n.startswith('layer') and block in m.modules())
        seen = {}
        block.register_full_backward_hook(lambda m, gi, go: seen.update(block_in=gi[0], block_out=go[0]))
        stage.register_full_backward_pre_hook(lambda m, go: seen.update(stage_out=go[0]))
        _gsop_input_module(block).register_full_backward_hook(lambda m, gi, go: seen.update(bn_out=go[0]))
        with released_ops() if net is ref.model else nullcontext():
            _run(net, name, 'train')
        captured.append(seen)
    assert captured[0].keys() == captured[1].keys() == {'block_in', 'block_out', 'stage_out', 'bn_out'}
    for key in captured[0]:
        torch.testing.assert_close(captured[0][key], captured[1][key], **F64, msg=lambda m: f'{key}: {m}')


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50', 'gsopresnet50'])
@pytest.mark.parametrize('mode', ['train', 'inference'])
def test_global_module_hooks_see_every_module_call(name, mode):
    model = make(name)
    ref = plain_reference(model)
    calls = []
    names = {m: n for n, m in list(model.named_modules()) + [(n, m) for n, m in ref.model.named_modules()]}
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(names.get(m)))
    try:
        _run(model, name, mode)
        seen_model = list(calls)
        calls.clear()
        with released_ops():
            _run(ref.model, name, mode)
        seen_ref = list(calls)
    finally:
        handle.remove()
    assert seen_model == seen_ref
    assert any(n.endswith('.bn3') for n in seen_model) and any(n.endswith('.se') for n in seen_model)


def test_inference_leaves_the_block_input_and_intermediates_intact():
    model = make('gsop_resnet50').eval()
    ref = plain_reference(model).eval()
    block = model.layer2[-1]
    x = torch.randn(2, block.conv1.in_channels, 16, 16, dtype=torch.float64)
    x_before = x.clone()
    with torch.inference_mode():
        out = block(x)
        out_ref = ref.model.layer2[-1](x)
    torch.testing.assert_close(out, out_ref, **F64)
    assert torch.equal(x, x_before)
    # forward_intermediates keeps every stage's output intact
    final, feats = model.forward_intermediates(image('gsop_resnet50', requires_grad=False))
    final_ref, feats_ref = ref.model.forward_intermediates(image('gsop_resnet50', requires_grad=False))
    torch.testing.assert_close(final, final_ref, **F64)
    for f, g in zip(feats, feats_ref):
        torch.testing.assert_close(f, g, **F64)
