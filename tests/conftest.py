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
