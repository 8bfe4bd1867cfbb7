"""fast-MPN-COV (iSQRT-COV) checkpoints load into isqrt_resnet50/101 with the same outputs.

The reference is ``official_reference.mpncov_resnet`` / ``mpncov_forward``; its state dict is a synthetic
checkpoint in the published layout, and the main.py layouts are derived from it.
"""
import warnings

import pytest
import torch
import timm

import timm_gsop  # noqa: F401
from conftest import randomise_bn_
from official_reference import MPNCOV_CHILDREN as CHILDREN, mpncov_forward as _reference_forward, mpncov_resnet


def _mpncov_resnet(depth=50, num_classes=1000, device=None, seed=0):
    net = mpncov_resnet(depth, num_classes, device, seed)
    return net if device == 'meta' else randomise_bn_(net, seed)
from timm_gsop import checkpoint_filter_fn, triu_vectorize
from timm_gsop.models.gsop_resnet import fast_mpncov_to_triu_order

def _main_py_layout(state_dict, from_scratch=True, data_parallel=True):
    """fast-MPN-COV main.py checkpoint: features[.module].<i>, representation / classifier."""
    out = {}
    for key, value in state_dict.items():
        head, rest = key.split('.', 1)
        if head == 'fc':
            out[f'classifier.{rest}'] = value
        elif from_scratch and head in ('layer_reduce', 'layer_reduce_bn'):
            out[f'representation.conv_dr_block.{0 if head == "layer_reduce" else 1}.{rest}'] = value
        else:
            prefix = 'features.module.' if data_parallel else 'features.'
            out[f'{prefix}{CHILDREN.index(head)}.{rest}'] = value
    return {'epoch': 65, 'arch': 'mpncovresnet50', 'state_dict': out, 'best_prec1': 78.3}


def _drop_batches_tracked(state_dict):  # the published files predate PyTorch 0.4.1
    return {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}


@pytest.fixture(scope='module')
def reference():
    net = _mpncov_resnet(50, num_classes=1000).double().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ref = _reference_forward(net, x)
    return net, x, ref


def test_triangle_order_permutation():
    dim = 7
    a = torch.randn(3, dim, dim, generator=torch.Generator().manual_seed(0))
    sym = a + a.transpose(1, 2)
    rows, cols = torch.triu_indices(dim, dim)
    theirs = sym[:, rows, cols]
    torch.testing.assert_close(theirs[:, fast_mpncov_to_triu_order(dim)], triu_vectorize(sym), rtol=0, atol=0)


@pytest.mark.parametrize('layout', ['published', 'published_with_buffers', 'main_scratch_dp',
                                    'main_scratch', 'main_finetuned', 'ddp_module_prefix'])
def test_fast_mpncov_checkpoint_same_outputs(reference, layout):
    net, x, ref = reference
    sd = net.state_dict()
    checkpoint = {
        'published': lambda: _drop_batches_tracked(sd),
        'published_with_buffers': lambda: sd,
        'main_scratch_dp': lambda: _main_py_layout(sd),
        'main_scratch': lambda: _main_py_layout(sd, data_parallel=False),
        'main_finetuned': lambda: _main_py_layout(_drop_batches_tracked(sd), from_scratch=False),
        'ddp_module_prefix': lambda: {'state_dict': {f'module.{k}': v for k, v in
                                                     _main_py_layout(sd)['state_dict'].items()}},
    }[layout]()
    model = timm.create_model('isqrt_resnet50', dtype=torch.float64).eval()
    model.load_state_dict(checkpoint_filter_fn(checkpoint, model))
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(ref).all() and ref.abs().max() > 1e-3
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_published_file_through_timm_pretrained_path(tmp_path):
    """float32, 10 classes, through create_model(pretrained=True, ... file=...) as a user would."""
    net = _mpncov_resnet(50, num_classes=10, seed=3).eval()
    path = tmp_path / 'mpncovresnet50-synthetic.pth'
    torch.save(_drop_batches_tracked(net.state_dict()), path)
    model = timm.create_model('isqrt_resnet50', pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_forward(net, x), rtol=1e-4, atol=1e-4)
    # a new task: timm drops the 1000-class classifier, the backbone and the covariance head load
    model = timm.create_model('isqrt_resnet50', pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    torch.testing.assert_close(model.global_pool.conv_reduce.weight, net.layer_reduce.weight)
    assert model.fc.out_features == 5


def test_resnet101_layout_maps_onto_isqrt_resnet101():
    net = _mpncov_resnet(101, device='meta')
    model = timm.create_model('isqrt_resnet101', device='meta')
    for checkpoint in (_drop_batches_tracked(net.state_dict()), _main_py_layout(net.state_dict())):
        mapped = _drop_batches_tracked(checkpoint_filter_fn(checkpoint, model))  # BatchNorm fills them in
        assert {k: v.shape for k, v in mapped.items()} == \
            {k: v.shape for k, v in _drop_batches_tracked(model.state_dict()).items()}
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in model.parameters()) == 75_921_960


