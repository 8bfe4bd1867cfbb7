"""The tooling around the models: ``timm-gsop export`` (a train.py checkpoint -> the folder timm and transformers
load), its refusals, model cards, ``push`` to a Hub (``hub_server.HubServer`` on 127.0.0.1) and loading back with
``hf-hub:``, and the small commands (``list``, ``recipe``, ``run``, ``-h``). Tiny models; no download."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch

import timm_gsop
from conftest import randomise_bn_, tiny_kwargs
from hub_server import HubServer
from timm_gsop import export
from timm_gsop_cli import main

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
TRAIN_ARGS = dict(epochs=37, opt='lamb', lr=0.0123, batch_size=48)  # what the card of an export lists
METRIC = 61.25  # train.py's evaluation of the EMA weights, stored in the checkpoint
TINY_ARGS = ['layers=(1,1,1,1)', 'channels=(16,32,64,128)']  # --model-kwargs of a tiny ResNet-50 layout


def tiny_model(name, seed):
    torch.manual_seed(seed)
    return randomise_bn_(timm.create_model(name, **tiny_kwargs(name)), seed).eval()


def outputs(model):
    with torch.no_grad():
        return model.eval()(X)


def write_checkpoint(path, name, raw, ema=None):
    """A checkpoint as timm's train.py saves it (``--model-ema`` adds ``state_dict_ema``)."""
    kwargs = tiny_kwargs(name)
    args = argparse.Namespace(model=name, num_classes=kwargs.pop('num_classes'), model_kwargs=kwargs, gp=None,
                              in_chans=None, img_size=None, crop_pct=None, interpolation='', eval_metric='top1',
                              model_ema=ema is not None, **TRAIN_ARGS)
    ckpt = dict(epoch=36, version=2, metric=METRIC, args=args, state_dict=raw.state_dict())
    if ema is not None:
        ckpt['state_dict_ema'] = ema.state_dict()
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """trained(name, *flags) -> (train.py checkpoint with EMA weights, raw model, EMA model, the folder
    ``timm-gsop export CHECKPOINT --out FOLDER *flags`` wrote); each made on first use."""
    tmp, cache = tmp_path_factory.mktemp('trained'), {}

    def get(name, *flags):
        if name not in cache:
            raw, ema = tiny_model(name, 1), tiny_model(name, 2)
            cache[name] = write_checkpoint(tmp / f'{name}.pth.tar', name, raw, ema), raw, ema
        if (name, *flags) not in cache:
            cache[name, *flags] = tmp / ''.join((name, *flags))
            assert main(['export', str(cache[name][0]), '--out', str(cache[name, *flags]), *flags]) == 0
        return (*cache[name], cache[name, *flags])
    return get


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
    """Checkpoints that export refuses: a plain ResNet's, a GSoP-Net1's state dict, a Net1 run without EMA."""
    tmp = tmp_path_factory.mktemp('inputs')
    plain, net1 = tiny_model('resnet50', 3), tiny_model('gsop_resnet50', 4)
    torch.save(plain.state_dict(), tmp / 'plain.pth')
    torch.save(net1.state_dict(), tmp / 'net1.pth')
    write_checkpoint(tmp / 'noema.pth.tar', 'gsop_resnet50', net1)
    return dict(tmp=tmp, gsop_keys=set(net1.state_dict()) - set(plain.state_dict()))


@pytest.mark.parametrize('name,flags', [('gsop2_resnet50', ()), ('covpool_resnet50', ('--no-ema',))])
def test_export_round_trip(name, flags, trained):
    _, raw, ema, folder = trained(name, *flags)
    want, other = (raw, ema) if flags else (ema, raw)  # the EMA weights unless --no-ema
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert torch.equal(outputs(reloaded), outputs(want)) and not torch.equal(outputs(reloaded), outputs(other))
    config = json.loads((folder / 'config.json').read_text())
    assert config['num_classes'] == tiny_kwargs(name)['num_classes'] and 'num_classes' not in config['model_args']
    # as transformers' TimmWrapper builds it: num_classes beside model_args, then the weights strictly
    net = timm.create_model(config['architecture'], num_classes=config['num_classes'], **config['model_args'])
    net.load_state_dict(safetensors.torch.load_file(folder / 'model.safetensors'))
    assert torch.equal(outputs(net), outputs(want))
    lines = (folder / 'README.md').read_text().splitlines()
    assert any(str(METRIC) in line for line in lines) == (not flags)  # the metric was measured on the EMA weights
    for key, value in TRAIN_ARGS.items():
        assert any(key in line and str(value) in line for line in lines), key


