"""Publishing to the Hugging Face Hub and loading back: export, model cards, push, pretrained=True.

No network: the Hub is ``hub_server.HubServer`` on 127.0.0.1 (started and stopped here), huggingface_hub
runs in subprocesses pointed at it through ``HF_ENDPOINT`` (with ``HF_HUB_DISABLE_XET=1`` and a temporary
``HF_HOME`` / ``HF_HUB_CACHE``), then again with ``HF_HUB_OFFLINE=1`` from the cache it filled.
Most tests use tiny configurations (``base_width=4, gsop_dim=16``: ~4M parameters); the Hub round trip
publishes a real gsop_resnet50 (113 MB) once.
"""
import argparse
import configparser
import fnmatch
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import timm
import yaml
from huggingface_hub import ModelCard
from huggingface_hub import constants as hf_constants

import timm_gsop
from timm_gsop import cards, checkpoints, export, push
from timm_gsop.cards import HUB_NAMESPACE
from timm_gsop.models.gsop_resnet import _HEAD_KEYS, _RELEASED_BLOCK_KEYS, fast_mpncov_to_triu_order
from timm_gsop.zoo import count_gflops, count_params, list_gsop_models
from timm_gsop_cli import main

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

TINY = dict(base_width=4, gsop_dim=16)
TINY_NET2 = dict(TINY, isqrt_dim=16)
TINY_ISQRT = dict(base_width=4, isqrt_dim=16)
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
TOKEN = 'hf_test_token'


def make_model(name='gsop_resnet50', seed=0, num_classes=5, **kwargs):
    """A model with random weights *and* random BN statistics, so a lost tensor changes the outputs."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes, **kwargs)
    gen = torch.Generator().manual_seed(seed + 100)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


def outputs(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


def train_args(**over):
    """An argparse.Namespace like timm's train.py stores in its checkpoints (the fields export reads + some)."""
    args = dict(model='gsop_resnet50', num_classes=5, model_kwargs=dict(TINY), gp=None, in_chans=None,
                input_size=None, img_size=None, crop_pct=None, mean=None, std=None, interpolation='',
                bn_momentum=None, bn_eps=None, drop=0.0, drop_path=0.05, epochs=3, opt='sgd', lr=0.1, momentum=0.9,
                weight_decay=1e-4, batch_size=32, sched='multistep', eval_metric='top1', model_ema=True, amp=False)
    args.update(over)
    return argparse.Namespace(**args)


def write_train_checkpoint(path, model, ema=None, **args_over):
    ckpt = {'epoch': 2, 'arch': 'gsop_resnet50', 'version': 2, 'metric': 61.25,
            'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()},
            'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1, 'params': [0, 1]}]},
            'args': train_args(model_ema=ema is not None, **args_over)}
    if ema is not None:
        ckpt['state_dict_ema'] = ema.state_dict()
    torch.save(ckpt, path)
    return path


def to_released_gsop(state_dict):
    """Our GSoP-Net (channel manner) keys -> the released code's (conv_for_DR, row_conv_group, layer_reduce ...)."""
    block = {ours: theirs for theirs, (branch, ours) in _RELEASED_BLOCK_KEYS.items() if branch == 'channel'}
    head = {ours: theirs for theirs, ours in _HEAD_KEYS.items()}
    out = {}
    for k, v in state_dict.items():
        if '.se.' in k:
            prefix, rest = k.split('.se.', 1)
            ours = next(n for n in block if rest.startswith(n + '.'))
            k = f'{prefix}.{block[ours]}{rest[len(ours):]}'
        elif k.startswith('global_pool.'):
            ours = next(n for n in head if k.startswith(n + '.'))
            k = head[ours] + k[len(ours):]
        if not k.endswith('num_batches_tracked'):  # the release predates these buffers
            out['module.' + k] = v
    return out


def to_fast_mpncov(state_dict):
    """Our iSQRT-COV keys -> fast-MPN-COV main.py's (features.N / representation / classifier), with its
    upper-triangle order of the covariance vector."""
    names = {'conv1.': 'features.0.', 'bn1.': 'features.1.', 'layer1.': 'features.4.', 'layer2.': 'features.5.',
             'layer3.': 'features.6.', 'layer4.': 'features.7.', 'global_pool.conv_reduce.':
             'representation.conv_dr_block.0.', 'global_pool.bn_reduce.': 'representation.conv_dr_block.1.',
             'fc.': 'classifier.'}
    out = {}
    for k, v in state_dict.items():
        prefix = next(p for p in names if k.startswith(p))
        if k == 'fc.weight':
            dim = state_dict['global_pool.conv_reduce.weight'].shape[0]
            theirs = torch.empty_like(v)
            theirs[:, fast_mpncov_to_triu_order(dim)] = v
            v = theirs
        out['module.' + names[prefix] + k[len(prefix):]] = v
    return out


@pytest.fixture(scope='module')
def net1():
    return make_model('gsop_resnet50', seed=1, **TINY)


