"""The covariance head on any timm backbone (``covpool*``): timm's backbone and its weights, exactly; the heads;
the backbone's features API; export and the Hub. timm's own model tests run on these models in
test_timm_suite.py, the fine-grained recipe in test_finegrained_recipe.py, the demo's comparison in test_demo.py."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import timm
from timm.models import group_parameters

import timm_gsop  # noqa: F401
from conftest import TINY_COVPOOL, tiny_kwargs
from timm_gsop import export
from timm_gsop.layers import CovPool, ISqrtCovPool
from timm_gsop.models import WarmStartWarning
from timm_gsop.models.covpool_net import CovPoolNet
from timm_gsop.zoo import list_gsop_models

# registered name -> the timm model it wraps
BACKBONES = {
    'covpool_resnet50': 'resnet50',
    'covpool_convnext_tiny': 'convnext_tiny',
    'covpool_efficientnet_b0': 'efficientnet_b0',
    'covpool_mobilenetv3_large_100': 'mobilenetv3_large_100',
    'covpool_regnety_016': 'regnety_016',
    'covpool_deit_small_patch16_224': 'deit_small_patch16_224',
}
DATA_KEYS = ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'crop_mode', 'fixed_input_size', 'hf_hub_id')


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _image(backbone, batch=2, seed=0):
    side = 224 if 'deit' in backbone else 64  # DeiT's input size is fixed
    return torch.randn((batch, 3, side, side), generator=torch.Generator().manual_seed(seed))


def _randomise_(model, seed=0):
    """Random weights and BN statistics, so a tensor lost or left at its initialisation changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dtype.is_floating_point:
                t.copy_(0.5 + 0.5 * torch.rand(t.shape, generator=g) if t.dim() <= 1 else
                        0.05 * torch.randn(t.shape, generator=g))
    return model


@pytest.fixture(scope='module')
def stand_in(tmp_path_factory):
    """A backbone's published weights as timm's Hub has them (its own classifier included): random values."""
    folder = tmp_path_factory.mktemp('stand_in')
    files = {}

    def make(backbone):
        if backbone not in files:
            files[backbone] = str(folder / f'{backbone}.safetensors')
            safetensors.torch.save_file(_randomise_(timm.create_model(backbone)).state_dict(), files[backbone])
        return files[backbone]
    return make


def test_registered_models_and_no_published_weights():
    assert set(list_gsop_models('covpool*')) == {'covpool', *BACKBONES}
    # no weights of a whole network exist: list_models(pretrained=True) does not list these as pretrained
    assert not [n for n in timm.list_models(pretrained=True) if n.startswith('covpool')]


@pytest.mark.parametrize('name', BACKBONES)
def test_backbone_is_timms_and_cfg_is_its_weights(name):
    model = timm.create_model(name, device='meta')
    backbone = BACKBONES[name]
    assert type(model.backbone) is type(timm.create_model(backbone, device='meta'))
    source = timm.models.get_pretrained_cfg(backbone).to_dict()
    cfg = model.pretrained_cfg
    assert {k: cfg.get(k) for k in DATA_KEYS} == {k: source.get(k) for k in DATA_KEYS}
    assert (cfg['architecture'], cfg['tag'], cfg['classifier']) == (name, source['tag'], 'fc')
    assert cfg['first_conv'] == f"backbone.{source['first_conv']}"
    assert model.backbone_name == f"{backbone}.{source['tag']}"
    # iSQRT-COV head: 256-d reduction, 5 iterations, 32,896 features, 1000 classes
    assert isinstance(model.global_pool, ISqrtCovPool) and model.global_pool.num_iters == 5
    assert model.head_hidden_size == 32_896 and model.fc.weight.shape == (1000, 32_896)