@pytest.mark.parametrize('failure', ['checkpoint-does-not-fit', 'failure-while-writing'])
def test_failed_export_leaves_the_users_folder_as_it_was(failure, inputs, trained, tmp_path, monkeypatch):
    out, called = tmp_path / 'out', []
    out.mkdir()
    saved = {'model.safetensors': b'old', 'config.json': b'{}', 'README.md': b'# mine', 'notes.txt': b'keep'}
    for file, data in saved.items():
        (out / file).write_bytes(data)

    def card_fails(*args, **kwargs):  # the card is written after the weights and config
        called.append(args)
        raise OSError('disk full')
    if failure == 'checkpoint-does-not-fit':
        with pytest.raises(ValueError):
            export.export_checkpoint(inputs['tmp'] / 'net1.pth', out, model='gsop2_resnet50',
                                     model_kwargs=dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128)))
    else:  # the weights fit and are written; then writing the card fails
        checkpoint = trained('gsop2_resnet50')[0]
        monkeypatch.setattr(export, 'render_card', card_fails)
        with pytest.raises(OSError, match='disk full'):
            export.export_checkpoint(checkpoint, out)
        assert called
    assert {p.name: p.read_bytes() for p in out.iterdir()} == saved
    assert [p.name for p in tmp_path.iterdir()] == ['out']  # no staging folder left behind