@pytest.fixture(scope='module')
def net2_export(tmp_path_factory):
    """A tiny GSoP-Net2 exported from a plain state dict: (folder, source model)."""
    tmp = tmp_path_factory.mktemp('net2')
    model = make_model('gsop2_resnet50', seed=2, **TINY_NET2)
    torch.save(model.state_dict(), tmp / 'weights.pth')
    export.export_checkpoint(tmp / 'weights.pth', tmp / 'export', model='gsop2_resnet50', model_kwargs=dict(TINY_NET2))
    return tmp / 'export', model


# ---- export: each checkpoint kind ------------------------------------------------------------------------

def assert_export_folder(folder, name, model):
    files = sorted(p.name for p in folder.iterdir())
    assert files == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == name.split('.')[0]
    # num_classes at the top level only: transformers' TimmWrapper passes it itself (test_clients.py)
    assert config['num_classes'] == model.num_classes and 'num_classes' not in config.get('model_args', {})
    assert config['pretrained_cfg']['num_classes'] == model.num_classes
    assert {'input_size', 'mean', 'std', 'crop_pct', 'first_conv', 'classifier'} <= set(config['pretrained_cfg'])
    assert (folder / 'model.safetensors').read_bytes()[8:9] == b'{'  # safetensors, not a pickle
    loaded = safetensors.torch.load_file(str(folder / 'model.safetensors'))
    assert set(loaded) == set(model.state_dict())
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    torch.testing.assert_close(outputs(reloaded), outputs(model), rtol=0, atol=0)
    card = ModelCard((folder / 'README.md').read_text())
    assert card.data.library_name == 'timm' and card.data.tags == ['image-classification', 'timm']
    return config, card


def test_export_timm_train_checkpoint_prefers_ema(tmp_path, net1):
    ema = make_model('gsop_resnet50', seed=11, **TINY)
    path = write_train_checkpoint(tmp_path / 'model_best.pth.tar', net1, ema)
    result = export.export_checkpoint(path, tmp_path / 'out')  # model and kwargs from the checkpoint's args
    assert result.used_ema and result.checkpoint.container == 'timm-train' and result.model_name == 'gsop_resnet50.in1k'
    config, card = assert_export_folder(tmp_path / 'out', 'gsop_resnet50', ema)
    assert config['model_args'] == {**TINY, 'in_chans': 3, 'global_pool': 'avg'} and config['num_classes'] == 5
    assert 'EMA weights' in card.text and 'epoch 2' in card.text
    assert 'top1 61.25' in card.text  # train.py's stored metric, for the EMA weights it evaluated
    assert 'epochs: `3`' in card.text and 'Published recipe' in card.text
    assert result.files['model.safetensors'] == (tmp_path / 'out' / 'model.safetensors').stat().st_size


def test_export_records_a_warm_start_in_the_card(tmp_path, net1):
    """train.py --pretrained --pretrained-path FILE: the card says where the run started and that GSoP modules the
    file had no tensors for were warm-started (checkpoint_filter_fn); timm's builder arg pretrained_strict, which
    older runs passed in --model-kwargs, is no model arg."""
    path = write_train_checkpoint(tmp_path / 'last.pth.tar', net1, None, pretrained=True,
                                  pretrained_path='resnet50.a1_in1k.safetensors',
                                  model_kwargs=dict(TINY, pretrained_strict=False))
    result = export.export_checkpoint(path, tmp_path / 'out', verify=False)
    card = (tmp_path / 'out' / 'README.md').read_text()
    assert 'initialised from: `resnet50.a1_in1k.safetensors` (GSoP modules it had no tensors for were ' \
           'initialised function-preserving, a warm start)' in card
    assert 'pretrained_strict' not in result.model_args
    plain = write_train_checkpoint(tmp_path / 'scratch.pth.tar', net1, None)
    export.export_checkpoint(plain, tmp_path / 'scratch', verify=False)
    assert 'initialised from' not in (tmp_path / 'scratch' / 'README.md').read_text()


def test_export_ema_choice(tmp_path, net1):
    ema = make_model('gsop_resnet50', seed=12, **TINY)
    path = write_train_checkpoint(tmp_path / 'checkpoint-2.pth.tar', net1, ema)
    assert main(['export', str(path), '--out', str(tmp_path / 'raw'), '--no-ema', '--no-verify']) == 0
    torch.testing.assert_close(outputs(timm.create_model(f'local-dir:{tmp_path / "raw"}', pretrained=True)),
                               outputs(net1), rtol=0, atol=0)
    assert 'top1 61.25' not in (tmp_path / 'raw' / 'README.md').read_text()  # that metric was the EMA's
    # trained without EMA, at another image size: the export records train.py's eval preprocessing
    no_ema = write_train_checkpoint(tmp_path / 'plain.pth.tar', net1, None, img_size=96, crop_pct=0.9)
    with pytest.raises(ValueError, match='no EMA weights'):
        export.export_checkpoint(no_ema, tmp_path / 'x', use_ema=True)
    result = export.export_checkpoint(no_ema, tmp_path / 'plain', verify=False)
    assert not result.used_ema
    cfg = json.loads((tmp_path / 'plain' / 'config.json').read_text())['pretrained_cfg']
    assert cfg['input_size'] == [3, 96, 96] and cfg['crop_pct'] == 0.9
    assert '  - Image size: 96 x 96\n' in (tmp_path / 'plain' / 'README.md').read_text()
    model = timm.create_model(f'local-dir:{tmp_path / "plain"}', pretrained=True)
    assert timm.data.resolve_model_data_config(model)['input_size'] == (3, 96, 96)


