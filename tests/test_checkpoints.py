"""Checkpoints of other code load as timm loads them (``pretrained=True`` with a file or a state dict in the
pretrained cfg overlay): the released GSoP-Net code's, fast-MPN-COV's, and a plain network's as a warm start.
References: official_reference.py (the released forward, fast-MPN-COV's) and timm's own models."""
import warnings
from types import SimpleNamespace

import pytest
import torch
import timm

import timm_gsop  # noqa: F401 (registers the models)
from conftest import randomise_bn_
from official_reference import (
    MPNCOV_CHILDREN, OfficialGSoPResNet, build_official, mpncov_forward, mpncov_resnet, randomize_)
from timm_gsop.models.gsop_resnet import WarmStartWarning

TINY = dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128))
TEN = dict(num_classes=10, overlay=dict(num_classes=10))  # the stand-ins' classes (ImageNet's: 1000)
CODES = {'channel': '1', 'position': '2', 'fusion_avg': '+', 'fusion_max': 'M', 'fusion_concat': '&'}  # --att_manner


def image(size=64, dtype=torch.float32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def load(name, source, overlay=(), **kwargs):
    """``timm.create_model(name, pretrained=True)`` with a file (a path) or a state dict (a dict); the model in
    eval mode and the texts of the WarmStartWarnings it gave."""
    given = dict(file=str(source)) if not isinstance(source, dict) else dict(state_dict=source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(given, **dict(overlay)), **kwargs)
    return model.eval(), [str(w.message) for w in caught if issubclass(w.category, WarmStartWarning)]


def no_tracked(state_dict):  # PyTorch 0.4.0 (the released code's, fast-MPN-COV's) had no num_batches_tracked
    return {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}


# ---- the released GSoP-Net code ---------------------------------------------------------------------------

# full size: ResNet-50 as main.py builds it; tiny: one block per stage (the same widths and GSoP modules), so that
# every manner runs within the time budget
RELEASED = [('channel', 1, None), ('channel', 2, None), ('position', 1, (1, 1, 1, 1)),
            ('fusion_avg', 1, (1, 1, 1, 1)), ('fusion_max', 1, (1, 1, 1, 1)), ('fusion_concat', 1, (1, 1, 1, 1))]


@pytest.mark.parametrize('manner,mode,depths', RELEASED, ids=[f'{m}-net{n}-{d and "tiny"}' for m, n, d in RELEASED])
def test_released_checkpoint_gives_the_released_outputs(manner, mode, depths, tmp_path):
    if depths is None:
        reference = build_official('resnet50', mode, manner, num_classes=10)
    else:  # GSoP-Net1: GSoP in the last (here the only) block of each stage, as main.py builds it
        reference = OfficialGSoPResNet(depths, [[CODES[manner]] for _ in depths], mode, num_classes=10)
    randomize_(reference, seed=len(manner) + mode)
    plain = no_tracked(reference.state_dict())
    path = tmp_path / 'model_best.pth.tar'  # what the released main.py saves for its DataParallel model
    torch.save({'epoch': 95, 'arch': 'resnet50', 'best_prec1': 77.9,
                'state_dict': {f'module.{k}': v for k, v in plain.items()}}, path)
    name = 'gsop_resnet50' if mode == 1 else 'gsop2_resnet50'
    kwargs = dict(TEN, gsop_manner=manner, **({} if depths is None else dict(layers=depths)))
    x = image(dtype=torch.float64)
    with torch.no_grad():
        expected = reference.double()(x)
    for source in (path, plain) if depths else (path,):  # and a bare state dict
        model, warned = load(name, source, **kwargs)
        assert not warned  # a checkpoint with every GSoP tensor is no warm start
        with torch.no_grad():
            torch.testing.assert_close(model.double()(x), expected, rtol=1e-9, atol=1e-9 * expected.abs().max())


# ---- fast-MPN-COV (iSQRT-COV) -----------------------------------------------------------------------------

def main_py(state_dict, data_parallel):
    """fast-MPN-COV main.py's checkpoint: `features` (a Sequential of MPNCOVResNet's children), `representation`,
    `classifier`; trained from scratch under DataParallel (`features.module.`, the reduction in `representation`)
    or fine-tuned from the published file (the reduction among `features`)."""
    out = {}
    for key, value in state_dict.items():
        head, rest = key.split('.', 1)
        if head == 'fc':
            out[f'classifier.{rest}'] = value
        elif head in ('layer_reduce', 'layer_reduce_bn') and data_parallel:
            out[f'representation.conv_dr_block.{int(head == "layer_reduce_bn")}.{rest}'] = value
        else:
            out[f'features.{"module." if data_parallel else ""}{MPNCOV_CHILDREN.index(head)}.{rest}'] = value
    return {'epoch': 65, 'arch': 'mpncovresnet50', 'best_prec1': 78.3, 'state_dict': out}


@pytest.fixture(scope='module')
def mpncov(tmp_path_factory):
    """fast-MPN-COV's ResNet-50 (randomised BN) in float64, its float32 state dict, a published-style file of it,
    an input and its outputs."""
    net = randomise_bn_(mpncov_resnet(50, num_classes=10, seed=3)).eval()
    state_dict = no_tracked(net.state_dict())  # float32: .double() below gives the net new tensors
    path = tmp_path_factory.mktemp('mpncov') / 'mpncovresnet50-synthetic.pth'
    torch.save(state_dict, path)
    x = image(dtype=torch.float64)
    with torch.no_grad():
        expected = mpncov_forward(net.double(), x)
    return net, state_dict, path, x, expected


@pytest.mark.parametrize('layout', ['published_file', 'main_py_dataparallel', 'main_py_finetuned'])
def test_fast_mpncov_checkpoint_gives_its_outputs(mpncov, layout):
    _, state_dict, path, x, expected = mpncov
    source = path if layout == 'published_file' else main_py(state_dict, layout.endswith('parallel'))
    model, warned = load('isqrt_resnet50', source, **TEN)
    assert not warned
    with torch.no_grad():  # the classifier's columns follow the lower triangle: reordered by the filter
        torch.testing.assert_close(model.double()(x), expected, rtol=1e-9, atol=1e-9 * expected.abs().max())


def test_first_file_tag_is_headless_and_in1k_has_no_weights(mpncov):
    net, _, path, x, _ = mpncov
    headless, warned = load('isqrt_resnet50.mpncov_finetune_start', path)  # its classifier left out
    assert headless.num_classes == 0 and not warned
    unclassified = SimpleNamespace(**dict(net.named_children(), fc=lambda v: v))
    with torch.no_grad():  # the covariance's triangle: fast-MPN-COV's upper one, ours the lower one (row by row)
        ours, theirs = headless.double()(x), mpncov_forward(unclassified, x)
    matrices = torch.zeros(2, 2, 256, 256, dtype=x.dtype)
    matrices[0][(slice(None), *torch.tril_indices(256, 256))] = ours
    matrices[1][(slice(None), *torch.triu_indices(256, 256))] = theirs
    torch.testing.assert_close(matrices[0], matrices[1].transpose(1, 2), rtol=1e-9, atol=1e-12)
    default = timm.create_model('isqrt_resnet50', device='meta')
    assert default.pretrained_cfg['tag'] == 'in1k' and default.num_classes == 1000
    with pytest.raises(RuntimeError, match='isqrt_resnet50'):  # timm's: no weights to load
        timm.create_model('isqrt_resnet50', pretrained=True, device='meta')


# ---- warm start from a plain network ----------------------------------------------------------------------

def plain(name, **kwargs):
    torch.manual_seed(0)
    return randomise_bn_(timm.create_model(name, **kwargs)).eval()


def head_differs(model, reference):
    """The names of the covariance head's and the classifier's tensors that differ from the reference's."""
    theirs = reference.state_dict()
    head = {k: v for k, v in model.state_dict().items() if k.startswith(('global_pool.', 'fc.'))}
    return [k for k, v in head.items() if not v.equal(theirs[k])]


@pytest.mark.parametrize('kwargs', [dict(last_stride=2), {}, dict(last_stride=2, gsop_manner='position')],
                         ids=['last_stride2', 'last_stride1', 'position'])
def test_warm_start_from_a_plain_resnet(kwargs):
    source = plain('resnet50', **TINY)
    model, warned = load('gsop_resnet50', source.state_dict(), **TINY, **kwargs)
    assert len(warned) == 1
    x = image()
    with torch.no_grad():
        same = torch.equal(model(x), source(x))
    if kwargs == dict(last_stride=2):
        assert same  # gates at 0.5 on a doubled bn3: the ResNet's logits, bit for bit
    else:  # the function differs, and the warning does not claim it: it names what differs
        assert not same and ('last_stride' if 'gsop_manner' not in kwargs else 'position') in warned[0]


def test_gsop2_from_a_plain_resnet_keeps_features_and_names_new_head():
    source = plain('resnet50', **TINY)
    torch.manual_seed(5)
    model, warned = load('gsop2_resnet50', source.state_dict(), **TINY, isqrt_dim=16, last_stride=2)
    torch.manual_seed(5)
    fresh = timm.create_model('gsop2_resnet50', **TINY, isqrt_dim=16, last_stride=2)
    assert len(warned) == 1 and all(m in warned[0] for m in ('global_pool.conv_reduce', 'global_pool.bn_reduce', 'fc'))
    with torch.no_grad():
        assert torch.equal(model.forward_features(image()), source.forward_features(image()))
    assert not head_differs(model, fresh)  # head and classifier: the model's own initialisation


def test_gsop2_from_isqrt_cov_keeps_features_and_head():
    source = plain('isqrt_resnet50', **TINY, isqrt_dim=16)
    model, warned = load('gsop2_resnet50', source.state_dict(), **TINY, isqrt_dim=16)
    assert len(warned) == 1
    with torch.no_grad():
        assert torch.equal(model.forward_features(image()), source.forward_features(image()))
    assert not head_differs(model, source)


def test_warm_start_of_the_cifar_family_is_exact():
    source = plain('preresnet164_cifar', layers=(1, 1, 1))
    model, warned = load('gsop_preresnet164_cifar', source.state_dict(), layers=(1, 1, 1))
    assert len(warned) == 1
    with torch.no_grad():
        assert torch.equal(model(image(32)), source(image(32)))


def test_warm_start_through_train_py_pretrained_path(tmp_path):
    """timm's train.py --pretrained --pretrained-path FILE --num-classes 10: the file in the overlay with
    num_classes=-1 (a new classifier)."""
    source = plain('resnet50', **TINY)
    torch.save(source.state_dict(), tmp_path / 'resnet.pth')
    model, warned = load('gsop_resnet50', tmp_path / 'resnet.pth', overlay=dict(num_classes=-1), num_classes=10,
                         last_stride=2, **TINY)
    assert len(warned) == 1 and model.fc.out_features == 10
    x = image()
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(x), pre_logits=True),
                           source.forward_head(source.forward_features(x), pre_logits=True))


def test_gsop_checkpoint_lacking_gsop_tensors_is_refused_by_the_strict_load():
    state_dict = plain('gsop_resnet50', **TINY).state_dict()
    missing = 'layer2.0.se.gate.conv_expand.weight'
    del state_dict[missing]
    with warnings.catch_warnings():
        warnings.simplefilter('error', WarmStartWarning)  # no warm start
        with pytest.raises(RuntimeError, match=missing.replace('.', r'\.')):
            timm.create_model('gsop_resnet50', pretrained=True, pretrained_cfg_overlay=dict(state_dict=state_dict),
                              **TINY)
