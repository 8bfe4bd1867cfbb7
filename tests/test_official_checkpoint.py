"""Checkpoints of the RELEASED GSoP-Net code load into timm_gsop and give the released outputs.

The released network is re-implemented independently in ``official_reference.py`` (the oracle). Each
test builds it, randomises every tensor (parameters and BN running statistics), saves a checkpoint the
way the released ``main.py`` does (DataParallel ``module.`` prefix inside
``{'epoch', 'arch', 'state_dict', 'best_prec1', 'optimizer'}``), loads it with
``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))`` and compares the two
eval-mode forwards in float64.

Checkpoints are written per (arch, GSoP mode, manner); the two most recent are kept for the tests that follow.
"""
import collections
import copy
import gc
import os
import re
import sys
from collections import OrderedDict

import pytest
import torch

import timm
import timm_gsop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from official_reference import (  # noqa: E402
    MANNER_TO_CODE, build_official, randomize_, released_channel_covariance, released_position_covariance,
    released_sqrtm, released_triu_vector,
)

MANNERS = tuple(MANNER_TO_CODE)
# Tolerance on max |y - y_ref| relative to max |y_ref|, both models in float64.
REL_TOL = 1e-6


def model_name(arch: str, gsop_mode: int) -> str:
    return f'gsop{"" if gsop_mode == 1 else "2"}_{arch}'