def test_export_released_gsop_checkpoint(tmp_path):
    model = make_model('gsop2_resnet50', seed=3, **TINY_NET2)
    torch.save({'epoch': 65, 'arch': 'resnet50', 'best_prec1': 78.81, 'optimizer': {'state': {}, 'param_groups': []},
                'state_dict': to_released_gsop(model.state_dict())}, tmp_path / 'model_best.pth.tar')
    result = export.export_checkpoint(tmp_path / 'model_best.pth.tar', tmp_path / 'out', model='gsop2_resnet50',
                                   model_kwargs=dict(TINY_NET2))
    assert result.checkpoint.container == 'released-code' and result.layout == 'released-gsop'
    _, card = assert_export_folder(tmp_path / 'out', 'gsop2_resnet50', model)
    assert 'best_prec1' in card.text and '78.81' in card.text and 'released GSoP-Net code' in card.text


def test_export_fast_mpncov_checkpoint(tmp_path):
    model = make_model('isqrt_resnet50', seed=4, **TINY_ISQRT)
    torch.save({'epoch': 64, 'arch': 'mpncovresnet50', 'best_prec1': 77.86, 'optimizer': {},
                'state_dict': to_fast_mpncov(model.state_dict())}, tmp_path / 'model_best.pth.tar')
    # fast-MPN-COV's arch names the model; its covariance vector is reordered on the way
    result = export.export_checkpoint(tmp_path / 'model_best.pth.tar', tmp_path / 'out',
                                   model_kwargs=dict(TINY_ISQRT))
    # your own weights: the tag without a published file, not the default (the authors' fine-tuning start)
    assert result.layout == 'fast-mpn-cov' and result.model_name == 'isqrt_resnet50.in1k'
    _, card = assert_export_folder(tmp_path / 'out', 'isqrt_resnet50', model)
    assert 'iSQRT-COV' in card.text and '22.14' in card.text  # the isqrt_cov facts, reported numbers
    # GSoP-Net2's loader would read the triangle vector in the wrong order: refused
    with pytest.raises(ValueError, match='isqrt_resnet50'):
        export.export_checkpoint(tmp_path / 'model_best.pth.tar', tmp_path / 'bad', model='gsop2_resnet50',
                              model_kwargs=dict(TINY_NET2, gsop_stages=(0, 0, 0, 0), isqrt_iters=5))


@pytest.mark.parametrize('kind', ['state-dict', 'safetensors'])
def test_export_plain_weights(tmp_path, net1, kind):
    if kind == 'safetensors':
        path = tmp_path / 'weights.safetensors'
        safetensors.torch.save_file(net1.state_dict(), str(path))
    else:
        path = tmp_path / 'weights.pth'
        torch.save({f'module.{k}': v for k, v in net1.state_dict().items()}, path)  # DataParallel prefix too
    # num_classes comes from the classifier's shape
    result = export.export_checkpoint(path, tmp_path / 'out', model='gsop_resnet50', model_kwargs=dict(TINY),
                                   repo_id='me/my-gsop', dataset='cifar100')
    assert result.checkpoint.container == kind and result.model_args['num_classes'] == 5
    _, card = assert_export_folder(tmp_path / 'out', 'gsop_resnet50', net1)
    assert "timm.create_model('hf-hub:me/my-gsop', pretrained=True)" in card.text
    assert card.data.datasets == ['cifar100'] and 'No evaluation results accompany these weights' in card.text


def test_export_with_validate_results(tmp_path, net1):
    safetensors.torch.save_file(net1.state_dict(), str(tmp_path / 'w.safetensors'))
    (tmp_path / 'results.json').write_text(json.dumps(
        {'model': 'gsop_resnet50', 'top1': 78.123, 'top5': 94.01, 'img_size': 224, 'crop_pct': 0.875}))
    export.export_checkpoint(tmp_path / 'w.safetensors', tmp_path / 'out', model='gsop_resnet50',
                          model_kwargs=dict(TINY), results=tmp_path / 'results.json', verify=False)
    card = (tmp_path / 'out' / 'README.md').read_text()
    assert 'top-1 78.123, top-5 94.010: timm validate.py' in card
    # another num_classes than the tag's: the dataset is not claimed
    assert 'datasets:' not in card and '**Dataset:** not recorded' in card


# ---- export: errors ------------------------------------------------------------------------------------

