"""Where a K-FAC iteration's time goes: the matrix-product flops of each phase of Algorithm 2
(M&G 2015 §8–9; docs/algorithm.md#one-iteration), as multiples of one SGD step's, for a stack of Linear layers.

Only GEMM flops are counted (``2·m·n·k`` per product): on a machine where the two optimizers'
products run equally fast this is a *floor* for the ratio "K-FAC iteration / SGD step" —
elementwise work (activations and φ', the loss, sampling, dot products, copies) and the
Cholesky factorisation's lower speed only add to it. ``benchmarks/bench_kfac_step.py`` prints
it next to the measured ratios; the lab's lectures use it to show why larger batches make
K-FAC's overhead shrink (the preconditioner and the inverses do not grow with the batch).

Phases per iteration (amortised over T1, T2, T3), for layer ``i`` with ``d_i = in_i + 1``
(bias) inputs and ``o_i`` outputs, batch ``m``, ``n₁ = τ₁m``, ``n₂ = τ₂m``:

- ``gradient``: forward ``2mΣ in_i o_i`` + backward (weights, and inputs except layer 1's);
- ``statistics``: sampled backward on ``n₁`` cases + the factor GEMMs ``2n₁(d_i² + o_i²)``
  (about half that from ``SYMMETRIC_MIN_ROWS`` rows on, where only the lower blocks are
  computed: ``factor_update_flops``) and the adjacent pairs ``2n₁(d_i d_{i+1} + o_i o_{i+1})``
  with ``cross_factors`` (``KFAC`` collects them only while ``approx="tridiag"``, or with
  ``cross_factors=True``);
- ``inverses``: per factor set, Cholesky ``n³/3`` + LAPACK's ``L⁻ᵀL⁻¹`` (``potri``) ``2n³/3``
  (``decompositions.inverse_from_cholesky``); one set every T3; on a γ-grid step (every T2) two
  more Choleskys (``gamma_grid="fast"``: the candidates by triangular solves, ``curvature/grid.py``)
  or two more whole sets (``"full"``);
- ``precondition``: ``2o_i²d_i + 2o_id_i d̃_i`` per candidate (1, or 3 on a γ-grid step; two
  triangular solves with a Cholesky factor count as one product with the inverse), with
  ``d̃_i`` the row length ``V A⁻¹`` is padded to (``curvature.inverses.aligned_width``);
- ``quadratic_model``: forward-mode products on ``n₂`` cases, ``dW·ā + W·dā`` per direction
  (Δ per candidate and δ₀);
- ``damping``: the extra forward of the λ test every T1.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..curvature.factors import SYMMETRIC_BLOCK, SYMMETRIC_MIN_ROWS
from ..curvature.inverses import aligned_width

__all__ = ["factor_update_flops", "iteration_flops", "linear_shapes"]


def factor_update_flops(rows: int, dims: Sequence[int], cross: bool = False) -> int:
    """GEMM flops of one running-average update of the factors of ``dims`` (ā or g widths, one
    per layer) from ``rows`` cases (``KroneckerFactors.update_from_cases``): each diagonal factor
    ``2·rows·d²``, or the lower blocks of ``curvature.factors.symmetric_addmm_``'s split from
    ``SYMMETRIC_MIN_ROWS`` rows on; each adjacent pair ``2·rows·d_i·d_{i+1}`` with ``cross``."""
    def diagonal(d: int) -> int:
        if rows < SYMMETRIC_MIN_ROWS or d <= SYMMETRIC_BLOCK:
            return 2 * rows * d * d
        k = d // 2
        return diagonal(k) + diagonal(d - k) + 2 * rows * k * (d - k)
    total = sum(diagonal(d) for d in dims)
    if cross:
        total += 2 * rows * sum(a * b for a, b in zip(dims, dims[1:]))
    return total


def linear_shapes(model: nn.Module) -> list[tuple[int, int, bool]]:
    """``(in_features, out_features, has_bias)`` of every ``nn.Linear`` in ``model``, in order."""
    shapes = [(m.in_features, m.out_features, m.bias is not None) for m in model.modules() if isinstance(m, nn.Linear)]
    if not shapes:
        raise ValueError("iteration_flops: the model has no nn.Linear layers; pass the layer shapes as (in, out) pairs")
    return shapes


def iteration_flops(layers: nn.Module | Sequence[tuple], batch: int, *, stats_fraction: float = 1 / 8,
                    fisher_fraction: float = 1 / 4, T1: int = 5, T2: int = 20, T3: int = 20,
                    cross_factors: bool = False, adapt_damping: bool = True, adapt_gamma: bool = True,
                    momentum: bool = True, gamma_grid: str = "fast") -> dict:
    """GEMM flops of one block-diagonal K-FAC iteration and of one SGD step on ``batch`` cases.

    ``layers``: a model (its ``nn.Linear`` layers, in order) or ``(in, out[, has_bias])`` tuples.
    Returns ``{"sgd_step": flops, "phases": {phase: flops per iteration}, "kfac_step": total,
    "ratios": {phase: flops / sgd_step}, "ratio": kfac_step / sgd_step}``."""
    shapes = linear_shapes(layers) if isinstance(layers, nn.Module) else [(*s, True)[:3] for s in layers]
    if gamma_grid not in ("fast", "full"):
        raise ValueError(f"iteration_flops: gamma_grid={gamma_grid!r}: choose 'fast' or 'full'")
    if batch < 1 or min(T1, T2, T3) < 1:
        raise ValueError(f"iteration_flops: batch={batch}, T1={T1}, T2={T2}, T3={T3} must all be >= 1")
    m = batch
    n1, n2 = max(1, round(m * stats_fraction)), max(1, round(m * fisher_fraction))
    P = [i * o for i, o, _ in shapes]  # weight entries per layer
    d = [i + int(b) for i, _, b in shapes]  # ā dimension (with the homogeneous 1)
    o = [out for _, out, _ in shapes]
    forward = lambda rows: 2 * rows * sum(P)
    backward = lambda rows: 2 * rows * sum(P) + 2 * rows * sum(P[1:])  # weight grads + input grads (not layer 1's)

    sgd = forward(m) + backward(m)
    candidates_per_step = 1 + (2 / T2 if adapt_gamma else 0)  # the γ grid tries 3 values every T2
    stats = 2 * n1 * sum(P[1:]) + factor_update_flops(n1, d, cross_factors) + factor_update_flops(n1, o, cross_factors)
    cubes = sum(x ** 3 + y ** 3 for x, y in zip(d, o))
    inverse_set = cubes  # Cholesky n³/3 + potri 2n³/3
    grid_candidate = cubes / 3 if gamma_grid == "fast" else inverse_set  # a Cholesky, or a whole inverse
    precondition = sum(2 * y * y * x + 2 * y * x * aligned_width(x) for x, y in zip(d, o))  # (V A⁻¹) padded, then G⁻¹·
    jvp_direction = 2 * n2 * sum(x * y for x, y in zip(d, o)) + 2 * n2 * sum(P[1:])  # ā·dWᵀ everywhere, dā·Wᵀ after layer 1
    directions = candidates_per_step + (1 if momentum else 0)
    phases = {
        "gradient": sgd,
        "statistics": stats,
        "inverses": inverse_set / T3 + (2 / T2 * grid_candidate if adapt_gamma else 0.0),
        "precondition": precondition * candidates_per_step,
        "quadratic_model": jvp_direction * directions,
        "damping": forward(m) / T1 if adapt_damping else 0.0,
    }
    total = sum(phases.values())
    return {"sgd_step": float(sgd), "phases": {k: float(v) for k, v in phases.items()}, "kfac_step": float(total),
            "ratios": {k: v / sgd for k, v in phases.items()}, "ratio": total / sgd}
