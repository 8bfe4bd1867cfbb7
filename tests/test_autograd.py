"""Every registered model is a correct PyTorch module under every use of autograd.

Each test runs a model the way research code does (partial ``autograd.grad`` with ``retain_graph``, repeated
backward, double backward, ``torch.func``, checkpointing, frozen parameters, hooks) and compares, in float64
and train mode, with the plain composition of the same modules: a copy whose ``GSoPBottleneck`` blocks run
timm's own ``Bottleneck.forward`` and whose covariance is the centred product in plain autograd ops
(:func:`plain_reference`). Nothing here trusts the package's own custom autograd functions.
"""
import copy
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn
import timm
from timm.models.resnet import Bottleneck

import timm_gsop  # noqa: F401
from conftest import distinct_tiny_models, randomise_bn_, tiny_kwargs
from timm_gsop.zoo import list_gsop_models
from timm_gsop.layers import ChannelGSoP, second_order
from timm_gsop.models._blocks import GSoPBottleneck
from timm_gsop.models.preresnet_cifar import PreActBottleneckCifar

# every registered model, once per distinct network at test size (a *101 model is its *50 twin there)
ALL_MODELS = distinct_tiny_models(list_gsop_models())
# the models with GSoPBottleneck blocks, which take the fused training path
FUSED_MODELS = [n for n in ALL_MODELS if 'gsop' in n and not n.startswith(('gsopresnet18', 'gsopresnet34'))
                and 'cifar' not in n]
F64 = dict(rtol=1e-7, atol=1e-9)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


class _PlainCovariance:
    """Stands in for ``second_order.Covariance``: the centred product, differentiated by autograd itself."""

    @staticmethod
    def apply(x):
        centred = x - x.mean(dim=2, keepdim=True)
        return centred @ centred.transpose(1, 2) / x.shape[-1]


