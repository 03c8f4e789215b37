"""Shards, their global order, a shard's share of the subsets, and shard sampling."""
import numpy as np
import pytest
import torch

from kfac_lab.curvature.losses import get_loss
from kfac_lab.distributed import ShardPlan, global_order, reference_batch, shard, shard_plan
from kfac_lab.distributed.sharding import ShardSampling


@pytest.mark.parametrize("W", [1, 2, 3, 5])
@pytest.mark.parametrize("m", [0, 1, 4, 13, 37])
def test_shards_cover_every_case_once(W, m):
    x = torch.arange(m)
    shards = [shard(x, r, W) for r in range(W)]
    assert sorted(torch.cat(shards).tolist()) == list(range(m))      # each case in exactly one shard
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    assert torch.equal(reference_batch(shards), x)
    assert torch.equal(torch.cat(shards)[global_order([len(s) for s in shards])], x)


def test_global_order_of_arbitrary_shards():
    # round-robin over local rows, a shard that has run out skipped
    xs = [torch.tensor([0, 1, 2, 3]), torch.tensor([10]), torch.tensor([20, 21])]
    assert reference_batch(xs).tolist() == [0, 10, 20, 1, 21, 2, 3]
    ys = [x * 2 for x in xs]
    bx, by = reference_batch(xs, ys)
    assert torch.equal(by, 2 * bx)
    order = global_order([4, 0, 2])
    assert sorted(order.tolist()) == list(range(6))
    with pytest.raises(ValueError, match="non-negative"):
        global_order([3, -1])
    with pytest.raises(ValueError, match="out of range"):
        shard(torch.arange(4), 2, 2)


@pytest.mark.parametrize("sizes", [(5,), (16, 16), (19, 18), (4, 0, 7), (3, 3, 3, 2)])
def test_shard_plan_is_the_prefix_of_the_global_subsets(sizes):
    M = sum(sizes)
    glob = global_order(sizes)                    # global row g = torch.cat(shards)[glob[g]]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for N1, N2 in [(1, 1), (max(1, M // 4), M), (M, max(1, M // 2))]:
        plans = [shard_plan(sizes, r, N1, N2) for r in range(len(sizes))]
        assert sum(p.n1 for p in plans) == N1 and sum(p.n2 for p in plans) == N2
        for r, p in enumerate(plans):
            assert isinstance(p, ShardPlan) and p.m == sizes[r] and p.M == M
            # brute force: the rank's local rows among the first N1 / N2 global rows
            mine = [g for g in range(M) if starts[r] <= glob[g] < starts[r] + sizes[r]]
            assert p.n1 == sum(g < N1 for g in mine) and p.n2 == sum(g < N2 for g in mine)
            assert p.stats_pos.tolist() == mine[:p.n1]      # local rows 0..n1-1, at their global positions
    with pytest.raises(ValueError, match="subsets"):
        shard_plan((4, 4), 0, 9, 1)
    with pytest.raises(ValueError, match="out of range"):
        shard_plan((4, 4), 2, 1, 1)


@pytest.mark.parametrize("loss", ["categorical", "bernoulli", "gaussian"])
def test_shard_sampling_is_the_single_process_draw(loss):
    g = torch.Generator().manual_seed(0)
    sizes, N1 = (7, 6, 6), 11
    z = torch.randn(sum(sizes), 4, dtype=torch.float64, generator=g)
    base = get_loss(loss)
    whole = base.sample(z[:N1], torch.Generator().manual_seed(5))          # the single-process draw
    zs = [shard(z, r, 3) for r in range(3)]
    for r in range(3):
        plan = shard_plan(sizes, r, N1, N1)
        s = ShardSampling(base)
        gen = torch.Generator().manual_seed(5)
        s.plan = plan
        mine = s.sample(zs[r][:plan.n1], gen)
        assert torch.equal(mine, whole[plan.stats_pos])
        # a rank with no statistics rows keeps the generator in step
        gen_skip, gen_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        s.skip(plan, zs[r], gen_skip)
        base.sample(z[:N1], gen_ref)
        assert torch.equal(torch.rand(3, generator=gen_skip), torch.rand(3, generator=gen_ref))
        s.plan = None  # inactive: the plain draw
        assert torch.equal(s.sample(zs[r], torch.Generator().manual_seed(5)),
                           base.sample(zs[r], torch.Generator().manual_seed(5)))
    assert s.name == base.name and "sampled across shards" in repr(s)
