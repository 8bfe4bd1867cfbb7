"""timm's own ``tests/test_models.py``, from the sdist of the installed timm, on every model this package registers.

``python tests/get_timm_tests.py`` fetches it (README: Install; ``.ci/run`` does it); ``timm_suite_plugin.py``
narrows timm's model lists to this package's models. The default run takes timm's forward / backward / config
/ features / intermediates / pretrained-loading tests; its TorchScript, fx and prune-contract tests take several
minutes for the 17 full-size models and run with ``-m slow``.
"""
import subprocess

import pytest

from conftest import TIMM_SLOW_TESTS as SLOW_TESTS, run_timm_tests as _run_timm_tests


def _summary(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-6000:] + proc.stderr[-3000:]


def test_timm_test_models_fast_part_passes_on_every_registered_model():
    proc = _run_timm_tests('-rA', '-k', ' and '.join(f'not {name}' for name in SLOW_TESTS))
    assert proc.returncode == 0, _summary(proc)
    assert ' passed' in proc.stdout and ' failed' not in proc.stdout and ' error' not in proc.stdout, _summary(proc)
    # it ran on this package's models, and only on them (-rA lists every passed test with its parameters)
    from timm_gsop.zoo import list_gsop_models
    passed = [line for line in proc.stdout.splitlines() if line.startswith('PASSED ') and '[' in line]
    names = {line.split('[', 1)[1].split(']')[0].split('-')[-1].split('.')[0] for line in passed}
    assert names == set(list_gsop_models()), _summary(proc)
    for test in ('test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_forward_features'):
        assert sum(f'::{test}[' in line for line in passed) >= len(names), test


@pytest.mark.slow
def test_timm_test_models_torchscript_fx_and_prune_pass_on_every_registered_model():
    proc = _run_timm_tests('-k', ' or '.join(SLOW_TESTS))
    assert proc.returncode == 0, _summary(proc)
    assert ' passed' in proc.stdout and ' failed' not in proc.stdout, _summary(proc)
