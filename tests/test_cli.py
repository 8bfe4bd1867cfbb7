"""`timm-gsop`: the zoo table, and the command line as a Unix tool: fast -h with defaults, one-line errors with
exit status 2 for bad values and unknown models, an install hint for a missing extra."""
import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest

import timm_gsop_cli
from timm_gsop_cli import build_parser, main

EXPECTED = {
    'gsop_resnet50': ('28,285,224', '12.79'),
    'gsop_resnet101': ('47,277,352', '20.22'),
    'gsop2_resnet50': ('58,278,568', '13.18'),
    'gsop2_resnet101': ('77,270,696', '20.60'),
}
COMMANDS = ('list', 'bench', 'onnx', 'export', 'push', 'card', 'run', 'recipe', 'demo')


def _rows(text):
    return {line.split()[0]: line.split() for line in text.splitlines()[2:] if line.strip()}


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
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == 'subcommand').choices
    assert set(subparsers) == set(COMMANDS)
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest in ('help',) or action.help == '==SUPPRESS==':
                continue
            assert action.help, f'{name} {action.option_strings or action.dest} has no help text'
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, [], '==SUPPRESS==') \
                    and action.dest != 'help':
                assert '(default:' in text, (name, action.dest)


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


def test_the_library_never_imports_the_command_line():
    """Layers: ops -> modules -> model families -> checkpoints / export / cards / push -> CLI."""
    root = os.path.dirname(os.path.abspath(timm_gsop_cli.__file__))
    for folder, _, files in os.walk(os.path.join(root, 'timm_gsop')):
        for name in files:
            if name.endswith('.py') and name != '__main__.py':
                text = open(os.path.join(folder, name), encoding='utf-8').read()
                assert not re.search(r'^\s*(from|import) timm_gsop_cli', text, re.M), name
                assert 'argparse.ArgumentParser(' not in text and 'add_parser(' not in text, name


def _imported_package_modules(path: str, package: str) -> set:
    """The timm_gsop modules a file imports (absolute or relative), as dotted names under timm_gsop."""
    import ast
    tree = ast.parse(open(path, encoding='utf-8').read())
    here = package.split('.')
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith('timm_gsop'))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                name = '.'.join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ''
            if name.startswith('timm_gsop'):
                found.add(name)
                found.update(f'{name}.{a.name}' for a in node.names)
    return found


def test_lower_layers_never_import_higher_ones():
    """ops (layers) -> modules -> model families (models) -> checkpoints / export / cards / push / tools -> CLI."""
    root = os.path.join(os.path.dirname(os.path.abspath(timm_gsop_cli.__file__)), 'timm_gsop')
    tools = {f'timm_gsop.{n}' for n in ('zoo', 'checkpoints', 'export', 'cards', 'push', 'onnx_export', 'bench',
                                         'run', 'recipes', 'demo')}
    for sub, forbidden in (('layers', {'timm_gsop.models'} | tools), ('models', tools)):
        folder = os.path.join(root, sub)
        for name in os.listdir(folder):
            if name.endswith('.py'):
                imported = _imported_package_modules(os.path.join(folder, name), f'timm_gsop.{sub}')
                bad = {m for m in imported if any(m == f or m.startswith(f + '.') for f in forbidden)}
                assert not bad, f'timm_gsop/{sub}/{name} imports {sorted(bad)} from a higher layer'
