"""Cost-based assignment (LPT) against brute force, and shared work in a world of one."""
import itertools
import random

import pytest
import torch

from kfac_lab.distributed import Communicator, Task, assign_lpt, run_shared
from kfac_lab.errors import DecompositionError


def makespan(costs, owners, W):
    load = [0.0] * W
    for c, o in zip(costs, owners):
        load[o] += c
    return max(load)


def lpt_by_hand(costs, W):
    """LPT written independently: a sorted list of (load, rank) bins, the lightest taking each task."""
    bins = [(0.0, r) for r in range(W)]
    owners = [None] * len(costs)
    for i, c in sorted(enumerate(costs), key=lambda ic: (-ic[1], ic[0])):
        bins.sort()
        load, r = bins[0]
        owners[i] = r
        bins[0] = (load + c, r)
    return owners


@pytest.mark.parametrize("seed", range(40))
def test_lpt_against_brute_force(seed):
    rnd = random.Random(seed)
    W = rnd.choice([2, 3])
    costs = [float(rnd.choice([rnd.randint(1, 20), rnd.randint(1, 20) ** 3])) for _ in range(rnd.randint(1, 7))]
    owners = assign_lpt(costs, W)
    assert owners == lpt_by_hand(costs, W)
    best = min(makespan(costs, o, W) for o in itertools.product(range(W), repeat=len(costs)))
    assert makespan(costs, owners, W) <= (4 / 3 - 1 / (3 * W)) * best + 1e-9   # Graham's bound
    assert makespan(costs, owners, W) >= best


def test_lpt_edge_cases():
    costs = [1000**3, 500**3, 250**3, 30**3, 1000**3, 784**3, 500**3, 250**3]
    assert assign_lpt(costs, 1) == [0] * len(costs)
    assert assign_lpt(costs, 2) == assign_lpt(costs, 2)
    assert makespan(costs, assign_lpt(costs, 2), 2) / sum(costs) < 0.6
    assert sorted(assign_lpt([1.0] * 5, 8)) == [0, 1, 2, 3, 4]     # more workers than tasks: one each
    assert assign_lpt([], 3) == []
    assert assign_lpt([2.0, 2.0, 2.0], 2) == [0, 1, 0]              # ties: lower index, lower rank
    with pytest.raises(ValueError, match="workers"):
        assign_lpt([1.0], 0)


def test_world_of_one_computes_every_task():
    comm = Communicator()
    assert comm.world == 1 and comm.rank == 0
    M = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    tasks = [Task(("inv", i), float(i + 1), [(2, 2)], [True], lambda i=i: [torch.linalg.inv(M + i * torch.eye(2))])
             for i in range(3)]
    results, stats = run_shared(tasks, comm, torch.float64, M.device, "testing")
    for i in range(3):
        assert torch.allclose(results[("inv", i)][0] @ (M + i * torch.eye(2, dtype=M.dtype)), torch.eye(2, dtype=M.dtype))
    assert stats["tasks"] == stats["total_tasks"] == 3 and stats["flops"] == stats["total_flops"] == 6.0
    assert stats["host_syncs"] == 0 and comm.stats.total_bytes == 0


def test_a_failing_task_raises_its_own_error():
    def boom():
        raise DecompositionError("damped A of layer 0 is not positive definite")
    with pytest.raises(DecompositionError, match="layer 0"):
        run_shared([Task(("x",), 1.0, [(1,)], [False], boom)], Communicator(), torch.float64, "cpu", "testing")
