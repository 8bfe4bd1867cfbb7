"""Reliability: numerics on degenerate images, bad input, determinism and export, tried the way users
will break the models."""
import functools

import pytest
import torch
import torch.nn as nn
import timm

import timm_gsop  # noqa: F401
from conftest import distinct_tiny_models, tiny_kwargs
from timm_gsop import CovarianceGate, ISqrtCovPool
from timm_gsop.zoo import list_gsop_models

# every registered model, at test size (tiny_kwargs: the same structure), once per distinct network; the
# covariance-head family on its default (ResNet) backbone only: its other backbones are timm's own networks, which
# tests/test_covpool.py runs through degenerate images
MODELS = distinct_tiny_models([n for n in list_gsop_models() if not n.startswith('covpool_')])
IMAGES = {
    'zeros': lambda shape, g: torch.zeros(shape),
    'constant': lambda shape, g: torch.full(shape, 0.37),
    'scaled_1e4': lambda shape, g: torch.randn(shape, generator=g) * 1e4,
    'scaled_1e-4': lambda shape, g: torch.randn(shape, generator=g) * 1e-4,
}


@functools.lru_cache(maxsize=None)
def _model(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(tiny_kwargs(name), **kwargs))


def _min_size(model):
    return 32  # the smallest side the tests use (the stem and four stages halve it to 1x1 at most)


def _images(kind, model, batch=2):
    size = _min_size(model)
    return IMAGES[kind]((batch, 3, size, size), torch.Generator().manual_seed(1))


def _assert_finite_forward_backward(model, x, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    if autocast_dtype is None:
        out = model(x)
    else:
        with torch.autocast('cpu', dtype=autocast_dtype):
            out = model(x)
    assert torch.isfinite(out).all(), 'non-finite output'
    out.float().square().mean().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f'non-finite gradients in {bad[:5]}'
    return out


@pytest.mark.parametrize('name', MODELS)
def test_degenerate_images_finite_fp32_and_bf16(name):
    """All-zero, constant, x1e4 and x1e-4 images: finite outputs and gradients, train and eval mode,
    fp32 and bf16 autocast. In eval mode samples are independent, so the four kinds share one batch; in
    train mode BatchNorm couples a batch, so each kind is its own batch."""
    model = _model(name)
    for dtype in (None, torch.bfloat16):
        model.train()
        for kind in IMAGES:
            out = _assert_finite_forward_backward(model, _images(kind, model), dtype)
            assert out.dtype == (dtype or torch.float32), kind
        model.eval()
        mixed = torch.cat([_images(kind, model, batch=1) for kind in IMAGES])
        _assert_finite_forward_backward(model, mixed, dtype)


@pytest.mark.parametrize('name', MODELS)
def test_batch_size_one_in_train_mode(name):
    # 64x64 so that stride-32 networks keep a 2x2 final map: BatchNorm cannot train on one value
    model = _model(name).train()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    _assert_finite_forward_backward(model, x)


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50'])
def test_second_order_stays_float32_under_bf16_autocast(name):
    model = _model(name, gsop_manner='fusion_concat').eval()
    dtypes = []
    hook = lambda m, i, o: dtypes.append((type(m).__name__, i[0].dtype, o.dtype))
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, CovarianceGate)]
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    for h in handles:
        h.remove()
    assert len(dtypes) == (8 if name.startswith('gsop_') else 6)  # channel + position gate per block
    assert all(i == o == torch.float32 for _, i, o in dtypes), dtypes
    assert out.dtype == torch.bfloat16  # what autocast users expect from the classifier
    if isinstance(model.global_pool, ISqrtCovPool):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            feats = model.global_pool.bn_reduce(model.global_pool.conv_reduce(torch.randn(1, model.num_features, 4, 4)))
        assert feats.dtype == torch.bfloat16  # the reduction conv runs in bf16, the covariance does not


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50'])
@pytest.mark.parametrize('hw', [(32, 32), (33, 65), (64, 37), (97, 131), (512, 512)])
def test_input_sizes(name, hw):
    model = _model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize('in_chans', [1, 4])
