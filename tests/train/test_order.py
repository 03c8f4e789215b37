"""DataOrder on its own: each epoch a permutation, batches across epoch ends, the saved position
continues the same order, determinism per seed."""
import pytest
import torch

from kfac_lab.train.order import DataOrder


def test_every_epoch_visits_every_case_once_and_batches_run_across_epoch_ends():
    n, m = 23, 5  # m does not divide n: batches straddle epoch ends
    order = DataOrder(n, seed=3)
    taken = torch.cat([order.take(m) for _ in range(3 * n // m + 1)])
    for e in range(3):
        epoch = taken[e * n:(e + 1) * n]
        assert sorted(epoch.tolist()) == list(range(n))                 # a permutation
        assert torch.equal(epoch, DataOrder(n, seed=3).permutation(e))  # the seeded one of epoch e
    assert order.state() == {"epoch": 3, "pos": taken.numel() - 3 * n}


def test_a_batch_larger_than_the_data_is_the_whole_data():
    order = DataOrder(7, seed=0)
    assert sorted(order.take(100).tolist()) == list(range(7)) and order.state() == {"epoch": 0, "pos": 7}


def test_the_saved_position_continues_the_same_order():
    ref = DataOrder(50, seed=11)
    for m in (7, 13, 40):
        ref.take(m)
    saved = ref.state()
    resumed = DataOrder(50, 11, "cpu", **saved)
    for m in (9, 30, 50, 1):
        assert torch.equal(resumed.take(m), ref.take(m))
    assert resumed.state() == ref.state()


def test_the_order_depends_on_the_seed_alone():
    a, b, c = DataOrder(100, 5), DataOrder(100, 5), DataOrder(100, 6)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(a.take(60), b.take(60))
    assert not torch.equal(DataOrder(100, 5).take(60), c.take(60))


@pytest.mark.parametrize("bad", [dict(pos=-1), dict(pos=11), dict(epoch=-2)])
def test_a_position_outside_the_data_is_refused(bad):
    with pytest.raises(ValueError, match="position"):
        DataOrder(10, 0, **bad)
    with pytest.raises(ValueError, match="at least one case"):
        DataOrder(0, 0)
