"""Shared test fixtures."""
import pytest


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one torch thread (and do not spin against other jobs on a shared CPU)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
