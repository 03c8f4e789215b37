"""One spawn of two gloo processes for the whole of tests/distributed/ (see ranks.py)."""
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from .ranks import rank_main


@pytest.fixture(scope="session")
def two_ranks():
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(rank_main, args=(2, os.path.join(d, "store"), d), nprocs=2, join=True,
                           start_method="spawn")
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(2)]