class PlainModel(nn.Module):
    """The same modules and parameters (a deep copy), run without any of the package's custom autograd."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        for m in self.model.modules():
            if type(m) is GSoPBottleneck:
                m.__class__ = Bottleneck

    def forward(self, *args, **kwargs):
        with plain_ops():
            return self.model(*args, **kwargs)


@contextmanager
def plain_ops():
    saved = second_order.Covariance
    second_order.Covariance = _PlainCovariance
    try:
        yield
    finally:
        second_order.Covariance = saved


def plain_reference(model: nn.Module) -> PlainModel:
    return PlainModel(model)


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


def test_fused_models_list_is_what_uses_gsop_bottleneck():
    for name in ALL_MODELS:
        model = timm.create_model(name, device='meta', **tiny_kwargs(name))
        fused = any(type(m) is GSoPBottleneck and isinstance(m.se, ChannelGSoP) for m in model.modules())
        assert fused == (name in FUSED_MODELS), name


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


@contextmanager
def _nothing():
    yield


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


@pytest.mark.parametrize('name', FUSED_MODELS + ['gsopresnet18', 'gsop_preresnet164_cifar'])
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


@pytest.mark.parametrize('name', FUSED_MODELS)
def test_module_state_matches_after_training_steps(name):
    model = make(name)
    blocks = [m for m in model.modules() if type(m) is GSoPBottleneck and isinstance(m.se, ChannelGSoP)]
    blocks[0].bn3.momentum = None  # cumulative moving average, from num_batches_tracked
    if len(blocks) > 2:
        blocks[1].bn3 = nn.BatchNorm2d(blocks[1].bn3.num_features, track_running_stats=False).double()
        blocks[2].bn3 = nn.BatchNorm2d(blocks[2].bn3.num_features, affine=False).double()
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
    assert blocks[0].bn3.num_batches_tracked.item() == 2
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **F64, msg=lambda m: f'{n}: {m}')
    model.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(image(name)), ref(image(name)), **F64)


# ---- hooks ---------------------------------------------------------------------------------------------------

HOOK_MODELS = FUSED_MODELS + ['gsopresnet18', 'gsop_preresnet164_cifar']


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


@pytest.mark.parametrize('name', HOOK_MODELS)
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
        with plain_ops() if net is ref.model else _nothing():
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


@pytest.mark.parametrize('name', HOOK_MODELS)
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
        with plain_ops() if net is ref.model else _nothing():
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
        with plain_ops():
            _run(ref.model, name, mode)
        seen_ref = list(calls)
    finally:
        handle.remove()
    assert seen_model == seen_ref
    assert any(n.endswith('.bn3') for n in seen_model) and any(n.endswith('.se') for n in seen_model)


# ---- the custom autograd functions themselves --------------------------------------------------------------

def _fn_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64)
    x = torch.randn(2, 3, 5, 4, generator=g, **d)
    return dict(
        x=x, scale=(torch.rand(3, generator=g, **d) + 0.5) * torch.tensor([1., -1., 1.], **d),
        shift=torch.randn(3, generator=g, **d), weight=torch.randn(4, 3, 1, 1, generator=g, **d),
        bias=torch.randn(4, generator=g, **d), a=torch.rand(2, 3, 1, 1, generator=g, **d),
        shortcut=torch.randn(2, 3, 5, 4, generator=g, **d))


def _affine_relu_conv(x, scale, shift, weight, bias):
    return functions.AffineReluConv.apply(x, scale, shift, weight, bias, (1, 1), (0, 0), (1, 1), 1)


def _affine_relu_conv_ref(x, scale, shift, weight, bias):
    return torch.nn.functional.conv2d(torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)), weight, bias)


def _affine_scale_add(x, scale, shift, a, shortcut):
    return functions.AffineScaleAdd.apply(x, scale, shift, a, shortcut)


def _affine_scale_add_ref(x, scale, shift, a, shortcut):
    return (x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)) * a + shortcut


def _batch_stats(x):
    return functions.BatchStats.apply(x, None, None, 0.1)


def _batch_stats_ref(x):
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return mean, var


from timm_gsop.layers import autograd_functions as functions  # noqa: E402

FUNCTIONS = {
    'AffineReluConv': (_affine_relu_conv, _affine_relu_conv_ref, ('x', 'scale', 'shift', 'weight', 'bias')),
    'AffineScaleAdd': (_affine_scale_add, _affine_scale_add_ref, ('x', 'scale', 'shift', 'a', 'shortcut')),
    'BatchStats': (_batch_stats, _batch_stats_ref, ('x',)),
    'covariance': (lambda x: second_order.covariance_pool(x), lambda x: _PlainCovariance.apply(x.flatten(2)), ('x',)),
}


@pytest.mark.parametrize('fn', sorted(FUNCTIONS))
def test_custom_function_gradcheck_and_gradgradcheck(fn):
    ours, _, arg_names = FUNCTIONS[fn]
    inputs = _fn_inputs()
    args = tuple(inputs[k].requires_grad_() for k in arg_names)
    assert torch.autograd.gradcheck(ours, args)
    assert torch.autograd.gradgradcheck(ours, args)


@pytest.mark.parametrize('fn', sorted(FUNCTIONS))
def test_custom_function_matches_plain_ops_with_any_inputs_frozen(fn):
    ours, ref, arg_names = FUNCTIONS[fn]
    for mask in range(1, 2 ** len(arg_names)):
        args = [_fn_inputs()[k].requires_grad_(bool(mask >> i & 1)) for i, k in enumerate(arg_names)]
        args_ref = [_fn_inputs()[k].requires_grad_(bool(mask >> i & 1)) for i, k in enumerate(arg_names)]
        out, out_ref = ours(*args), ref(*args_ref)
        out, out_ref = (out if isinstance(out, tuple) else (out,)), (out_ref if isinstance(out_ref, tuple) else (out_ref,))
        for o, r in zip(out, out_ref):
            torch.testing.assert_close(o, r, **F64)
        wanted = [a for a in args if a.requires_grad]
        wanted_ref = [a for a in args_ref if a.requires_grad]
        cot = [torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(3)) for o in out]
        _assert_all_close(torch.autograd.grad(out, wanted, cot), torch.autograd.grad(out_ref, wanted_ref, cot))


@pytest.mark.parametrize('fn', sorted(FUNCTIONS))
def test_custom_function_under_torch_func_transforms(fn):
    ours, ref, arg_names = FUNCTIONS[fn]
    args = [_fn_inputs()[k] for k in arg_names]

    def total(f):
        def loss(*a):
            out = f(*a)
            return sum((o * o).sum() for o in (out if isinstance(out, tuple) else (out,)))
        return loss

    argnums = tuple(range(len(args)))
    _assert_all_close(torch.func.grad(total(ours), argnums=argnums)(*args),
                      torch.func.grad(total(ref), argnums=argnums)(*args))
    # vmap over a batch of inputs (per-sample gradients are vmap(grad))
    stacked = [torch.stack([a, a * 0.5 + 0.1]) for a in args]
    _assert_all_close(torch.func.vmap(torch.func.grad(total(ours)))(*stacked),
                      torch.func.vmap(torch.func.grad(total(ref)))(*stacked))


def test_batch_stats_update_running_statistics_exactly_as_batchnorm():
    for momentum in (0.1, 0.5):
        bn = nn.BatchNorm2d(6, momentum=momentum).double().train()
        running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
        x = torch.randn(4, 6, 7, 5, dtype=torch.float64)
        bn(x)
        functions.BatchStats.apply(x, running_mean, running_var, momentum)
        assert torch.equal(running_mean, bn.running_mean) and torch.equal(running_var, bn.running_var)


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


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsopresnet50'])
def test_training_keeps_no_copy_of_the_gsop_block_outputs(name):
    """The default training path is the fused one (its memory is what the benchmarks report): compared with
    timm's order it does not save the GSoP blocks' bn3 outputs and their rectified copies."""
    x = torch.randn(2, 3, 64, 64)
    gsop = timm.create_model(name, layers=(1, 1, 1, 1)).train()
    unfused = timm.create_model(name, layers=(1, 1, 1, 1), gsop_fused=False).train()
    sizes = []
    handles = [m.bn3.register_forward_hook(lambda m, i, o: sizes.append(o.numel() * o.element_size()))
               for m in gsop.modules() if type(m) is GSoPBottleneck]
    with torch.no_grad():
        gsop(x)
    for h in handles:
        h.remove()
    fused_bytes = _saved_bytes(gsop, x)
    assert _saved_bytes(PlainModel(gsop), x) - fused_bytes >= 1.2 * sum(sizes)
    assert _saved_bytes(unfused, x) - fused_bytes >= 1.2 * sum(sizes)


# ---- the fused path in other layouts and dtypes ------------------------------------------------------------

def test_fused_path_matches_in_channels_last():
    model = make('gsop_resnet50').to(memory_format=torch.channels_last)
    ref = plain_reference(model)
    x = image('gsop_resnet50').detach().to(memory_format=torch.channels_last).requires_grad_()
    xr = image('gsop_resnet50').detach().to(memory_format=torch.channels_last).requires_grad_()
    _loss(model(x)).backward()
    _loss(ref(xr)).backward()
    torch.testing.assert_close(x.grad, xr.grad, **F64)
    _assert_all_close([p.grad for p in model.parameters()], [p.grad for p in ref.parameters()])


def test_fused_path_in_float32():
    torch.manual_seed(0)
    model = randomise_bn_(timm.create_model('gsop_resnet50', **tiny_kwargs('gsop_resnet50'))).train()
    ref = plain_reference(model)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    _loss(model(x)).backward()
    _loss(ref(xr)).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=2e-4, atol=2e-5)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-4, atol=2e-5, msg=lambda m: f'{n}: {m}')


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


def test_training_under_bf16_autocast_runs_the_plain_order_in_float32_second_order():
    """Under autocast the fused path steps aside (it would compute its affine maps in autocast's dtype);
    the plain order keeps the covariance and gate in float32."""
    model = randomise_bn_(timm.create_model('gsop_resnet50', **tiny_kwargs('gsop_resnet50'))).train()
    block = _first_gsop_block(model)
    seen = []
    block.se.gate.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    assert out.dtype == torch.bfloat16 and seen == [torch.float32]
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
