"""The communicator: packing round trips, a world of one is a no-op, and the collectives on two
real gloo processes (bucketed sums of symmetric and general tensors, broadcast, gathers, shared
LPT work, a failure agreed on by every rank)."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kfac_lab.distributed import Communicator, Task, init_distributed, run_shared
from kfac_lab.distributed.communicator import pack, packed_numel, unpack
from kfac_lab.errors import DecompositionError

DT = torch.float64


def sym(n, seed):
    S = torch.randn(n, n, dtype=DT, generator=torch.Generator().manual_seed(seed))
    return S + S.t()


def test_pack_roundtrip():
    S, R = sym(5, 0), torch.randn(3, 4, dtype=DT)
    v, i = torch.randn(4, dtype=torch.float32), torch.arange(6).reshape(2, 3)
    flat = pack([S, R, v, i], [True, False, False, False], DT)
    assert flat.dtype == DT and flat.numel() == 15 + 12 + 4 + 6
    assert [packed_numel(t.shape, s) for t, s in zip([S, R, v], [True, False, False])] == [15, 12, 4]
    S2, R2, v2, i2 = unpack(flat, [S.shape, R.shape, v.shape, i.shape], [True, False, False, False],
                            [DT, DT, torch.float32, torch.int64])
    assert torch.equal(S2, S) and torch.equal(R2, R) and torch.equal(v2, v) and torch.equal(i2, i)
    assert v2.dtype == torch.float32 and i2.dtype == torch.int64
    assert pack([], [], DT).numel() == 0
    with pytest.raises(ValueError, match="does not hold"):
        unpack(flat[:-1], [S.shape, R.shape], [True, False], [DT, DT])


def test_world_of_one_is_a_no_op():
    comm = Communicator(bucket_bytes=8)
    assert (comm.rank, comm.world, comm.active) == (0, 1, False)
    t = torch.randn(10, dtype=DT)
    before = t.clone()
    assert comm.all_reduce_(t, "factors") is t and torch.equal(t, before)
    assert comm.broadcast_(t, 0, "inverses") is t and torch.equal(t, before)
    ts = [sym(3, 1), t]
    out = comm.all_reduce_tensors(ts, "factors", [True, False])
    assert all(a is b for a, b in zip(out, ts))
    assert comm.all_gather_int(7, "sizes", "cpu") == [7] and comm.all_gather_object({"a": 1}, "status") == [{"a": 1}]
    assert comm.agree_on_failure(None, "testing", "cpu") is False
    with pytest.raises(DecompositionError, match="mine"):
        comm.agree_on_failure(DecompositionError("mine"), "testing", "cpu")
    assert comm.stats.snapshot() == {"bytes": {}, "calls": {}}


# ---------------------------------------------------------------------------------------------
# two real processes

def _rank_main(rank, world, store, out_dir):
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
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_rank_main, args=(2, os.path.join(d, "store"), d), nprocs=2, join=True,
                           start_method="spawn")
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def test_collectives_on_two_processes(two_ranks):
    S, R = sym(6, 2), torch.randn(3, 5, dtype=DT, generator=torch.Generator().manual_seed(3))
    for rank, out in enumerate(two_ranks):
        assert torch.allclose(out["sum"][0], 3 * S) and torch.allclose(out["sum"][1], 3 * R)
        assert torch.equal(out["bcast"], torch.ones(20, dtype=DT))
        assert out["sizes"] == [10, 11]
        # the 64-byte bucket splits each collective: 21 + 15 entries → 5 chunks of ≤ 8 doubles
        assert out["stats"]["calls"]["factors"] == 5 and out["stats"]["bytes"]["factors"] == 36 * 8
        assert out["stats"]["calls"]["inverses"] >= 3


def test_shared_work_reaches_every_rank(two_ranks):
    for out in two_ranks:
        assert set(out["shared"]) == {(k,) for k in range(5)}
        for k in range(5):
            a, v = out["shared"][(k,)]
            assert torch.equal(a, sym(2, k)) and torch.equal(v, torch.full((3,), float(k), dtype=DT))
    s0, s1 = two_ranks[0]["shared_stats"], two_ranks[1]["shared_stats"]
    assert s0["tasks"] + s1["tasks"] == 5 and (s0["flops"], s1["flops"]) == (8.0, 7.0)  # LPT: {5,2,1} vs {4,3}


def test_a_failure_is_raised_on_every_rank(two_ranks):
    name0, msg0 = two_ranks[0]["agree"]
    name1, msg1 = two_ranks[1]["agree"]
    assert name1 == "DecompositionError" and msg1 == "rank 1's own failure"
    assert name0 == "DecompositionError"                      # the peer's error class, naming rank and step
    assert "rank 1 failed while computing a test at step 7" in msg0 and "rank 1's own failure" in msg0