def released_checkpoint(model: torch.nn.Module, arch: str, epoch: int = 95) -> dict:
    """What the released main.py's save_checkpoint writes for a DataParallel-wrapped model."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return {
        'epoch': epoch,
        'arch': arch,
        'state_dict': OrderedDict(('module.' + k, v) for k, v in model.state_dict().items()),
        'best_prec1': torch.tensor(77.95),
        'optimizer': optimizer.state_dict(),
    }


def load_timm(name: str, path, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


def inputs(*shape, seed=1234) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class OfficialCase:
    """A randomised oracle network and its released-format checkpoint file."""

    def __init__(self, arch: str, gsop_mode: int, manner: str, directory) -> None:
        self.arch, self.gsop_mode, self.manner = arch, gsop_mode, manner
        self.name = model_name(arch, gsop_mode)
        seed = 1000 * gsop_mode + 10 * MANNERS.index(manner) + (0 if arch == 'resnet50' else 7)
        reference = randomize_(build_official(arch, gsop_mode, manner), seed).eval()
        # the checkpoint keeps the float32 tensors; the oracle itself then moves to float64 in place
        self.checkpoint = released_checkpoint(reference, arch)
        self.path = directory / f'{arch}-GSoP{gsop_mode}-{manner}' / 'model_best.pth.tar'
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.checkpoint, self.path)
        self.reference64 = reference.double()
        self._outputs = {}

    @torch.no_grad()
    def reference_output(self, shape) -> torch.Tensor:
        if shape not in self._outputs:
            self._outputs[shape] = self.reference64(inputs(*shape))
        return self._outputs[shape]

    def write(self, obj, filename: str):
        path = self.path.parent / filename
        torch.save(obj, path)
        return path


pytestmark = pytest.mark.usefixtures('one_thread')  # small float64 forwards gain little from more


@pytest.fixture(scope='module')  # freed after this module
def official(tmp_path_factory):
    # the two most recent cases only: each holds a float64 ResNet-50/101 and its checkpoint (0.3-0.7 GB), and
    # all of them at once took this process above 9 GB
    cache = collections.OrderedDict()
    directory = tmp_path_factory.mktemp('official_checkpoints')

    def get(arch: str = 'resnet50', gsop_mode: int = 1, manner: str = 'channel') -> OfficialCase:
        key = (arch, gsop_mode, manner)
        if key not in cache:
            while len(cache) >= 2:
                cache.popitem(last=False)
            gc.collect()
            cache[key] = OfficialCase(arch, gsop_mode, manner, directory)
        cache.move_to_end(key)
        return cache[key]

    return get


@torch.no_grad()
def assert_matches_reference(case: OfficialCase, model: torch.nn.Module, shape) -> None:
    model = model.double().eval()
    expected = case.reference_output(shape)
    actual = model(inputs(*shape))
    assert actual.shape == expected.shape
    assert torch.isfinite(expected).all()
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= REL_TOL * scale, (
        f'{case.name} gsop_manner={case.manner!r} input {shape}: max |diff| {err:.3e} vs output scale '
        f'{scale:.3e} (relative {err / scale:.3e} > {REL_TOL:g})')


# ---- the oracle itself ----------------------------------------------------------------------------------

def test_oracle_second_order_helpers():
    x = inputs(3, 5, 4, 6)
    flat = x.flatten(2)
    centred = flat - flat.mean(dim=2, keepdim=True)
    torch.testing.assert_close(released_channel_covariance(x), centred @ centred.transpose(1, 2) / 24)

    sums = flat.sum(dim=1)
    gram = flat.transpose(1, 2) @ flat
    expected = gram / 24 - sums.unsqueeze(2) * sums.unsqueeze(1) / 24 ** 2
    torch.testing.assert_close(released_position_covariance(x), expected)

    m = torch.arange(16.).reshape(1, 4, 4)
    order = [m[0, i, j] for i in range(4) for j in range(i + 1)]  # lower triangle, row by row
    assert released_triu_vector(m)[0].tolist() == torch.stack(order).tolist()

    a = inputs(2, 6, 20)
    spd = a @ a.transpose(1, 2) / 20 + 0.1 * torch.eye(6, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(spd)
    root = evecs @ torch.diag_embed(evals.sqrt()) @ evecs.transpose(1, 2)
    torch.testing.assert_close(released_sqrtm(spd, 30), root, rtol=1e-8, atol=1e-8)
    approx = released_sqrtm(spd, 3)  # 3 iterations: a rough root, still symmetric
    torch.testing.assert_close(approx, approx.transpose(1, 2))


def test_oracle_key_layout():
    sd = build_official('resnet50', 1, 'fusion_concat').state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    # layer1's block: DR to 128, 128 rows -> 512 -> 256 channels; concat convs: groups 4, kernel 11
    assert shapes['layer1.2.conv_for_DR.weight'] == (128, 256, 1, 1)
    assert shapes['layer1.2.row_conv_group.weight'] == (512, 1, 128, 1)
    assert shapes['layer1.2.fc_adapt_channels.weight'] == (256, 512, 1, 1)
    assert shapes['layer1.2.row_conv_group_for_spatial.weight'] == (256, 1, 64, 1)
    assert shapes['layer1.2.fc_adapt_channels_for_spatial.weight'] == (64, 256, 1, 1)
    assert shapes['layer1.2.dilate_conv_for_concat1.weight'] == (256, 64, 11, 1)
    assert shapes['layer2.3.dilate_conv_for_concat2.weight'] == (512, 64, 9, 1)
    assert shapes['layer3.5.dilate_conv_for_concat1.weight'] == (1024, 64, 7, 1)
    assert shapes['layer4.2.dilate_conv_for_concat1.weight'] == (2048, 64, 5, 1)
    assert shapes['layer4.2.bn_for_concat.running_var'] == (2048,)
    assert shapes['fc.weight'] == (1000, 2048)
    gsop_blocks = sorted({'.'.join(k.split('.')[:2]) for k in sd if 'for_DR' in k})
    assert gsop_blocks == ['layer1.2', 'layer2.3', 'layer3.5', 'layer4.2']

    sd2 = build_official('resnet101', 2, 'channel').state_dict()
    assert sorted({'.'.join(k.split('.')[:2]) for k in sd2 if 'conv_for_DR' in k}) == [
        'layer1.2', 'layer2.3', 'layer3.22']
    assert tuple(sd2['layer_reduce.weight'].shape) == (256, 2048, 1, 1)
    assert tuple(sd2['fc.weight'].shape) == (1000, 32896)
    assert not any('layer_reduce.bias' in k or 'for_DR_spatial' in k for k in sd2)


def test_oracle_randomisation_is_not_trivial(official):
    """The comparison below is only worth something if the GSoP path matters for the output."""
    case = official('resnet50', 1, 'channel')
    perturbed = copy.deepcopy(case.reference64)
    with torch.no_grad():
        perturbed.layer3[5].row_conv_group.bias.add_(0.05)
        changed = perturbed(inputs(2, 3, 64, 64))
    expected = case.reference_output((2, 3, 64, 64))
    assert (changed - expected).abs().max() > 1e3 * REL_TOL * expected.abs().max()
    assert 0.1 < expected.std() < 100


# ---- released checkpoints -> timm_gsop, outputs ---------------------------------------------------------

@pytest.mark.parametrize('gsop_mode', [1, 2])
@pytest.mark.parametrize('manner', MANNERS)
def test_released_checkpoint_matches_reference(official, manner, gsop_mode):
    case = official('resnet50', gsop_mode, manner)
    model = load_timm(case.name, case.path, gsop_manner=manner)
    assert_matches_reference(case, model, (2, 3, 64, 64))
    if manner in ('position', 'fusion_concat'):
        # non-square map: the position grid is pooled to 8x8 and back to H x W
        assert_matches_reference(case, model, (1, 3, 64, 96))


@pytest.mark.parametrize('layout', ['bare', 'bare_module_prefix', 'no_num_batches_tracked'])
def test_bare_and_old_state_dicts_load(official, layout):
    case = official('resnet50', 2, 'fusion_concat')
    plain = {k[len('module.'):]: v for k, v in case.checkpoint['state_dict'].items()}
    if layout == 'bare':
        obj = plain
    elif layout == 'bare_module_prefix':
        obj = dict(case.checkpoint['state_dict'])
    else:  # PyTorch 0.4.0 (the released environment) had no num_batches_tracked buffers
        obj = dict(case.checkpoint, state_dict=OrderedDict(
            (k, v) for k, v in case.checkpoint['state_dict'].items() if not k.endswith('num_batches_tracked')))
    path = case.write(obj, f'{layout}.pth')
    model = load_timm(case.name, path, gsop_manner=case.manner)
    assert_matches_reference(case, model, (2, 3, 64, 64))


@pytest.mark.parametrize('gsop_mode', [1, 2])
def test_new_num_classes_loads_everything_but_fc(official, gsop_mode):
    case = official('resnet50', gsop_mode, 'channel')
    model = load_timm(case.name, case.path, gsop_manner='channel', num_classes=10).double().eval()
    assert model.fc.out_features == 10
    assert model.fc.weight.shape[1] == case.checkpoint['state_dict']['module.fc.weight'].shape[1]
    sd = model.state_dict()
    for key in ('conv1.weight', 'layer1.0.conv1.weight', 'layer2.3.bn3.running_var', 'layer4.2.conv3.weight'):
        torch.testing.assert_close(sd[key], case.checkpoint['state_dict']['module.' + key].double(), rtol=0, atol=0)
    # everything before the classifier, GSoP blocks and (Net2) the iSQRT-COV head included, is the checkpoint's
    x = inputs(2, 3, 64, 64)
    ref = case.reference64
    with torch.no_grad():
        feats = model.forward_features(x)
        ref_feats = ref.forward_features(x)
        torch.testing.assert_close(feats, ref_feats, rtol=0, atol=REL_TOL * ref_feats.abs().max().item())
        pooled = model.forward_head(feats, pre_logits=True)
        ref_pooled = ref.pooled(ref_feats)
        torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=REL_TOL * ref_pooled.abs().max().item())


def test_resnet101_channel(official):
    case = official('resnet101', 1, 'channel')
    model = load_timm(case.name, case.path, gsop_manner='channel')
    assert_matches_reference(case, model, (2, 3, 64, 64))


# ---- mismatches -----------------------------------------------------------------------------------------

def assert_mismatch(path, name: str, key_pattern: str, **kwargs) -> str:
    """torch's strict load_state_dict refuses it, naming the keys (the filter transforms only)."""
    with pytest.raises(RuntimeError) as info:
        load_timm(name, path, **kwargs)
    message = str(info.value)
    assert 'Error(s) in loading state_dict' in message, message
    assert re.search(key_pattern, message), f'no key matching {key_pattern!r} in:\n{message}'
    return message


