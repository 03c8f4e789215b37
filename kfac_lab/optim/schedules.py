"""Schedules of the paper's experiments (M&G 2015 §13): K-FAC's growing mini-batch and the
Sutskever et al. (2013) momentum schedule of the SGD-Nesterov baseline.

Pure functions of the iteration number, plus small callable classes holding the constants.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["BatchSizeSchedule", "SutskeverMomentum", "batch_size", "sutskever_momentum"]


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_batch_args(m1, total, k_full) -> tuple[int, int, int]:
    if total is None:
        raise ValueError("total (the training-set size |S|, the largest batch) is required, e.g. total=60000")
    m1 = _check_int("m1 (the first batch size)", m1, 1)
    total = _check_int("total (the training-set size |S|)", total, 1)
    k_full = _check_int("k_full (the iteration that reaches the full set)", k_full, 1)
    if total < m1:
        raise ValueError(
            f"total={total} is smaller than the first batch size m1={m1}: the schedule only grows; "
            f"use m1 <= total (e.g. m1={total})"
        )
    return m1, total, k_full


def _growth_b(m1: int, total: int, k_full: int) -> float:
    """``b = (k_full − 1) / ln(total / m1)``, so that ``m1·exp((k_full−1)/b) = total``; ``inf``
    when the batch never needs to grow (``total == m1``), ``0`` when ``k_full == 1``."""
    if total == m1:
        return math.inf
    if k_full == 1:
        return 0.0
    return (k_full - 1) / math.log(total / m1)


def _batch_size(k: int, m1: int, total: int, k_full: int) -> int:
    if k >= k_full or total == m1:
        return total if k >= k_full else m1
    b = _growth_b(m1, total, k_full)
    return min(int(round(m1 * math.exp((k - 1) / b))), total)


def batch_size(k: int, m1: int = 1000, total: int | None = None, k_full: int = 500) -> int:
    """K-FAC's mini-batch size at iteration ``k`` (1-based; M&G 2015 §13):

    ``m_k = min(m₁ · exp((k − 1)/b), |S|)`` with ``b = (k_full − 1) / ln(|S|/m₁)``, so that
    ``m_1 = m₁`` and ``m_{k_full} = |S|`` (the paper: ``m₁ = 1000``, ``k_full = 500``).

    ``total`` is ``|S|``, the training-set size (required). Returns an ``int`` (rounded to the
    nearest integer; exactly ``total`` from ``k_full`` on). Raises ``ValueError`` for ``k < 1``,
    ``m1 < 1``, ``total < m1`` or non-integer arguments.
    """
    m1, total, k_full = _check_batch_args(m1, total, k_full)
    k = _check_int("k (the iteration, counted from 1)", k, 1)
    return _batch_size(k, m1, total, k_full)


class BatchSizeSchedule:
    """``batch_size`` with its constants fixed: ``BatchSizeSchedule(1000, 60000)(k) -> m_k``.

    ``b`` is the growth constant (``inf`` when ``total == m1``)."""

    def __init__(self, m1: int = 1000, total: int | None = None, k_full: int = 500):
        self.m1, self.total, self.k_full = _check_batch_args(m1, total, k_full)
        self.b = _growth_b(self.m1, self.total, self.k_full)

    def __call__(self, k: int) -> int:
        k = _check_int("k (the iteration, counted from 1)", k, 1)
        return _batch_size(k, self.m1, self.total, self.k_full)

    def __repr__(self) -> str:
        return f"BatchSizeSchedule(m1={self.m1}, total={self.total}, k_full={self.k_full})"


def _check_mu_max(mu_max) -> float:
    if isinstance(mu_max, bool) or not isinstance(mu_max, numbers.Real) or not 0.0 <= mu_max < 1.0:
        raise ValueError(f"mu_max must be a number in [0, 1) (the paper: 0.99, 0.995 or 0.999), got {mu_max!r}")
    return float(mu_max)


def sutskever_momentum(t: int, mu_max: float = 0.99, period: int = 250) -> float:
    """The momentum schedule of Sutskever et al. (2013) used for the SGD-Nesterov baseline
    (M&G 2015 §13): ``μ_t = min(1 − 2^{−1−log₂(⌊t/250⌋+1)}, μ_max)``, ``t = 0, 1, …``.

    Since ``2^{−1−log₂ n} = 1/(2n)`` this is ``min(1 − 1/(2(⌊t/period⌋ + 1)), μ_max)``:
    0.5 for the first ``period`` iterations, then 0.75, 0.833…, 0.875, … up to ``μ_max``.
    """
    t = _check_int("t (the iteration, counted from 0)", t, 0)
    period = _check_int("period", period, 1)
    mu_max = _check_mu_max(mu_max)
    n = t // period + 1
    return min(1.0 - 0.5 / n, mu_max)


class SutskeverMomentum:
    """``sutskever_momentum`` with ``mu_max`` and ``period`` fixed: ``SutskeverMomentum(0.99)(t)``."""

    def __init__(self, mu_max: float = 0.99, period: int = 250):
        self.mu_max = _check_mu_max(mu_max)
        self.period = _check_int("period", period, 1)

    def __call__(self, t: int) -> float:
        return sutskever_momentum(t, self.mu_max, self.period)

    def __repr__(self) -> str:
        return f"SutskeverMomentum(mu_max={self.mu_max}, period={self.period})"
