"""`timm-gsop list` / `python -m timm_gsop list`: the zoo table."""
import subprocess
import sys

import pytest

from timm_gsop.cli import main

EXPECTED = {
    'gsop_resnet50': ('28,285,224', '12.79'),
    'gsop_resnet101': ('47,277,352', '20.22'),
    'gsop2_resnet50': ('58,278,568', '13.18'),
    'gsop2_resnet101': ('77,270,696', '20.60'),
}


def _rows(text):
    return {line.split()[0]: line.split() for line in text.splitlines()[2:] if line.strip()}


def test_list_prints_zoo_with_params_and_gflops(capsys):
    assert main(['list']) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(EXPECTED) <= set(rows)
    for name, (params, gflops) in EXPECTED.items():
        assert rows[name][1:4] == [params, gflops, '3x224x224']
        assert rows[name][4:] == ['-']  # no GSoP-Net weights exist anywhere


def test_list_filter_and_no_match(capsys):
    assert main(['list', 'gsop2_resnet*']) == 0
    assert set(_rows(capsys.readouterr().out)) == {'gsop2_resnet50', 'gsop2_resnet101'}
    assert main(['list', 'nothing*']) == 1
    assert 'No timm-gsop model matches' in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert 'list' in capsys.readouterr().out


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit) as e:
        main(['frobnicate'])
    assert e.value.code == 2


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, '-m', 'timm_gsop', 'list', 'gsop_resnet50'],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert '28,285,224' in out.stdout