@pytest.mark.parametrize('argv,names', [
    (['export', 'plain.pth', '--model', 'gsop_resnet50', '--model-kwargs', *TINY_ARGS], 'a GSoP key'),
    (['export', 'net1.pth', '--model', 'gsop2_resnet50', '--model-kwargs', *TINY_ARGS], r'\bgsop_resnet50\b'),
    (['export', 'missing.pth'], r'missing\.pth'),
    (['export', 'noema.pth.tar', '--ema'], r'noema\.pth\.tar'),
    (['export', 'plain.pth', '--model', 'nope_resnet'], 'nope_resnet'),
    (['card', 'nope_resnet'], 'nope_resnet'),
    (['recipe', 'NOPE'], 'NOPE'),
], ids='plain-as-gsop net1-as-net2 missing-file ema-without-ema unknown-model card recipe'.split())
def test_bad_input_is_one_line_and_status_2(argv, names, inputs, monkeypatch, capsys):
    monkeypatch.chdir(inputs['tmp'])
    code = main(argv + (['--out', 'out'] if argv[0] == 'export' else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    if names == 'a GSoP key':  # torch's strict load would name one: the export's own check must too
        assert any(key in err[0] for key in inputs['gsop_keys']), err
    else:
        assert re.search(names, err[0]), err
    assert not (inputs['tmp'] / 'out').exists()


def test_card_states_the_model_as_built(capsys):
    assert main(['card', 'gsop2_resnet50', '--model-kwargs', 'isqrt_dim=64']) == 0
    card = capsys.readouterr().out
    model = timm.create_model('gsop2_resnet50', isqrt_dim=64, device='meta')
    default = timm.create_model('gsop2_resnet50', device='meta').get_classifier().in_features
    assert model.get_classifier().in_features == 64 * 65 // 2  # the triangle vector of a 64x64 covariance
    assert f'{sum(p.numel() for p in model.parameters()):,}' in card
    assert '2,080' in card and re.search(r'\b64\b', card) and f'{default:,}' not in card
    assert not re.search(r'\{[a-z_]+\}|\{\{|\{%', card), 'an unfilled placeholder'


def test_push_to_the_hub_and_load_back(trained, tmp_path, monkeypatch, capsys):
    """A dry run makes no request; a push uploads the export, whose card then loads the repo it went to; a retry
    and a push to a new branch commit nothing; the repo loads through timm into an empty cache. The Hub client is a
    script run by ``timm-gsop run`` (HF_ENDPOINT is read when huggingface_hub is imported), which passes its argv,
    has the models registered and returns its exit status."""
    repo_id, wanted = 'some-org/tiny-gsop2', {'README.md', 'config.json', 'model.safetensors'}
    folder, client = tmp_path / 'folder', tmp_path / 'hub_client.py'
    _, _, ema, exported = trained('gsop2_resnet50')
    shutil.copytree(exported, folder)
    (folder / 'optimizer.pth').write_bytes(b'a pickle: never uploaded')
    torch.save(X, tmp_path / 'x.pt')
    client.write_text(HUB_CLIENT)
    with HubServer() as hub:
        monkeypatch.setattr(huggingface_hub.constants, 'ENDPOINT', hub.url)  # where a request would go
        assert main(['push', str(folder), '--repo-id', repo_id, '--dry-run']) == 0
        out = capsys.readouterr().out
        assert hub.requests == [] and all(f in out for f in wanted) and 'optimizer.pth' not in out
        env = dict({k: v for k, v in os.environ.items() if not k.startswith('HF_')}, HF_ENDPOINT=hub.url,
                   HF_HOME=str(tmp_path / 'hf_home'), HF_TOKEN=hub.token, HF_HUB_DISABLE_TELEMETRY='1',
                   HF_HUB_DISABLE_XET='1', OMP_NUM_THREADS='1')
        proc = subprocess.run([sys.executable, '-m', 'timm_gsop', 'run', str(client), str(folder), repo_id,
                               str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 3, proc.stderr[-3000:]  # the script's sys.exit(3)
    repo = hub.repos[repo_id]
    assert len(repo['commits']) == 2  # the repo's first commit, then one push: the retries committed nothing
    assert repo['refs']['dev'] == repo['refs']['main']
    remote = hub.head(repo_id)[1]
    assert set(remote) == wanted | {'.gitattributes'}
    assert all(remote[f] == (folder / f).read_bytes() for f in wanted)
    # the card's usage examples load the repo it was pushed to
    assert set(re.findall(r'hf-hub:([\w.-]+/[\w.-]+)', remote['README.md'].decode())) == {repo_id}
    assert ('GET', f'/{repo_id}/resolve/main/model.safetensors') in hub.requests
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the client computed it
    try:
        assert torch.equal(torch.load(tmp_path / 'y.pt'), outputs(ema))
    finally:
        torch.set_num_threads(threads)


HUB_CLIENT = '''import sys
import timm
assert timm.is_model('gsop2_resnet50') and sys.argv[0].endswith('hub_client.py')  # run registered the models
import torch
from huggingface_hub import HfApi
from timm_gsop_cli import main
folder, repo_id, tmp = sys.argv[1:]
torch.set_num_threads(1)
assert main(['push', folder, '--repo-id', repo_id]) == 0
head = HfApi().repo_info(repo_id).sha
assert main(['push', folder, '--repo-id', repo_id]) == 0
assert main(['push', folder, '--repo-id', repo_id, '--revision', 'dev']) == 0
assert HfApi().repo_info(repo_id).sha == head
model = timm.create_model('hf-hub:' + repo_id, pretrained=True).eval()
with torch.no_grad():
    torch.save(model(torch.load(tmp + '/x.pt')), tmp + '/y.pt')
sys.exit(3)
'''


def test_help_needs_no_torch():
    code = '''import contextlib, io, sys, timm_gsop_cli
timm_gsop_cli.build_parser()
for argv in ([], ['export'], ['push'], ['card']):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            timm_gsop_cli.main(argv + ['-h'])
        except SystemExit as e:
            assert e.code == 0, argv
    assert out.getvalue().startswith('usage: timm-gsop'), argv
print(sorted(m for m in ('torch', 'timm', 'timm_gsop', 'huggingface_hub') if m in sys.modules))'''
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == '[]', proc.stderr


@pytest.mark.parametrize('pattern', ['gsop*_resnet50', pytest.param('', marks=pytest.mark.slow)])
def test_list_names_every_model(pattern, capsys):
    assert main(['list', pattern]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    registered = [n for n in timm.list_models(pattern or '*')
                  if timm.models.model_entrypoint(n).__module__.startswith('timm_gsop.')]
    assert registered and sorted(rows) == sorted(registered)
    for name in registered:
        assert rows[name][1] == f"{sum(p.numel() for p in timm.create_model(name, device='meta').parameters()):,}"


def test_recipe_lists_and_finds_the_shipped_recipes(capsys):
    shipped = {p.stem: p.resolve() for p in (Path(timm_gsop.__file__).parent / 'recipes').glob('*.yaml')}
    assert main(['recipe']) == 0
    listed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert shipped and {name: Path(path).resolve() for name, path in listed.items()} == shipped
    for name, path in shipped.items():
        assert main(['recipe', name]) == 0 and Path(capsys.readouterr().out.strip()).resolve() == path
    assert main(['recipe', name, '--show']) == 0 and capsys.readouterr().out == path.read_text()
