"""Suite-wide hooks and fixtures: the session fails when it leaves a file changed that git tracks
or does not ignore (see tests/clean_clone.py); ``one_thread`` for modules of tiny problems."""
import pytest
import torch
from clean_clone import pytest_sessionfinish, pytest_sessionstart  # noqa: F401 - pytest hooks


@pytest.fixture
def one_thread():
    """Tiny problems run far faster on one intra-op thread on a loaded 2-core machine (use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def cli_isolated(monkeypatch):
    """For tests that call ``kfac_lab.cli.main``: no ``$KFAC_LAB_STORE`` from the caller's shell, and
    torch's thread count put back afterwards (``--threads`` sets it for the whole process)."""
    old = torch.get_num_threads()
    monkeypatch.delenv("KFAC_LAB_STORE", raising=False)
    yield
    torch.set_num_threads(old)
