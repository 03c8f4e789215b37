"""``damping="auto"``: λ₀ chosen from the first batch by a probe of the quadratic model (beyond
the paper; docs/algorithm.md#automatic-initial-damping).

The paper starts every problem at λ₀ = 150 and lets the Levenberg–Marquardt rule (M&G 2015 §6.5)
bring λ down by ω₁ = (19/20)^5 every 5 steps: on the autoencoders that is ~100 iterations spent
on damping alone. The probe asks the same question the LM rule asks — does the quadratic model
predict what the objective does (the reduction ratio ρ)? — for a whole geometric range of λ at
once, on the first step's own batch, factors and gradient:

1. for a λ on the grid ``λ_j = 10^j`` (``j = 4, 3, …, -3``, inside ``[min_damping,
   max_damping]``): the damped inverse at γ = sqrt(λ + η) (M&G 2015 §6.6, as Algorithm 2 starts
   γ), the proposal ``Δ_λ = −F̃_γ⁻¹ ∇h``, its α from the exact-Fisher quadratic model (§6.4) and
   the predicted change ``M(αΔ_λ) − M(0)``;
2. the objective ``h(θ + αΔ_λ)`` on the batch (θ itself is not touched) and
   ``ρ(λ) = (h(θ+δ) − h(θ)) / (M(δ) − M(0))`` (§6.5; docs/algorithm.md#λ-levenbergmarquardt);
3. **the rule**: λ₀ is a grid λ with ``ρ ≥ 3/4`` whose next smaller grid λ has ``ρ < 3/4`` (or
   the smallest of the grid), found by bisection over the grid: at most 4 candidates of the 8.
   Where ρ falls as λ does (every problem of benchmarks/results/initial_damping.md), that is
   the last λ, walking down, before the first with ρ < 3/4 — what the LM rule does from a
   large λ (shrink λ while ρ > 3/4), taken in decades on one batch instead of by ω₁ every T₁
   steps. Stopping at ρ < 3/4 rather than 1/4 errs on the side of trust: the LM rule brings λ
   further down if the next batches allow it, while a λ₀ too small costs steps the model
   cannot predict. If the largest λ already has ``ρ < 3/4``, λ₀ is the largest; if no inverse
   can be built at any probed λ, the paper's 150.

4. **γ₀** (same step, same batch): the paper's γ criterion (M&G 2015 §6.6 — the candidate whose
   update, at its own α, minimises the quadratic model M(δ) − M(0) with λ = λ₀) over the wide grid
   ``γ = s·10^(−j/2)``, ``j = 0 … 8``, from the paper's start ``s = sqrt(λ₀ + η)`` down four
   decades. The γ grid of Algorithm 2 moves γ by at most ω₂ = (19/20)^10 ≈ 0.6 every T2 = 20
   steps, so a start a decade too high costs ~90 iterations (benchmarks/results/initial_damping.md
   measures the start's effect). The grid goes down only: above the natural-gradient minimum,
   M falls again as γ grows, towards the plain-gradient limit (γ → ∞: Δ ∝ −∇h with its optimal
   α), which wins the one-step comparison on some problems at initialisation (CURVES: M = −1046
   at γ = 3000 against −949 at 0.01, λ = 0.1) and is the plateau the paper's λ₀ = 150 leads CURVES
   onto; the probe is to start K-FAC, not gradient descent. Skipped when the user fixed ``gamma``
   or set ``adapt_gamma=False``.

Then Algorithm 2 runs unchanged from λ₀ and γ₀. The λ probe costs, per candidate, one damped
inverse, one preconditioning, one exact-F product and one forward pass (about half an
iteration); the γ₀ choice is the γ grid with nine candidates instead of three (Cholesky
factors, not inverses, for the factored damping: ``curvature/grid.py``) — together about ten
iterations' time, on the first step only. It uses no random numbers, so it is deterministic and
a resumed run repeats it bit for bit. Its outcome is ``KFAC.initial_damping`` (also in
``state_dict``) and an ``"initial_damping"`` event.
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
RULE = "probe: bisection over λ = 1e4, 1e3, …, 1e-3 for a λ with ρ ≥ 3/4 whose next smaller has ρ < 3/4"
#: the γ₀ candidates as multiples of the paper's start sqrt(λ₀ + η), largest first: 1, 10^(-1/2), …,
#: 1e-4 (step 4 of the module docstring)
GAMMA_STEPS = tuple(10.0 ** (-j / 2) for j in range(9))
GAMMA_RULE = "the γ grid's criterion (min M(δ) − M(0) at λ₀) over γ = s, s·10^(-1/2), …, s·1e-4, s = sqrt(λ₀ + η)"


def gamma_grid(damping: float, weight_decay: float) -> list[float]:
    """The γ₀ candidates at λ₀ = ``damping``: ``s·10^(−j/2)``, ``j = 0 … 8``, ``s = sqrt(λ₀ + η)``."""
    s = math.sqrt(damping + weight_decay)
    return [s * f for f in GAMMA_STEPS]


def is_auto(damping) -> bool:
    return isinstance(damping, str) and damping == AUTO


def grid(lower: float, upper: float) -> list[float]:
    """The probed λ inside ``[lower, upper]`` (the config's ``min_damping``, ``max_damping``); at
    least one: the nearest bound when the range misses the grid."""
    out = [lam for lam in GRID if lower <= lam <= upper]
    return out or [min(max(GRID[0], lower), upper)]


def bisect(rho_at, n: int) -> int:
    """The rule's search (module docstring, step 3) over grid indices ``0 … n−1`` (largest λ
    first): ``rho_at(i)`` evaluates candidate ``i``; returns the chosen index — one with
    ρ ≥ 3/4 whose successor has ρ < 3/4 (or is past the end), else 0."""
    lo, hi = -1, n  # ρ(lo) ≥ 3/4 (lo = −1: none yet), ρ(hi) < 3/4 (hi = n: past the smallest λ)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rho_at(mid) >= RHO_HIGH:
            lo = mid
        else:
            hi = mid
    return max(lo, 0)


def probe(opt, x: Tensor, y: Tensor, grad: list[Tensor], z: Tensor, acts, n2: int, h: float) -> dict:
    """Run the probe for the ``KFAC`` ``opt`` at its current step (factors already updated with
    this batch, ``grad`` = ∇h in blocks, ``h`` = h(θ)); returns the record
    ``{"damping": λ₀, "rule", "step", "objective", "candidates": [{"damping", "rho", "h_new",
    "model_change", "alpha"}, …]}`` (the probed λ, largest first). The parameters, the factors
    and the generator are left as they were."""
    cfg = opt.config
    lams = grid(cfg.min_damping, cfg.max_damping)
    rows: dict[int, dict] = {}

    def rho_at(i: int) -> float:
        rows[i] = _candidate(opt, lams[i], x, y, grad, z, acts, n2, h)
        return rows[i]["rho"]

    i = bisect(rho_at, len(lams))
    record = {"damping": lams[i], "rule": RULE, "step": opt.k + 1, "objective": h,
              "candidates": [rows[j] for j in sorted(rows)]}
    if all(r.get("failed") for r in rows.values()):  # no inverse at any probed λ
        record.update(damping=min(max(PAPER, cfg.min_damping), cfg.max_damping),
                      rule=f"probe failed ({rows[i]['failed']}); the paper's λ₀")
    return record


def _candidate(opt, lam: float, x, y, grad, z, acts, n2: int, h: float) -> dict:
    """ρ(λ) of the proposal at λ (steps 1–2 of the module docstring)."""
    cfg, curv, eta = opt.config, opt.curvature, opt.config.weight_decay
    row = {"damping": lam, "rho": float("-inf"), "h_new": float("nan"), "model_change": float("nan"),
           "alpha": float("nan")}
    gamma = math.sqrt(lam + eta)
    try:  # block-diagonal: through Cholesky solves, as the γ grid's (tridiag's probe needs its own inverse)
        (inverse,) = (curv.grid_candidates(cfg.approx, [gamma]) if cfg.cholesky_candidates and cfg.approx == "blockdiag"
                      else curv.refresh(cfg.approx, [gamma], cfg.damping_type))
    except DecompositionError as exc:  # a factor too ill-conditioned at this γ: not trusted
        return {**row, "failed": str(exc)}
    u = opt._precondition(inverse, grad)  # Δ = −u
    Q = opt._fisher_gram(x[:n2], z[:n2], acts, n2, [u])
    dFd, dd, gd = curv.reduce_scalars(torch.stack([Q[0, 0], dot(u, u), -dot(grad, u)]),
                                      (Share.PART, Share.SAME, Share.SAME)).double().tolist()
    p = Products(dFd, 0.0, 0.0, dd, 0.0, 0.0, gd, 0.0)
    alpha, _ = coefficients(p, lam + eta, False, cfg.lr, False)
    M = model_change(p, lam + eta, alpha, 0.0)
    opt.host_syncs += 1
    if not (p.finite() and math.isfinite(alpha) and math.isfinite(M)):
        return {**row, "alpha": alpha, "model_change": M}
    with torch.no_grad():  # h(θ + αΔ), θ untouched (a functional call)
        theta = [w.detach() - alpha * t for w, t in zip(opt.params, opt._tangent(u).values())]
        out = functional_call(opt.model, dict(zip(opt._names, theta)), (x,))
        both = torch.stack([opt.loss.nll(out, y).to(z.dtype), sq_norm(theta).to(z.dtype)])
        nll_new, sq_new = curv.reduce_scalars(both, (Share.CASE_MEAN, Share.SAME)).double().tolist()
    opt.host_syncs += 1
    h_new = nll_new + 0.5 * eta * sq_new
    return {**row, "rho": reduction_ratio(h_new, h, M), "h_new": h_new, "model_change": M, "alpha": alpha}


def with_gamma(rec: dict, gamma: float, values) -> dict:
    """The probe record ``rec`` with step 4's outcome: ``gamma`` (γ₀), ``gamma_rule`` and
    ``gamma_candidates`` = ``[[γ, M(δ) − M(0)], …]`` (the grid's values, largest γ first)."""
    return {**rec, "gamma": float(gamma), "gamma_rule": GAMMA_RULE,
            "gamma_candidates": [[float(g), float(m)] for g, m in values]}


def copy_record(rec: dict | None) -> dict | None:
    """A deep copy of a probe record (plain values) for ``state_dict``."""
    if rec is None:
        return None
    out = {**rec, "candidates": [dict(c) for c in rec["candidates"]]}
    if "gamma_candidates" in rec:
        out["gamma_candidates"] = [list(c) for c in rec["gamma_candidates"]]
    return out


def checked_record(rec, checker) -> dict | None:
    """A saved probe record, checked (``None``: no probe has run; states written before
    ``damping="auto"`` existed have none)."""
    if rec is None:
        return None
    checker.mapping(rec, ("damping", "rule", "step", "candidates"), "the initial-damping record")
    lam = checker.real(rec["damping"], "the probed λ₀ (initial_damping)", positive=True)
    if not isinstance(rec["candidates"], list) or not all(isinstance(c, dict) for c in rec["candidates"]):
        checker.fail("the initial-damping record's candidates must be a list of dicts", "the state is damaged")
    out = {**copy_record(rec), "damping": lam}
    if "gamma" in rec:  # step 4's outcome (records written before γ₀ was probed have none)
        out["gamma"] = checker.real(rec["gamma"], "the probed γ₀ (initial_damping)", positive=True)
        cands = rec.get("gamma_candidates")
        if not isinstance(cands, list) or not all(isinstance(c, (list, tuple)) and len(c) == 2 for c in cands):
            checker.fail("the initial-damping record's gamma_candidates must be a list of [γ, M] pairs",
                         "the state is damaged")
    return out