def test_arbitrary_code_pickle_is_refused(tmp_path):
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}, 'payload': Evil()}, tmp_path / 'evil.pth.tar')
    with pytest.raises(checkpoints.UnsafeCheckpointError, match=r'Refusing to load .*posix\.system|Refusing .*system'):
        export.export_checkpoint(tmp_path / 'evil.pth.tar', tmp_path / 'out', model='gsop_resnet50')
    assert not marker.exists() and not (tmp_path / 'out').exists()
    assert main(['export', str(tmp_path / 'evil.pth.tar'), '--model', 'gsop_resnet50', '--out',
                 str(tmp_path / 'out')]) == 1
    assert not marker.exists()


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_corrupted_safetensors(tmp_path, net1, net2_export, damage):
    path = tmp_path / 'w.safetensors'
    safetensors.torch.save_file(net1.state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if damage == 'truncated' else data[:8] + b'\xff' * 32 + data[40:])
    with pytest.raises(checkpoints.CheckpointReadError, match='not a readable safetensors file'):
        export.export_checkpoint(path, tmp_path / 'out', model='gsop_resnet50')
    # loading: a damaged model.safetensors in an exported folder, and as a pretrained_cfg_overlay file
    folder, _ = net2_export
    broken = tmp_path / 'broken'
    broken.mkdir()
    for name in ('config.json', 'README.md'):
        (broken / name).write_bytes((folder / name).read_bytes())
    good = (folder / 'model.safetensors').read_bytes()
    (broken / 'model.safetensors').write_bytes(good[:len(good) // 2] if damage == 'truncated' else b'\x00' * 64)
    # (timm reads them: safetensors' own error, which names no file)
    with pytest.raises(safetensors.SafetensorError, match='deserializing header'):
        timm.create_model(f'local-dir:{broken}', pretrained=True)
    with pytest.raises(safetensors.SafetensorError, match='deserializing header'):
        timm.create_model('gsop_resnet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          num_classes=5, **TINY)
    with pytest.raises(push.ExportFolderError, match='not a readable safetensors'):
        push.check_export_folder(broken)


def test_truncated_pickle_and_missing_file(tmp_path, net1):
    path = write_train_checkpoint(tmp_path / 'model_best.pth.tar', net1)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])
    with pytest.raises(checkpoints.CheckpointReadError, match='truncated or corrupted'):
        checkpoints.read_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        checkpoints.read_checkpoint(tmp_path / 'nope.pth')


def test_wrong_architecture(tmp_path, net1):
    """torch's strict load_state_dict error names the keys: GSoP-Net1 has a GSoP module in stage 4, Net2 none."""
    torch.save(net1.state_dict(), tmp_path / 'net1.pth')
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "layer4\.2\.se\.'):
        export.export_checkpoint(tmp_path / 'net1.pth', tmp_path / 'out', model='gsop2_resnet50',
                                 model_kwargs=dict(TINY_NET2))
    # a plain network's checkpoint would load as a warm start (untrained GSoP modules): export refuses it
    plain = timm.create_model('resnet50', num_classes=5, base_width=4)
    torch.save(plain.state_dict(), tmp_path / 'plain.pth')
    with pytest.raises(ValueError, match=r'no tensors for layer1\.2\.se\.bn_reduce, .* of gsop_resnet50\.in1k: '
                                         r'exported, they would be untrained'):
        export.export_checkpoint(tmp_path / 'plain.pth', tmp_path / 'out', model='gsop_resnet50', model_kwargs=TINY)
    # train.py's args.model disagrees with --model
    write_train_checkpoint(tmp_path / 'ckpt.pth.tar', net1)
    with pytest.raises(ValueError, match="trained as 'gsop_resnet50'"):
        export.export_checkpoint(tmp_path / 'ckpt.pth.tar', tmp_path / 'out', model='gsop2_resnet50')
    with pytest.raises(ValueError, match='not a timm-gsop model'):
        export.export_checkpoint(tmp_path / 'net1.pth', tmp_path / 'out', model='resnet50')
    # and when loading: Net1 weights into a Net2 (same classes, so timm loads strictly)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "layer4\.2\.se\.'):
        timm.create_model('gsop2_resnet50', pretrained=True, num_classes=5, **TINY_NET2,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'net1.pth'), num_classes=5))


def test_wrong_num_classes(tmp_path, net1):
    torch.save(net1.state_dict(), tmp_path / 'net1.pth')
    mismatch = (r'size mismatch for fc\.weight: .* torch\.Size\(\[5, 2048\]\) from checkpoint, '
                r'.* torch\.Size\(\[{}, 2048\]\)')
    with pytest.raises(RuntimeError, match=mismatch.format(10)):
        export.export_checkpoint(tmp_path / 'net1.pth', tmp_path / 'out', model='gsop_resnet50',
                                 model_kwargs=dict(TINY, num_classes=10))
    # loading a 5-class file into the default 1000-class model (its cfg says 1000 classes: a strict load)
    with pytest.raises(RuntimeError, match=mismatch.format(1000)):
        timm.create_model('gsop_resnet50', pretrained=True, **TINY,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'net1.pth')))
    # a cfg naming the file's classes keeps the classifier, or drops it for another num_classes
    overlay = dict(file=str(tmp_path / 'net1.pth'), num_classes=5)
    kept = timm.create_model('gsop_resnet50', pretrained=True, num_classes=5, pretrained_cfg_overlay=overlay, **TINY)
    torch.testing.assert_close(outputs(kept), outputs(net1), rtol=0, atol=0)
    new = timm.create_model('gsop_resnet50', pretrained=True, num_classes=3, pretrained_cfg_overlay=overlay, **TINY)
    torch.testing.assert_close(new.layer4[2].conv3.weight, net1.layer4[2].conv3.weight)
    assert new.fc.out_features == 3


