import math

import pytest
from hypothesis import given, settings, strategies as st

from kfac_lab.optim.schedules import BatchSizeSchedule, SutskeverMomentum, batch_size, sutskever_momentum


def test_batch_size_endpoints_and_formula():
    total = 60000
    assert batch_size(1, total=total) == 1000
    assert batch_size(500, total=total) == total
    assert batch_size(10_000, total=total) == total
    b = 499 / math.log(60)
    for k in (2, 17, 250, 499):
        assert batch_size(k, 1000, total) == round(1000 * math.exp((k - 1) / b))
    assert batch_size(499, total=total) < total


def test_batch_size_monotone_and_class_agrees():
    sched = BatchSizeSchedule(m1=250, total=20000, k_full=100)
    sizes = [sched(k) for k in range(1, 150)]
    assert sizes[0] == 250 and sizes[99] == 20000 and sizes[-1] == 20000
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert sizes == [batch_size(k, 250, 20000, 100) for k in range(1, 150)]
    assert all(isinstance(s, int) for s in sizes)
    assert sched.b == pytest.approx(99 / math.log(80))


@settings(max_examples=60, deadline=None)
@given(m1=st.integers(1, 5000), extra=st.integers(0, 100000), k_full=st.integers(1, 800), k=st.integers(1, 2000))
def test_batch_size_properties(m1, extra, k_full, k):
    total = m1 + extra
    m = batch_size(k, m1, total, k_full)
    assert m1 <= m <= total
    assert batch_size(1, m1, total, k_full) == (total if k_full == 1 else m1)
    assert batch_size(k_full, m1, total, k_full) == total
    assert batch_size(k + 1, m1, total, k_full) >= m


def test_batch_size_degenerate_cases():
    assert [batch_size(k, 500, 500) for k in (1, 2, 1000)] == [500, 500, 500]
    assert batch_size(1, 10, 100, k_full=1) == 100


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0, m1=10, total=100), "k "),
    (dict(k=1, m1=0, total=100), "m1"),
    (dict(k=1, m1=200, total=100), "smaller than the first batch"),
    (dict(k=1), "total"),
    (dict(k=1.5, m1=10, total=100), "integer"),
    (dict(k=1, m1=10, total=100, k_full=0), "k_full"),
])
def test_batch_size_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        batch_size(**kwargs)
    if "k" in kwargs and kwargs["k"] == 1 and "total" in kwargs:
        with pytest.raises(ValueError, match=match):
            BatchSizeSchedule(**{k: v for k, v in kwargs.items() if k != "k"})


def test_sutskever_momentum_values():
    assert sutskever_momentum(0, 0.999) == 0.5
    assert sutskever_momentum(249, 0.999) == 0.5
    assert sutskever_momentum(250, 0.999) == 0.75
    assert sutskever_momentum(500, 0.999) == pytest.approx(5 / 6)
    assert sutskever_momentum(750, 0.999) == 0.875
    # the paper's formula literally
    for t in (0, 1, 300, 999, 12345):
        lit = min(1 - 2 ** (-1 - math.log2(t // 250 + 1)), 0.999)
        assert sutskever_momentum(t, 0.999) == pytest.approx(lit, abs=1e-15)


def test_sutskever_momentum_capped_and_monotone():
    assert sutskever_momentum(10**6, 0.99) == 0.99
    assert sutskever_momentum(750, 0.8) == 0.8
    assert sutskever_momentum(0, 0.3) == 0.3
    mus = [sutskever_momentum(t, 0.995) for t in range(0, 100_000, 97)]
    assert all(a <= b for a, b in zip(mus, mus[1:]))
    assert SutskeverMomentum(0.99)(750) == 0.875
    assert SutskeverMomentum(0.99, period=10)(10) == 0.75


@pytest.mark.parametrize("mu_max", [1.0, -0.1, 1.5, float("nan"), "0.9", True])
def test_sutskever_momentum_validation(mu_max):
    with pytest.raises(ValueError, match="mu_max"):
        sutskever_momentum(0, mu_max)
    with pytest.raises(ValueError, match="mu_max"):
        SutskeverMomentum(mu_max)


def test_sutskever_momentum_negative_t():
    with pytest.raises(ValueError, match="t "):
        sutskever_momentum(-1, 0.99)