FIRST_UPLOADS = (('isqrt_resnet50', 'mpncovresnet50-15991845.pth', '15991845', '19TWen7p9UDyM0Ueu9Gb22NtouR109C6j'),
                 ('isqrt_resnet101', 'mpncovresnet101-ade9737a.pth', 'ade9737a', '1riur7v3rZ7vnrdj2UZ7EBaTKEGSccYwg'))


def test_the_published_files_are_tagged_as_what_they_are():
    """The authors' first uploads classify ImageNet at chance (fast-MPN-COV issue #20): a fine-tuning start, not
    an in1k classifier in timm.list_models(pretrained=True); the re-trained files (Google Drive) are an in1k tag
    without a file timm could download."""
    for name, file, sha, drive in FIRST_UPLOADS:
        cfg = timm.create_model(name, device='meta').pretrained_cfg  # the default: the file timm can download
        assert cfg['tag'] == 'mpncov_finetune_start' and cfg['url'].endswith(file) and not cfg.get('hf_hub_id')
        assert cfg['paper_ids'] == 'arXiv:1712.01034' and cfg['license'] == 'mit'
        assert cfg['origin_url'] == 'https://github.com/jiangtaoxie/fast-MPN-COV'
        notes = ' '.join(cfg['notes'])
        for fact in (f'sha256 prefix {sha}', '0.166% top-1', 'fast-MPN-COV/issues/20', 'fine-tuning start only',
                     drive, f'timm-gsop export PATH --model {name} --out DIR', 'FineTuneStartWarning'):
            assert fact in notes, fact
        in1k = timm.models.get_pretrained_cfg(f'{name}.in1k')
        assert not in1k.has_weights and drive in ' '.join(in1k.notes)
    assert set(timm.list_models('isqrt_*', pretrained=True)) == {
        'isqrt_resnet101.mpncov_finetune_start', 'isqrt_resnet50.mpncov_finetune_start'}


def _first_upload_standin(path, seed=0):
    """A tiny isqrt_resnet50 saved as the published files are: fast-MPN-COV's names and triangle order, no BN step
    counters (what timm_suite_plugin writes for the url cfgs, at full size)."""
    from conftest import tiny_kwargs
    torch.manual_seed(seed)
    model = randomise_bn_(timm.create_model('isqrt_resnet50', **tiny_kwargs('isqrt_resnet50')), seed).eval()
    sd = {k.replace('global_pool.conv_reduce', 'layer_reduce').replace('global_pool.bn_reduce', 'layer_reduce_bn'): v
          for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    theirs = torch.empty_like(sd['fc.weight'])
    theirs[:, fast_mpncov_to_triu_order(model.global_pool.dim)] = sd['fc.weight']
    sd['fc.weight'] = theirs
    torch.save(sd, path)
    return model


def _load(path, **kwargs):
    from conftest import tiny_kwargs
    kwargs = dict(tiny_kwargs('isqrt_resnet50'), **kwargs)
    overlay = dict(file=str(path), num_classes=7)  # the stand-in's classes (the real files: 1000)
    return timm.create_model('isqrt_resnet50', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


def test_a_first_upload_warns_when_its_classifier_is_used(tmp_path):
    from timm_gsop import FineTuneStartWarning
    old = tmp_path / 'mpncovresnet50-15991845.pth'
    source = _first_upload_standin(old)
    with pytest.warns(FineTuneStartWarning, match=r'mpncovresnet50-15991845\.pth: a fine-tuning start only.*'
                                                  r'0\.166% top-1.*19TWen7p9UDyM0Ueu9Gb22NtouR109C6j'):
        model = _load(old)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))  # loaded all the same: the warning is the point
    # fine-tuning (a new classifier), or another file of the same layout: nothing to say
    for path, kwargs in ((old, dict(num_classes=5)), (tmp_path / 'isqrt_r50_retrained.pth', {})):
        if not path.exists():
            old.rename(path)
        with warnings.catch_warnings():
            warnings.simplefilter('error', FineTuneStartWarning)
            _load(path, **kwargs)
    # the filter called by hand with this package's layout, on the default cfg (which names the first upload)
    model = timm.create_model('isqrt_resnet50', device='meta')
    with warnings.catch_warnings():
        warnings.simplefilter('error', FineTuneStartWarning)
        checkpoint_filter_fn(model.state_dict(), model)


