"""The error of the Kronecker approximation in terms of cumulants (M&G 2015 §3.1 and Appendix A;
docs/algorithm.md#analysis).

For the weights ``W_i[r, p]`` and ``W_j[s, q]`` write ``ā₁ = ā_i[p]``, ``g₁ = g_i[r]``,
``ā₂ = ā_j[q]``, ``g₂ = g_j[s]``. The approximation error of that entry of ``F̃`` is
``E[ā₁ā₂g₁g₂] − E[ā₁ā₂]E[g₁g₂]``. Expanding both moments in joint cumulants (the moment–cumulant
formula over the 15 partitions of {ā₁, ā₂, g₁, g₂}) gives, for ANY distribution,

    error = κ(ā₁,ā₂,g₁,g₂) + E[ā₁] κ(ā₂,g₁,g₂) + E[ā₂] κ(ā₁,g₁,g₂)            (eqn 3)
          + κ(ā₁,g₁) κ(ā₂,g₂) + κ(ā₁,g₂) κ(ā₂,g₁)                               ("kappa22")
          + E[g₁] κ(ā₁,ā₂,g₂) + E[g₂] κ(ā₁,ā₂,g₁)
          + E[g₂] E[ā₂] κ(ā₁,g₁) + E[g₁] E[ā₂] κ(ā₁,g₂)
          + E[g₂] E[ā₁] κ(ā₂,g₁) + E[g₁] E[ā₁] κ(ā₂,g₂)                         ("mean_terms")

with ``κ(x,y) = E[x̃ỹ]``, ``κ(x,y,z) = E[x̃ỹz̃]`` and
``κ(x,y,z,w) = E[x̃ỹz̃w̃] − E[x̃ỹ]E[z̃w̃] − E[x̃z̃]E[ỹw̃] − E[x̃w̃]E[ỹz̃]`` on centred variables
``x̃ = x − E[x]``. Under the model's predictive distribution ``E[g | x] = 0`` (Lemma 4), so both
``E[g] = 0`` and ``κ(ā, g) = E[ā E[g|x]] = 0`` (``ā`` depends on the input only): the last two
lines vanish and eqn 3 is exact. NOTE: eqn 3 needs ``κ(ā, g) = 0`` as well as ``E[g] = 0``
(``E[g] = 0`` alone leaves ``kappa22``). For a *sample* (sampled targets) neither holds
exactly; ``residual`` = error − (eqn 3's three terms) = ``kappa22 + mean_terms`` reports the
sampling effect. ``mode="exact"`` (softmax outputs) weights every class by its probability
instead of sampling: then the residual is zero to rounding.

Bound (eqn 4): ``|κ₄| + |E[ā₁]| |κ(ā₂,g₁,g₂)| + |E[ā₂]| |κ(ā₁,g₁,g₂)|``.

All terms are computed with batched contractions over cases, never with Python loops over weight
pairs: per case the draws share ``ā``, so every fourth moment is ``Σ_n (ā_n ā_nᵀ) ⊗ H_n`` with
``H_n = Σ_k w_k g_k g_kᵀ`` — one GEMM per block pair over the cases (chunked), ``N·P²``
multiply-adds whatever the number of targets per case.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from ..curvature import Capture, get_loss, output_gradients
from .. import checks
from ..curvature.losses import Categorical
from ..curvature.memory import itemsize, refuse_if_too_large
from ._common import block_coords, matrix_coords, model_copy, provenance, select_layers, to_numpy

__all__ = ["cumulant_terms", "cumulant_study", "estimate_cumulant_bytes", "PAPER_TOTAL_ERROR", "PAPER_TOTAL_BOUND"]

#: Totals the paper reports for its figure-1 network (middle 4 layers), M&G 2015 §3.1.
PAPER_TOTAL_ERROR = 2894.4
PAPER_TOTAL_BOUND = 4134.6

TERMS = ("error", "kappa4", "kappa3_a", "kappa3_b", "bound", "residual", "kappa22", "mean_terms")

# Entries of one chunk's scratch rows (cases × width); chunks are sized to stay near this.
_CHUNK_ELEMS = 4 * 1024 * 1024


def _check_inputs(a: Sequence[Tensor], g: Sequence[Tensor], weights: Tensor | None):
    """``(A, Gk, w, in_dims, out_dims)``: ā of all layers side by side ``(m, I)``, g ``(k, m, O)``,
    and the draw weights ``(k, m)`` (uniform ``1/(k·m)`` by default)."""
    if len(a) != len(g) or not a:
        raise ValueError(f"need one a and one g per layer, got {len(a)} and {len(g)}")
    g = [gi.unsqueeze(0) if gi.dim() == 2 else gi for gi in g]
    k, m = g[0].shape[:2]
    for i, (ai, gi) in enumerate(zip(a, g)):
        if ai.dim() != 2 or ai.shape[0] != m or gi.dim() != 3 or gi.shape[:2] != (k, m):
            raise ValueError(f"layer {i}: a must be (m, in_dim) and g (k, m, d_out) with the same m and k; "
                             f"got {tuple(ai.shape)} and {tuple(gi.shape)}")
    dtype = a[0].dtype
    if weights is None:
        w = torch.full((k, m), 1.0 / (k * m), dtype=dtype, device=a[0].device)
    else:
        w = torch.as_tensor(weights, dtype=dtype, device=a[0].device)
        if w.dim() == 1:
            w = w.unsqueeze(0)
        if w.shape != (k, m):
            raise ValueError(f"weights must have shape (k, m) = {(k, m)}, got {tuple(w.shape)}")
        if bool((w < 0).any()) or not math.isclose(float(w.sum()), 1.0, rel_tol=1e-6):
            raise ValueError("weights must be >= 0 and sum to 1 (a distribution over the draws)")
    A = torch.cat(list(a), dim=1)
    Gk = torch.cat(g, dim=2)
    return A, Gk, w, [ai.shape[1] for ai in a], [gi.shape[2] for gi in g]


def _fourth_moments(A: Tensor, H: Tensor, in_off, in_dims, out_off, out_dims, sizes, poff, chunk: int) -> Tensor:
    """``Σ_n (ā_n ā_nᵀ) ⊗ H_n`` for every block, in the paper's ordering.

    Per case the draws share ``ā``, so ``Σ_k w_k (ā ⊗ g_k)(ā ⊗ g_k)ᵀ = (ā āᵀ) ⊗ H_n`` with
    ``H_n = Σ_k w_k g_k g_kᵀ``: block ``(i, j)`` is one GEMM ``X_ijᵀ Y_ij`` over cases
    (``X[n] = vec(ā_i ā_jᵀ)``, ``Y[n] = vec(H_n[i, j])``) and a permutation — ``N·P²``
    multiply-adds however many targets each case has. Blocks ``j < i`` are mirrored."""
    m = A.shape[0]
    P = sum(sizes)
    out = torch.empty(P, P, dtype=A.dtype, device=A.device)
    L = len(in_dims)
    for i in range(L):
        ai = slice(in_off[i], in_off[i] + in_dims[i])
        gi = slice(out_off[i], out_off[i] + out_dims[i])
        for j in range(i, L):
            aj = slice(in_off[j], in_off[j] + in_dims[j])
            gj = slice(out_off[j], out_off[j] + out_dims[j])
            Ii, Ij, Oi, Oj = in_dims[i], in_dims[j], out_dims[i], out_dims[j]
            M = torch.zeros(Ii * Ij, Oi * Oj, dtype=A.dtype, device=A.device)
            for s0 in range(0, m, chunk):
                s1 = min(m, s0 + chunk)
                X = (A[s0:s1, ai, None] * A[s0:s1, None, aj]).reshape(s1 - s0, Ii * Ij)
                Y = H[s0:s1, gi, gj].reshape(s1 - s0, Oi * Oj)
                M.addmm_(X.t(), Y)
            blk = M.view(Ii, Ij, Oi, Oj).permute(0, 2, 1, 3).reshape(sizes[i], sizes[j])
            out[poff[i]:poff[i] + sizes[i], poff[j]:poff[j] + sizes[j]] = blk
            if j != i:
                out[poff[j]:poff[j] + sizes[j], poff[i]:poff[i] + sizes[i]] = blk.t()
    return out


def cumulant_terms(a: Sequence[Tensor], g: Sequence[Tensor], weights: Tensor | None = None,
                   chunk: int | None = None) -> dict:
    """Every term of the cumulant expansion of the Kronecker error, for all weight pairs.

    Args:
        a: per layer ``ā`` (input with its homogeneous 1 last when the layer has a bias), shape
            ``(m, in_dim_i)``.
        g: per layer ``g``, shape ``(k, m, d_out_i)`` (``k`` draws per case, e.g. sampled targets)
            or ``(m, d_out_i)``. Each ``(k, m)`` pair is one draw of ``(ā, g)``; ``ā`` is shared
            by the ``k`` draws of a case. NOT the ``1/√k``-scaled ``g`` of ``output_gradients``.
        weights: probability of each draw, shape ``(k, m)`` (default uniform ``1/(k·m)``).
        chunk: cases per GEMM (default: sized to ~32 MB of scratch).

    Returns a dict of ``(P, P)`` tensors in the paper's ordering (``P = Σ d_out_i · in_dim_i``):
    ``error`` (``E[ā₁ā₂g₁g₂] − E[ā₁ā₂]E[g₁g₂]``, from raw moments), ``kappa4``, ``kappa3_a``
    (``E[ā₁]κ(ā₂,g₁,g₂)``), ``kappa3_b`` (``E[ā₂]κ(ā₁,g₁,g₂)``), ``bound`` (eqn 4), ``residual``
    (error − κ₄ − κ3_a − κ3_b), ``kappa22``, ``mean_terms`` (see the module docstring), and
    ``moment4`` (``E[ā₁ā₂g₁g₂]``, i.e. ``F`` on these draws); plus floats ``total_error``
    (Σ|error|), ``total_bound`` (Σ bound), ``total_residual`` (Σ|residual|), ``total_kappa4``,
    ``total_kappa3_a``, ``total_kappa3_b`` (Σ|·|), and ``identity_error``
    (max |error − all terms| — rounding only, the expansion is an identity; the raw moments
    behind ``error`` and the centred ones behind the cumulants are computed separately).

    Cost: two ``N·P²`` contractions over the ``N`` cases (raw and centred fourth moments), however
    many draws ``k`` each case has, plus ``O(N·I·O²)`` for the third moments (``I``, ``O`` the
    total input/output widths).
    """
    A, Gk, w, in_dims, out_dims = _check_inputs(a, g, weights)
    dtype, device = A.dtype, A.device
    m, I = A.shape
    O = Gk.shape[2]
    in_off = np.cumsum([0] + in_dims[:-1]).tolist()
    out_off = np.cumsum([0] + out_dims[:-1]).tolist()
    sizes = [i * o for i, o in zip(in_dims, out_dims)]
    P = sum(sizes)
    poff = np.cumsum([0] + sizes[:-1]).tolist()

    # Moments up to second order (I, O wide).
    wc = w.sum(0)                                               # weight of each case (m,)
    mu_a = wc @ A                                               # E[ā]  (I,)
    mu_g = torch.einsum("km,kmo->o", w, Gk)                     # E[g]  (O,)
    At = A - mu_a
    Gt = Gk - mu_g
    swc = wc.sqrt().unsqueeze(1)
    A_raw = (A * swc).t() @ (A * swc)                           # E[ā āᵀ]
    A_cov = (At * swc).t() @ (At * swc)                         # κ(ā, ā)
    sw = w.sqrt().unsqueeze(2)
    G_raw = torch.einsum("kmo,kmp->op", Gk * sw, Gk * sw)       # E[g gᵀ]
    G_cov = torch.einsum("kmo,kmp->op", Gt * sw, Gt * sw)       # κ(g, g)
    m_t = torch.einsum("km,kmo->mo", w, Gt)                     # Σ_k w g̃ per case
    K = At.t() @ m_t                                            # κ(ā, g)  (I, O)
    # Per-case second moments of g over the draws: H_n = Σ_k w g gᵀ (raw and centred).
    H = torch.einsum("kmo,kmp->mop", Gk * sw, Gk * sw)          # (m, O, O)
    Ht = torch.einsum("kmo,kmp->mop", Gt * sw, Gt * sw)
    del Gk, Gt
    # Third moments: κ(ā, g, g) = Σ_n ã_n ⊗ H̃_n, κ(ā, ā, g) = Σ_n ã_n ⊗ ã_n ⊗ m̃_n.
    T3 = (At.t() @ Ht.reshape(m, O * O)).view(I, O, O)
    U3 = torch.einsum("mp,mq,ms->pqs", At, At, m_t)

    if chunk is None:
        width = max(max(i * j for i in in_dims for j in in_dims), max(o * p for o in out_dims for p in out_dims))
        chunk = max(1, min(m, _CHUNK_ELEMS // max(1, width)))
    M4 = _fourth_moments(A, H, in_off, in_dims, out_off, out_dims, sizes, poff, chunk)     # E[ā₁ā₂g₁g₂]
    M4c = _fourth_moments(At, Ht, in_off, in_dims, out_off, out_dims, sizes, poff, chunk)  # E[ã₁ã₂g̃₁g̃₂]
    del H, Ht

    out = {name: torch.empty(P, P, dtype=dtype, device=device) for name in
           ("error", "kappa4", "kappa3_a", "kappa3_b", "kappa22", "mean_terms")}
    L = len(in_dims)
    for i in range(L):
        ai = slice(in_off[i], in_off[i] + in_dims[i])
        gi = slice(out_off[i], out_off[i] + out_dims[i])
        pi = slice(poff[i], poff[i] + sizes[i])
        for j in range(L):
            aj = slice(in_off[j], in_off[j] + in_dims[j])
            gj = slice(out_off[j], out_off[j] + out_dims[j])
            pj = slice(poff[j], poff[j] + sizes[j])
            shape4 = (in_dims[i], out_dims[i], in_dims[j], out_dims[j])   # [p, r, q, s]
            blk = lambda t: t.reshape(sizes[i], sizes[j])                  # noqa: E731
            kron_raw = A_raw[ai, aj][:, None, :, None] * G_raw[gi, gj][None, :, None, :]
            out["error"][pi, pj] = M4[pi, pj] - blk(kron_raw)
            kron_cov = A_cov[ai, aj][:, None, :, None] * G_cov[gi, gj][None, :, None, :]
            # κ(ā₁,g₁)κ(ā₂,g₂) + κ(ā₁,g₂)κ(ā₂,g₁)
            pair1 = K[ai, gi][:, :, None, None] * K[aj, gj][None, None, :, :]
            pair2 = K[ai, gj][:, None, None, :] * K[aj, gi].t()[None, :, :, None]
            k22 = pair1 + pair2
            out["kappa22"][pi, pj] = blk(k22)
            out["kappa4"][pi, pj] = M4c[pi, pj] - blk(kron_cov + k22)
            # κ(ā₂, g₁, g₂)[q, r, s] and κ(ā₁, g₁, g₂)[p, r, s]
            k3_2 = T3[aj, gi, gj]
            k3_1 = T3[ai, gi, gj]
            out["kappa3_a"][pi, pj] = blk(mu_a[ai][:, None, None, None] * k3_2.permute(1, 0, 2)[None])
            out["kappa3_b"][pi, pj] = blk(k3_1[:, :, None, :] * mu_a[aj][None, None, :, None])
            # the terms with E[g] (x = ā₁, y = ā₂, z = g₁, w = g₂)
            mg_i, mg_j, ma_i, ma_j = mu_g[gi], mu_g[gj], mu_a[ai], mu_a[aj]
            k3_aag_s = U3[ai, aj, gj]                                      # κ(ā₁, ā₂, g₂) [p, q, s]
            k3_aag_r = U3[ai, aj, gi]                                      # κ(ā₁, ā₂, g₁) [p, q, r]
            mt = (mg_i[None, :, None, None] * k3_aag_s[:, None, :, :]                          # E[z]κ(x,y,w)
                  + mg_j[None, None, None, :] * k3_aag_r.permute(0, 2, 1)[:, :, :, None]       # E[w]κ(x,y,z)
                  + K[ai, gi][:, :, None, None] * (ma_j[:, None] * mg_j[None, :])[None, None]  # κ(x,z)E[y]E[w]
                  + K[ai, gj][:, None, None, :] * (ma_j[None, :, None] * mg_i[:, None, None])[None]  # κ(x,w)E[y]E[z]
                  + K[aj, gi].t()[None, :, :, None] * (ma_i[:, None, None, None] * mg_j[None, None, None, :])
                  + K[aj, gj][None, None, :, :] * (ma_i[:, None] * mg_i[None, :])[:, :, None, None])
            out["mean_terms"][pi, pj] = blk(mt.expand(shape4))
    del M4c
    out["bound"] = out["kappa4"].abs() + out["kappa3_a"].abs() + out["kappa3_b"].abs()
    out["residual"] = out["error"] - out["kappa4"] - out["kappa3_a"] - out["kappa3_b"]
    out["moment4"] = M4
    identity = (out["residual"] - out["kappa22"] - out["mean_terms"]).abs().max()
    scale = out["error"].abs().max().clamp(min=torch.finfo(dtype).tiny)
    out.update({
        "total_error": float(out["error"].abs().sum()),
        "total_bound": float(out["bound"].sum()),
        "total_residual": float(out["residual"].abs().sum()),
        "total_kappa4": float(out["kappa4"].abs().sum()),
        "total_kappa3_a": float(out["kappa3_a"].abs().sum()),
        "total_kappa3_b": float(out["kappa3_b"].abs().sum()),
        "identity_error": float(identity),
        "identity_rel_error": float(identity / scale),
    })
    return out


def estimate_cumulant_bytes(layers, cases: int, draws: int, dtype: torch.dtype = torch.float64) -> dict:
    """The big buffers of :func:`cumulant_study` in bytes, by what they hold: ``P = Σ d_out·in_dim``
    parameters, ``I = Σ in_dim``, ``O = Σ d_out`` over ``layers``, ``draws`` targets per case."""
    b = itemsize(dtype)
    I, O = sum(l.in_dim for l in layers), sum(l.d_out for l in layers)
    P = sum(l.num_params for l in layers)
    return {
        f"the 12 {P:,}×{P:,} matrices of the expansion": 12 * P * P * b,
        f"the output gradients of {draws:,} draws × {cases:,} cases": 4 * draws * cases * O * b,
        "the per-case second moments of g": 2 * cases * O * O * b,
        "the inputs ā and the third moments": (3 * cases * I + I * O * O + I * I * O) * b,
        "the GEMM scratch": 2 * _CHUNK_ELEMS * b,
    }


def _class_gradients(model: nn.Module, sel, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """``ā`` and, for every class ``c``, ``g`` with target ``c`` (shape ``(C, m, d_out)``), and the
    probabilities ``p`` ``(m, C)``: the exact distribution over targets of a softmax output."""
    with torch.enable_grad(), Capture(sel, grads=False, outputs=True) as cap:
        z = model(x)
    s = [cap.s[l.index] for l in sel]
    z2 = z.reshape(z.shape[0], -1)
    p = torch.softmax(z2.detach(), dim=1)
    C = p.shape[1]
    eye = torch.eye(C, dtype=p.dtype, device=p.device)
    dirs = (p.unsqueeze(0) - eye.unsqueeze(1)).reshape(C, *z.shape)  # ∂ nll(z, c)/∂z = p − e_c
    try:
        gs = torch.autograd.grad(z, s, dirs, is_grads_batched=True)
    except RuntimeError:  # an op without a batching rule
        outs = [torch.autograd.grad(z, s, d, retain_graph=True) for d in dirs]
        gs = [torch.stack(col) for col in zip(*outs)]
    a = [cap.a[l.index] for l in sel]
    g = [l.outputs(gi, lead=2) for gi, l in zip(gs, sel)]
    return a, g, p


def _location_draws(a, g, weights, sel):
    """Weight-sharing layers (convolutions): every ``(case, location)`` pair is one draw of
    ``(ā_t, g_t)`` — KFC's independence assumption, given its other two (Grosse & Martens 2016 §3.1):
    ``|T|·error`` is then ``E[Σ_t ā_tā_tᵀ ⊗ g_tg_tᵀ] − Ω ⊗ Γ``. Pairs of layers need the same draws,
    so all the layers studied must have the same number of locations ``|T|``."""
    Ts = [t.shape[1] if t.dim() == 3 else 1 for t in a]
    if all(t.dim() == 2 for t in a):
        return a, g, weights, 1
    if len(set(Ts)) > 1 or any(t.dim() == 2 for t in a):
        listed = ", ".join(f"{l.name} ({T})" for l, T in zip(sel, Ts))
        raise ValueError(f"cumulant_study: with weight sharing every (case, location) pair is one draw, so the layers "
                         f"studied together need the same number of output locations; these have {listed}. Study "
                         "one convolution at a time (layers=[k]), or layers with equal locations")
    T = Ts[0]
    k, m = g[0].shape[0], g[0].shape[1]
    w = torch.full((k, m), 1.0 / (k * m), dtype=a[0].dtype, device=a[0].device) if weights is None else weights
    w = (w[:, :, None].expand(k, m, T) / T).reshape(k, m * T)
    return [t.reshape(m * T, -1) for t in a], [t.reshape(k, m * T, -1) for t in g], w, T


def cumulant_study(
    model: nn.Module,
    loss,
    x: Tensor,
    layers: Sequence[int] | None = None,
    samples: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    mode: str = "sampled",
    max_bytes: int = 2**32,
) -> xr.Dataset:
    """Cumulant decomposition of the Kronecker error for every weight pair of ``layers``.

    ``mode="sampled"`` (default): ``ā`` and ``g`` from ``samples`` targets drawn per case from the
    model's predictive distribution (seeded by ``seed``); each ``(case, sample)`` is one draw, so
    ``error`` equals ``F − F̃`` on these sampled statistics. ``mode="exact"`` (categorical loss
    only): every class weighted by its probability — the exact expectation, where the identity of
    eqn 3 holds and ``residual`` is zero to rounding.

    Returns an ``xarray.Dataset`` with over ``(row, col)`` (the same coords as
    :func:`fisher_study`): ``error``, ``kappa4``, ``kappa3_a``, ``kappa3_b``, ``bound``,
    ``residual``, ``kappa22``, ``mean_terms``; scalars ``total_error``, ``total_bound``,
    ``total_residual``, ``total_kappa4``, ``total_kappa3_a``, ``total_kappa3_b``,
    ``identity_error``; over ``(block_row, block_col)``: ``block_error`` and ``block_bound``
    (Σ|error| and Σ bound per layer pair).

    The paper reports a total error of 2894.4 against a bound of 4134.6 for its network (middle 4
    layers). The totals are sums over P² entries, so they scale with the number of layers and
    units, and they depend on the training stage (how far the network was trained), on the data
    and number of cases, on the number of sampled targets (sampling noise adds to both the error
    and the cumulants) and on the precise parameters: compare their ratio and order, not the
    digits.

    Weight-sharing layers (convolutions; Grosse & Martens 2016 §3.1): every ``(case, location)`` is one
    draw of ``(ā_t, g_t)``, so ``|T|·error`` is KFC's independence error ``E[Σ_t ā_tā_tᵀ ⊗ g_tg_tᵀ] − Ω ⊗ Γ``
    (attr ``locations`` = ``|T|``); the layers studied together must then share ``|T|``.

    ``max_bytes``: refuse with a ``MemoryLimitError`` (naming the estimate and what to lower)
    before allocating when the estimate (:func:`estimate_cumulant_bytes`) exceeds it.
    """
    if mode not in ("sampled", "exact"):
        raise ValueError(f"mode={mode!r}: choose 'sampled' or 'exact'")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    seed = checks.seed(seed)
    lossf = get_loss(loss)
    net = model_copy(model, dtype)
    x = x.to(dtype)
    sel, idx, all_layers = select_layers(net, x, layers)
    if mode == "exact":
        if not isinstance(lossf, Categorical):
            raise ValueError("mode='exact' enumerates the targets: only the categorical (softmax) loss has finitely "
                             f"many; use mode='sampled' for the {lossf.name} loss")
    with torch.no_grad():
        classes = int(net(x[:1]).reshape(1, -1).shape[1])
    draws = classes if mode == "exact" else int(samples)
    refuse_if_too_large(
        f"cumulant_study ({sum(l.num_params for l in sel):,} parameters, {int(x.shape[0]):,} cases, {draws:,} "
        f"{'classes' if mode == 'exact' else 'samples'} per case)",
        estimate_cumulant_bytes(sel, int(x.shape[0]), draws, dtype), max_bytes,
        "lower samples (targets per case), the number of cases (x[:n]) or the layers studied (layers=[...])")
    if mode == "exact":
        a, g, p = _class_gradients(net, sel, x)
        weights = p.t() / p.shape[0]
    else:
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
        a, g, _ = output_gradients(net, sel, lossf, x, mode="sampled", samples=int(samples), generator=gen)
        g = [gi * math.sqrt(samples) for gi in g]  # undo the 1/√k weighting: each sample is one draw
        weights = None
    a = [t.to(dtype).detach() for t in a]
    g = [t.to(dtype).detach() for t in g]
    a, g, weights, locations = _location_draws(a, g, weights, sel)
    res = cumulant_terms(a, g, weights)

    from ._common import block_slices

    slices = block_slices(sel)
    n = len(sel)
    be = np.zeros((n, n))
    bbnd = np.zeros((n, n))
    for i, si in enumerate(slices):
        for j, sj in enumerate(slices):
            be[i, j] = float(res["error"][si, sj].abs().sum())
            bbnd[i, j] = float(res["bound"][si, sj].sum())
    rc = ("row", "col")
    bb = ("block_row", "block_col")
    names = {
        "error": "E[ā₁ā₂g₁g₂] − E[ā₁ā₂]E[g₁g₂] (= F − F̃ on these draws)",
        "kappa4": "κ(ā₁, ā₂, g₁, g₂)",
        "kappa3_a": "E[ā₁] κ(ā₂, g₁, g₂)",
        "kappa3_b": "E[ā₂] κ(ā₁, g₁, g₂)",
        "bound": "|κ₄| + |E[ā₁]||κ(ā₂,g₁,g₂)| + |E[ā₂]||κ(ā₁,g₁,g₂)| (eqn 4)",
        "residual": "error − κ₄ − E[ā₁]κ₃ − E[ā₂]κ₃ (= kappa22 + mean_terms; 0 in expectation)",
        "kappa22": "κ(ā₁,g₁)κ(ā₂,g₂) + κ(ā₁,g₂)κ(ā₂,g₁) (0 under the model's distribution)",
        "mean_terms": "terms with E[g] (0 under the model's distribution)",
    }
    data = {k: xr.Variable(rc, to_numpy(res[k]), attrs={"long_name": v}) for k, v in names.items()}
    scalars = {
        "total_error": "Σ |error|", "total_bound": "Σ bound", "total_residual": "Σ |residual|",
        "total_kappa4": "Σ |κ₄|", "total_kappa3_a": "Σ |E[ā₁]κ₃|", "total_kappa3_b": "Σ |E[ā₂]κ₃|",
        "identity_error": "max |error − (all terms of the expansion)| (rounding only)",
    }
    for k, v in scalars.items():
        data[k] = xr.Variable((), res[k], attrs={"long_name": v})
    data["block_error"] = xr.Variable(bb, be, attrs={"long_name": "Σ |error| per layer pair"})
    data["block_bound"] = xr.Variable(bb, bbnd, attrs={"long_name": "Σ bound per layer pair"})
    coords = {**matrix_coords(sel, idx), **block_coords(sel, idx)}
    ds = xr.Dataset(data, coords=coords)
    ds.attrs = provenance("cumulants", model, all_layers, lossf.name, seed, {
        "mode": mode,
        "samples": int(samples) if mode == "sampled" else 0,
        "num_cases": int(x.shape[0]),
        "num_draws": int(g[0].shape[0] * g[0].shape[1]),
        "locations": int(locations),
        "draws": ("(case, location) pairs of the weight-sharing layers: locations × error is "
                  "E[Σ_t ā_tā_tᵀ ⊗ g_tg_tᵀ] − Ω ⊗ Γ (KFC's independence error)") if locations > 1 else "cases",
        "num_params": int(res["error"].shape[0]),
        "layers": list(idx),
        "layer_names": [l.name for l in sel],
        "dtype": dtype,
        "paper_total_error": PAPER_TOTAL_ERROR,
        "paper_total_bound": PAPER_TOTAL_BOUND,
        "note": ("totals depend on the training stage, the data and number of cases, the sampled targets and the "
                 "layers studied; the paper's 2894.4 (error) vs 4134.6 (bound) are for its own network"),
        "row_order": "per layer, vec([W | b]) column-stacked: entry p*d_out + r is W[r, p]; bias column last",
    })
    return ds
