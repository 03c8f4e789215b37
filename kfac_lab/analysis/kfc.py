"""Where KFC's assumptions hold on a CNN: measured per convolution layer (Grosse & Martens 2016, KFC §3.1;
docs/algorithm.md#weight-sharing).

KFC approximates a convolution's Fisher block ``F_ℓ = E[vec(DW) vec(DW)ᵀ]``, ``DW = Σ_t g_t ā_tᵀ``,
by ``Ω ⊗ Γ`` under three assumptions:

1. independent activations and derivatives (K-FAC's own, M&G 2015 §3);
2. spatial homogeneity: the statistics of ``ā_t`` and ``g_t`` do not depend on the location ``t``;
3. spatially uncorrelated derivatives: ``E[g_t g_{t'}ᵀ] = 0`` for ``t ≠ t'``.

:func:`kfc_assumptions` measures each on the cases ``x``: the correlation of ``g`` between locations
(assumption 3), the spread of ``E‖g_t‖²`` and ``E‖ā_t‖²`` over the locations (assumption 2), and
how far ``F_ℓ`` is from ``F_unc = E[Σ_t ā_t ā_tᵀ ⊗ g_t g_tᵀ]`` — ``F_ℓ`` with every cross-location
term dropped — and from KFC-expand's ``Ω ⊗ Γ``. All from the same per-case ``ā``, ``g`` (same seed).
"""
from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from torch import nn

from .. import checks
from ..curvature import get_loss, output_gradients
from ..curvature.factors import kron
from ._common import model_copy, provenance, select_layers, to_numpy

__all__ = ["kfc_assumptions"]

#: Rows × columns of one chunk of the per-location Kronecker rows (bounds the scratch memory).
_CHUNK_ELEMS = 2**23