def test_channel_checkpoint_into_position_model(official):
    case = official('resnet50', 1, 'channel')
    # a GSoP key of one of the four GSoP blocks, in either naming
    assert_mismatch(case.path, 'gsop_resnet50', r'layer(1\.2|2\.3|3\.5|4\.2)\.\S+', gsop_manner='position')


def test_resnet101_checkpoint_into_resnet50(official):
    case = official('resnet101', 1, 'channel')
    assert_mismatch(case.path, 'gsop_resnet50', r'layer3\.([6-9]|1\d|2[0-2])\.', gsop_manner='channel')


def test_net1_checkpoint_into_net2_model(official):
    case = official('resnet50', 1, 'channel')
    # Net1 has a GSoP block in layer4.2 and no layer_reduce head
    assert_mismatch(
        case.path, 'gsop2_resnet50', r'layer4\.2\.\S+|layer_reduce|global_pool\.', gsop_manner='channel')


def test_checkpoint_with_missing_keys(official):
    case = official('resnet50', 1, 'channel')
    deleted = ['layer2.1.conv2.weight', 'layer3.5.bn3.running_var', 'layer4.0.downsample.1.bias']
    sd = OrderedDict((k, v) for k, v in case.checkpoint['state_dict'].items() if k[len('module.'):] not in deleted)
    path = case.write(dict(case.checkpoint, state_dict=sd), 'missing_keys.pth.tar')
    message = assert_mismatch(path, 'gsop_resnet50', re.escape(deleted[0]), gsop_manner='channel')
    for key in deleted[1:]:
        assert key in message, message


