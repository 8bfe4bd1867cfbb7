"""The models in the libraries researchers use them with (docs/clients.md): transformers' TimmWrapper on a folder
written by ``timm-gsop export``, OpenVINO's two PyTorch frontends (TorchScript trace and ExportedProgram), and
torch-pruning with the documented ``ignored_layers``.

Each library is the ``clients`` extra (``pip install 'timm-gsop[clients]'``; the ``test`` extra and CI install it):
a test is skipped only when its library is not installed. Tiny models (``conftest.tiny_kwargs``), no network.
"""
import json

import pytest
import torch
import timm

import timm_gsop  # noqa: F401 (registers the models: transformers builds them with timm.create_model)
from conftest import distinct_tiny_models, randomise_bn_, tiny_kwargs
from timm_gsop import ChannelGSoP, GSoPFusion, ISqrtCovPool, PositionGSoP
from timm_gsop.export import HF_OWN_ARGS, export_checkpoint
from timm_gsop.zoo import list_gsop_models

pytestmark = pytest.mark.usefixtures('one_thread')

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _tiny(name, seed=0, **over):
    torch.manual_seed(seed)
    return randomise_bn_(timm.create_model(name, **dict(tiny_kwargs(name), **over)), seed).eval()


def _need(module):
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install 'timm-gsop[clients]')")


# ---- transformers ------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A tiny GSoP-Net2 (GSoP modules and the iSQRT-COV head, whose triangle index TimmWrapper re-initialises)
    exported by ``timm-gsop export``: (folder, the source model)."""
    tmp = tmp_path_factory.mktemp('hf')
    model = _tiny('gsop2_resnet50', seed=1)
    torch.save(model.state_dict(), tmp / 'weights.pth')
    kwargs = {k: v for k, v in tiny_kwargs('gsop2_resnet50').items() if k != 'num_classes'}
    export_checkpoint(tmp / 'weights.pth', tmp / 'export', model='gsop2_resnet50', model_kwargs=kwargs)
    return tmp / 'export', model


def test_export_config_is_what_both_loaders_read(exported):
    folder, model = exported
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'gsop2_resnet50' and config['num_classes'] == model.num_classes == 7
    assert not set(HF_OWN_ARGS) & set(config['model_args'])  # TimmWrapper passes these itself
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()  # timm's own loader
    with torch.no_grad():
        assert torch.equal(reloaded(X), model(X))


def test_timm_wrapper_and_pipeline_load_an_export(exported, tmp_path):
    transformers = _need('transformers')
    from PIL import Image
    folder, model = exported
    wrapped = transformers.AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    assert type(wrapped).__name__ == 'TimmWrapperForImageClassification'
    features = transformers.AutoModel.from_pretrained(str(folder)).eval()
    # the same network and weights; the same outputs up to float rounding (on one thread the CPU kernels may
    # differ in the last bit between two copies of a model: here 1e-7, and exact on two threads)
    close = dict(rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ref = model(X)
        torch.testing.assert_close(wrapped(pixel_values=X).logits, ref, **close)
        pooled = model.forward_head(model.forward_features(X), pre_logits=True)
        torch.testing.assert_close(features(pixel_values=X).pooler_output, pooled, **close)

    # the pipeline: the export's preprocessing (timm's eval transforms from config.json), then the classifier
    image = Image.fromarray((torch.rand(80, 96, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    classifier = transformers.pipeline('image-classification', model=str(folder))
    top = classifier(image, top_k=3)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        probs = model(transform(image).unsqueeze(0)).softmax(-1)[0]
    scores, classes = probs.topk(3)
    assert [r['label'] for r in top] == [wrapped.config.id2label[int(c)] for c in classes]
    torch.testing.assert_close(torch.tensor([r['score'] for r in top]), scores, rtol=1e-5, atol=1e-6)

    # save_pretrained -> from_pretrained, and the transformers-saved folder read back by timm
    wrapped.save_pretrained(str(tmp_path / 'saved'))
    again = transformers.AutoModelForImageClassification.from_pretrained(str(tmp_path / 'saved')).eval()
    by_timm = timm.create_model(f'local-dir:{tmp_path / "saved"}', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=X).logits, ref, **close)
        torch.testing.assert_close(by_timm(X), ref, **close)


# ---- OpenVINO ----------------------------------------------------------------------------------------------

def _openvino_run(ov_model, x):
    import openvino as ov
    # f32: OpenVINO's CPU plugin may infer in bf16 by default, a precision choice, not a conversion error
    compiled = ov.Core().compile_model(ov_model, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})
    return torch.from_numpy(compiled(x.numpy())[0])


def _max_rel_err(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


OPENVINO_MODELS = ['gsop_resnet50', 'gsop2_resnet50', 'isqrt_resnet50']


@pytest.mark.parametrize('frontend', ['torchscript', 'exported_program'])
@pytest.mark.parametrize('name', OPENVINO_MODELS)
def test_openvino_converts_with_eager_outputs(name, frontend):
    ov = _need('openvino')
    model = _tiny(name)
    with torch.no_grad():
        ref = model(X)
        if frontend == 'torchscript':  # convert_model traces the module (torch.jit.trace) with the example
            ov_model = ov.convert_model(model, example_input=X)
        else:
            ov_model = ov.convert_model(torch.export.export(model, (X,)))
    out = _openvino_run(ov_model, X)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert _max_rel_err(out, ref) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize('frontend', ['torchscript', 'exported_program'])
def test_openvino_converts_every_registered_model(frontend):
    """Every distinct tiny registered model and every GSoP manner, both frontends (minutes)."""
    ov = _need('openvino')
    names = distinct_tiny_models(list_gsop_models())
    cases = [(n, {}) for n in names] + [
        ('gsop_resnet50', dict(gsop_manner=m)) for m in ('position', 'fusion_avg', 'fusion_max', 'fusion_concat')]
    failures = []
    for name, over in cases:
        model = _tiny(name, **over)
        x = X[:, :, :32, :32] if 'cifar' in name else X
        with torch.no_grad():
            ref = model(x)
            try:
                ov_model = ov.convert_model(model, example_input=x) if frontend == 'torchscript' else \
                    ov.convert_model(torch.export.export(model, (x,)))
                err = _max_rel_err(_openvino_run(ov_model, x), ref)
            except Exception as e:  # collect them all
                failures.append(f'{name} {over}: {type(e).__name__}: {str(e)[:300]}')
                continue
        if not err < 1e-4:
            failures.append(f'{name} {over}: max relative error {err:.2e}')
    assert not failures, '\n'.join(failures)


# ---- torch-pruning -----------------------------------------------------------------------------------------

def ignored_layers(model):
    """docs/clients.md's recipe: the GSoP modules and the covariance head (a covariance couples every pair of its
    channels, which torch-pruning's channel dependency graph cannot follow) and the classifier."""
    gsop = (ChannelGSoP, PositionGSoP, GSoPFusion, ISqrtCovPool)
    return [m for m in model.modules() if isinstance(m, gsop)] + [model.get_classifier()]


@pytest.mark.parametrize('name', ['gsopresnet18', 'gsop_resnet50', 'gsop2_resnet50', 'isqrt_resnet50'])
def test_torch_pruning_recipe(name):
    tp = _need('torch_pruning')
    model = _tiny(name)
    x = X[:1]
    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.3, ignored_layers=ignored_layers(model))
    pruner.step()
    after = sum(p.numel() for p in model.parameters())
    assert after < 0.9 * before
    with torch.no_grad():
        out = model.eval()(X)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out = model.train()(X)  # and it trains: gradients reach every parameter left
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
