"""How far a step may be trusted: the Levenberg–Marquardt rule for λ and KL-clipping.

Shared by :class:`~kfac_lab.optim.KFAC` and :class:`~kfac_lab.optim.KFACPreconditioner`
(docs/algorithm.md, docs/preconditioner.md):

* the reduction ratio ``ρ = (h(θ+δ) − h(θ)) / (M(δ) − M(0))`` and the rule ``λ ← ω₁λ`` if
  ``ρ > 3/4``, ``λ ← λ/ω₁`` if ``ρ < 1/4``, with ``ω₁ = (19/20)^T₁`` (M&G 2015 §6.5);
* the KL-clipping scale ``ν = min(1, sqrt(κ / (δᵀ F̃ δ)))`` of a step ``δ`` (Ba, Grosse &
  Martens 2017: the step's predicted KL divergence, ``½ δᵀ F δ``, stays below ``κ/2``).
"""
from __future__ import annotations

import math

RHO_HIGH = 0.75  # ρ above: the quadratic model is trusted, λ shrinks (M&G 2015 §6.5)
RHO_LOW = 0.25   # ρ below: it is not, λ grows


def omega1(T1: int) -> float:
    """``ω₁ = (19/20)^T₁``, the factor λ moves by when the rule runs every ``T₁`` steps (M&G 2015 §6.5)."""
    return (19 / 20) ** T1


def reduction_ratio(h_new: float, h_old: float, model_change: float) -> float:
    """``ρ = (h(θ+δ) − h(θ)) / (M(δ) − M(0))`` (M&G 2015 §6.5); ``−inf`` when the model
    predicts no decrease (``M(δ) − M(0) ≥ 0``) or the new objective is not finite, so that λ grows."""
    if not (model_change < 0 and math.isfinite(h_new)):
        return float("-inf")
    return (h_new - h_old) / model_change


def levenberg_marquardt(damping: float, rho: float, omega: float, lower: float, upper: float) -> float:
    """The new λ (M&G 2015 §6.5): ``ω₁λ`` if ``ρ > 3/4``, ``λ/ω₁`` if ``ρ < 1/4``, else λ; kept
    in ``[lower, upper]`` (not in the paper: the bounds keep λ from under- or overflowing)."""
    if rho > RHO_HIGH:
        return max(damping * omega, lower)
    if rho < RHO_LOW:
        return min(damping / omega, upper)
    return damping


def kl_clip_scale(quadratic: float, kl_clip: float | None) -> float:
    """``ν = min(1, sqrt(κ / q))`` for a step whose quadratic term is ``q = δᵀ F̃ δ`` (Ba, Grosse &
    Martens 2017); 1 when clipping is off (``κ = None``) or the step is zero. ``q`` is taken in
    absolute value: a damped ``F̃`` is positive definite, so only rounding makes it negative."""
    if kl_clip is None:
        return 1.0
    q = abs(quadratic)
    if not q > kl_clip:  # also q == 0 and a q of NaN (the caller rejects non-finite steps first)
        return 1.0
    return math.sqrt(kl_clip / q)


def bounded_by_objective(p, damping: float, weight_decay: float, objective: float, momentum, has_previous: bool,
                         omega: float, upper: float):
    """``(λ', α, μ, M)``: the smallest ``λ' = λ/ω₁^j`` (j ≥ 0, at most ``upper``) whose step's
    predicted change ``M(δ) − M(0) ≥ −h``, with that step's ``(α, μ)`` (not in the paper).

    The objective h (the NLL of every loss here, plus ½η‖θ‖²) is never negative, so a model that
    predicts ``M(δ) − M(0) < −h`` promises more than there is to gain: it is wrong about this step.
    That happens where the Fisher vanishes — a classifier at near-zero loss, whose confident
    predictions give F ≈ 0 — while the LM rule (every T1 steps, ω₁ at a time) has taken λ to
    ~1e-7: the 2×2 solve for (α, μ) then returns huge coefficients (μ = −33, −1,060, … on
    mnist-cnn) and three steps take the loss from 0.005 to NaN. Raising λ at once, in the
    model only (2×2 arithmetic on the host, no extra pass), is what the LM rule would do a few
    steps later, before the step is taken."""
    from .quadratic import coefficients, model_change

    lam = damping
    while True:
        alpha, mu = coefficients(p, lam + weight_decay, momentum, None, has_previous)
        M = model_change(p, lam + weight_decay, alpha, mu)
        if not (M < -objective and lam < upper and math.isfinite(M)):
            return lam, alpha, mu, M
        lam = min(lam / omega, upper)
