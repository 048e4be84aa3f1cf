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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped (with the reason) where torch sees no CUDA device."""
    gpu = [it for it in items if "gpu" in it.keywords]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        for it in gpu:
            it.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
