"""Shared helpers. Markers: ``slow`` (long tests, timm's TorchScript / fx / prune contract, the full demo) and
``clients`` (transformers, OpenVINO, ONNX Runtime, torch-pruning); ``.ci/run`` runs the default set, then each."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get('PYTEST_XDIST_WORKER'):
    # two worker processes on CI's two cores (pyproject addopts): one thread each, and for their subprocesses
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)

# make the GSoP-Net-family models small while keeping their structure: (layers, channels) of a ResNet, a CIFAR
# ResNet's one block per stage, a 32-d covariance head; covpool: the backbone made small by its own kwargs, else
# timm's small model of the same family
_TINY_RESNET = dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128))
TINY_COVPOOL = {
    'covpool': _TINY_RESNET,
    'covpool_resnet50': _TINY_RESNET,
    'covpool_convnext_tiny': dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
    'covpool_efficientnet_b0': dict(backbone='test_efficientnet'),
    'covpool_mobilenetv3_large_100': dict(backbone='mobilenetv3_small_050'),
    'covpool_regnety_016': dict(backbone='regnety_002'),
    'covpool_deit_small_patch16_224': dict(depth=2, embed_dim=32, num_heads=2, dynamic_img_size=True),
}


def tiny_kwargs(name: str) -> dict:
    """Kwargs that make a registered model small (7 classes) with the same structure."""
    if name in TINY_COVPOOL:
        return dict(TINY_COVPOOL[name], isqrt_dim=16, num_classes=7)
    kwargs = dict(layers=(1, 1, 1), num_classes=7) if 'cifar' in name else dict(_TINY_RESNET, num_classes=7)
    if name.startswith(('gsop2', 'isqrt')):
        kwargs['isqrt_dim'] = 32
    return kwargs


def randomise_bn_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, so eval-mode checks are not near-identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return module


# timm's tests/test_models.py tests that take minutes on the full-size models: the `slow` run
TIMM_SLOW_TESTS = ('test_model_forward_torchscript', 'test_model_forward_fx', 'test_model_backward_fx',
                   'test_model_forward_fx_torchscript', 'test_prune_intermediate_layers_contract')


def run_timm_tests(*selection: str, pythonpath: tuple = ()) -> subprocess.CompletedProcess:
    """timm's own ``tests/test_models.py`` (``get_timm_tests.py`` fetched it) with ``timm_suite_plugin``, in a
    subprocess; ``pythonpath`` goes first on its path (a copy of timm with the model files merged in)."""
    from get_timm_tests import tests_dir
    folder = tests_dir()
    if not (folder / 'test_models.py').is_file():
        pytest.fail(f"timm's test suite is not at {folder}: fetch it with `python tests/get_timm_tests.py` "
                    '(README: Install)', pytrace=False)
    here = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, pythonpath), here, os.environ.get('PYTHONPATH', '')]))
    env.pop('GITHUB_ACTIONS', None)  # timm narrows its own suite on GitHub runners; run it whole
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p', 'timm_suite_plugin', '-n', '0',
           '-W', 'ignore::FutureWarning', '-W', 'ignore::UserWarning', 'tests/test_models.py', *selection]
    return subprocess.run(cmd, cwd=folder.parent, env=env, capture_output=True, text=True, timeout=3000)


def pytest_collection_modifyitems(config, items):
    # the longest file first: under -n 2 --dist loadfile one worker runs it while the other runs the rest
    items.sort(key=lambda item: item.path.name != 'test_timm_suite.py')