@pytest.mark.parametrize('key, shape', [
    ('layer2.1.conv2.weight', (128, 128, 1, 1)),       # backbone
    ('layer3.5.row_conv_group.weight', (512, 1, 64, 1)),  # inside a GSoP block
], ids=['backbone', 'gsop_block'])
def test_checkpoint_with_wrong_shape(official, key, shape):
    case = official('resnet50', 1, 'channel')
    sd = OrderedDict(case.checkpoint['state_dict'])
    sd['module.' + key] = torch.zeros(shape)
    path = case.write(dict(case.checkpoint, state_dict=sd), 'wrong_shape.pth.tar')
    block = re.escape(key.rsplit('.', 2)[0] if 'row_conv' in key else key)
    assert_mismatch(path, 'gsop_resnet50', block, gsop_manner='channel')


@pytest.mark.parametrize('key, shape', [
    ('fc', (100, 2048)),          # a 100-class checkpoint loaded without num_classes=100
    ('conv1', (64, 3, 5, 5)),     # a stem of another shape, in_chans unchanged
], ids=['fc', 'conv1'])
def test_checkpoint_with_wrong_stem_or_classifier_shape(official, key, shape):
    """The stem and the classifier are checked like any other tensor when the model does not adapt them:
    ``checkpoint_filter_fn`` leaves ``conv1.*`` / ``fc.*`` to timm (which drops the classifier only when
    ``num_classes`` differs from the pretrained cfg and adapts ``conv1`` only when ``in_chans`` differs)."""
    case = official('resnet50', 1, 'channel')
    sd = OrderedDict(case.checkpoint['state_dict'])
    sd[f'module.{key}.weight'] = torch.zeros(shape)
    if key == 'fc':
        sd['module.fc.bias'] = torch.zeros(shape[0])
    path = case.write(dict(case.checkpoint, state_dict=sd), f'wrong_{key}.pth.tar')
    assert_mismatch(path, 'gsop_resnet50', rf'{key}\.weight', gsop_manner='channel')


def test_truncated_checkpoint_fails_loudly(official, tmp_path):
    case = official('resnet50', 1, 'channel')
    path = tmp_path / 'model_best.pth.tar'
    data = case.path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(RuntimeError, match='zip archive'):  # torch.load's own error
        load_timm('gsop_resnet50', path, gsop_manner='channel')


def test_missing_file_names_the_model_and_path(tmp_path):
    path = tmp_path / 'does_not_exist.pth.tar'
    with pytest.raises(FileNotFoundError, match=r'gsop_resnet50: no such file .*does_not_exist\.pth\.tar'):
        timm.create_model('gsop_resnet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
