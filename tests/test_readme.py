"""README.md and docs/*.md are code: every ```python block runs as pasted, each in a fresh interpreter.

The blocks that load from the Hub run against a Hub look-alike on 127.0.0.1 (``hub_server.py``) with an empty
Hugging Face cache and no token. It holds ``timm/resnet50.a1_in1k`` (random weights of that architecture) and
``YOUR_ORG/gsop_resnet50.in1k``, which README's own Publish commands put there: ``timm-gsop export`` of a
train.py-style checkpoint at the path README names, then ``timm-gsop push``, as pasted. The released-code
checkpoint README loads is written from ``official_reference.py`` (the released network, independent of the
package). Where a block says what it prints, the test checks that it prints it.

The rest keeps the text true of the code: README stays under 250 lines with its sections in the issue's order;
every relative link resolves; the `timm-gsop` options and recipe names in the ```bash blocks exist, and so do
the ``timm_gsop.NAME`` attributes and the package / test files the text names; the kwargs in the kwargs tables
are arguments of the model class; the zoo's names are registered and its exact parameter counts are counted. ``The two commands`` run as pasted in a slow test; ``.ci/run`` executes README's test command.
"""
import inspect
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import timm
from timm.models.resnet import ResNet

import timm_gsop
from hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ['README.md'] + sorted(f'docs/{p.name}' for p in (ROOT / 'docs').glob('*.md'))
TEXT = {name: (ROOT / name).read_text(encoding='utf-8') for name in DOCS}
README = TEXT['README.md']
TOKEN = 'hf_readme_test_token'
README_SECTIONS = ['Install', 'The two commands', 'Use', 'Model zoo', 'Start from pretrained weights',
                   'Train with timm', 'Publish your weights', 'Citation', 'More']


def fenced_blocks(text: str, language: str):
    return [m.group(1) for m in re.finditer(rf'^```{language}\n(.*?)^```$', text, re.M | re.S)]


def section(text: str, title: str) -> str:
    start = text.index(f'\n## {title}\n')
    end = text.find('\n## ', start + 1)
    return text[start:end if end != -1 else len(text)]


def bash_commands(text: str):
    """The commands of a text's ```bash blocks: continuation lines joined, comments dropped, shell-split."""
    commands = []
    for block in fenced_blocks(text, 'bash'):
        for line in block.replace('\\\n', ' ').splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


PYTHON_BLOCKS = [(name, i, block) for name in DOCS for i, block in enumerate(fenced_blocks(TEXT[name], 'python'))]

# a block containing the key prints (stdout) or warns (stderr) these lines
EXPECTED_OUTPUT = {
    'features_only=True': ('stdout', [
        str([torch.Size([256, 56, 56]), torch.Size([512, 28, 28]), torch.Size([1024, 14, 14]),
             torch.Size([2048, 14, 14])]),
        'torch.Size([2, 32896])']),
    "hf_hub_id='timm/resnet50.a1_in1k'": ('stderr', ['WarmStartWarning', 'timm/resnet50.a1_in1k']),
    'print(torch.equal(gsop(x), resnet(x)))': ('stdout', ['True']),
    'print(weights.dtype, logits.dtype': ('stdout', ['torch.float32 torch.bfloat16 True']),
    'print(cov.shape, vec.shape': ('stdout', [
        'torch.Size([2, 256, 256]) torch.Size([2, 32896]) torch.Size([2, 256, 14, 14]) torch.Size([2, 2080])']),
}

SEED = textwrap.dedent('''
    import sys
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(sys.argv[1], exist_ok=True)
    api.upload_folder(repo_id=sys.argv[1], folder_path=sys.argv[2])
''')


def released_checkpoint(path: Path) -> None:
    """What the released GSoP-Net main.py saves for GSoP-Net1 ResNet-50 (channel), DataParallel-wrapped."""
    from official_reference import build_official
    torch.manual_seed(0)
    state_dict = build_official('resnet50', 1, 'channel').state_dict()
    torch.save({'epoch': 95, 'arch': 'resnet50', 'best_prec1': 77.9,
                'state_dict': {f'module.{k}': v for k, v in state_dict.items()
                               if not k.endswith('num_batches_tracked')}}, path)  # the release predates these