def test_export_tags_a_first_upload_as_a_finetuning_start(tmp_path):
    """`timm-gsop export FILE --model isqrt_resnet50`: the first upload keeps its tag, a card that says what it is
    and the warning when its export is loaded; any other file is exported as isqrt_resnet50.in1k."""
    from timm_gsop import FineTuneStartWarning
    from timm_gsop.export import export_checkpoint
    old = tmp_path / 'mpncovresnet50-15991845.pth'
    source = _first_upload_standin(old, seed=1)
    with pytest.warns(FineTuneStartWarning, match='exported as isqrt_resnet50.mpncov_finetune_start'):
        result = export_checkpoint(old, tmp_path / 'old', model='isqrt_resnet50',
                                   model_kwargs=dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), isqrt_dim=32))
    assert result.model_name == 'isqrt_resnet50.mpncov_finetune_start' and result.model_args['num_classes'] == 7
    card = (tmp_path / 'old' / 'README.md').read_text()
    assert '**Note:** A fine-tuning start only' in card and '0.166% top-1' in card
    with pytest.warns(FineTuneStartWarning, match='an export of the isqrt_resnet50 fine-tuning start'):
        reloaded = timm.create_model(f'local-dir:{tmp_path / "old"}', pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded(x), source(x))

    retrained = tmp_path / 'iSQRT-COV_ResNet50.pth'
    old.rename(retrained)
    with warnings.catch_warnings():
        warnings.simplefilter('error', FineTuneStartWarning)
        result = export_checkpoint(retrained, tmp_path / 'new', model='isqrt_resnet50', verify=False,
                                   model_kwargs=dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), isqrt_dim=32))
        timm.create_model(f'local-dir:{tmp_path / "new"}', pretrained=True)
    assert result.model_name == 'isqrt_resnet50.in1k'
    assert '0.166%' not in (tmp_path / 'new' / 'README.md').read_text()


def test_mismatching_checkpoints_are_named():
    """The filter only transforms (strictness is the caller's); torch's strict load names the keys."""
    r101 = _drop_batches_tracked(_mpncov_resnet(101, device='meta').state_dict())
    model = timm.create_model('isqrt_resnet50', device='meta')
    converted = checkpoint_filter_fn(r101, model)
    assert 'layer3.6.conv1.weight' in converted
    with pytest.raises(RuntimeError, match=r'Unexpected key.*"layer3\.6\.'):
        model.load_state_dict(converted)
    partial = {k: v for k, v in _mpncov_resnet(50, device='meta').state_dict().items() if 'layer_reduce_bn' not in k}
    with pytest.raises(RuntimeError, match='Missing key.*"global_pool.bn_reduce'):
        model.load_state_dict(checkpoint_filter_fn(partial, model))
    assert model.load_state_dict(checkpoint_filter_fn(partial, model), strict=False).missing_keys == [
        'global_pool.bn_reduce.weight', 'global_pool.bn_reduce.bias', 'global_pool.bn_reduce.running_mean',
        'global_pool.bn_reduce.running_var']


def test_own_layout_round_trip():
    model = timm.create_model('isqrt_resnet50', num_classes=3).eval()
    other = timm.create_model('isqrt_resnet50', num_classes=3).eval()
    other.load_state_dict(checkpoint_filter_fn({'state_dict': model.state_dict()}, other))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
