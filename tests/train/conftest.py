import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems run far faster on one intra-op thread on a loaded 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