def test_model_tag_and_backbone_tag_name_the_backbones_weights():
    tagged = timm.create_model('covpool_resnet50.a1h_in1k', device='meta')
    source = timm.models.get_pretrained_cfg('resnet50.a1h_in1k')
    assert tagged.pretrained_cfg['hf_hub_id'] == 'timm/resnet50.a1h_in1k' == source.hf_hub_id
    assert tuple(tagged.pretrained_cfg['input_size']) == source.input_size != (3, 224, 224)
    generic = timm.create_model('covpool', backbone='resnet50.a1h_in1k', device='meta')
    assert generic.pretrained_cfg['hf_hub_id'] == 'timm/resnet50.a1h_in1k'
    assert timm.create_model('covpool.a1h_in1k', device='meta').backbone_name == 'resnet50.a1h_in1k'


def test_bad_backbones_and_tags_are_named():
    with pytest.raises(ValueError, match="backbone must name a timm model.*'resnet_500'"):
        timm.create_model('covpool', backbone='resnet_500')
    with pytest.raises(ValueError, match="Two pretrained tags.*'a1h_in1k'.*'a1_in1k'"):
        timm.create_model('covpool_resnet50.a1h_in1k', backbone='resnet50.a1_in1k')
    with pytest.raises(RuntimeError, match=r'Invalid pretrained tag \(nope\) for resnet50'):
        timm.create_model('covpool_resnet50.nope')
    with pytest.raises(ValueError, match="Unknown global_pool 'covariance'"):
        timm.create_model('covpool_resnet50', global_pool='covariance', device='meta')
    with pytest.raises(TypeError, match='not_an_arg'):  # the backbone refuses what neither knows
        timm.create_model('covpool_resnet50', not_an_arg=1, device='meta')


