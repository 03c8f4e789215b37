import pytest


@pytest.fixture(autouse=True)
def _tiny_problems_on_one_thread(one_thread):
    """Every test here: one intra-op thread (the suite-wide ``one_thread`` of tests/conftest.py)."""
    yield
