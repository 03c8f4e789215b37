"""The communicator: packing round trips, a world of one is a no-op, and the collectives on two
real gloo processes (bucketed sums of symmetric and general tensors, broadcast, gathers, shared
LPT work, a failure agreed on by every rank; the processes run ranks.py)."""
import pytest
import torch

from kfac_lab.distributed import Communicator
from kfac_lab.distributed.communicator import pack, packed_numel, unpack
from kfac_lab.errors import DecompositionError

from .ranks import DT, sym


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
# two real processes (conftest.py, ranks.py)

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