# ---- loading: local-dir, file overlay, adaptation -------------------------------------------------------

def test_load_local_dir_and_file_overlay(net2_export):
    folder, model = net2_export
    ref = outputs(model)
    torch.testing.assert_close(outputs(timm.create_model(f'local-dir:{folder}', pretrained=True)), ref, rtol=0, atol=0)
    overlay = dict(file=str(folder / 'model.safetensors'), num_classes=5)
    by_file = timm.create_model('gsop2_resnet50', pretrained=True, num_classes=5, pretrained_cfg_overlay=overlay,
                                **TINY_NET2)
    torch.testing.assert_close(outputs(by_file), ref, rtol=0, atol=0)


def test_num_classes_and_in_chans_adapt_keep_covariance_head(net2_export):
    folder, model = net2_export
    adapted = timm.create_model(f'local-dir:{folder}', pretrained=True, num_classes=7, in_chans=1).eval()
    assert adapted.fc.out_features == 7 and adapted.conv1.in_channels == 1
    # the classifier is new, everything before it (the iSQRT-COV head included) is the checkpoint's
    adapted_sd, source_sd = adapted.state_dict(), model.state_dict()
    for name in ('global_pool.conv_reduce.weight', 'global_pool.bn_reduce.running_var', 'layer3.5.se.conv_reduce.weight'):
        torch.testing.assert_close(adapted_sd[name], source_sd[name], rtol=0, atol=0)
    torch.testing.assert_close(adapted.conv1.weight, model.conv1.weight.sum(dim=1, keepdim=True))
    gray = X[:, :1]
    with torch.no_grad():
        torch.testing.assert_close(adapted.forward_head(adapted.forward_features(gray), pre_logits=True),
                                   model.forward_head(model.forward_features(gray.expand(-1, 3, -1, -1)),
                                                      pre_logits=True), rtol=1e-4, atol=1e-5)


def test_pretrained_without_published_weights_fails_at_once(monkeypatch):
    """No weights exist for the GSoP tags (no url / hf_hub_id in their cfgs): timm says so before any request."""
    def no_network(*args, **kwargs):
        raise AssertionError('a network request was made')
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_network)
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', no_network, raising=False)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match='No pretrained weights exist for gsop_resnet50'):
        timm.create_model('gsop_resnet50', pretrained=True)
    assert time.perf_counter() - start < 5


def test_list_models_pretrained_names_only_weights_that_exist(capsys):
    listed = set(timm.list_models(pretrained=True))
    ours = {full for name in list_gsop_models() for full in timm.list_models(name, include_tags=True)}
    assert listed & ours == {'isqrt_resnet50.mpncov_finetune_start', 'isqrt_resnet101.mpncov_finetune_start'}
    for full in ours:
        cfg = timm.models.get_pretrained_cfg(full)
        assert bool(cfg.has_weights) == (full in listed), full
    assert main(['list', 'gsop_resnet50']) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('gsop_resnet50'))
    assert row.rstrip().endswith('-')
    assert main(['list', 'isqrt_resnet50']) == 0
    assert 'mpncov_finetune_start' in capsys.readouterr().out


def test_a_published_tag_has_weights_and_its_card_says_where(monkeypatch):
    """Publishing a tag's weights is an hf_hub_id on its cfg line in default_cfgs, as in timm (loading them from
    the Hub: test_hub_round_trip)."""
    repo = f'{HUB_NAMESPACE}/gsop_resnet50.in1k'
    monkeypatch.setattr(timm.models._registry._model_pretrained_cfgs['gsop_resnet50.in1k'], 'hf_hub_id', repo)
    assert timm.models.get_pretrained_cfg('gsop_resnet50').has_weights
    text = cards.render_card('gsop_resnet50')
    assert f'The weights are published at `hf-hub:{repo}`.' in text and '# Model card for gsop_resnet50.in1k\n' in text
    assert "timm.create_model('gsop_resnet50.in1k', pretrained=True)" in text


# ---- model cards ---------------------------------------------------------------------------------------

def _assert_card_dimensions_are_the_models(text, model):
    """Every dimension the card's prose states is the model's own."""
    from timm_gsop.layers import ChannelGSoP, GSoPFusion, ISqrtCovPool, PositionGSoP
    gsop = [m for m in model.modules() if isinstance(m, (ChannelGSoP, PositionGSoP, GSoPFusion))]
    dims = sorted({(m.channel if isinstance(m, GSoPFusion) else m).dim for m in gsop})
    for d in re.findall(r'(\d+)-channel\s+reduction', text) + re.findall(r'\(d = (\d+)\)', text):
        assert int(d) in dims, (d, dims)
    pool = getattr(model, 'global_pool', None)
    if isinstance(pool, ISqrtCovPool):
        for features in re.findall(r'([\d,]+)-d (?:upper-)?triangle vector', text):
            assert int(features.replace(',', '')) == pool.out_features
        for a, b in re.findall(r'1x1 conv (\d+)\s+->\s+(\d+)', text):
            assert (int(a), int(b)) == (model.num_features, pool.dim)
    for blocks in re.findall(r'(\d+) GSoP blocks', text):
        assert int(blocks) == len(gsop)
    h, w = model.pretrained_cfg['input_size'][1:]
    final_map = model.forward_features(torch.empty(1, 3, h, w, device='meta')).shape[-2:]
    for a, b in re.findall(rf'(\d+)x(\d+) final map at {h}x{w}', text):
        assert (int(a), int(b)) == tuple(final_map)


