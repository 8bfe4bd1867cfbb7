"""benchmarks/compare.py runs end to end (a smoke test that the script does not rot; no timing is asserted)."""
import importlib.util
from pathlib import Path

import pytest

from conftest import tiny_kwargs


def _spec(name, **extra):
    return ':'.join([name] + [f'{k}={v!r}'.replace(' ', '') for k, v in {**tiny_kwargs(name), **extra}.items()])


@pytest.fixture(scope='module')
def compare():
    spec = importlib.util.spec_from_file_location('compare', Path(__file__).parents[1] / 'benchmarks' / 'compare.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_prints_ratio_table(compare, capsys):
    net, backbone = _spec('gsop_resnet50'), _spec('gsop_resnet50', gsop_stages=(0, 0, 0, 0))
    assert compare.parse_spec(backbone)[1] == {**tiny_kwargs('gsop_resnet50'), 'gsop_stages': (0, 0, 0, 0)}
    compare.main([net, '--baseline', backbone, '--batch-size', '2', '--img-size', '32', '--threads', '1', '--repeats', '1'])
    lines = capsys.readouterr().out.splitlines()
    rows = {tuple(line.split()[:2]): line.split() for line in lines if line.startswith(('infer ', 'train '))}
    assert set(rows) == {(task, spec) for task in ('infer', 'train') for spec in (net, backbone)}
    assert rows['train', backbone][-3:] == ['1.000', '[1.000,', '1.000]']  # the baseline against itself


def test_compare_ops(compare, capsys):
    compare.main(['--ops', '--ops-batch', '1', '--repeats', '1', '--threads', '1'])  # asserts the formulations agree, then times them
    out = capsys.readouterr().out
    assert 'isqrt 5 + triangle' in out and 'released' in out
