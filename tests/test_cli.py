"""`timm-gsop`: the zoo table, and the command line as a Unix tool: fast -h with defaults, one-line errors with
exit status 2 for bad values and unknown models, an install hint for a missing extra."""
import argparse
import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest

import timm_gsop_cli
from timm_gsop.zoo import PAPER_COMPARISON
from timm_gsop_cli import build_parser, main

EXPECTED = {
    'gsop_resnet50': ('28,285,224', '12.79'),
    'gsop_resnet101': ('47,277,352', '20.22'),
    'gsop2_resnet50': ('58,278,568', '13.18'),
    'gsop2_resnet101': ('77,270,696', '20.60'),
}
COMMANDS = ('list', 'bench', 'onnx', 'export', 'push', 'card', 'run', 'recipe', 'demo')


def _rows(text):
    return {line.split()[0]: line.split() for line in text.splitlines()[2:] if line.strip() and '  ' in line}


def test_list_prints_zoo_with_params_and_gflops(capsys):
    assert main(['list', 'gsop*resnet*']) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(EXPECTED) <= set(rows)
    for name, (params, gflops) in EXPECTED.items():
        assert rows[name][1:4] == [params, gflops, '3x224x224']
        assert rows[name][4:] == ['-']  # no GSoP-Net weights exist anywhere


def test_list_filter_and_no_match(capsys):
    assert main(['list', 'gsop2_resnet*']) == 0
    assert set(_rows(capsys.readouterr().out)) == {'gsop2_resnet50', 'gsop2_resnet101'}
    assert main(['list', 'nothing*']) == 2
    assert capsys.readouterr().err == "timm-gsop list: error: no timm-gsop model matches 'nothing*'\n"


def test_list_shows_the_whole_family(capsys):
    assert main(['list', '*cifar']) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {'preresnet164_cifar', 'gsop_preresnet164_cifar', 'gsop2_preresnet164_cifar'}
    assert rows['preresnet164_cifar'][1:4] == ['1,726,388', '0.50', '3x32x32']
    assert main(['list', 'isqrt*']) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows['isqrt_resnet50'][1:4] == ['56,929,832', '13.11', '3x224x224']


def test_list_compare(capsys):
    assert main(['list', '--compare']) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert 'top-1 err (reported)' in header and 'top-5 err (reported)' in header
    rows = {line.split()[0]: line for line in out.splitlines()[2:8]}
    assert list(rows) == [name for name, *_ in PAPER_COMPARISON] == [
        'resnet50', 'seresnet50', 'cbamresnet50', 'isqrt_resnet50', 'gsop_resnet50', 'gsop2_resnet50']
    assert '25,557,032' in rows['resnet50'] and '8.18' in rows['resnet50']
    assert '56,929,832' in rows['isqrt_resnet50'] and '22.14' in rows['isqrt_resnet50']
    assert '28,285,224' in rows['gsop_resnet50'] and '12.79' in rows['gsop_resnet50']
    assert '22.02' in rows['gsop_resnet50'] and '5.88' in rows['gsop_resnet50']
    assert '21.19' in rows['gsop2_resnet50'] and '5.64' in rows['gsop2_resnet50']
    assert 'as reported by' in out
    assert main(['list', '--compare', 'gsop*']) == 0
    assert len(_rows(capsys.readouterr().out)) == 2
    assert main(['list', '--compare', 'nothing*']) == 2


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert 'list' in capsys.readouterr().out


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit) as e:
        main(['frobnicate'])
    assert e.value.code == 2


def test_every_command_answers_help_at_once_without_torch():
    """The parser needs no torch: `-h` of every command runs in a fresh interpreter in well under a second."""
    for command in ('',) + COMMANDS:
        argv = [sys.executable, '-c', 'import sys, timm_gsop_cli; sys.exit(timm_gsop_cli.main(sys.argv[1:]))']
        start = time.perf_counter()
        proc = subprocess.run(argv + ([command] if command else []) + ['-h'], capture_output=True, text=True,
                              timeout=60)
        seconds = time.perf_counter() - start
        assert proc.returncode == 0 and 'usage: timm-gsop' in proc.stdout, proc.stderr
        assert seconds < 1.0, f'{command} -h took {seconds:.2f} s'
    code = ('import sys, timm_gsop_cli; timm_gsop_cli.build_parser(); '
            "print(sorted(m for m in ('torch', 'timm', 'timm_gsop') if m in sys.modules))")
    assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True).stdout.strip() == '[]'


