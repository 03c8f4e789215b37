"""The quadratic model and the (α, μ) that minimise it (M&G 2015 §6.4, §7;
docs/algorithm.md#the-step-α-and-μ).

``M(δ) − M(0) = ½ δᵀ C δ + ∇hᵀ δ`` with ``C = F + (λ+η) I`` and ``δ = α Δ + μ δ₀``. Given the
scalar products, everything here is 2×2 arithmetic in float64 on the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Products:
    """Scalar products of the step directions: ``Δ`` (proposal), ``δ₀`` (previous update), ``∇h``.

    ``dFd = ΔᵀFΔ``, ``dFp = ΔᵀFδ₀``, ``pFp = δ₀ᵀFδ₀``, ``dd = ‖Δ‖²``, ``dp = Δᵀδ₀``,
    ``pp = ‖δ₀‖²``, ``gd = ∇hᵀΔ``, ``gp = ∇hᵀδ₀`` (the δ₀ terms are 0 when there is no δ₀)."""

    dFd: float
    dFp: float
    pFp: float
    dd: float
    dp: float
    pp: float
    gd: float
    gp: float

    def C(self, damping: float) -> tuple[float, float, float]:
        """``(ΔᵀCΔ, ΔᵀCδ₀, δ₀ᵀCδ₀)`` with ``C = F + damping·I`` (damping = λ + η)."""
        return self.dFd + damping * self.dd, self.dFp + damping * self.dp, self.pFp + damping * self.pp

    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.dFd, self.dFp, self.pFp, self.dd, self.dp, self.pp, self.gd, self.gp))


def model_change(p: Products, damping: float, alpha: float, mu: float) -> float:
    """``M(αΔ + μδ₀) − M(0) = ½ [α μ] C₂ [α μ]ᵀ + [gd gp]·[α μ]``."""
    cdd, cdp, cpp = p.C(damping)
    return 0.5 * (alpha * alpha * cdd + 2 * alpha * mu * cdp + mu * mu * cpp) + alpha * p.gd + mu * p.gp


def coefficients(p: Products, damping: float, momentum: bool | float, lr: float | None,
                 has_previous: bool) -> tuple[float, float]:
    """``(α, μ)`` for the update ``δ = αΔ + μδ₀``.

    - ``lr=None, momentum=True``: both minimise ``M`` (solve the 2×2 system of M&G 2015 §7); at the first
      step (no ``δ₀``) or when the system is singular, ``α`` alone with ``μ = 0``.
    - ``lr=None, momentum=False``: ``α* = −∇hᵀΔ / ΔᵀCΔ`` (M&G 2015 §6.4 re-scaling), ``μ = 0``.
    - ``lr=None, momentum=μ`` (a float): fixed ``μ``, ``α`` minimises ``M`` given ``μ``.
    - ``lr`` a float fixes ``α``; ``momentum=True`` then picks ``μ`` from ``M``, a float fixes it.
    """
    cdd, cdp, cpp = p.C(damping)
    use_prev = has_previous and p.pp > 0
    if lr is None:
        if momentum is True and use_prev:
            det = cdd * cpp - cdp * cdp
            if det > 1e-12 * abs(cdd * cpp):
                alpha = (-p.gd * cpp + p.gp * cdp) / det
                mu = (-p.gp * cdd + p.gd * cdp) / det
                return alpha, mu
        mu = float(momentum) if (momentum is not True and momentum is not False and use_prev) else 0.0
        return -(p.gd + mu * cdp) / cdd, mu
    alpha = float(lr)
    if momentum is True:
        mu = -(p.gp + alpha * cdp) / cpp if use_prev else 0.0
    elif momentum is False:
        mu = 0.0
    else:
        mu = float(momentum) if use_prev else 0.0
    return alpha, mu
