"""README.md and docs/*.md are code: every ```python block runs as pasted, each in a fresh interpreter, with no
network: the Hub repos the blocks load are in an offline Hugging Face cache (``timm/resnet50.a1_in1k``: random
weights of that architecture; ``YOUR_ORG/gsop_resnet50.in1k``: what README's Publish commands export), and the
files they read lie in the working folder (README's export command writes its folder as pasted; the released-code
checkpoint comes from ``official_reference.py``). Where a block says what it prints, the test checks it. The
rest keeps the text true of the code: links, package names and files, ``timm-gsop`` options and recipes, kwargs,
the zoo's parameter counts, and CI running README's test command."""
import argparse
import importlib
import importlib.util
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import timm
from timm.models.resnet import ResNet

import timm_gsop
from timm_gsop_cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ['README.md'] + sorted(f'docs/{p.name}' for p in (ROOT / 'docs').glob('*.md'))
TEXT = {name: (ROOT / name).read_text(encoding='utf-8') for name in DOCS}
BLOCKS = [(n, i, b) for n in DOCS for i, b in enumerate(re.findall(r'^```python\n(.*?)^```$', TEXT[n], re.M | re.S))]
# what a block's comments say it prints (the first line of the block that holds the key)
PRINTS = {'print(embed(x).shape)': 'torch.Size([2, 32896])', 'print(torch.equal(gsop(x), resnet(x)))': 'True',
          'print(weights.dtype, logits.dtype': 'torch.float32 torch.bfloat16 True'}


def bash_commands(text: str):
    """The commands of a text's ```bash blocks: continuation lines joined, comments dropped, shell-split."""
    blocks = re.findall(r'^```bash\n(.*?)^```$', text, re.M | re.S)
    lines = [line for b in blocks for line in b.replace('\\\n', ' ').splitlines()]
    return [words for line in lines if (words := shlex.split(line, comments=True))]


def _hf_cache(home: Path, repo: str, folder: Path) -> None:
    """``folder``'s files as the offline cache holds a download of ``repo`` (huggingface_hub's cache layout)."""
    base = home / 'hub' / f"models--{repo.replace('/', '--')}"
    (base / 'refs').mkdir(parents=True)
    (base / 'refs' / 'main').write_text('0' * 40)
    shutil.copytree(folder, base / 'snapshots' / ('0' * 40))


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    import safetensors.torch
    from official_reference import build_official
    work = tmp_path_factory.mktemp('docs')
    torch.manual_seed(0)  # the released main.py's model_best.pth.tar of GSoP-Net1 ResNet-50, DataParallel-wrapped
    released = build_official('resnet50', 1, 'channel').state_dict()
    released = {f'module.{k}': v for k, v in released.items() if not k.endswith('num_batches_tracked')}
    torch.save(dict(epoch=95, arch='resnet50', best_prec1=77.9, state_dict=released), work / 'model_best.pth.tar')
    export = next(w for w in bash_commands(TEXT['README.md']) if w[:2] == ['timm-gsop', 'export'])
    (work / export[2]).parent.mkdir(parents=True)  # what timm's train.py saves for a GSoP-Net1 run
    args = argparse.Namespace(model='gsop_resnet50', num_classes=1000, model_kwargs={}, gp=None, in_chans=None,
                              epochs=95, opt='momentum', lr_base=0.1, weight_decay=1e-4, model_ema=False)
    torch.save({'epoch': 94, 'version': 2, 'metric': 77.0, 'args': args,
                'state_dict': timm.create_model('gsop_resnet50').state_dict()}, work / export[2])
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(export[1:]) == 0  # as pasted
    finally:
        os.chdir(cwd)
    (work / 'resnet50').mkdir()
    resnet = timm.create_model('resnet50').state_dict()
    safetensors.torch.save_file(resnet, str(work / 'resnet50' / 'model.safetensors'))
    _hf_cache(work / 'hf_home', 'timm/resnet50.a1_in1k', work / 'resnet50')
    _hf_cache(work / 'hf_home', 'YOUR_ORG/gsop_resnet50.in1k', work / export[export.index('--out') + 1])
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGINGFACE_'))}
    env.update(HF_HOME=str(work / 'hf_home'), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    return work, env


@pytest.mark.parametrize('name,index,block', [  # docs/clients.md's blocks need the clients: with them (-m clients)
    pytest.param(n, i, b, id=f'{n}:{i}', marks=[pytest.mark.clients] if n == 'docs/clients.md' else [])
    for n, i, b in BLOCKS])
def test_python_block_runs_as_pasted(name, index, block, world):
    work, env = world
    proc = subprocess.run([sys.executable, '-c', block], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f'{name} block {index}:\n{block}\n{proc.stderr[-4000:]}'
    for key, line in PRINTS.items():
        assert key not in block or line in proc.stdout, f'{name} block {index}: {line!r} not printed:\n{proc.stdout}'


def test_readme_push_dry_run_as_pasted(world, capsys):
    work, _ = world
    push = next(w for w in bash_commands(TEXT['README.md']) if w[:2] == ['timm-gsop', 'push'] and '--dry-run' in w)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(push[1:]) == 0
    finally:
        os.chdir(cwd)
    assert 'model.safetensors' in capsys.readouterr().out


@pytest.mark.parametrize('name', DOCS)
def test_links_names_options_and_kwargs_of_the_text_exist(name):
    text = TEXT[name]
    for target in re.findall(r'\]\(([^)#]+)(?:#[^)]*)?\)', text):
        assert target.startswith('http') or ((ROOT / name).parent / target).exists(), f'link to {target}'
    for dotted in re.findall(r'`timm_gsop\.([\w.]+\w)', text):  # a module or a name in one
        module, _, attr = f'timm_gsop.{dotted}'.rpartition('.')
        assert hasattr(importlib.import_module(module), attr) or importlib.util.find_spec(f'{module}.{attr}'), dotted
    for path in re.findall(r'`((?:timm_gsop|tests|benchmarks|hub_cards)/[\w/.]+)`', text):
        assert (ROOT / path).exists(), path
    from timm_gsop.recipes import list_recipes
    parser = build_parser()
    for words in bash_commands(text):
        for recipe in re.findall(r'\$\(timm-gsop recipe (\S+)\)', ' '.join(words)):
            assert recipe in list_recipes(), recipe
        if words[0] == 'timm-gsop' and words[1] != 'run':  # run passes its options to the script
            assert parser.parse_known_args(words[1:])[1] == [], shlex.join(words)
    arguments = set(inspect.signature(timm_gsop.GSoPResNet).parameters) | set(inspect.signature(ResNet).parameters)
    for table in re.findall(r'^\| kwarg \|.*?\n((?:\|.*\n)+)', text, re.M):
        for row in table.splitlines()[1:]:
            assert set(re.findall(r'`(\w+)`', row.split('|')[1])) <= arguments, row


def test_zoo_parameter_counts_and_ci_runs_readmes_test_command():
    zoo = TEXT['README.md'].split('\n## Model zoo\n')[1].split('\n## ')[0]
    for name, params in re.findall(r'^\| `(\w+)` \| [^|]+ \| ([\d,]+) \|', zoo, re.M):
        model = timm.create_model(name, device='meta')
        assert sum(p.numel() for p in model.parameters()) == int(params.replace(',', '')), name
    commands = bash_commands(TEXT['README.md'].split('\n## The two commands\n')[1].split('\n## ')[0])
    assert [' '.join(c) for c in commands] == ['timm-gsop demo', 'python -m pytest -q']
    assert 'python -m pytest -q' in (ROOT / '.ci' / 'run').read_text()