@pytest.mark.parametrize('name', BACKBONES)
def test_warm_start_is_exact_and_trains(name, stand_in):
    """pretrained=True: the backbone's weights (here a local file in place of its Hub tag), the head and the
    classifier of the model's own initialisation, said once; the backbone computes what timm's model computes."""
    backbone, file = BACKBONES[name], stand_in(BACKBONES[name])
    reference = timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay=dict(file=file)).eval()
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        model = timm.create_model(name, pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=file))
    warm = [str(w.message) for w in caught if issubclass(w.category, WarmStartWarning)]
    assert len(warm) == 1 and 'global_pool.conv_reduce' in warm[0] and 'fc' in warm[0], warm
    torch.manual_seed(0)
    fresh = timm.create_model(name, num_classes=5)
    for key, value in model.state_dict().items():
        if not key.startswith('backbone.'):
            assert torch.equal(value, fresh.state_dict()[key]), key  # the model's own initialisation
    x = _image(backbone)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.backbone.forward_features(x), reference.forward_features(x))

    # one SGD step of the whole network
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 3]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    moved = {n.split('.')[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {'backbone', 'global_pool', 'fc'}


@pytest.mark.parametrize('name', sorted(TINY_COVPOOL))
def test_export_reloads_exactly_without_arguments(name, tmp_path):
    kwargs = tiny_kwargs(name)
    model = _randomise_(timm.create_model(name, **kwargs)).eval()
    torch.save(model.state_dict(), tmp_path / 'trained.pth')
    result = export.export_checkpoint(tmp_path / 'trained.pth', tmp_path / 'out', model=name, model_kwargs=kwargs)
    config = json.loads((result.out_dir / 'config.json').read_text())
    assert config['architecture'] == name
    if 'backbone' in kwargs:
        assert config['model_args']['backbone'] == kwargs['backbone']  # the Hub folder says which backbone
    reloaded = timm.create_model(f'local-dir:{result.out_dir}', pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_avg_head_is_the_backbones_own_classifier(stand_in):
    """global_pool='avg' pools the map the covariance head reads: on a ResNet, exactly timm's ResNet."""
    file = stand_in('resnet50')
    reference = timm.create_model('resnet50', pretrained=True, pretrained_cfg_overlay=dict(file=file)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', WarmStartWarning)
        model = timm.create_model('covpool_resnet50', global_pool='avg', pretrained=True,
                                  pretrained_cfg_overlay=dict(file=file)).eval()
    model.fc.load_state_dict(reference.fc.state_dict())
    x = _image('resnet50')
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_cov_head_is_the_covariance_triangle():
    model = timm.create_model('covpool', global_pool='cov', **dict(tiny_kwargs('covpool'), isqrt_dim=8)).eval()
    assert type(model.global_pool) is CovPool and model.head_hidden_size == 36
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        y = model.global_pool.act(model.global_pool.bn_reduce(model.global_pool.conv_reduce(feats))).flatten(2)
        centred = y - y.mean(-1, keepdim=True)
        cov = centred @ centred.transpose(1, 2) / y.shape[-1]
        rows, cols = torch.tril_indices(8, 8)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), cov[:, rows, cols])


def test_reset_classifier_keeps_a_trained_covariance_head():
    model = timm.create_model('covpool', **tiny_kwargs('covpool'))
    head = model.global_pool
    model.reset_classifier(3)
    assert model.global_pool is head and model.fc.out_features == 3
    model.reset_classifier(3, 'cov')
    assert type(model.global_pool) is CovPool
    model.reset_classifier(3, 'avg')
    assert model.head_hidden_size == model.num_features == 128 * 4


def test_tokens_and_nhwc_maps_are_nchw():
    """A ViT's patch tokens on their grid (class token dropped), a Swin's NHWC map permuted: (B, C, H, W)."""
    x = torch.randn(2, 3, 64, 64)
    vit = timm.create_model('covpool_deit_small_patch16_224', **tiny_kwargs('covpool_deit_small_patch16_224')).eval()
    swin = timm.create_model('covpool', backbone='swin_tiny_patch4_window7_224', embed_dim=16, depths=(1, 1, 1, 1),
                             num_heads=(1, 1, 1, 1), window_size=2, img_size=64, isqrt_dim=8, num_classes=3).eval()
    with torch.no_grad():
        tokens = vit.backbone.forward_features(x)
        assert tokens.shape == (2, 1 + 4 * 4, 32)
        assert torch.equal(vit.forward_features(x), tokens[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4))
        nhwc = swin.backbone.forward_features(x)
        assert torch.equal(swin.forward_features(x), nhwc.permute(0, 3, 1, 2))
        assert swin(x).shape == (2, 3) and torch.isfinite(swin(x)).all()


@pytest.mark.parametrize('name', sorted(TINY_COVPOOL))
def test_features_are_the_backbones(name):
    """features_only / forward_intermediates: the backbone's levels (its own features_only default), its tensors."""
    kwargs = tiny_kwargs(name)
    model = timm.create_model(name, **kwargs).eval()
    backbone_args = {k: v for k, v in kwargs.items() if k not in ('isqrt_dim', 'num_classes', 'backbone')}
    own = timm.create_model(model.backbone_name, features_only=True, device='meta', **backbone_args)
    features = timm.create_model(name, features_only=True, **kwargs).eval()
    features.model.load_state_dict(model.state_dict(), strict=False)  # its backbone: the same tensors
    assert features.feature_info.out_indices == own.feature_info.out_indices
    assert features.feature_info.channels() == own.feature_info.channels()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.backbone.forward_intermediates(x, indices=own.feature_info.out_indices,
                                                        intermediates_only=True)
        for got, want in zip(features(x), expected):
            assert torch.equal(got, want)
        final, _ = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))


def test_group_matcher_gives_the_classifier_its_own_top_group():
    model = timm.create_model('covpool', **tiny_kwargs('covpool'))
    groups = group_parameters(model, model.group_matcher(), reverse=True)
    top = max(groups.values())
    assert {n for n, g in groups.items() if g == top} == {'fc.weight', 'fc.bias'}
    assert {n for n, g in groups.items() if g == top - 1} == {n for n, _ in model.named_parameters()
                                                                if n.startswith('global_pool.')}
    backbone = group_parameters(model.backbone, model.backbone.group_matcher(), reverse=True)
    assert all(groups[f'backbone.{n}'] == g for n, g in backbone.items())


