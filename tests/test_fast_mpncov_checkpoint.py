"""fast-MPN-COV (iSQRT-COV) checkpoints load into isqrt_resnet50/101 with the same outputs.

The reference is ``official_reference.mpncov_resnet`` / ``mpncov_forward``; its state dict is a synthetic
checkpoint in the published layout, and the main.py layouts are derived from it.
"""
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


def test_published_cfg_points_at_the_authors_weights():
    for name, file in (('isqrt_resnet50', 'mpncovresnet50-15991845.pth'),
                       ('isqrt_resnet101', 'mpncovresnet101-ade9737a.pth')):
        cfg = timm.create_model(name, device='meta').pretrained_cfg
        assert cfg['tag'] == 'mpncov_in1k' and cfg['url'].endswith(file) and not cfg.get('hf_hub_id')
        assert cfg['paper_ids'] == 'arXiv:1712.01034' and cfg['license'] == 'mit'
        assert cfg['origin_url'] == 'https://github.com/jiangtaoxie/fast-MPN-COV'


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
