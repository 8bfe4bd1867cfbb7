"""The README is code: every ```python block runs as pasted, each in a fresh interpreter, in README order.

The blocks that load from the Hub run against a Hub look-alike on 127.0.0.1 (``hub_server.py``) that holds
the repos they name (``timm/resnet50.a1_in1k``, ``YOUR_ORG/gsop_resnet50.in1k``: random weights of the right
architecture), with an empty Hugging Face cache; the files the blocks read (an exported folder, a released-code
checkpoint) are made first in their working folder. ``The two commands`` run as pasted in a slow test
(``timm-gsop demo`` in full; the test suite itself collected, not run inside itself). The Install block is what
``.ci/run`` executes.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import timm

import timm_gsop  # noqa: F401
from hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / 'README.md').read_text(encoding='utf-8')
TOKEN = 'hf_readme_test_token'


def fenced_blocks(text: str, language: str):
    return [m.group(1) for m in re.finditer(rf'^```{language}\n(.*?)^```$', text, re.M | re.S)]


def section(text: str, title: str) -> str:
    start = text.index(f'## {title}\n')
    end = text.find('\n## ', start + 1)
    return text[start:end if end != -1 else len(text)]


PYTHON_BLOCKS = fenced_blocks(README, 'python')

SEED = textwrap.dedent('''
    import sys
    from huggingface_hub import HfApi
    api = HfApi()
    for repo, folder in zip(sys.argv[1::2], sys.argv[2::2]):
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=folder)
''')


@pytest.fixture(scope='module')
def readme_world(tmp_path_factory):
    """A working folder with the files the README's blocks read, and a local Hub with the repos they load."""
    import safetensors.torch
    from timm_gsop.export import export_checkpoint
    from test_hub import to_released_gsop

    work = tmp_path_factory.mktemp('readme')
    torch.manual_seed(0)
    gsop = timm.create_model('gsop_resnet50').eval()
    torch.save(gsop.state_dict(), work / 'weights.pth')
    export_checkpoint(work / 'weights.pth', work / 'gsop_resnet50.in1k', model='gsop_resnet50', verify=False)
    (work / 'weights.pth').unlink()
    torch.save({'epoch': 95, 'arch': 'resnet50', 'best_prec1': 77.9, 'state_dict': to_released_gsop(gsop.state_dict())},
               work / 'model_best.pth.tar')
    resnet = work / 'hub' / 'resnet50.a1_in1k'
    resnet.mkdir(parents=True)
    safetensors.torch.save_file(timm.create_model('resnet50').state_dict(), str(resnet / 'model.safetensors'))

    server = HubServer(token=TOKEN, max_lifetime=900).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGINGFACE_'))}
    env.update(HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET='1', HF_HOME=str(work / 'hf_home'), HF_TOKEN=TOKEN,
               HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_PROGRESS_BARS='1', OMP_NUM_THREADS='1')
    seed = subprocess.run(
        [sys.executable, '-c', SEED, 'timm/resnet50.a1_in1k', str(resnet),
         'YOUR_ORG/gsop_resnet50.in1k', str(work / 'gsop_resnet50.in1k')],
        env=env, capture_output=True, text=True, timeout=600)
    assert seed.returncode == 0, seed.stderr[-3000:]
    env.pop('HF_TOKEN')  # the blocks load public repos, as a user without a token would
    yield work, env
    server.stop()


def test_readme_has_python_blocks_and_the_install_comes_first():
    assert len(PYTHON_BLOCKS) >= 6
    headings = re.findall(r'^## (.+)$', README, re.M)
    assert headings[:2] == ['Install', 'The two commands']


@pytest.mark.parametrize('index', range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_pasted(index, readme_world):
    work, env = readme_world
    block = PYTHON_BLOCKS[index]
    proc = subprocess.run([sys.executable, '-c', block], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f'README python block {index} failed:\n{block}\n{proc.stderr[-4000:]}'
    if 'features_only=True' in block:  # where the block says in a comment what it prints, it prints that
        assert 'torch.Size([2, 32896])' in proc.stdout
        assert str([torch.Size([256, 56, 56]), torch.Size([512, 28, 28]), torch.Size([1024, 14, 14]),
                    torch.Size([2048, 14, 14])]) in proc.stdout


def test_the_use_block_is_the_one_whose_output_is_checked():
    assert sum('features_only=True' in b and 'print(' in b for b in PYTHON_BLOCKS) == 1


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
