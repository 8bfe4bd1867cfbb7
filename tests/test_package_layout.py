"""How the package is put together: the model code (``layers/``, ``models/``) imports only torch, timm, the
standard library and itself, layer by layer (ops -> modules -> model families -> tooling -> CLI); no file of it
shares a name with one of timm's; nothing in the package reads private torch state, pokes the C library or
builds a command line."""
import ast
import re
import sys
from pathlib import Path

import pytest
import timm

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'timm_gsop'
# each module may import only modules of a lower rank (a module's own folder counts as its rank)
RANKS = {
    'layers.second_order': 0, 'layers.gsop': 1, 'layers.cov_pool': 1, 'layers': 2,
    'models.gsop_resnet': 3, 'models.preresnet_cifar': 4, 'models.covpool_net': 4, 'models': 5, 'version': 0,
    'zoo': 6, 'run': 6, 'onnx_export': 6, 'checkpoints': 7, 'cards': 7, 'bench': 7,
    'export': 8, 'push': 9, 'demo': 9, 'recipes': 6, '': 10, '__main__': 11,  # '': the package's __init__
}


def _sources():
    return sorted(PACKAGE.rglob('*.py'))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: Path):
    """(absolute module name, level, relative module) for every import in the file, in functions too."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, 0, ''
        elif isinstance(node, ast.ImportFrom):
            yield node.module or '', node.level, node.module or ''


def _resolve(path: Path, level: int, module: str, names=()) -> str:
    """The timm_gsop-relative name a relative import refers to."""
    base = _module_name(path).split('.') if path.name == '__init__.py' else _module_name(path).split('.')[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return '.'.join([p for p in base if p] + ([module] if module else []))


def _rank(name: str) -> int:
    while name not in RANKS:
        name = name.rpartition('.')[0]
    return RANKS[name]


@pytest.mark.parametrize('path', [p for p in _sources() if p.parent.name in ('layers', 'models')],
                         ids=lambda p: f'{p.parent.name}/{p.name}')
def test_model_code_imports_only_torch_timm_stdlib_and_itself(path):
    for module, level, relative in _imports(path):
        if level:
            target = _resolve(path, level, relative)
            assert target.split('.')[0] in ('layers', 'models'), f'{path.name} imports timm_gsop.{target}'
            if path.parent.name == 'layers':
                assert target.startswith('layers'), f'{path.name} (a layer) imports {target}'
        else:
            top = module.split('.')[0]
            assert top in ('torch', 'timm') or top in sys.stdlib_module_names, f'{path.name} imports {module}'


@pytest.mark.parametrize('path', _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    own = _rank(_module_name(path))
    for module, level, relative in _imports(path):
        if level:
            target = _resolve(path, level, relative)
        elif module == 'timm_gsop' or module.startswith('timm_gsop.'):
            target = module.partition('.')[2] or 'models'  # the package itself: its layers and models
        elif module == 'timm_gsop_cli':
            assert path.name == '__main__.py', f'{path.name} imports the CLI'  # `python -m timm_gsop`
            continue
        else:
            continue
        if target == '':  # `from . import __version__`
            target = 'version'
        if path.name in ('__init__.py', '__main__.py') and _module_name(path) in ('', 'layers', 'models'):
            continue  # a package's __init__ gathers what is below it
        assert _rank(target) < own or target.startswith(_module_name(path) + '.'), \
            f'timm_gsop.{_module_name(path)} (rank {own}) imports timm_gsop.{target} (rank {_rank(target)})'


def test_every_module_has_a_rank():
    for path in _sources():
        _rank(_module_name(path) or '')


def test_no_model_code_file_shares_a_name_with_timms():
    timm_root = Path(timm.__file__).parent
    for folder in ('layers', 'models'):
        ours = {p.name for p in (PACKAGE / folder).glob('*.py')} - {'__init__.py'}
        assert ours and not ours & {p.name for p in (timm_root / folder).glob('*.py')}, folder


@pytest.mark.parametrize('path', _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_torch_state_or_c_library_tricks(path):
    text = path.read_text()
    for pattern in (r'torch\._C\b', r'_global_\w*hook', r'torch\.nn\.modules\.module\._', r'\bctypes\b',
                    r'/proc/self', r'mallopt', r'torch\._functorch', r'autograd\.Function\b',
                    r'argparse\.ArgumentParser\(', r'add_parser\('):  # the command line is timm_gsop_cli's
        assert not re.search(pattern, text), f'{path.name}: {pattern}'