def test_every_option_has_help_and_shows_its_default():
    """Every option that takes a value (and every optional positional) states its default once, in its help:
    argparse's value where it means what it says, else words; flags (off unless given) and required arguments
    state none. Never ``(default: X) (default: None)``, never ``(default: True)`` on a ``--no-...`` flag."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == 'subcommand').choices
    assert set(subparsers) == set(COMMANDS)
    for name, sub in [('', parser), *subparsers.items()]:
        formatter = sub._get_formatter()
        stated = 0
        for action in sub._actions:
            if action.dest == 'help' or isinstance(action, argparse._SubParsersAction):
                continue
            what = f'{name} {"/".join(action.option_strings) or action.dest}'
            assert action.help, f'{what} has no help text'
            text = ' '.join(formatter._expand_help(action).split())
            count = text.count('(default')
            stated += count
            assert not re.search(r'\(default: (None|True|False|\[\]|)\)', text), (what, text)
            if action.nargs == 0 or action.required or action.nargs == argparse.REMAINDER:
                assert count <= 1, (what, text)  # a flag may say what happens without it, once
                continue
            assert count == 1, (what, text)
            if '(default' not in action.help:  # appended by the formatter: the value argparse uses
                value = action.default
                shown = ' '.join(map(str, value)) if isinstance(value, list) else str(value)
                assert text.endswith(f'(default: {shown})'), (what, text)
        # what -h prints: each statement once, no doubles added by the formatter
        assert ' '.join(sub.format_help().split()).count('(default') == stated, name
    export_help = ' '.join(subparsers['export'].format_help().split())
    assert "(default: the checkpoint's args.model) --ema" in export_help
    assert 'export the raw (non-EMA) weights --' in export_help  # --no-ema: no default of its own


@pytest.mark.parametrize('argv,message', [
    (['demo', '--epochs', '0'], 'argument --epochs: must be >= 1, got 0'),
    (['demo', '--corr', '0.9'], 'argument --corr: must be in (0, 0.707)'),
    (['bench', '--batch-size', 'x'], "argument --batch-size: expected an integer, got 'x'"),
    (['bench', '--model', 'nope'], "unknown model 'nope'"),
    (['card', 'nope'], "unknown model 'nope'"),
    (['card', 'resnet50'], "'resnet50' is not a timm-gsop model"),
    (['onnx', 'nope', 'x.onnx'], "unknown model 'nope'"),
    (['export', 'does_not_exist.pth', '--out', 'x'], 'No checkpoint file at does_not_exist.pth'),
    (['export', 'x.pth', '--out', 'x', '--model', 'nope'], "unknown model 'nope'"),
    (['recipe', 'nope'], "Unknown recipe 'nope'"),
    (['run', 'no_such_script.py'], 'no such script: no_such_script.py'),
    (['push', '.', '--repo-id', 'not-a-repo-id', '--dry-run'], '--repo-id must be ORG/NAME'),
    (['card', 'gsop_resnet50', '--model-kwargs', 'oops'], "model kwargs are key=value pairs, got 'oops'"),
])
def test_bad_values_and_unknown_models_are_one_line_errors_with_status_2(argv, message, tmp_path, monkeypatch,
                                                                         capsys):
    # in-process (an exception escaping main fails the test as a traceback would); the console entry point
    # itself is test_python_dash_m_entry_point
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 or lines[0].startswith('usage:'), err  # argparse's own: usage + error
    assert message in lines[-1], err
    assert lines[-1].startswith(f'timm-gsop {argv[0]}: error: ')
    assert not any(tmp_path.iterdir())  # a refused command writes nothing


def test_missing_onnx_extra_gives_an_install_hint(capsys, monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'onnxscript' else real(name, *a))
    assert main(['onnx', 'gsop_resnet50', str(tmp_path / 'm.onnx')]) == 1
    err = capsys.readouterr().err
    assert err == ("timm-gsop onnx: error: the dynamo exporter needs onnxscript: pip install 'timm-gsop[onnx]' "
                   '(or use --exporter torchscript)\n')


def test_version(capsys):
    assert main(['--version']) == 0
    from timm_gsop import __version__
    assert capsys.readouterr().out.strip() == f'timm-gsop {__version__}'


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, '-m', 'timm_gsop', 'list', 'gsop_resnet50'],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert '28,285,224' in out.stdout
