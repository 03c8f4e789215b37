"""What each of two real gloo processes runs for tests/distributed/ (one spawn per test session,
see conftest.py): the collectives, shared LPT work, a failure agreed on, and factor sync. Every
result is saved for the tests to compare with what this process computes."""
import os

import torch
import torch.distributed as dist

from kfac_lab.curvature import KroneckerFactors
from kfac_lab.distributed import Communicator, Task, init_distributed, run_shared
from kfac_lab.distributed.factor_sync import FactorSync, used_pairs
from kfac_lab.errors import DecompositionError

DT = torch.float64
DIMS = [(4, 3), (5, 2), (3, 4)]        # (in_dim, d_out) per layer
STEPS_BLOCKDIAG, STEPS = 2, 5           # factor sync: block-diagonal first, then block-tridiagonal


def sym(n, seed):
    S = torch.randn(n, n, dtype=DT, generator=torch.Generator().manual_seed(seed))
    return S + S.t()


def batch_share(rank: int, step: int, pairs) -> tuple[dict, dict]:
    """Rank ``rank``'s share of the mini-batch factors at ``step`` (their sum over ranks is the global one)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    A = {(i, j): torch.randn(DIMS[i][0], DIMS[j][0], dtype=DT, generator=g) for i, j in pairs}
    G = {(i, j): torch.randn(DIMS[i][1], DIMS[j][1], dtype=DT, generator=g) for i, j in pairs}
    for d in (A, G):
        for (i, j), t in d.items():
            if i == j:
                d[(i, j)] = t + t.t()
    return A, G


def approx_at(step: int) -> str:
    return "blockdiag" if step <= STEPS_BLOCKDIAG else "tridiag"


def _factor_sync(comm: Communicator, mode: str) -> dict:
    F = KroneckerFactors(len(DIMS), "tridiag")
    sync = FactorSync(comm, mode)
    out = {"global": [], "stored": [], "bytes": []}
    for step in range(1, STEPS + 1):
        used = used_pairs(len(DIMS), approx_at(step))
        before = comm.stats.bytes.get("factors", 0)
        F.update(*sync.reduce_batch(F, *batch_share(comm.rank, step, F.pairs), used))
        out["bytes"].append(comm.stats.bytes.get("factors", 0) - before)   # sent by this update
        out["stored"].append(({k: v.clone() for k, v in F.A.items()}, sorted(sync.partial)))
        A, G = sync.global_pairs(F, list(F.pairs))
        out["global"].append(({k: v.clone() for k, v in A.items()}, {k: v.clone() for k, v in G.items()}))
    return out


def rank_main(rank, world, store, out_dir):
    torch.set_num_threads(1)
    init_distributed("gloo", timeout=20.0, init_method=f"file://{store}", rank=rank, world_size=world)
    comm = Communicator(bucket_bytes=64, step_of=lambda: 7)
    out = {}
    # bucketed sum: each rank adds (rank + 1) × the same tensors
    S, R = sym(6, 2), torch.randn(3, 5, dtype=DT, generator=torch.Generator().manual_seed(3))
    out["sum"] = comm.all_reduce_tensors([S * (rank + 1), R * (rank + 1)], "factors", [True, False])
    b = torch.full((20,), float(rank), dtype=DT)
    out["bcast"] = comm.broadcast_(b, 1, "inverses").clone()
    out["sizes"] = comm.all_gather_int(10 + rank, "sizes", "cpu")
    # shared work: every rank ends with every task's result, each computed once
    tasks = [Task((k,), float(c), [(2, 2), (3,)], [True, False],
                  lambda k=k: [sym(2, k), torch.full((3,), float(k), dtype=DT)]) for k, c in enumerate([5, 1, 4, 2, 3])]
    results, stats = run_shared(tasks, comm, DT, torch.device("cpu"), "testing")
    out["shared"], out["shared_stats"] = results, stats
    try:
        comm.agree_on_failure(DecompositionError("rank 1's own failure") if rank == 1 else None,
                              "computing a test", "cpu")
        out["agree"] = None
    except Exception as exc:  # noqa: BLE001 — reported to the test
        out["agree"] = (type(exc).__name__, str(exc))
    out["stats"] = comm.stats.snapshot()
    out["factor_sync"] = {mode: _factor_sync(Communicator(), mode) for mode in ("eager", "lazy")}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