def test_card_text_follows_the_model_kwargs():
    """A card of a model built with other kwargs states that model's dimensions, not the published ones."""
    text = cards.render_card('gsop2_resnet50', model_kwargs=dict(gsop_dim=32, last_stride=2, isqrt_dim=64))
    model = timm.create_model('gsop2_resnet50', gsop_dim=32, last_stride=2, isqrt_dim=64, device='meta')
    _assert_card_dimensions_are_the_models(text, model)
    assert '32-channel reduction' in text and '(d = 32)' in text
    assert '128-channel' not in text and '(d = 128)' not in text
    assert 'runs at stride 2 (7x7 final map at 224x224)' in text and '2,080-d upper-triangle vector' in text
    cifar = cards.render_card('gsop2_preresnet164_cifar')
    assert '64-channel reduction' in cifar and '128-channel' not in cifar


def _activations(model, input_size):
    total = []
    hooks = [m.register_forward_hook(lambda mod, i, o: total.append(o.numel())) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))]
    gflops = count_gflops(model, input_size)
    for h in hooks:
        h.remove()
    return sum(total), gflops


@pytest.mark.parametrize('name', list_gsop_models())
def test_card_of_every_registered_model(name):
    text = cards.render_card(name)
    card = ModelCard(text)
    meta = yaml.safe_load(text.split('---')[1])
    assert meta == card.data.to_dict()
    assert card.data.library_name == 'timm' and card.data.tags == ['image-classification', 'timm']
    assert card.data.pipeline_tag == 'image-classification' and card.data.license
    cfg = timm.models.get_pretrained_cfg(name)
    model = timm.create_model(name, device='meta')
    _assert_card_dimensions_are_the_models(text, model)
    input_size = tuple(cfg.input_size)
    activations, gflops = _activations(model, input_size)
    assert f'  - Params (M): {count_params(model) / 1e6:.1f}\n' in text
    assert f'Params: {count_params(model):,} parameters' in text
    assert f'  - GMACs: {gflops / 2:.2f}\n' in text
    assert f'  - Activations (M): {activations / 1e6:.1f}\n' in text
    assert f'  - Image size: {input_size[1]} x {input_size[2]}\n' in text
    for section in ('## Model Details', '## Model Usage', '### Image Classification', '### Feature Map Extraction',
                    '### Image Embeddings', '## Citation', '```bibtex', '- **Papers:**', '- **Dataset:**'):
        assert section in text, section
    assert f"timm.create_model('{f'{name}.{cfg.tag}' if cfg.tag else name}', pretrained=True)" in text
    assert f'({", ".join(map(str, [1, model.head_hidden_size]))}) shaped tensor' in text
    dataset = cards.dataset_for_tag(cfg.tag)
    assert card.data.datasets == ([dataset['hub_id']] if dataset else None)


def test_card_facts_are_labelled_and_data_driven():
    text = cards.render_card('gsop2_resnet50')
    assert '### Reported by the papers (not measured on these weights)' in text
    assert '| ImageNet-1k val, single 224x224 crop | *78.81* | *94.36* | 21.19 | 5.64 | GSoP-Net paper' in text
    assert 'arxiv.org/abs/1712.01034' in text and 'GSoP-Net2' in text and '@inproceedings{gao2019global' in text
    assert '#  torch.Size([1, 2048, 14, 14])' in text  # stride-1 last stage
    assert '(1, 32896) shaped tensor' in text
    # the paper reports nothing for ResNet-101
    assert 'The papers report no results' in cards.render_card('gsop_resnet101')
    # a family without a facts file gets generic facts from its pretrained cfg
    facts = cards.card_facts('cbamresnet50')
    assert facts['family'] is None and facts['reported'] == [] and facts['papers']
    cifar = cards.render_card('gsop2_preresnet164_cifar')
    assert '| CIFAR-100 (ResNet-164) | *81.42* | - | 18.58 | - |' in cifar and 'cifar100' in cifar
    assert '*Italic*: 100 minus the reported' in cifar
    # model kwargs reach the numbers and are listed
    small = cards.render_card('gsop_resnet50', model_kwargs=dict(TINY, num_classes=5))
    assert '`base_width=4`, `gsop_dim=16`' in small and 'other arguments than the published configuration' in small


def test_card_cli(tmp_path, capsys):
    assert main(['card', 'gsop_resnet50', '--out', str(tmp_path / 'README.md'), '--repo-id', 'me/x']) == 0
    text = (tmp_path / 'README.md').read_text()
    assert "timm.create_model('hf-hub:me/x', pretrained=True)" in text and '# Model card for x\n' in text
    assert main(['card', 'resnet50']) == 2
    assert 'not a timm-gsop model' in capsys.readouterr().err


