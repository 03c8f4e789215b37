"""Suite-wide hooks: the session fails when it leaves a file changed that git tracks or does
not ignore (see tests/clean_clone.py)."""
from clean_clone import pytest_sessionfinish, pytest_sessionstart  # noqa: F401 - pytest hooks
