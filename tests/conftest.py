"""Shared test fixtures and helpers."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope='module')
def one_thread():
    """Run a module's tests on one torch thread: tiny models gain nothing from more, and on a busy machine
    several OpenMP threads per process can be many times slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def randomise_bn_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, so eval-mode checks are not near-identity."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return module


# the covariance head on a timm backbone: the backbone made small by its own kwargs, else timm's small model of the
# same class (EfficientNet, MobileNetV3, RegNet)
_TINY_COVPOOL_RESNET = dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128))
TINY_COVPOOL = {
    'covpool': _TINY_COVPOOL_RESNET,
    'covpool_resnet50': _TINY_COVPOOL_RESNET,
    'covpool_convnext_tiny': dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
    'covpool_efficientnet_b0': dict(backbone='test_efficientnet'),
    'covpool_mobilenetv3_large_100': dict(backbone='mobilenetv3_small_050'),
    'covpool_regnety_016': dict(backbone='regnety_002'),
    'covpool_deit_small_patch16_224': dict(depth=3, embed_dim=32, num_heads=2, dynamic_img_size=True),
}


def tiny_kwargs(name: str) -> dict:
    """Kwargs that make any registered model small (one block per stage, narrow stages, 7 classes, a 32-d
    covariance head) while keeping its structure: for tests that run every model many times in float64."""
    if name in TINY_COVPOOL:
        return dict(TINY_COVPOOL[name], isqrt_dim=16, num_classes=7)
    if 'cifar' in name:
        kwargs = dict(layers=(1, 1, 1), num_classes=7)
    else:
        kwargs = dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), num_classes=7)
    if name.startswith(('gsop2', 'isqrt')):
        kwargs['isqrt_dim'] = 32
    return kwargs


def write_image_folder(root, counts=(('train', 6), ('validation', 3)), size=(40, 48), seed=0):
    """A tiny ImageFolder under ``root``: per split, 2 classes (``class_0``, ``class_1``) of random RGB PNGs whose
    class-numbered channel is saturated, so the label is learnable. Returns ``root``."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, count in counts:
        for c in range(2):
            folder = root / split / f'class_{c}'
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                pixels[..., c] = 255
                Image.fromarray(pixels).save(folder / f'{i}.png')
    return root


def distinct_tiny_models(names):
    """``names`` without those whose tiny version is the same network as an earlier one's (e.g. a 101-layer
    model and its 50-layer twin differ only in depth, which :func:`tiny_kwargs` sets)."""
    import timm
    seen, out = set(), []
    for name in names:
        text = repr(timm.create_model(name, device='meta', **tiny_kwargs(name)))
        if text not in seen:
            seen.add(text)
            out.append(name)
    return out


# timm's tests/test_models.py tests that take minutes for the 17 full-size models: run with -m slow
TIMM_SLOW_TESTS = ('test_model_forward_torchscript', 'test_model_forward_fx', 'test_model_backward_fx',
                   'test_model_forward_fx_torchscript', 'test_prune_intermediate_layers_contract')


def run_timm_tests(*selection: str, pythonpath: tuple = ()) -> subprocess.CompletedProcess:
    """timm's own ``tests/test_models.py`` (``get_timm_tests.py`` fetched it) with ``timm_suite_plugin``, in a
    subprocess; ``pythonpath`` goes first on its path (a copy of timm with the model files merged in)."""
    import pytest
    from get_timm_tests import tests_dir  # not test-prefixed: pytest would collect it
    folder = tests_dir()
    if not (folder / 'test_models.py').is_file():
        pytest.fail(f"timm's test suite is not at {folder}: fetch it with `python tests/get_timm_tests.py` "
                    '(README: Install)', pytrace=False)
    here = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, pythonpath), here, os.environ.get('PYTHONPATH', '')]))
    env.pop('GITHUB_ACTIONS', None)  # timm narrows its own suite on GitHub runners; run it whole
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p', 'timm_suite_plugin',
           '-W', 'ignore::FutureWarning', 'tests/test_models.py', *selection]
    return subprocess.run(cmd, cwd=folder.parent, env=env, capture_output=True, text=True, timeout=3000)


def _peak_rss_mb() -> tuple:
    """(this process, the largest subprocess it waited for) peak RSS in MB (Linux reports kilobytes)."""
    import resource
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


if os.environ.get('PYTEST_XDIST_WORKER'):
    # the suite runs in two worker processes on CI's two cores (pyproject addopts: -n 2): one thread each, and
    # for the subprocesses they start, so the workers do not oversubscribe the cores
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)


class _WorkerPeaks:
    """Collects each xdist worker's peak RSS (sent back through ``workeroutput``)."""

    def __init__(self) -> None:
        self.peaks = []

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        self.peaks.append(node.workeroutput.get('peak_rss_mb', (0, 0)))


def pytest_configure(config):
    if config.pluginmanager.hasplugin('xdist') and not hasattr(config, 'workeroutput'):
        config.pluginmanager.register(_WorkerPeaks(), 'timm_gsop_worker_peaks')


def pytest_sessionfinish(session):
    if hasattr(session.config, 'workeroutput'):  # an xdist worker: report to the controller
        session.config.workeroutput['peak_rss_mb'] = _peak_rss_mb()


def pytest_terminal_summary(terminalreporter):
    """Peak memory of the run, for README's claim about the largest test process: the pytest process (each
    worker's, under xdist) and the largest subprocess a test waited for."""
    own, children = _peak_rss_mb()
    plugin = terminalreporter.config.pluginmanager.get_plugin('timm_gsop_worker_peaks')
    if plugin is not None and plugin.peaks:
        own = max(p[0] for p in plugin.peaks)
        children = max(p[1] for p in plugin.peaks)
    terminalreporter.write_line(f'peak RSS: pytest process {own:.0f} MB, largest subprocess {children:.0f} MB')


def pytest_collection_modifyitems(config, items):
    # the two longest files first: under -n 2 --dist loadfile each worker starts with one, beside the rest
    items.sort(key=lambda item: item.path.name not in ('test_timm_suite.py', 'test_drop_in.py'))