def test_hub_cards_ship_in_the_wheel():
    """setup.py maps hub_cards/ to the package timm_gsop.hub_cards; setup.cfg lists its files as package data."""
    root = Path(__file__).resolve().parent.parent
    assert "'timm_gsop.hub_cards': 'hub_cards'" in (root / 'setup.py').read_text()
    cfg = configparser.ConfigParser()
    cfg.read(root / 'setup.cfg')
    patterns = [p.strip() for p in cfg['options.package_data']['timm_gsop.hub_cards'].split(',')]
    assert cards.cards_dir() in (root / 'hub_cards', Path(timm_gsop.__file__).parent / 'hub_cards')
    files = [p.relative_to(root / 'hub_cards').as_posix() for p in (root / 'hub_cards').rglob('*') if p.is_file()]
    assert all(any(fnmatch.fnmatch(f, pat) and f.count('/') == pat.count('/') for pat in patterns) for f in files)
    assert 'families/gsop_net.yaml' in files


# ---- push ----------------------------------------------------------------------------------------------

def test_push_dry_run_lists_files_without_network(net2_export, tmp_path, capsys):
    folder, _ = net2_export
    staged = tmp_path / 'staged'
    staged.mkdir()
    for p in folder.iterdir():
        (staged / p.name).write_bytes(p.read_bytes())
    (staged / 'checkpoint-3.pth.tar').write_bytes(b'pickle')  # never uploaded
    assert main(['push', str(staged), '--repo-id', 'me/tiny-gsop2', '--dry-run']) == 0
    out = capsys.readouterr().out
    assert 'Dry run: would upload to me/tiny-gsop2@main' in out
    for name in ('model.safetensors', 'config.json', 'README.md'):
        assert re.search(rf'{re.escape(name)}\s+[\d,]+ bytes', out), name
    assert 'checkpoint-3.pth.tar' in out and 'skipped' in out
    assert 'usage examples point at me/tiny-gsop2' in out
    (staged / 'config.json').write_text(json.dumps({'architecture': 'gsop_resnet50', 'model_args': TINY}))
    assert main(['push', str(staged), '--repo-id', 'me/tiny-gsop2', '--dry-run']) == 2
    assert 'does not hold the tensors of gsop_resnet50' in capsys.readouterr().err
    assert main(['push', str(staged), '--repo-id', 'not-a-repo-id', '--dry-run']) == 2


# ---- the Hub round trip --------------------------------------------------------------------------------

CLIENT = textwrap.dedent('''
    import json, os, sys, traceback
    import torch, timm, timm_gsop
    from timm_gsop_cli import main

    folder, repo, out_file, phase = sys.argv[1:5]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    report, tensors = {}, {}

    def run(key, argv):
        print(f'>>> {key}', flush=True)
        report[key] = main(argv)

    def load(key, *args, **kwargs):
        try:
            model = timm.create_model(*args, **kwargs).eval()
            with torch.no_grad():
                tensors[key] = model(x)
            report[key] = 'ok'
        except Exception as e:
            report[key] = f'{type(e).__name__}: {e}'

    if phase == 'online':
        run('push', ['push', folder, '--repo-id', repo])
        run('push_again', ['push', folder, '--repo-id', repo])
        run('push_pr', ['push', folder, '--repo-id', 'timm-gsop/pr-test', '--create-pr'])
        run('push_branch', ['push', folder, '--repo-id', 'timm-gsop/pr-test', '--revision', 'dev', '--private'])
        token = os.environ.pop('HF_TOKEN')
        run('push_no_token', ['push', folder, '--repo-id', 'timm-gsop/no-token'])
        os.environ['HF_TOKEN'] = token
        from huggingface_hub import HfApi
        info = HfApi().model_info(repo)
        report['card_data'] = info.card_data.to_dict()
        report['siblings'] = sorted(s.rfilename for s in info.siblings)
    load('hf_hub', f'hf-hub:{repo}', pretrained=True)
    timm.models._registry._model_pretrained_cfgs['gsop_resnet50.in1k'].hf_hub_id = repo  # its cfg line, published
    load('published', 'gsop_resnet50', pretrained=True)
    load('not_published', 'gsop2_resnet50', pretrained=True)
    if phase == 'online':
        load('adapted', f'hf-hub:{repo}', pretrained=True, num_classes=7)
    torch.save(tensors, out_file)
    json.dump(report, open(out_file + '.json', 'w'))
''')


@pytest.fixture(scope='module')
def full_export(tmp_path_factory):
    """A real gsop_resnet50 (28.3M parameters) exported once: (folder, reference output on X[:1])."""
    tmp = tmp_path_factory.mktemp('full')
    model = make_model('gsop_resnet50', seed=5, num_classes=1000)
    torch.save(model.state_dict(), tmp / 'gsop_resnet50.pth')
    result = export.export_checkpoint(tmp / 'gsop_resnet50.pth', tmp / 'gsop_resnet50.in1k', model='gsop_resnet50')
    (tmp / 'gsop_resnet50.pth').unlink()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return result, outputs(model, x)


