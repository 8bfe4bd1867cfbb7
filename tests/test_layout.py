"""The package's layering (ops -> modules -> model families -> tooling -> CLI: a lower layer never imports a higher
one; model code stands on torch, timm and itself, so it merges into timm) and no private torch API anywhere:
every dotted name in the package and in benchmarks/ is checked, not a list of past findings."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted([*ROOT.glob('timm_gsop/**/*.py'), ROOT / 'timm_gsop_cli.py', *ROOT.glob('benchmarks/**/*.py')])
STDLIB_OK = {'math', 'typing', 'warnings', 'itertools', 'contextlib', 'functools'}


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[1] if len(rel) > 2 and rel[1] in ('layers', 'models') else 'cli' if rel[0] == 'timm_gsop_cli.py' \
        else 'benchmarks' if rel[0] == 'benchmarks' else 'tooling'


def _imports(tree: ast.AST, path: Path):
    """Absolute dotted names of the modules a file imports (relative imports resolved)."""
    package = '.'.join(path.relative_to(ROOT).with_suffix('').parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')
                base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            yield base


def _dotted(node: ast.AST):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


@pytest.mark.parametrize('path', FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_layering_and_no_private_torch(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    layer, imported = _layer(path), set(_imports(tree, path))
    ours = {m for m in imported if m.split('.')[0] in ('timm_gsop', 'timm_gsop_cli')}
    if layer == 'layers':
        assert all(m.startswith('timm_gsop.layers') for m in ours), ours
    if layer == 'models':
        assert all(m.startswith(('timm_gsop.layers', 'timm_gsop.models')) for m in ours), ours
        assert {m.split('.')[0] for m in imported} <= {'torch', 'timm', 'timm_gsop'} | STDLIB_OK, imported
    if layer in ('layers', 'models', 'tooling') and path.name != '__main__.py':
        assert 'timm_gsop_cli' not in {m.split('.')[0] for m in imported}
    names = [m.split('.') for m in imported] + [d for n in ast.walk(tree) if (d := _dotted(n))]
    private = [n for n in names if n[0] == 'torch' and any(p.startswith('_') and not p.startswith('__') for p in n)]
    assert not private, f'private torch API: {private}'
    if layer not in ('layers', 'models'):  # model code may use timm's internals as timm's own families do
        private = [m for m in imported if m.startswith('timm') and any(p.startswith('_') for p in m.split('.'))]
        assert not private, f'private timm API outside the model code: {private}'
    bases = [_dotted(b) for n in ast.walk(tree) if isinstance(n, ast.ClassDef) for b in n.bases]
    assert ['torch', 'autograd', 'Function'] not in bases and ['Function'] not in bases  # only opt-in, own file