@pytest.mark.parametrize('name', sorted(TINY_COVPOOL))
@pytest.mark.parametrize('image', ['zeros', 'constant'])
def test_degenerate_images_give_finite_outputs_and_gradients(name, image):
    model = timm.create_model(name, **tiny_kwargs(name)).train()
    x = torch.zeros(2, 3, 32, 32) if image == 'zeros' else torch.full((2, 3, 32, 32), 0.37)
    x.requires_grad_(True)
    out = model(x)
    out.square().mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_training_keeps_the_covariance_in_float32(dtype, monkeypatch):
    from timm_gsop.layers import cov_pool
    seen = []
    covariance = cov_pool.covariance_pool
    monkeypatch.setattr(cov_pool, 'covariance_pool', lambda x: seen.append(x.dtype) or covariance(x))
    model = timm.create_model('covpool_convnext_tiny', **tiny_kwargs('covpool_convnext_tiny')).train()
    with torch.autocast('cpu', dtype=dtype):
        out = model(torch.randn(2, 3, 64, 64))
        cov = cov_pool.covariance_pool(torch.randn(2, 4, 3, 3, dtype=dtype))
    assert seen[0] == dtype and cov.dtype == torch.float32  # low-precision features in, float32 covariance out
    assert out.dtype == dtype
    out.float().logsumexp(1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


HUB_CLIENT = textwrap.dedent('''
    import json, sys, warnings
    import safetensors.torch, torch, timm, timm_gsop
    from huggingface_hub import HfApi
    from timm_gsop import export, push

    folder, out = sys.argv[1:3]
    backbone = 'regnety_002'
    hub_id = timm.models.get_pretrained_cfg(backbone).hf_hub_id
    api = HfApi()
    api.create_repo(hub_id)
    api.upload_file(path_or_fileobj=folder + '/backbone.safetensors', path_in_repo='model.safetensors', repo_id=hub_id)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reference = timm.create_model(backbone, pretrained=True).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        model = timm.create_model('covpool', backbone=backbone, pretrained=True, num_classes=3).eval()
    report = dict(warm_start=sum('Warm start' in str(w.message) for w in caught))
    with torch.no_grad():
        report['backbone_equal'] = torch.equal(model.backbone.forward_features(x), reference.forward_features(x))
    torch.save(dict(model=model.state_dict(), args=dict(model='covpool', num_classes=3,
                                                        model_kwargs=dict(backbone=backbone))), folder + '/ckpt.pth')
    result = export.export_checkpoint(folder + '/ckpt.pth', folder + '/export')
    push.push_folder(result.out_dir, 'someone/covpool-regnety')
    loaded = timm.create_model('hf-hub:someone/covpool-regnety', pretrained=True).eval()
    with torch.no_grad():
        report['hub_equal'] = torch.equal(loaded(x), model(x))
    report['config'] = json.load(open(result.out_dir / 'config.json'))
    json.dump(report, open(out, 'w'))
''')


def test_backbone_weights_from_the_hub_then_export_push_and_hf_hub_load(tmp_path):
    """pretrained=True fetches the backbone's own Hub repo (timm/<backbone>.<tag>); the export, pushed, loads back
    with hf-hub: and no argument. The Hub is a server on 127.0.0.1."""
    from hub_server import HubServer
    safetensors.torch.save_file(_randomise_(timm.create_model('regnety_002')).state_dict(),
                                str(tmp_path / 'backbone.safetensors'))
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGINGFACE_'))}
    with HubServer(token='hf_test_token', max_lifetime=300) as hub:
        env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET='1', HF_HOME=str(tmp_path / 'hf_home'),
                   HF_TOKEN='hf_test_token', HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_PROGRESS_BARS='1',
                   OMP_NUM_THREADS='1')
        proc = subprocess.run([sys.executable, '-c', HUB_CLIENT, str(tmp_path), str(tmp_path / 'report.json')],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert not hub.unhandled, hub.unhandled
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['warm_start'] == 1 and report['backbone_equal'] and report['hub_equal'], report
    assert report['config']['architecture'] == 'covpool'
    assert report['config']['model_args']['backbone'] == 'regnety_002'