def _output_grids(net: nn.Module, sel, x) -> list[tuple[int, int] | None]:
    """``(H_out, W_out)`` of each selected convolution (None for other layers), from one forward."""
    grids: list = [None] * len(sel)
    hooks = [l.module.register_forward_hook(lambda m, i, o, k=k: grids.__setitem__(k, tuple(o.shape[-2:])))
             for k, l in enumerate(sel) if getattr(l, "is_conv", False)]
    try:
        with torch.no_grad():
            net(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return grids


def _uncorrelated_block(a, g) -> torch.Tensor:
    """``(1/n) Σ_{n,t,k} (ā āᵀ) ⊗ (g gᵀ)`` in the paper's order (``kron(ā, g)`` rows), chunked."""
    k, n, T, O = g.shape
    I = a.shape[-1]
    out = a.new_zeros(I * O, I * O)
    step = max(1, _CHUNK_ELEMS // max(1, k * T * I * O))
    for lo in range(0, n, step):
        rows = (a[None, lo:lo + step, :, :, None] * g[:, lo:lo + step, :, None, :]).reshape(-1, I * O)
        out.addmm_(rows.t(), rows)
    return out / n


def _rel(x, ref) -> float:
    return float(torch.linalg.matrix_norm(x - ref) / torch.linalg.matrix_norm(ref))


def kfc_assumptions(model: nn.Module, loss, x, layers=None, mode: str = "exact", samples: int = 1, seed: int = 0,
                    dtype: torch.dtype = torch.float64) -> xr.Dataset:
    """KFC's assumptions measured on each convolution among ``layers`` (default all; others are skipped).

    Per convolution ``k`` (its index in the network), over ``T = H_out·W_out`` locations:

    - ``g_corr_<k>`` over ``(t<k>, t<k>_other)``: ``E[g_tᵀ g_t'] / √(E‖g_t‖² E‖g_t'‖²)`` (1 on the
      diagonal; assumption 3 says 0 elsewhere), and the scalar ``g_offdiag_corr_<k>``: its mean |value|
      off the diagonal;
    - ``g_power_<k>`` / ``a_power_<k>`` over ``(h<k>, w<k>)``: ``E‖g_t‖²`` and ``E‖ā_t‖²`` on the output
      grid, and ``g_power_cv_<k>`` / ``a_power_cv_<k>``: their coefficients of variation over ``t``
      (assumption 2 says 0);
    - ``uncorrelated_rel_error_<k>`` = ‖F_ℓ − F_unc‖_F / ‖F_ℓ‖_F (the cross-location terms alone) and
      ``expand_rel_error_<k>`` = ‖F_ℓ − Ω ⊗ Γ‖_F / ‖F_ℓ‖_F (all three assumptions), with ``F_ℓ`` the
      layer's exact block from the same statistics.

    ``mode``: ``"exact"`` (expectation over the model's outputs) or ``"sampled"`` (``samples`` targets per
    case, seeded by ``seed``). A ``ValueError`` when no selected layer is a convolution."""
    if mode not in ("exact", "sampled"):
        raise ValueError(f"mode={mode!r}: choose 'exact' or 'sampled'")
    seed = checks.seed(seed)
    lossf = get_loss(loss)
    net = model_copy(model, dtype)
    x = x.to(dtype)
    sel, idx, all_layers = select_layers(net, x, layers)
    grids = _output_grids(net, sel, x)
    if not any(gr is not None for gr in grids):
        raise ValueError("kfc_assumptions: none of the selected layers is a convolution "
                         f"({[l.name for l in sel]}); pass layers=[...] with the network's nn.Conv2d layers")
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    a, g, _ = output_gradients(net, sel, lossf, x, mode=mode, samples=int(samples), generator=gen)
    data, coords = {}, {}
    for l, k, ai, gi, grid in zip(sel, idx, a, g, grids):
        if grid is None:
            continue
        ai, gi = ai.detach().to(dtype), gi.detach().to(dtype)
        if gi.dim() == 3:
            gi = gi.unsqueeze(0)
        n, T = ai.shape[0], ai.shape[1]
        M = torch.einsum("knto,knso->ts", gi, gi) / n                      # E[g_tᵀ g_s]
        p = torch.diagonal(M).clone()
        live = p > p.max() * torch.finfo(dtype).eps      # locations whose output reaches the loss
        root = torch.where(live, p, torch.ones_like(p)).sqrt()
        C = M / (root[:, None] * root[None, :])
        C[~live, :] = float("nan")                        # undefined where g is always 0 (e.g. cropped by a stride)
        C[:, ~live] = float("nan")
        off = ~torch.eye(T, dtype=torch.bool, device=C.device) & live[:, None] & live[None, :]
        q = ai.square().sum((0, 2)) / n                                     # E‖ā_t‖²
        DW = torch.einsum("knto,nti->knio", gi, ai).reshape(-1, ai.shape[-1] * gi.shape[-1])  # vec, column-stacked
        F = DW.t() @ DW / n
        Om = torch.einsum("nti,ntj->ij", ai, ai) / n
        Ga = torch.einsum("knto,kntp->op", gi, gi) / (n * T)
        t_dim, h_dim, w_dim = f"t{k}", f"h{k}", f"w{k}"
        cv = lambda v: float(v.std(unbiased=False) / v.mean())  # noqa: E731
        data.update({
            f"g_corr_{k}": ((t_dim, f"{t_dim}_other"), to_numpy(C), {
                "long_name": f"correlation of g between output locations, layer L{k + 1}", "symbol": "corr"}),
            f"g_offdiag_corr_{k}": ((), float(C[off].abs().mean()) if bool(off.any()) else 0.0, {
                "long_name": "mean |correlation| of g between different locations (assumption 3: 0; "
                             "locations where g is always 0 left out)"}),
            f"dead_locations_{k}": ((), int((~live).sum()), {
                "long_name": "output locations whose g is always 0 (they never reach the loss)"}),
            f"g_power_{k}": ((h_dim, w_dim), to_numpy(p.reshape(grid)), {
                "long_name": f"E‖g_t‖² over the output grid, layer L{k + 1}", "symbol": "E‖g_t‖²"}),
            f"a_power_{k}": ((h_dim, w_dim), to_numpy(q.reshape(grid)), {
                "long_name": f"E‖ā_t‖² over the output grid, layer L{k + 1}", "symbol": "E‖ā_t‖²"}),
            f"g_power_cv_{k}": ((), cv(p), {"long_name": "std/mean of E‖g_t‖² over t (assumption 2: 0)"}),
            f"a_power_cv_{k}": ((), cv(q), {"long_name": "std/mean of E‖ā_t‖² over t (assumption 2: 0)"}),
            f"uncorrelated_rel_error_{k}": ((), _rel(_uncorrelated_block(ai, gi), F), {
                "long_name": "‖F_ℓ − E[Σ_t ā_tā_tᵀ ⊗ g_tg_tᵀ]‖_F / ‖F_ℓ‖_F (the cross-location terms)"}),
            f"expand_rel_error_{k}": ((), _rel(kron(Om, Ga), F), {
                "long_name": "‖F_ℓ − Ω ⊗ Γ‖_F / ‖F_ℓ‖_F (KFC expand)"}),
        })
        coords.update({t_dim: np.arange(T), f"{t_dim}_other": np.arange(T), h_dim: np.arange(grid[0]),
                       w_dim: np.arange(grid[1])})
    ds = xr.Dataset({k: xr.Variable(d, v, attrs=at) for k, (d, v, at) in data.items()}, coords=coords)
    convs = [k for k, gr in zip(idx, grids) if gr is not None]
    ds.attrs = provenance("kfc_assumptions", model, all_layers, lossf.name, seed, {
        "mode": mode, "samples": int(samples) if mode == "sampled" else 0, "num_cases": int(x.shape[0]),
        "conv_layers": convs, "output_grids": [list(gr) for gr in grids if gr is not None]})
    return ds
