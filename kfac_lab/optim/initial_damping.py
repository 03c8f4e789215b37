"""``damping="auto"``: λ₀ chosen from the first batch by a probe of the quadratic model (beyond
the paper; docs/algorithm.md#automatic-initial-damping).

The paper starts every problem at λ₀ = 150 and lets the Levenberg–Marquardt rule (M&G 2015 §6.5)
bring λ down by ω₁ = (19/20)^5 every 5 steps: on the autoencoders that is ~100 iterations spent
on damping alone. The probe asks the same question the LM rule asks — does the quadratic model
predict what the objective does (the reduction ratio ρ)? — for a whole geometric range of λ at
once, on the first step's own batch, factors and gradient:

1. for every λ on the grid ``λ_j = 10^j`` (``j = 4, 3, …, -3``, inside ``[min_damping,
   max_damping]``), the damped inverse at γ = sqrt(λ + η) (M&G 2015 §6.6, as Algorithm 2 starts γ), the proposal
   ``Δ_λ = −F̃_γ⁻¹ ∇h``, its α from the exact-Fisher quadratic model (§6.4) and the predicted
   change ``M(αΔ_λ) − M(0)``; one Gram matrix of exact-F products for all candidates;
2. the objective ``h(θ + αΔ_λ)`` on the batch (θ itself is not touched) and
   ``ρ(λ) = (h(θ+δ) − h(θ)) / (M(δ) − M(0))`` (§6.5; docs/algorithm.md#λ-levenbergmarquardt);
3. **the rule**: walking down the grid from the largest λ, λ₀ is the last λ before the first
   with ``ρ < 3/4`` — what the LM rule does from a large λ (shrink λ while ρ > 3/4), done in
   decades on one batch instead of by ω₁ every T₁ steps. Stopping at ρ < 3/4 rather than 1/4
   errs on the side of trust: the LM rule brings λ further down if the next batches allow it,
   while a λ₀ too small costs steps the model cannot predict. If already the largest λ has
   ``ρ < 3/4``, λ₀ is the largest.

Then Algorithm 2 runs unchanged from λ₀ (γ = sqrt(λ₀ + η)). The probe costs one damped inverse
per candidate, one exact-F Gram of the candidates and one forward pass per candidate, on the
first step only; it uses no random numbers, so it is deterministic and a resumed run repeats it
bit for bit. Its outcome is ``KFAC.initial_damping`` (also in ``state_dict``) and an
``"initial_damping"`` event.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.func import functional_call

from ..curvature.engine import Share
from ..curvature.products import dot, sq_norm
from ..errors import DecompositionError
from .quadratic import Products, coefficients, model_change
from .trust import RHO_HIGH, reduction_ratio

AUTO = "auto"
PAPER = 150.0  # the paper's λ₀ (M&G 2015 §6.5), the fallback when no candidate can be built
#: the probed λ, largest first (the paper's λ₀ = 150 lies between the first two)
GRID = tuple(10.0 ** j for j in range(4, -4, -1))
RULE = "probe: the smallest λ of 1e4, 1e3, …, 1e-3 with ρ ≥ 3/4 there and at every larger λ"


def is_auto(damping) -> bool:
    return isinstance(damping, str) and damping == AUTO


def grid(lower: float, upper: float) -> list[float]:
    """The probed λ inside ``[lower, upper]`` (the config's ``min_damping``, ``max_damping``); at
    least one: the nearest bound when the range misses the grid."""
    out = [lam for lam in GRID if lower <= lam <= upper]
    return out or [min(max(GRID[0], lower), upper)]


def choose(candidates: list[dict]) -> dict:
    """The rule (module docstring, step 3) on the probe's table ``[{"damping", "rho", …}, …]``
    (largest λ first): the chosen row."""
    chosen = candidates[0]
    for row in candidates:
        if not row["rho"] >= RHO_HIGH:
            break
        chosen = row
    return chosen


def probe(opt, x: Tensor, y: Tensor, grad: list[Tensor], z: Tensor, acts, n2: int, h: float) -> dict:
    """Run the probe for the ``KFAC`` ``opt`` at its current step (factors already updated with
    this batch, ``grad`` = ∇h in blocks, ``h`` = h(θ)); returns the record
    ``{"damping": λ₀, "rule", "step", "candidates": [{"damping", "rho", "h_new", "model_change", "alpha"}]}``.
    The parameters, the factors and the generator are left as they were."""
    cfg = opt.config
    curv = opt.curvature
    eta = cfg.weight_decay
    lams = grid(cfg.min_damping, cfg.max_damping)
    while True:  # a factor too ill-conditioned at the smallest γ drops that candidate (and smaller)
        try:
            inverses = curv.refresh(cfg.approx, [math.sqrt(lam + eta) for lam in lams], cfg.damping_type)
            break
        except DecompositionError as exc:
            if len(lams) == 1:  # not even the largest λ: start from the paper's λ₀ (the step handles the rest)
                lam0 = min(max(PAPER, cfg.min_damping), cfg.max_damping)
                return {"damping": lam0, "rule": f"probe failed ({exc}); the paper's λ₀", "step": opt.k + 1,
                        "objective": h, "candidates": []}
            lams = lams[:-1]
    deltas = [opt._precondition(inv, grad) for inv in inverses]
    Q = opt._fisher_gram(x[:n2], z[:n2], acts, n2, deltas)
    rows = torch.stack([torch.stack([Q[c, c], dot(d, d), dot(grad, d)]) for c, d in enumerate(deltas)])
    values = curv.reduce_scalars(rows, (Share.PART, Share.SAME, Share.SAME)).double().tolist()
    zero = 0.0
    steps = []
    for lam, (dFd, dd, gd) in zip(lams, values):
        p = Products(dFd, zero, zero, dd, zero, zero, gd, zero)
        alpha, _ = coefficients(p, lam + eta, False, cfg.lr, False)
        M = model_change(p, lam + eta, alpha, 0.0) if p.finite() and math.isfinite(alpha) else float("nan")
        steps.append((alpha, M))
    # h(θ + αΔ) for every candidate, θ untouched (a functional call), one reduction for all
    names, params = opt._names, [p.detach() for p in opt.params]
    news = []
    with torch.no_grad():
        for (alpha, M), d in zip(steps, deltas):
            if not (math.isfinite(alpha) and math.isfinite(M)):
                news.append(torch.full((2,), float("nan"), dtype=z.dtype, device=z.device))
                continue
            theta = [p + alpha * t for p, t in zip(params, opt._tangent(d).values())]
            out = functional_call(opt.model, dict(zip(names, theta)), (x,))
            news.append(torch.stack([opt.loss.nll(out, y).to(z.dtype), sq_norm(theta).to(z.dtype)]))
        news = curv.reduce_scalars(torch.stack(news), (Share.CASE_MEAN, Share.SAME)).double().tolist()
    opt.host_syncs += 2
    table = []
    for lam, (alpha, M), (nll_new, sq_new) in zip(lams, steps, news):
        h_new = nll_new + 0.5 * eta * sq_new
        rho = reduction_ratio(h_new, h, M) if math.isfinite(M) else float("-inf")
        table.append({"damping": lam, "rho": rho, "h_new": h_new, "model_change": M, "alpha": alpha})
    best = choose(table)
    return {"damping": best["damping"], "rule": RULE, "step": opt.k + 1, "objective": h, "candidates": table}


def copy_record(rec: dict | None) -> dict | None:
    """A deep copy of a probe record (plain values) for ``state_dict``."""
    if rec is None:
        return None
    return {**rec, "candidates": [dict(c) for c in rec["candidates"]]}


def checked_record(rec, checker) -> dict | None:
    """A saved probe record, checked (``None``: no probe has run; states written before
    ``damping="auto"`` existed have none)."""
    if rec is None:
        return None
    checker.mapping(rec, ("damping", "rule", "step", "candidates"), "the initial-damping record")
    lam = checker.real(rec["damping"], "the probed λ₀ (initial_damping)", positive=True)
    if not isinstance(rec["candidates"], list) or not all(isinstance(c, dict) for c in rec["candidates"]):
        checker.fail("the initial-damping record's candidates must be a list of dicts", "the state is damaged")
    return {**copy_record(rec), "damping": lam}