def train_py_checkpoint(path: Path) -> None:
    """What timm's train.py saves (weights, its args) for a GSoP-Net1 ResNet-50 run."""
    import argparse
    torch.manual_seed(0)
    model = timm.create_model('gsop_resnet50')
    args = argparse.Namespace(model='gsop_resnet50', num_classes=1000, model_kwargs={}, gp=None, in_chans=None,
                              input_size=None, img_size=None, crop_pct=None, mean=None, std=None, interpolation='',
                              bn_momentum=None, bn_eps=None, pretrained=False, pretrained_path=None,
                              initial_checkpoint='', epochs=95, opt='momentum', lr=None, lr_base=0.1, momentum=0.9,
                              weight_decay=1e-4, batch_size=256, sched='multistep', model_ema=False)
    path.parent.mkdir(parents=True)
    torch.save({'epoch': 94, 'arch': 'gsop_resnet50', 'version': 2, 'metric': 77.0, 'args': args,
                'state_dict': model.state_dict()}, path)


def publish_commands():
    """README's export and push commands, in order."""
    return [c for c in bash_commands(section(README, 'Publish your weights')) if c[:2] in (['timm-gsop', 'export'],
                                                                                          ['timm-gsop', 'push'])]


@pytest.fixture(scope='module')
def docs_world(tmp_path_factory):
    """A working folder with the files the blocks read, and a local Hub with the repos they load."""
    import safetensors.torch

    work = tmp_path_factory.mktemp('docs')
    released_checkpoint(work / 'model_best.pth.tar')
    export, *_ = publish_commands()
    train_py_checkpoint(work / export[2])
    resnet = work / 'hub' / 'resnet50.a1_in1k'
    resnet.mkdir(parents=True)
    safetensors.torch.save_file(timm.create_model('resnet50').state_dict(), str(resnet / 'model.safetensors'))

    server = HubServer(token=TOKEN, max_lifetime=1200).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGINGFACE_'))}
    env.update(HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET='1', HF_HOME=str(work / 'hf_home'), HF_TOKEN=TOKEN,
               HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_PROGRESS_BARS='1', OMP_NUM_THREADS='1')
    seed = subprocess.run([sys.executable, '-c', SEED, 'timm/resnet50.a1_in1k', str(resnet)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert seed.returncode == 0, seed.stderr[-3000:]
    for command in publish_commands():  # export, push --dry-run, push: as pasted
        proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f'{shlex.join(command)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}'
    assert set(server.files('YOUR_ORG/gsop_resnet50.in1k')) >= {'model.safetensors', 'config.json', 'README.md'}
    env.pop('HF_TOKEN')  # the blocks load public repos, as a user without a token would
    yield work, env
    server.stop()


def test_readme_is_short_and_in_the_issues_order():
    assert len(README.splitlines()) < 250
    assert re.findall(r'^## (.+)$', README, re.M) == README_SECTIONS
    install = section(README, 'Install')  # the user's path first, the contributor's after
    assert install.index('pip install git+') < install.index("pip install -e '.[test]'")


def test_readme_has_python_blocks_and_every_expectation_names_one_block():
    assert sum(name == 'README.md' for name, _, _ in PYTHON_BLOCKS) >= 4
    for key in EXPECTED_OUTPUT:
        assert sum(key in block for _, _, block in PYTHON_BLOCKS) == 1, key


@pytest.mark.parametrize('name,index,block', PYTHON_BLOCKS, ids=[f'{n}:{i}' for n, i, _ in PYTHON_BLOCKS])
def test_python_block_runs_as_pasted(name, index, block, docs_world):
    work, env = docs_world
    proc = subprocess.run([sys.executable, '-c', block], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f'{name} python block {index} failed:\n{block}\n{proc.stderr[-4000:]}'
    for key, (stream, lines) in EXPECTED_OUTPUT.items():
        if key in block:
            out = getattr(proc, stream)
            for line in lines:
                assert line in out, f'{name} python block {index}: {line!r} not in its {stream}:\n{out[-3000:]}'


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


@pytest.mark.parametrize('name', DOCS)
def test_relative_links_resolve(name):
    for target in re.findall(r'\]\(([^)]+)\)', TEXT[name]):
        if target.startswith(('http://', 'https://')):
            continue
        path, _, anchor = target.partition('#')
        file = (ROOT / name).parent / path if path else ROOT / name
        assert file.exists(), f'{name}: link to {target}'
        if anchor:
            headings = re.findall(r'^#+ (.+)$', file.read_text(encoding='utf-8'), re.M)
            assert anchor in {_anchor(h) for h in headings}, f'{name}: link to {target}'


def test_timm_gsop_options_and_recipes_in_the_bash_blocks_exist():
    from timm_gsop.recipes import list_recipes
    helps = {}
    for name in DOCS:
        for words in bash_commands(TEXT[name]):
            for word in words:
                for recipe in re.findall(r'\$\(timm-gsop recipe (\S+)\)', word):
                    assert recipe in list_recipes(), f'{name}: {shlex.join(words)}'
            if words[0] != 'timm-gsop' or words[1] == 'run':  # run passes the options on to the script
                continue
            if words[1] not in helps:
                proc = subprocess.run(['timm-gsop', words[1], '-h'], capture_output=True, text=True, timeout=120)
                assert proc.returncode == 0, f'{name}: {shlex.join(words)}\n{proc.stderr}'
                helps[words[1]] = proc.stdout
            for option in (w.split('=')[0] for w in words if w.startswith('--')):
                assert re.search(rf'{re.escape(option)}\b', helps[words[1]]), f'{name}: {option} in {shlex.join(words)}'


def test_the_package_names_the_docs_use_exist():
    names = {n for name in DOCS for n in re.findall(r'`timm_gsop\.(\w+)', TEXT[name])}
    assert names and all(hasattr(timm_gsop, n) for n in names), sorted(n for n in names if not hasattr(timm_gsop, n))
    paths = {p for name in DOCS for p in re.findall(r'`((?:timm_gsop|tests|benchmarks)/[\w/.]+)`', TEXT[name])}
    assert paths and all((ROOT / p).exists() for p in paths), sorted(p for p in paths if not (ROOT / p).exists())


def test_documented_kwargs_are_model_arguments():
    arguments = set(inspect.signature(timm_gsop.GSoPResNet).parameters) | set(inspect.signature(ResNet).parameters)
    found = 0
    for name in DOCS:
        for table in re.findall(r'^\| kwarg \|.*?\n((?:\|.*\n)+)', TEXT[name], re.M):
            for row in table.splitlines()[1:]:
                for kwarg in re.findall(r'`(\w+)`', row.split('|')[1]):
                    assert kwarg in arguments, f'{name}: kwarg {kwarg}'
                    found += 1
    assert found >= 10


def test_zoo_tables_name_registered_models_with_their_parameter_counts():
    zoo = section(README, 'Model zoo')
    names = set(re.findall(r'^\| `(\w+)`', zoo, re.M)) | set(re.findall(r'`((?:\w+_)?\w*resnet\w*)`', zoo))
    assert {'gsop_resnet50', 'gsop2_resnet101', 'isqrt_resnet50', 'preresnet164_cifar'} <= names
    for name in names - {'seresnet50', 'resnet50'}:
        assert name in timm.list_models(module='timm_gsop.*') or timm.is_model(name), name
    for name, params in re.findall(r'^\| `(\w+)` \| [^|]+ \| ([\d,]+) \|', zoo, re.M):
        model = timm.create_model(name, device='meta')
        assert sum(p.numel() for p in model.parameters()) == int(params.replace(',', '')), name


def two_commands():
    block = fenced_blocks(section(README, 'The two commands'), 'bash')[0]
    return [line.split('#')[0].strip() for line in block.splitlines() if line.split('#')[0].strip()]


def test_the_two_commands_are_the_demo_and_the_test_suite():
    assert two_commands() == ['timm-gsop demo', 'python -m pytest -q']
    ci = (ROOT / '.ci' / 'run').read_text()
    assert 'python -m pytest -q' in ci.splitlines()[-1]  # CI runs README's test command


@pytest.mark.slow
def test_the_two_commands_run_as_pasted(tmp_path):
    demo, tests = two_commands()
    proc = subprocess.run(demo.split(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and '-> OK' in proc.stdout, proc.stderr[-3000:]
    # the suite is this process's own: collected (every module imports), not run inside itself
    proc = subprocess.run(tests.split() + ['--collect-only'], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and ' tests collected' in proc.stdout + proc.stderr, proc.stdout[-3000:]
