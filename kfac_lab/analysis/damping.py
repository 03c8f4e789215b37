"""Tikhonov damping alone is not enough (M&G 2015 §6.4; figure 7 of the ICML version;
docs/algorithm.md#the-quadratic-model).

On a fixed network and batch, with the exact Fisher ``F`` of the batch, the quadratic model
``M(δ) − M(0) = ½ δᵀCδ + ∇hᵀδ``, ``C = F + (λ+η)I`` (as in ``optim/quadratic.py``) is evaluated
for the K-FAC proposal ``Δ(γ) = −F̆_γ⁻¹∇h`` (factored Tikhonov damping γ) over a grid of γ:

- ``tikhonov``: ``δ = Δ(γ)`` as it is (α = 1);
- ``rescaled``: ``δ = α*Δ(γ)`` with ``α* = −∇hᵀΔ / ΔᵀCΔ`` (M&G 2015 §6.4, re-scaling by the exact F);
- ``momentum``: ``δ = αΔ(γ) + μδ₀`` with ``(α, μ)`` minimising ``M`` (M&G 2015 §7), ``δ₀`` the last update
  of a short K-FAC run;
- ``ideal``: the exact damped Newton step ``δ = −C⁻¹∇h``, the minimiser of ``M``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from .. import checks
from ..curvature import (batch_factors, factor_pairs, find_layers, get_loss, make_inverse, output_gradients,
                         params_to_vector, vector_to_params)
from ..curvature.exact import estimate_exact_fisher_bytes, exact_fisher
from ..curvature.memory import itemsize, refuse_if_too_large
from ..optim import KFAC
from ..optim.quadratic import Products, coefficients, model_change
from ._common import model_copy, provenance

__all__ = ["damping_study"]


def damping_study(
    model: nn.Module,
    loss,
    x: Tensor,
    y: Tensor,
    gammas: Sequence[float] | None = None,
    seed: int = 0,
    damping: float | Sequence[float] | None = None,
    weight_decay: float = 1e-5,
    kfac_steps: int = 5,
    approx: str = "blockdiag",
    factors: str = "kfac",
    dtype: torch.dtype = torch.float64,
    kfac_options: dict | None = None,
    max_bytes: int = 2**32,
) -> xr.Dataset:
    """How much of the quadratic model's optimal decrease each damping technique achieves.

    Runs ``kfac_steps`` full-batch K-FAC iterations on ``(x, y)`` (a copy of ``model`` in
    ``dtype``; ``kfac_options`` go to ``KFAC``), then at the resulting parameters computes the
    exact Fisher ``F`` of the batch (dense: small networks), ``∇h = ∇ mean NLL + ηθ`` and, for each
    γ, ``Δ(γ) = −F̆_γ⁻¹∇h`` (``approx="tridiag"`` for ``F̂``) from the factors — the K-FAC
    run's running estimates (``factors="kfac"``, what the optimizer would use) or the exact
    factors of this batch (``factors="batch"``).

    ``damping`` (λ): fixed for the whole comparison; default the K-FAC run's final λ. A sequence
    of λ values evaluates the same proposals Δ(γ) under each (Δ does not depend on λ; ``C``, α, μ
    and the ideal decrease do): every variable then has a leading dim ``damping``.
    ``weight_decay`` (η). ``gammas``: the γ grid (default ``sqrt(λ+η)·10^[-3 … 2]``, 21 points).

    Returns an ``xarray.Dataset`` over dim ``gamma`` with ``reduction_tikhonov``,
    ``reduction_rescaled``, ``reduction_momentum`` (each ``M(δ) − M(0)``: NEGATIVE is progress,
    more negative is better), ``alpha_rescaled``, ``alpha_momentum``, ``mu_momentum`` and
    ``fraction_*`` = reduction / ideal reduction (1 = optimal); scalars ``reduction_ideal``
    (``−½∇hᵀC⁻¹∇h``), ``best_tikhonov``, ``best_rescaled``, ``best_momentum`` (the most negative
    over γ) and ``best_gamma_*``. For every γ: ideal ≤ momentum ≤ rescaled ≤ tikhonov.

    ``max_bytes``: refuse with a ``MemoryLimitError`` before allocating when the estimate (the
    dense exact Fisher, ``C`` and its Cholesky factor) exceeds it.
    """
    if isinstance(kfac_steps, bool) or not isinstance(kfac_steps, int) or kfac_steps < 1:
        raise ValueError(f"kfac_steps must be an integer >= 1 (the momentum term needs a previous update), "
                         f"got {kfac_steps!r}")
    if factors not in ("kfac", "batch"):
        raise ValueError(f"factors={factors!r}: choose 'kfac' (the run's running estimates) or 'batch'")
    if approx not in ("blockdiag", "tridiag"):
        raise ValueError(f"approx={approx!r}: choose 'blockdiag' or 'tridiag'")
    lossf = get_loss(loss)
    net = model_copy(model, dtype)
    x = x.to(dtype)
    if y.is_floating_point():
        y = y.to(dtype)
    layers = find_layers(net, example_input=x[:1])
    kfac_ids = {id(p) for l in layers for p in l.params}
    if any(p.requires_grad and id(p) not in kfac_ids for p in net.parameters()):
        raise ValueError("damping_study needs a network whose trainable parameters all belong to K-FAC layers")
    seed = checks.seed(seed)
    with torch.no_grad():
        classes = int(net(x[:1]).reshape(1, -1).shape[1])
    P, N = sum(l.num_params for l in layers), int(x.shape[0])
    refuse_if_too_large(
        f"damping_study ({P:,} parameters, {N:,} cases)",
        {"the exact Fisher with its statistics and scratch": estimate_exact_fisher_bytes(layers, N, classes, dtype),
         f"C = F + (λ+η)I, its Cholesky factor and a product ({P:,}×{P:,} each)": 3 * P * P * itemsize(dtype)},
        max_bytes, "use a smaller network or fewer cases (x[:n], y[:n])")

    opts = dict(approx=approx, weight_decay=weight_decay, stats_fraction=1.0, fisher_fraction=1.0, seed=seed)
    opts.update(kfac_options or {})
    opt = KFAC(net, lossf, **opts)
    for _ in range(kfac_steps):
        info = opt.step(x, y)
    lams = [float(opt.damping)] if damping is None else (
        [float(v) for v in damping] if isinstance(damping, (list, tuple, np.ndarray)) else [float(damping)])
    eta = float(weight_decay)
    if not lams or not all(math.isfinite(v) and v >= 0 for v in lams):
        raise ValueError(f"damping must be >= 0 (a number or a non-empty list of them), got {damping!r}")
    lam = lams[0]
    total = lam + eta
    if gammas is None:
        g0 = math.sqrt(total) if total > 0 else 1.0
        gammas = g0 * 10.0 ** np.linspace(-3.0, 2.0, 21)
    gammas = np.asarray(sorted(float(g) for g in gammas), dtype=np.float64)
    if gammas.size == 0 or not np.all(gammas > 0):
        raise ValueError("gammas must be a non-empty list of positive numbers")

    # The exact quadratic model at the current parameters.
    F = exact_fisher(net, lossf, x, mode="exact", layers=layers, dtype=dtype, max_bytes=max_bytes).dense
    net.zero_grad(set_to_none=True)
    with torch.enable_grad():
        nll = lossf.nll(net(x), y)
        nll.backward()
    theta = params_to_vector([l.weight_matrix().detach() for l in layers])
    grad = params_to_vector([l.grad_matrix().detach() for l in layers]) + eta * theta
    net.zero_grad(set_to_none=True)
    ideals = []
    for lam_j in lams:  # the minimum of M: −½∇hᵀC⁻¹∇h (the exact damped Newton step)
        C = F + (lam_j + eta) * torch.eye(F.shape[0], dtype=dtype)
        newton = torch.cholesky_solve(-grad.unsqueeze(1), torch.linalg.cholesky(C)).squeeze(1)
        ideals.append(float(0.5 * newton @ C @ newton + grad @ newton))

    if factors == "kfac":
        A, G = opt.factors.diag()
        A_off, G_off = opt.factors.off_diag() if approx == "tridiag" else (None, None)
    else:
        a, g, _ = output_gradients(net, layers, lossf, x, mode="exact")
        Ab, Gb = batch_factors(a, g, factor_pairs(len(layers), "tridiag"))
        n = len(layers)
        A, G = [Ab[(i, i)] for i in range(n)], [Gb[(i, i)] for i in range(n)]
        A_off = [Ab[(i, i + 1)] for i in range(n - 1)] if approx == "tridiag" else None
        G_off = [Gb[(i, i + 1)] for i in range(n - 1)] if approx == "tridiag" else None
    A = [t.to(dtype) for t in A]
    G = [t.to(dtype) for t in G]
    if A_off is not None:
        A_off, G_off = [t.to(dtype) for t in A_off], [t.to(dtype) for t in G_off]
    prev = params_to_vector([d.to(dtype) for d in opt.delta0[: len(layers)]])
    grad_mats = vector_to_params(grad, layers)

    out = {k: np.full((len(lams), gammas.size), np.nan) for k in
           ("reduction_tikhonov", "reduction_rescaled", "reduction_momentum", "alpha_rescaled", "alpha_momentum",
            "mu_momentum")}
    Fp = F @ prev
    for c, gamma in enumerate(gammas):
        inv = make_inverse(approx, A, G, A_off, G_off, gamma=float(gamma))
        delta = -params_to_vector(inv.apply(grad_mats))
        Fd = F @ delta
        p = Products(dFd=float(delta @ Fd), dFp=float(delta @ Fp), pFp=float(prev @ Fp), dd=float(delta @ delta),
                     dp=float(delta @ prev), pp=float(prev @ prev), gd=float(grad @ delta), gp=float(grad @ prev))
        for j, lam_j in enumerate(lams):
            total = lam_j + eta
            out["reduction_tikhonov"][j, c] = model_change(p, total, 1.0, 0.0)
            a_r, _ = coefficients(p, total, False, None, False)
            out["alpha_rescaled"][j, c] = a_r
            out["reduction_rescaled"][j, c] = model_change(p, total, a_r, 0.0)
            a_m, mu_m = coefficients(p, total, True, None, True)
            out["alpha_momentum"][j, c], out["mu_momentum"][j, c] = a_m, mu_m
            out["reduction_momentum"][j, c] = model_change(p, total, a_m, mu_m)

    data = {}
    labels = {
        "reduction_tikhonov": "M(δ) − M(0), δ = Δ(γ) (factored Tikhonov alone, α = 1)",
        "reduction_rescaled": "M(δ) − M(0), δ = α*Δ(γ) (re-scaled by the exact F)",
        "reduction_momentum": "M(δ) − M(0), δ = αΔ(γ) + μδ₀ (re-scaling + momentum)",
        "alpha_rescaled": "α* of the re-scaled step",
        "alpha_momentum": "α of the momentum step",
        "mu_momentum": "μ of the momentum step",
    }
    ideal = np.asarray(ideals)
    for k, v in out.items():
        data[k] = xr.Variable(("damping", "gamma"), v, attrs={"long_name": labels[k]})
    for kind in ("tikhonov", "rescaled", "momentum"):
        red = out[f"reduction_{kind}"]
        data[f"fraction_{kind}"] = xr.Variable(("damping", "gamma"), red / ideal[:, None], attrs={
            "long_name": f"({kind}) reduction / ideal reduction (1 = the optimum of M)"})
        b = np.nanargmin(red, axis=1)
        data[f"best_{kind}"] = xr.Variable("damping", red[np.arange(len(lams)), b],
                                           attrs={"long_name": f"best {kind} reduction over γ"})
        data[f"best_gamma_{kind}"] = xr.Variable("damping", gammas[b], attrs={"long_name": f"γ of best_{kind}"})
    data["reduction_ideal"] = xr.Variable("damping", ideal, attrs={"long_name": "M(−C⁻¹∇h) − M(0) = −½∇hᵀC⁻¹∇h"})
    ds = xr.Dataset(data, coords={"gamma": ("gamma", gammas, {"long_name": "γ (factored Tikhonov damping)"}),
                                  "damping": ("damping", np.asarray(lams), {"long_name": "λ (Levenberg–Marquardt damping)"})})
    if not isinstance(damping, (list, tuple, np.ndarray)):
        ds = ds.isel(damping=0)  # one λ: scalars over γ, as before (λ stays as a scalar coordinate)
    ds.attrs = provenance("damping", model, layers, lossf.name, seed, {
        "damping": lam if len(lams) == 1 else lams,
        "weight_decay": eta,
        "kfac_steps": int(kfac_steps),
        "kfac_final_gamma": float(opt.gamma),
        "kfac_final_damping": float(opt.damping),
        "kfac_last_loss": float(info.loss),
        "loss_at_study": float(nll.detach()),
        "approx": approx,
        "factors": factors,
        "num_cases": int(x.shape[0]),
        "num_params": int(F.shape[0]),
        "dtype": dtype,
        "note": "reductions are M(δ) − M(0): negative is progress; C = F + (λ+η)I with F the exact Fisher of the batch",
    })
    return ds
