"""Factor sync: eager and lazy, on two real processes (ranks.py), give the single-process
running factors; partial pairs sum over ranks to them; lazy sends nothing on updates."""
import pytest
import torch

from kfac_lab.curvature import KroneckerFactors
from kfac_lab.distributed import Communicator
from kfac_lab.distributed.factor_sync import FactorSync, used_pairs

from .ranks import DIMS, STEPS, STEPS_BLOCKDIAG, batch_share


def reference():
    """The running factors of one process that sees the global mini-batch factors."""
    F = KroneckerFactors(len(DIMS), "tridiag")
    out = []
    for step in range(1, STEPS + 1):
        shares = [batch_share(r, step, F.pairs) for r in range(2)]
        F.update(*({k: s[0][n][k] + s[1][n][k] for k in F.pairs} for n, s in ((0, shares), (1, shares))))
        out.append(({k: v.clone() for k, v in F.A.items()}, {k: v.clone() for k, v in F.G.items()}))
    return out


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_two_ranks_hold_the_global_factors(two_ranks, mode):
    ref = reference()
    for step in range(STEPS):
        A_ref, G_ref = ref[step]
        for rank in range(2):
            A, G = two_ranks[rank]["factor_sync"][mode]["global"][step]
            for k in A_ref:
                assert torch.allclose(A[k], A_ref[k], rtol=1e-12, atol=1e-12), (mode, step, rank, k)
                assert torch.allclose(G[k], G_ref[k], rtol=1e-12, atol=1e-12), (mode, step, rank, k)
        # the stored values: synced pairs are global on each rank, partial ones sum over ranks to it
        (S0, partial0), (S1, partial1) = (two_ranks[r]["factor_sync"][mode]["stored"][step] for r in range(2))
        assert partial0 == partial1
        for k in A_ref:
            if tuple(k) in map(tuple, partial0):
                assert torch.allclose(S0[k] + S1[k], A_ref[k], rtol=1e-12, atol=1e-12)
            else:
                assert torch.allclose(S0[k], A_ref[k], rtol=1e-12, atol=1e-12)
                assert torch.allclose(S1[k], A_ref[k], rtol=1e-12, atol=1e-12)


def test_what_is_partial_and_what_is_sent(two_ranks):
    eager, lazy = two_ranks[0]["factor_sync"]["eager"], two_ranks[0]["factor_sync"]["lazy"]
    off = [(0, 1), (1, 2)]
    every = sorted(used_pairs(len(DIMS), "tridiag"))
    for step in range(STEPS):
        # eager: the adjacent pairs are partial while block-diagonal, summed back on the switch
        assert eager["stored"][step][1] == (off if step < STEPS_BLOCKDIAG else [])
        assert lazy["stored"][step][1] == every                          # lazy: everything partial
        assert lazy["bytes"][step] == 0                                  # and nothing sent on an update
        assert eager["bytes"][step] > 0
    # the switch step also sends the partial adjacent running factors
    assert eager["bytes"][STEPS_BLOCKDIAG] > eager["bytes"][STEPS_BLOCKDIAG + 1] > eager["bytes"][0]


def test_world_of_one_sends_nothing():
    F = KroneckerFactors(len(DIMS), "tridiag")
    sync = FactorSync(Communicator(), "lazy")
    A_b, G_b = batch_share(0, 1, F.pairs)
    A, G = sync.reduce_batch(F, A_b, G_b, used_pairs(len(DIMS), "tridiag"))
    assert A is A_b and G is G_b and sync.partial == set()
    F.update(A, G)
    A2, _ = sync.global_pairs(F, list(F.pairs))
    assert all(A2[k] is F.A[k] for k in F.pairs)
    with pytest.raises(ValueError, match="factor_sync"):
        FactorSync(Communicator(), "sometimes")