@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50'])
def test_in_chans(name, in_chans):
    model = timm.create_model(name, in_chans=in_chans, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, in_chans, 40, 48)).shape == (2, 3)
    with pytest.raises(RuntimeError, match=rf'to have {in_chans} channels, but got 3'):  # torch's conv error
        model(torch.randn(2, 3, 40, 48))


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50'])
@pytest.mark.parametrize('shape, message', [
    ((3, 64, 64), r'expected 4D input'),  # BatchNorm2d's ValueError
    ((1, 1, 3, 64, 64), r'Expected 3D \(unbatched\) or 4D \(batched\) input'),
    ((2, 1, 64, 64), r'expected input\[2, 1, 64, 64\] to have 3 channels'),
])
def test_bad_input_shapes_get_torchs_error(name, shape, message):
    model = _model(name).eval()
    for fn in (model, model.forward_intermediates):
        with pytest.raises((RuntimeError, ValueError), match=message):
            fn(torch.randn(shape))


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50'])
def test_eval_determinism_and_batch_independence(name):
    model = _model(name, gsop_manner='fusion_avg').eval()
    x = torch.randn(4, 3, 64, 80, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(x), model(x)
        assert torch.equal(a, b), 'two eval runs differ'
        # conv kernels pick other blockings per batch size: float32 rounding only, no cross-sample mixing
        for i in range(4):
            alone = model(x[i:i + 1])
            torch.testing.assert_close(alone, a[i:i + 1], rtol=1e-4, atol=1e-4)
        perm = torch.tensor([2, 0, 3, 1])
        torch.testing.assert_close(model(x[perm]), a[perm], rtol=1e-4, atol=1e-4)
        # a wildly different neighbour changes nothing either
        mixed = torch.cat([x[:1], torch.zeros_like(x[:1]), 1e3 * x[1:2]])
        torch.testing.assert_close(model(mixed)[0], a[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50'])
def test_jit_trace_and_torch_export(name):
    model = _model(name, gsop_manner='position').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), ref, rtol=1e-5, atol=1e-5)
        batch = torch.export.Dim('batch', min=1, max=64)
        program = torch.export.export(model, (x,), dynamic_shapes={'x': {0: batch}})
        torch.testing.assert_close(program.module()(x), ref, rtol=1e-5, atol=1e-5)
        x3 = torch.randn(3, 3, 64, 64)
        torch.testing.assert_close(program.module()(x3), model(x3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['gsop_resnet50', 'gsop2_resnet50'])
def test_onnx_export_matches_onnxruntime(name, tmp_path):
    pytest.importorskip('onnxruntime', reason='install the test extra: pip install -e .[test]')
    from timm_gsop.onnx_export import check_onnx, export_onnx
    model = _model(name).eval()
    path = export_onnx(model, tmp_path / 'model.onnx', input_size=(3, 96, 96), opset=18)
    errors = check_onnx(model, path, (3, 96, 96), batch_sizes=(1, 4))
    assert set(errors) == {1, 4}  # dynamic batch
    assert max(errors.values()) < 1e-4, errors
    ops = _onnx_op_types(path)
    assert 'Conv' in ops and 'MatMul' in ops


@pytest.mark.parametrize('name', MODELS)
def test_torchscript_exporter_onnx_of_every_model(name, tmp_path, monkeypatch):
    """timm's onnx_export (the TorchScript exporter, dynamo=False, as its onnx_export.py uses by default) on
    every model: no aten::tril_indices (the triangle index is a buffer), outputs as onnxruntime runs."""
    pytest.importorskip('onnxruntime', reason='install the test extra: pip install -e .[test]')
    import onnxruntime as ort
    from timm.utils.onnx import onnx_export
    model = _model(name).eval()
    size = _min_size(model) * 2
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    onnx_export(model, str(tmp_path / 'model.onnx'), example_input=x, opset=17, check_forward=False)
    session = ort.InferenceSession(str(tmp_path / 'model.onnx'), providers=['CPUExecutionProvider'])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = model(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_onnx_cli_torchscript_exporter(tmp_path, capsys):
    pytest.importorskip('onnxruntime', reason='install the test extra: pip install -e .[test]')
    from timm_gsop_cli import main
    out = tmp_path / 'g.onnx'
    assert main(['onnx', 'gsop2_resnet50', str(out), '--img-size', '64', '64', '--num-classes', '5',
                 '--exporter', 'torchscript', '--model-kwargs', 'layers=(1,1,1,1)', 'channels=(16,32,64,128)']) == 0
    text = capsys.readouterr().out
    assert out.exists() and 'batch 3: max relative error' in text


def _onnx_op_types(path):
    import onnx
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_onnx_cli(tmp_path, capsys):
    pytest.importorskip('onnxruntime', reason='install the test extra: pip install -e .[test]')
    from timm_gsop_cli import main
    out = tmp_path / 'g.onnx'
    assert main(['onnx', 'gsop_resnet50', str(out), '--img-size', '64', '64', '--num-classes', '5',
                 '--model-kwargs', 'gsop_manner=fusion_max', 'layers=(1,1,1,1)', 'channels=(16,32,64,128)']) == 0
    text = capsys.readouterr().out
    assert out.exists() and 'batch 3: max relative error' in text
    before = out.read_bytes()
    assert main(['onnx', 'gsop_resnet50', str(out), '--opset', '11']) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'timm-gsop onnx: error: opset must be >= 17 (dynamo exporter), got 11'
    assert out.read_bytes() == before


def test_onnx_export_failure_leaves_previous_file(tmp_path, monkeypatch):
    from timm_gsop import onnx_export
    path = tmp_path / 'model.onnx'
    path.write_bytes(b'previous good export')

    def broken_export(*args, **kwargs):
        raise RuntimeError('exporter crashed half way')
    monkeypatch.setattr(torch.onnx, 'export', broken_export)
    with pytest.raises(RuntimeError, match='half way'):
        onnx_export.export_onnx(nn.Conv2d(3, 3, 1), path, input_size=(3, 8, 8))
    assert path.read_bytes() == b'previous good export'
    assert [p.name for p in tmp_path.iterdir()] == ['model.onnx']  # no temp file left behind
