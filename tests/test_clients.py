"""The models in the libraries researchers run timm models in (docs/clients.md), on tiny versions, offline:
transformers' TimmWrapper and pipeline on a folder written by ``export_checkpoint``, OpenVINO, ONNX Runtime on
timm's own ``onnx_export``, torch-pruning with the documented ``ignored_layers``. ``python -m pytest -m clients``.
"""
import argparse
import warnings

import pytest
import torch
import timm

import timm_gsop  # noqa: F401 (registers the models: transformers and the exporters build them through timm)
from conftest import randomise_bn_, tiny_kwargs
from timm_gsop import ChannelGSoP, GSoPFusion, PositionGSoP
from timm_gsop.export import export_checkpoint

pytestmark = pytest.mark.clients

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

# one tiny model of each family: GSoP-Net2 (channel GSoP modules, the iSQRT-COV head), the CIFAR pre-activation
# ResNet with both GSoP branches (channel and position), the covariance head on a ViT backbone (at a fixed size:
# timm's dynamic position-embedding resampling is an op the exporters lack, for a plain timm ViT too)
FAMILIES = {
    'gsop2_resnet50': ('gsop2_resnet50', {}, 64),
    'gsop_preresnet164_cifar-fusion_concat': ('gsop_preresnet164_cifar', dict(gsop_manner='fusion_concat'), 32),
    'covpool_deit_small_patch16_224': ('covpool_deit_small_patch16_224', dict(dynamic_img_size=False, img_size=64), 64),
}
# f32 against eager, max |error| / max |output|; measured: OpenVINO 5e-7 to 1e-6, onnxruntime 6e-7 to 1.3e-6
TOLERANCE = 2e-5  # ~15x the largest error measured (1.3e-6): other CPUs round differently


def _tiny(name, seed=0, **over):
    torch.manual_seed(seed)
    return randomise_bn_(timm.create_model(name, **dict(tiny_kwargs(name), **over)), seed).eval()


def _family(case):
    name, over, size = FAMILIES[case]
    return _tiny(name, **over), X[:, :, :size, :size]


def _rel_err(out, ref):
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


# ---- transformers -----------------------------------------------------------------------------------------

@pytest.fixture(scope='module', params=['gsop2_resnet50', 'covpool'])
def exported(request, tmp_path_factory):
    """(folder, source model): a state dict of a tiny GSoP-Net2 exported with model and kwargs given, or a
    train.py-style checkpoint of the generic covpool (its args name the model, backbone and data settings)."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == 'gsop2_resnet50':
        model = _tiny('gsop2_resnet50', seed=1)
        torch.save(model.state_dict(), tmp / 'weights.pth')
        export_checkpoint(tmp / 'weights.pth', tmp / 'export', model='gsop2_resnet50',
                          model_kwargs=tiny_kwargs('gsop2_resnet50'))
    else:
        kwargs = dict(tiny_kwargs('covpool'), backbone='resnet18')
        model = _tiny('covpool', seed=1, backbone='resnet18')
        args = argparse.Namespace(model='covpool', num_classes=kwargs.pop('num_classes'), model_kwargs=kwargs,
                                  img_size=64, crop_pct=0.9)
        torch.save(dict(epoch=3, state_dict=model.state_dict(), args=args), tmp / 'last.pth.tar')
        export_checkpoint(tmp / 'last.pth.tar', tmp / 'export')
    return tmp / 'export', model


def test_timm_wrapper_and_pipeline_load_an_export(exported):
    import transformers
    from PIL import Image
    folder, model = exported
    wrapped = transformers.AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        ref = model(X)
        torch.testing.assert_close(wrapped(pixel_values=X).logits, ref, rtol=1e-5, atol=1e-6)  # measured: equal

    # the pipeline preprocesses as the export's config says: timm's eval transforms for timm's own reading of it
    image = Image.fromarray((torch.rand(80, 96, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    top = transformers.pipeline('image-classification', model=str(folder))(image, top_k=3)
    config = timm.data.resolve_model_data_config(timm.create_model(f'local-dir:{folder}', pretrained=True))
    with torch.no_grad():
        scores, classes = model(timm.data.create_transform(**config)(image).unsqueeze(0)).softmax(-1)[0].topk(3)
    assert [r['label'] for r in top] == [wrapped.config.id2label[int(c)] for c in classes]
    torch.testing.assert_close(torch.tensor([r['score'] for r in top]), scores, rtol=1e-5, atol=1e-6)


def test_timm_wrapper_loads_an_export_in_bfloat16(exported):
    import transformers
    folder, model = exported
    wrapped = transformers.AutoModelForImageClassification.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    assert {p.dtype for p in wrapped.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = wrapped(pixel_values=X.bfloat16()).logits
        ref = model(X)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _rel_err(out, ref) < 0.1  # bf16 rounding, measured 1.9e-2 (gsop2_resnet50), 2.8e-2 (covpool)


# ---- OpenVINO, ONNX Runtime -------------------------------------------------------------------------------

@pytest.mark.parametrize('case', list(FAMILIES))
def test_openvino_f32_matches_eager(case):
    import openvino as ov
    model, x = _family(case)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)  # the ViT's asserts on its input size
        ref = model(x)
        ov_model = ov.convert_model(model, example_input=x)  # traces the module
    # f32: the CPU plugin may infer in bf16 by default (on a CPU with bf16 units: 4e-3 to 4e-2)
    compiled = ov.Core().compile_model(ov_model, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})
    out = torch.from_numpy(compiled(x.numpy())[0])
    assert out.shape == ref.shape and _rel_err(out, ref) < TOLERANCE


@pytest.mark.parametrize('dynamo', [False, True], ids=['torchscript', 'dynamo'])
@pytest.mark.parametrize('case', list(FAMILIES))
def test_timm_onnx_export_runs_in_onnxruntime(case, dynamo, tmp_path):
    """timm's ``onnx_export`` (a dynamic batch; ONNX's checker), exported at batch 1, run at batch 2."""
    from timm.utils.onnx import onnx_export, onnx_forward
    model, x = _family(case)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        warnings.simplefilter('ignore', DeprecationWarning)  # torch's, on its TorchScript exporter
        onnx_export(model, str(tmp_path / 'model.onnx'), example_input=x[:1], use_dynamo=dynamo)
    with torch.no_grad():
        ref = model(x)
    out = torch.from_numpy(onnx_forward(str(tmp_path / 'model.onnx'), x))
    assert out.shape == ref.shape and _rel_err(out, ref) < TOLERANCE


# ---- torch-pruning ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['covpool_resnet50', 'gsop2_resnet50'])
def test_torch_pruning_with_the_documented_ignored_layers(name):
    """docs/clients.md: the covariance head and the classifier (and a GSoP-Net's GSoP modules) ignored; the
    backbone's channels, those into the head included, pruned; the model runs and trains."""
    import torch_pruning as tp
    model = _tiny(name)
    ignored = [model.global_pool, model.fc]
    ignored += [m for m in model.modules() if isinstance(m, (ChannelGSoP, PositionGSoP, GSoPFusion))]
    head_in, head_dim = model.global_pool.conv_reduce.in_channels, model.global_pool.conv_reduce.out_channels
    before = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # its shape inference's 'Maximum recursive depth reached!'
        pruner = tp.pruner.MagnitudePruner(model, X[:1], importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=0.3, ignored_layers=ignored)
        pruner.step()
    assert sum(p.numel() for p in model.parameters()) < 0.9 * before
    assert model.global_pool.conv_reduce.in_channels < head_in
    assert model.global_pool.conv_reduce.out_channels == head_dim and model.fc.out_features == 7
    out = model.train()(X)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
