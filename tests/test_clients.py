"""The models in the libraries researchers use them with (docs/clients.md): transformers' TimmWrapper on a folder
written by ``timm-gsop export``, OpenVINO's two PyTorch frontends (TorchScript trace and ExportedProgram), and
torch-pruning with the documented ``ignored_layers``; for the covariance head on any timm backbone (``covpool*``) also
the package's ONNX export in onnxruntime and ``torch.compile`` (no graph break, float64 gradients as eager).

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
    _assert_pipeline_top3_is_the_models(folder, model, wrapped, rtol=1e-5, atol=1e-6)

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


def _assert_pipeline_top3_is_the_models(folder, model, wrapped, rtol, atol):
    """transformers' pipeline on an exported folder: the export's preprocessing (timm's eval transforms from
    config.json), then the classifier; its top 3 are the model's."""
    import transformers
    from PIL import Image
    image = Image.fromarray((torch.rand(80, 96, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    top = transformers.pipeline('image-classification', model=str(folder))(image, top_k=3)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        probs = model(transform(image).unsqueeze(0)).softmax(-1)[0]
    scores, classes = probs.topk(3)
    assert [r['label'] for r in top] == [wrapped.config.id2label[int(c)] for c in classes]
    torch.testing.assert_close(torch.tensor([r['score'] for r in top]), scores, rtol=rtol, atol=atol)


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
        model = _tiny(name, **dict(FIXED_SIZE_VIT.get(name, {}), **over))  # the documented way to convert a ViT
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


# ---- covariance pooling on any timm backbone (CovPoolNet) ----------------------------------------------------

def _covpool(name, seed=0, **over):
    """(a tiny covpool model in eval mode, its create_model kwargs): ``conftest.TINY_COVPOOL`` (a 16-d iSQRT-COV
    head, 7 classes; the DeiT with ``dynamic_img_size``), or for the generic ``covpool`` given a ``backbone``, that
    backbone at its own size."""
    if name == 'covpool' and 'backbone' in over:
        kwargs = dict(isqrt_dim=16, num_classes=7, **over)
    else:
        kwargs = dict(tiny_kwargs(name), **over)
    torch.manual_seed(seed)
    return randomise_bn_(timm.create_model(name, **kwargs), seed).eval(), kwargs


# the generic model on a timm model no registered name wraps; the DeiT at its fixed 224 x 224 (what the pipeline
# feeds it: the backbone's pretrained cfg)
EXPORT_CASES = {
    'covpool_resnet50': ('covpool_resnet50', {}, 64),
    'covpool_deit_small_patch16_224': ('covpool_deit_small_patch16_224', dict(dynamic_img_size=False), 224),
    'covpool-regnety_016': ('covpool', dict(backbone='regnety_016'), 64),
}


@pytest.mark.parametrize('case', list(EXPORT_CASES))
def test_covpool_export_loads_in_timm_wrapper_and_pipeline(case, tmp_path):
    """``timm-gsop export`` of a CovPoolNet, then transformers' TimmWrapper and pipeline on the folder. The generic
    ``covpool``'s config.json carries its backbone: neither loader needs an argument."""
    transformers = _need('transformers')
    name, over, size = EXPORT_CASES[case]
    model, kwargs = _covpool(name, seed=1, **over)
    torch.save(model.state_dict(), tmp_path / 'weights.pth')
    folder = tmp_path / 'export'
    export_checkpoint(tmp_path / 'weights.pth', folder, model=name,
                      model_kwargs={k: v for k, v in kwargs.items() if k != 'num_classes'})
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == name and config['num_classes'] == 7
    assert not set(HF_OWN_ARGS) & set(config['model_args'])
    assert config['model_args'].get('backbone', over.get('backbone')) == over.get('backbone')

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    wrapped = transformers.AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    assert type(wrapped.timm_model).__name__ == 'CovPoolNet'
    features = transformers.AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        ref = model(x)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        # measured: 0 (resnet50, deit); regnety_016's two copies differ by 9e-6 of the logits' range on one
        # thread (its CPU kernels from the second stage on, at random weights' activations of up to ~500)
        assert _max_rel_err(wrapped(pixel_values=x).logits, ref) < 1e-4
        assert _max_rel_err(features(pixel_values=x).pooler_output, pooled) < 1e-4
    assert pooled.shape == (2, 16 * 17 // 2)

    _assert_pipeline_top3_is_the_models(folder, model, wrapped, rtol=1e-4, atol=1e-5)


# a ViT at a fixed 64 x 64: with dynamic_img_size, timm resamples its position embedding by an antialiased bicubic
# interpolation that neither torch's TorchScript ONNX exporter nor OpenVINO's ExportedProgram frontend converts
# (aten::_upsample_bicubic2d_aa; a plain timm ViT the same)
FIXED_SIZE_VIT = {'covpool_deit_small_patch16_224': dict(dynamic_img_size=False, img_size=64)}


def _covpool_openvino_error(name, frontend):
    ov = _need('openvino')
    model, _ = _covpool(name, **FIXED_SIZE_VIT.get(name, {}))
    with torch.no_grad():
        ref = model(X)
        ov_model = ov.convert_model(model, example_input=X) if frontend == 'torchscript' else \
            ov.convert_model(torch.export.export(model, (X,)))
    out = _openvino_run(ov_model, X)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return _max_rel_err(out, ref)


def test_covpool_openvino_torchscript_frontend():
    assert _covpool_openvino_error('covpool_resnet50', 'torchscript') < 1e-4  # measured 1.7e-6


@pytest.mark.slow
@pytest.mark.parametrize('frontend', ['torchscript', 'exported_program'])
@pytest.mark.parametrize('name', ['covpool_resnet50', 'covpool_deit_small_patch16_224', 'covpool_convnext_tiny'])
def test_covpool_openvino_both_frontends(name, frontend):
    assert _covpool_openvino_error(name, frontend) < 1e-4  # measured 5e-7 to 2e-6


@pytest.mark.parametrize('exporter', ['torchscript', pytest.param('dynamo', marks=pytest.mark.slow)])
@pytest.mark.parametrize('name', ['covpool_resnet50', 'covpool_deit_small_patch16_224'])
def test_covpool_onnx_export_runs_in_onnxruntime(name, exporter, tmp_path):
    """The package's ONNX export (``timm-gsop onnx``): a dynamic batch, onnxruntime against eager."""
    _need('onnxruntime')
    if exporter == 'dynamo':
        _need('onnxscript')
    from timm_gsop.onnx_export import check_onnx, export_onnx
    model, _ = _covpool(name, **FIXED_SIZE_VIT.get(name, {}))
    path = export_onnx(model, tmp_path / 'm.onnx', input_size=(3, 64, 64), exporter=exporter)
    errors = check_onnx(model, path, input_size=(3, 64, 64), batch_sizes=(1, 3))
    assert max(errors.values()) < 1e-4, errors  # measured 3e-7 to 4e-6


def covpool_ignored_layers(model):
    """docs/clients.md's recipe for CovPoolNet: the covariance head (``global_pool``: its reduction feeds a d x d
    covariance read as a d (d + 1) / 2 triangle vector) and the classifier."""
    return [model.global_pool, model.get_classifier()]


def _pruned_runs_and_trains(model, before, ratio):
    assert sum(p.numel() for p in model.parameters()) < ratio * before
    with torch.no_grad():
        out = model.eval()(X)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    model.train()(X).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('name', ['covpool_resnet50', 'covpool_convnext_tiny'])
def test_torch_pruning_covpool_recipe(name):
    tp = _need('torch_pruning')
    model, _ = _covpool(name)
    channels_in, head_out = model.global_pool.conv_reduce.in_channels, model.fc.in_features
    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MagnitudePruner(model, X[:1], importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.3, ignored_layers=covpool_ignored_layers(model))
    pruner.step()
    # the channels into the head are pruned (tiny resnet50: 512 -> 358), its own width and the classifier kept
    assert model.global_pool.conv_reduce.in_channels < channels_in and model.fc.in_features == head_out
    _pruned_runs_and_trains(model, before, 0.6)  # measured: about half the parameters left


def test_torch_pruning_covpool_vit_recipe():
    """A ViT backbone needs torch-pruning's ViT recipe too, as timm's plain ViT does: ``num_heads`` to the pruner,
    then each attention's ``num_heads``, ``head_dim`` and ``attn_dim`` from its pruned qkv."""
    tp = _need('torch_pruning')
    model, _ = _covpool('covpool_deit_small_patch16_224')
    attentions = [block.attn for block in model.backbone.blocks]
    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MagnitudePruner(
        model, X[:1], importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.3,
        ignored_layers=covpool_ignored_layers(model), num_heads={a.qkv: a.num_heads for a in attentions},
        prune_head_dims=True, prune_num_heads=False)
    pruner.step()
    for a in attentions:
        a.num_heads = pruner.num_heads[a.qkv]
        a.head_dim = a.qkv.out_features // (3 * a.num_heads)
        a.attn_dim = a.num_heads * a.head_dim
    _pruned_runs_and_trains(model, before, 0.7)


# ---- torch.compile -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('name, training', [
    pytest.param('covpool_resnet50', False, marks=pytest.mark.slow), ('covpool_resnet50', True),
    ('covpool_deit_small_patch16_224', False), ('covpool_deit_small_patch16_224', True)])
def test_covpool_compiles_without_graph_breaks(name, training):
    torch._dynamo.reset()
    model, _ = _covpool(name)
    explained = torch._dynamo.explain(model.train(training))(X)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def _compiled_float64_gradients_match(name, backend):
    """Train mode, float64: the outputs and every parameter's gradient of ``torch.compile(fullgraph=True)``
    against eager (measured: equal, inductor and aot_eager)."""
    torch._dynamo.reset()
    model, _ = _covpool(name)
    model = model.double().train()
    x = X[:, :, :32, :32].double()
    params = list(model.parameters())
    results = []
    for forward in (model, torch.compile(model, backend=backend, fullgraph=True)):
        state = {k: v.clone() for k, v in model.state_dict().items()}  # both from the same BN running stats
        out = forward(x)
        results.append((out.detach(), torch.autograd.grad(out.square().mean(), params)))
        model.load_state_dict(state)
    (out_eager, grads_eager), (out_compiled, grads_compiled) = results
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-10, atol=1e-12)
    for compiled, eager in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=1e-12)


def test_covpool_compiled_float64_gradients_aot_eager():
    """AOTAutograd's joint forward / backward graph (what inductor compiles), without inductor's C++ build."""
    _compiled_float64_gradients_match('covpool_deit_small_patch16_224', 'aot_eager')


@pytest.mark.slow
@pytest.mark.parametrize('name', ['covpool_resnet50', 'covpool_deit_small_patch16_224'])
def test_covpool_compiled_float64_gradients_inductor(name):
    _compiled_float64_gradients_match(name, 'inductor')
