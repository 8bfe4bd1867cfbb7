"""Fetch the test suite of the installed timm from its sdist (``pip download``), for ``tests/test_timm_suite.py``.

    python tests/get_timm_tests.py          # -> .timm-tests/timm-<version>/tests/test_models.py

timm's own ``tests/test_models.py`` is the contract every model this package registers must keep. It is not in
the timm wheel; this takes it from the sdist of exactly the installed version (nothing of it is committed here).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# timm's pytest markers (its pyproject.toml), so the fetched tests run without warnings about unknown marks
PYTEST_INI = """[pytest]
markers =
    base: timm's basic model tests
    forward: per-model forward tests
    backward: per-model backward tests
    cfg: config tests
    cfg_nonstd: non-standard config tests
    torchscript: torchscript tests
    features: feature extraction tests
    fxforward: torch fx forward tests
    fxbackward: torch fx backward tests
    timeout: per-test timeout (pytest-timeout, not installed here)
"""


def timm_version() -> str:
    import timm
    return timm.__version__


def tests_dir(version: str = '') -> Path:
    """Where the fetched tests of timm ``version`` (default: the installed one) live."""
    base = Path(os.environ.get('TIMM_TESTS_DIR') or ROOT / '.timm-tests')
    return base / f'timm-{version or timm_version()}' / 'tests'


def fetch(version: str = '') -> Path:
    version = version or timm_version()
    target = tests_dir(version)
    if (target / 'test_models.py').is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
                        f'timm=={version}', '-d', tmp], check=True)
        sdist = next(Path(tmp).glob('timm-*.tar.gz'))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        try:
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(f'timm-{version}/tests/')]
                tar.extractall(staging, members=members, filter='data')
            (target.parent / 'pytest.ini').write_text(PYTEST_INI)
            os.replace(staging / f'timm-{version}' / 'tests', target)  # the whole folder or nothing
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--version', default='', help='timm version (default: the installed one)')
    args = parser.parse_args()
    print(fetch(args.version))
    return 0


if __name__ == '__main__':
    sys.exit(main())
