"""The model code merged into timm as timm would merge it: ``timm_gsop/layers/*.py`` copied into ``timm/layers/``,
``timm_gsop/models/*.py`` into ``timm/models/`` and one import line per model file in ``timm/models/__init__.py``,
in a copy of the installed timm. A fresh interpreter that cannot import ``timm_gsop`` runs timm's own
``tests/test_models.py`` on the GSoP models there, and every model computes what the plugin's computes."""
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
# first on the merged interpreter's path: an import of timm_gsop fails there
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
try:
    import timm_gsop
except ModuleNotFoundError:
    pass
else:
    raise AssertionError('timm_gsop is importable')
cases = torch.load(sys.argv[1])
for name, (kwargs, state_dict, x, expected) in cases.items():
    model = timm.create_model(name, **kwargs).eval()
    assert type(model).__module__.startswith('timm.models.'), type(model).__module__
    model.load_state_dict(state_dict)
    with torch.no_grad():
        assert torch.equal(model(x), expected), name
print(len(cases), 'models equal')
'''


@pytest.fixture(scope='module')
def timm_with_gsop(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('merged')
    shutil.copytree(Path(timm.__file__).parent, root / 'timm', ignore=shutil.ignore_patterns('__pycache__'))
    for folder in ('layers', 'models'):
        for file in sorted((PACKAGE / folder).glob('[!_]*.py')):
            target = root / 'timm' / folder / file.name
            assert not target.exists(), f'{folder}/{file.name} would replace timm\'s own file'
            shutil.copy(file, target)
    init = root / 'timm' / 'models' / '__init__.py'
    lines = [f'from .{file.stem} import *\n' for file in sorted((PACKAGE / 'models').glob('[!_]*.py'))]
    init.write_text(init.read_text() + ''.join(lines))
    (root / 'sitecustomize.py').write_text(BLOCK_PLUGIN)
    return root


def test_every_model_computes_what_the_plugins_computes(timm_with_gsop, tmp_path):
    cases = {}
    for name in list_gsop_models():
        kwargs = tiny_kwargs(name)
        torch.manual_seed(0)
        model = timm.create_model(name, **kwargs).eval()
        x = torch.randn(2, 3, 32, 32) if 'cifar' in name else torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            cases[name] = (kwargs, model.state_dict(), x, model(x))
    torch.save(cases, tmp_path / 'cases.pt')
    env = dict(os.environ, PYTHONPATH=str(timm_with_gsop))
    proc = subprocess.run([sys.executable, '-c', CHECK_OUTPUTS, str(tmp_path / 'cases.pt'), str(timm_with_gsop)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f'{len(cases)} models equal' in proc.stdout


def test_timms_own_model_tests_pass_on_the_merged_models(timm_with_gsop):
    proc = run_timm_tests('-k', ' and '.join(f'not {name}' for name in TIMM_SLOW_TESTS), pythonpath=(timm_with_gsop,))
    summary = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, summary
    assert ' passed' in proc.stdout and ' failed' not in proc.stdout and ' error' not in proc.stdout, summary
    # on the merged models: the plugin would import timm_gsop for models timm lacks, which this interpreter cannot
