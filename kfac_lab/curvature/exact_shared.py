"""The exact Fisher of a network with weight-sharing layers (convolutions; Linear on ``(N, …, d)``
inputs), in the paper's ordering (docs/conventions.md#parameters-and-vec).

A shared layer's per-case, per-direction gradient is ``DW_n^k = Σ_t g_{n,t}^k ā_{n,t}ᵀ`` (KFC,
Grosse & Martens 2016 §3), so the factorisation ``(ā āᵀ) ⊗ H_n`` of :mod:`.exact` does not hold.
Here the sum over ``t`` is taken first, one GEMM per layer and chunk of cases, giving the rows
``J[(k, n)] = vec(DW_n^k)`` of all layers side by side; then ``F += Jᵀ J / N`` (lower blocks only,
mirrored: :func:`~.factors.symmetric_addmm_`) — ``k·N·P²/2`` multiply-adds, as
``F = (1/N) Σ_n J_nᵀ F_R J_n`` with ``F_R = Σ_k f_k f_kᵀ`` (M&G 2015 §5, eq. 3). Memory is planned
and refused before anything is allocated, as for :func:`~.exact.exact_fisher`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import FisherTooLargeError
from .factors import symmetric_addmm_
from .layers import Capture, KFACLayer
from .memory import refuse_if_too_large

__all__ = ["layer_locations", "plan_shared", "fisher_from_jacobians"]

#: Rows (cases × directions) of one chunk's Jacobian J by default.
DEFAULT_ROWS = 4096


def layer_locations(model: nn.Module, layers: Sequence[KFACLayer], x1: Tensor) -> list[int]:
    """``|T|`` of every layer on the input ``x1`` (one case; 0 for a layer without weight sharing)."""
    with torch.no_grad(), Capture(layers, inputs=True, grads=False, rows=1) as cap:
        model(x1)
    return [int(a.shape[1]) if a is not None and a.dim() == 3 else 0 for a in cap.a]


def plan_shared(layers: Sequence[KFACLayer], locations: Sequence[int], n: int, k: int, itemsize: int,
                max_bytes: int, chunk_size: int | None) -> tuple[int, int]:
    """``(cases per chunk, bytes)`` for :func:`fisher_from_jacobians`; ``FisherTooLargeError`` when
    the dense matrix plus statistics and scratch would exceed ``max_bytes`` (before allocating)."""
    P = sum(l.num_params for l in layers)
    dense = P * P * itemsize
    T = [max(1, t) for t in locations]
    # ā and g of all cases (g three times: the batched backward's intermediates, g, a copy)
    stats = n * sum(t * (l.in_dim + 3 * k * l.d_out) for t, l in zip(T, layers)) * itemsize

    def scratch(chunk: int) -> int:  # J and one layer's einsum result, per chunk
        return chunk * k * (P + max(l.num_params for l in layers)) * itemsize

    if chunk_size is not None:
        if isinstance(chunk_size, bool) or int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        chunk = min(int(chunk_size), n)
    else:
        chunk = max(1, min(n, DEFAULT_ROWS // k))
        while dense + stats + scratch(chunk) > max_bytes and chunk > 1:
            chunk = max(1, chunk // 4)
    names = ", ".join(f"{l.name or '?'} ({l.num_params:,})" for l in layers)
    total = refuse_if_too_large(
        f"the exact Fisher of {P:,} parameters",
        {f"the {P:,}×{P:,} matrix at {itemsize} bytes per entry": dense,
         f"the per-location statistics of {n:,} cases (|T| = {', '.join(map(str, T))})": stats,
         "the per-case Jacobians of a chunk": scratch(chunk)},
        max_bytes,
        f"restrict it to fewer layers (layers=[...]; parameters per layer: {names}), use a smaller model or "
        "smaller images, fewer cases (or sampled targets) or a float32 dtype",
        error=FisherTooLargeError)
    return chunk, total


def _vec_grads(a: Tensor, g: Tensor) -> Tensor:
    """``vec(DW)`` per direction and case, ``(k, m, I·O)`` column-stacked (index ``p·O + r``), from
    ā ``(m, [T,] I)`` and g ``(k, m, [T,] O)``: ``DW = Σ_t g_t ā_tᵀ``."""
    if a.dim() == 3:
        return torch.einsum("knto,nti->knio", g, a).flatten(2)
    return torch.einsum("kno,ni->knio", g, a).flatten(2)


def fisher_from_jacobians(a: list[Tensor], g: list[Tensor], layers: Sequence[KFACLayer], chunk: int,
                          dtype: torch.dtype) -> Tensor:
    """``(1/N) Σ_n Σ_k vec(DW_n^k) vec(DW_n^k)ᵀ`` over all layers (module doc), ``(P, P)``."""
    n, k = a[0].shape[0], g[0].shape[0]
    sizes = [l.num_params for l in layers]
    P = sum(sizes)
    dense = torch.zeros(P, P, dtype=dtype, device=a[0].device)
    J = torch.empty(k, chunk, P, dtype=dtype, device=a[0].device)
    for s0 in range(0, n, chunk):
        s1 = min(n, s0 + chunk)
        Jc = J[:, : s1 - s0]
        off = 0
        for ai, gi, size in zip(a, g, sizes):
            Jc[:, :, off:off + size] = _vec_grads(ai[s0:s1], gi[:, s0:s1])
            off += size
        symmetric_addmm_(dense, Jc.reshape(-1, P), 1.0, 1.0 / n)
    return dense