def _client(hub_server, tmp_path, folder, phase, **env_over):
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGINGFACE_', 'TRANSFORMERS_'))}
    env.update(HF_ENDPOINT=hub_server.url, HF_HUB_DISABLE_XET='1', HF_HOME=str(tmp_path / 'hf_home'),
               HF_HUB_CACHE=str(tmp_path / 'hf_home' / 'hub'), HF_TOKEN=TOKEN, HF_HUB_DISABLE_TELEMETRY='1',
               HF_HUB_DISABLE_PROGRESS_BARS='1', OMP_NUM_THREADS='1', **env_over)
    out = tmp_path / f'{phase}.pt'
    proc = subprocess.run(
        [sys.executable, '-c', CLIENT, str(folder), f'{HUB_NAMESPACE}/gsop_resnet50.in1k', str(out), phase],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(Path(str(out) + '.json').read_text()), torch.load(out), proc.stdout + proc.stderr


# the client process runs with 1 thread, the reference with the session's: same weights, but conv kernels
# may sum in another order, so equal up to float32 rounding (a wrong or missing tensor is off by far more)
SAME = dict(rtol=1e-5, atol=1e-5)


def test_hub_round_trip(full_export, tmp_path):
    result, ref = full_export
    folder = result.out_dir
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert sizes['model.safetensors'] > 110e6 and sizes['config.json'] < 4096
    with HubServer(token=TOKEN, max_lifetime=300) as hub_server:
        report, tensors, log = _client(hub_server, tmp_path, folder, 'online')
        repo = f'{HUB_NAMESPACE}/gsop_resnet50.in1k'

        # push: the files, LFS for the weights, a retry that changes nothing, a PR and a branch
        assert report['push'] == 0 and report['push_again'] == 0, log
        assert 'already has these files: nothing to commit' in log
        files = hub_server.files(repo)
        assert set(files) == {'.gitattributes', 'model.safetensors', 'config.json', 'README.md'}
        assert files['model.safetensors'].lfs_oid and files['model.safetensors'].size == sizes['model.safetensors']
        assert files['config.json'].content == (folder / 'config.json').read_bytes()
        assert hub_server.num_commits(repo) == 2  # the repo's initial commit + one push
        assert sum(1 for m, p in hub_server.requests if m == 'PUT' and p.startswith('/_lfs/')) == 1
        pr_repo = hub_server.repos[f'{HUB_NAMESPACE}/pr-test']
        assert report['push_pr'] == 0 and 'discussions/1' in log
        assert set(hub_server.files(pr_repo.repo_id, 'main')) == {'.gitattributes'}  # the PR did not touch main
        pr_card = hub_server.files(pr_repo.repo_id, 'refs/pr/1')['README.md'].content.decode()
        assert f"'hf-hub:{HUB_NAMESPACE}/pr-test'" in pr_card and f'hf-hub:{repo}' not in pr_card
        assert report['push_branch'] == 0 and 'model.safetensors' in hub_server.files(pr_repo.repo_id, 'dev')
        assert report['push_no_token'] == 1 and 'hf auth login' in log
        assert 'timm-gsop/no-token' not in hub_server.repos
        assert report['card_data']['library_name'] == 'timm' and report['card_data']['datasets'] == ['imagenet-1k']
        assert report['siblings'] == sorted(files)

        # load: hf-hub:, a published tag (its cfg names the repo), the adapted classifier
        assert report['hf_hub'] == 'ok' and report['published'] == 'ok', report
        torch.testing.assert_close(tensors['hf_hub'], ref, **SAME)
        torch.testing.assert_close(tensors['published'], ref, **SAME)
        assert report['adapted'] == 'ok' and tensors['adapted'].shape == (1, 7)
        assert report['not_published'].startswith('RuntimeError: No pretrained weights exist for gsop2_resnet50')
        snapshots = list((tmp_path / 'hf_home' / 'hub').glob('models--timm-gsop--gsop_resnet50.in1k/snapshots/*/*'))
        assert {p.name for p in snapshots} == {'config.json', 'model.safetensors'}

        # offline, from the cache: same outputs, not one request
        seen = len(hub_server.requests)
        report, tensors, log = _client(hub_server, tmp_path, folder, 'offline', HF_HUB_OFFLINE='1')
        assert len(hub_server.requests) == seen
        torch.testing.assert_close(tensors['hf_hub'], ref, **SAME)
        torch.testing.assert_close(tensors['published'], ref, **SAME)
        assert report['not_published'].startswith('RuntimeError: No pretrained weights exist for gsop2_resnet50')
        assert not hub_server.unhandled, hub_server.unhandled
    assert not hub_server.running


def test_failed_export_keeps_the_previous_good_files(tmp_path, net1, monkeypatch):
    path = tmp_path / 'weights.pth'
    torch.save(net1.state_dict(), path)
    export.export_checkpoint(path, tmp_path / 'out', model='gsop_resnet50', model_kwargs=dict(num_classes=5, **TINY))
    before = {p.name: p.read_bytes() for p in (tmp_path / 'out').iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError('disk full half way through the card')
    monkeypatch.setattr(export, 'render_card', crash)
    with pytest.raises(RuntimeError, match='disk full'):
        export.export_checkpoint(path, tmp_path / 'out', model='gsop_resnet50', model_kwargs=dict(num_classes=5, **TINY))
    assert {p.name: p.read_bytes() for p in (tmp_path / 'out').iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out', 'weights.pth']  # no staging folder left
