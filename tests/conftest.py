"""Shared test fixtures."""
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


def tiny_kwargs(name: str) -> dict:
    """Kwargs that make any registered model small (one block per stage, narrow stages, 7 classes, a 32-d
    covariance head) while keeping its structure: for tests that run every model many times in float64."""
    if 'cifar' in name:
        kwargs = dict(layers=(1, 1, 1), num_classes=7)
    else:
        kwargs = dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), num_classes=7)
    if name.startswith(('gsop2', 'isqrt')):
        kwargs['isqrt_dim'] = 32
    return kwargs


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


def pytest_terminal_summary(terminalreporter):
    """Peak memory of the run, for README's claim that no test process goes above 6 GB: this process and the
    largest subprocess the tests waited for (Linux reports kilobytes)."""
    import resource
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    terminalreporter.write_line(f'peak RSS: pytest process {own:.0f} MB, largest subprocess {children:.0f} MB')
