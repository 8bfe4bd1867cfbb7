"""timm's own ``tests/test_models.py`` (from the sdist of the installed timm: ``python tests/get_timm_tests.py``) is
the model contract, run once, on the model code merged into a copy of timm as timm would merge it:
``timm_gsop/layers/*.py`` into ``timm/layers/``, ``timm_gsop/models/*.py`` into ``timm/models/`` with one import line
per model file, in an interpreter that cannot import ``timm_gsop``. Every merged model computes what the plugin's
computes. The default run takes timm's forward / backward / config / features / intermediates / pretrained-loading
tests; its TorchScript, fx and prune-contract tests take minutes on the full-size models: ``-m slow``."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import timm

from conftest import TIMM_SLOW_TESTS, run_timm_tests, tiny_kwargs
from timm_gsop.zoo import list_gsop_models

PACKAGE = Path(__file__).resolve().parents[1] / 'timm_gsop'
BLOCK_PLUGIN = '''import sys


class _NoTimmGsop:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'timm_gsop':
            raise ModuleNotFoundError(f'{name}: this interpreter runs timm with the GSoP model files merged in')


sys.meta_path.insert(0, _NoTimmGsop())
'''
CHECK_OUTPUTS = '''import sys
import torch
import timm
assert timm.__file__.startswith(sys.argv[2]), timm.__file__
for name, (kwargs, state_dict, x, expected) in torch.load(sys.argv[1]).items():
    model = timm.create_model(name, **kwargs).eval()
    assert type(model).__module__.startswith('timm.models.'), type(model).__module__
    model.load_state_dict(state_dict)
    with torch.no_grad():
        assert torch.equal(model(x), expected), name
    print(name)
'''


@pytest.fixture(scope='module')
def merged_timm(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('merged')
    shutil.copytree(Path(timm.__file__).parent, root / 'timm', ignore=shutil.ignore_patterns('__pycache__'))
    for folder in ('layers', 'models'):
        for file in sorted((PACKAGE / folder).glob('[!_]*.py')):
            assert not (root / 'timm' / folder / file.name).exists(), f'{folder}/{file.name} is a file of timm'
            shutil.copy(file, root / 'timm' / folder / file.name)
    init = root / 'timm' / 'models' / '__init__.py'
    families = sorted((PACKAGE / 'models').glob('[!_]*.py'))
    init.write_text(init.read_text() + ''.join(f'from .{f.stem} import *\n' for f in families))
    (root / 'sitecustomize.py').write_text(BLOCK_PLUGIN)
    return root


def test_the_merged_models_compute_what_the_plugins_compute(merged_timm, tmp_path):
    cases = {}
    for name in list_gsop_models():
        torch.manual_seed(0)
        model = timm.create_model(name, **tiny_kwargs(name)).eval()
        x = torch.randn(2, 3, 32, 32) if 'cifar' in name else torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            cases[name] = (tiny_kwargs(name), model.state_dict(), x, model(x))
    torch.save(cases, tmp_path / 'cases.pt')
    env = dict(os.environ, PYTHONPATH=str(merged_timm))
    proc = subprocess.run([sys.executable, '-c', CHECK_OUTPUTS, str(tmp_path / 'cases.pt'), str(merged_timm)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == list(cases)


def _passed_models(proc: subprocess.CompletedProcess) -> set:
    summary = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 and ' passed' in proc.stdout and ' failed' not in proc.stdout, summary
    passed = [line for line in proc.stdout.splitlines() if line.startswith('PASSED ') and '[' in line]
    return {line.split('[', 1)[1].split(']')[0].split('-')[-1].split('.')[0] for line in passed}


def test_timms_model_tests_pass_on_every_merged_model(merged_timm):
    proc = run_timm_tests('-rA', '-k', ' and '.join(f'not {t}' for t in TIMM_SLOW_TESTS), pythonpath=(merged_timm,))
    assert _passed_models(proc) == set(list_gsop_models())  # on exactly this package's models


@pytest.mark.slow
def test_timms_torchscript_fx_and_prune_tests_pass_on_every_merged_model(merged_timm):
    proc = run_timm_tests('-rA', '-k', ' or '.join(TIMM_SLOW_TESTS), pythonpath=(merged_timm,))
    assert _passed_models(proc) == set(list_gsop_models())
