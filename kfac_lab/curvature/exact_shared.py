"""The exact Fisher of a network with weight-sharing layers (convolutions; Linear on ``(N, …, d)``
inputs), in the paper's ordering (docs/conventions.md#parameters-and-vec).

A shared layer's per-case, per-direction gradient is ``DW_n^k = Σ_t g_{n,t}^k ā_{n,t}ᵀ`` (KFC,
Grosse & Martens 2016 §3), so the factorisation ``(ā āᵀ) ⊗ H_n`` of :mod:`.exact` does not hold
for it. ``F = (1/N) Σ_n Σ_k J_n^k J_n^kᵀ`` (M&G 2015 §5, eq. 3, with ``F_R = Σ_k f_k f_kᵀ``) is
assembled in three kinds of blocks, each with the cheapest product it admits:

- shared × shared: the sum over ``t`` first (one einsum per layer and chunk of cases) gives the
  rows ``J[(k, n)] = vec(DW_n^k)`` side by side; ``F_SS += Jᵀ J / N`` (lower blocks only,
  mirrored: :func:`~.factors.symmetric_addmm_`) — ``k·N·P_S²/2`` multiply-adds;
- shared × plain (layer ``j`` without sharing, ``J_j^k = ā_j ⊗ g_j^k``): per case
  ``M_n = Σ_k J_S^k g_j^kᵀ`` (``P_S × O_j``), then ``F_Sj = Σ_n M_n ⊗ ā_jᵀ / N`` as one GEMM —
  ``N·P_S·P_j`` instead of ``k·N·P_S·P_j``;
- plain × plain: the packed ``(ā āᵀ) ⊗ H_n`` products of :mod:`.exact` (``plain``).

Memory is planned and refused before anything is allocated, as for :func:`~.exact.exact_fisher`.
"""
from __future__ import annotations

from typing import Callable, Sequence

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
                max_bytes: int, chunk_size: int | None, plain_bytes: int = 0) -> tuple[int, int]:
    """``(cases per chunk, bytes)`` for :func:`fisher_from_jacobians`; ``FisherTooLargeError`` when
    the dense matrix plus statistics and scratch would exceed ``max_bytes`` (before allocating).
    ``plain_bytes``: what the plain × plain blocks need (their matrix and scratch)."""
    P = sum(l.num_params for l in layers)
    dense = P * P * itemsize
    T = [max(1, t) for t in locations]
    PS = sum(l.num_params for l, t in zip(layers, locations) if t)
    Oj = max([l.d_out for l, t in zip(layers, locations) if not t], default=0)
    # ā and g of all cases (g three times: the batched backward's intermediates, g, a copy)
    stats = n * sum(t * (l.in_dim + 3 * k * l.d_out) for t, l in zip(T, layers)) * itemsize

    def scratch(chunk: int) -> int:  # J, one layer's einsum result and M, per chunk
        return (chunk * k * (PS + max(l.num_params for l in layers)) + chunk * PS * Oj) * itemsize

    if chunk_size is not None:
        if isinstance(chunk_size, bool) or int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        chunk = min(int(chunk_size), n)
    else:
        chunk = max(1, min(n, DEFAULT_ROWS // k))
        while dense + stats + scratch(chunk) + plain_bytes > max_bytes and chunk > 1:
            chunk = max(1, chunk // 4)
    names = ", ".join(f"{l.name or '?'} ({l.num_params:,})" for l in layers)
    total = refuse_if_too_large(
        f"the exact Fisher of {P:,} parameters",
        {f"the {P:,}×{P:,} matrix at {itemsize} bytes per entry": dense,
         f"the per-location statistics of {n:,} cases (|T| = {', '.join(map(str, T))})": stats,
         "the per-case Jacobians of a chunk": scratch(chunk),
         "the blocks of the layers without weight sharing": plain_bytes},
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


def _place(dense: Tensor, block: Tensor, rows: Sequence[int], cols: Sequence[int], sizes: Sequence[int],
           offs: Sequence[int]) -> None:
    """Copy ``block`` (the layers ``rows`` × ``cols``, packed in that order) into ``dense`` at the
    layers' offsets, one slice copy per pair of layers (an advanced-index scatter of the whole
    ``P × P`` matrix was a third of the exact Fisher's time on fig1-cnn)."""
    r0 = 0
    for i in rows:
        c0 = 0
        for j in cols:
            dense[offs[i]:offs[i] + sizes[i], offs[j]:offs[j] + sizes[j]] = block[r0:r0 + sizes[i], c0:c0 + sizes[j]]
            c0 += sizes[j]
        r0 += sizes[i]


def fisher_from_jacobians(a: list[Tensor], g: list[Tensor], layers: Sequence[KFACLayer], chunk: int,
                          dtype: torch.dtype, plain: Callable | None = None) -> Tensor:
    """``(1/N) Σ_n Σ_k vec(DW_n^k) vec(DW_n^k)ᵀ`` over all layers (module doc), ``(P, P)``.
    ``plain(a, g, layers)``: the dense Fisher of the layers without weight sharing (``a[i]`` 2-D)."""
    n, k, dev = a[0].shape[0], g[0].shape[0], a[0].device
    sizes = [l.num_params for l in layers]
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    P = sum(sizes)
    S = [i for i, t in enumerate(a) if t.dim() == 3] if plain is not None else list(range(len(a)))
    L = [i for i in range(len(a)) if i not in S]
    PS = sum(sizes[i] for i in S)
    dense = torch.empty(P, P, dtype=dtype, device=dev)  # every block is written below (S ∪ L: all layers)
    FSS = torch.zeros(PS, PS, dtype=dtype, device=dev)
    FSL = {j: torch.zeros(PS, sizes[j], dtype=dtype, device=dev) for j in L}
    J = torch.empty(k, chunk, PS, dtype=dtype, device=dev)
    for s0 in range(0, n, chunk):
        s1 = min(n, s0 + chunk)
        Jc = J[:, : s1 - s0]
        off = 0
        for i in S:
            Jc[:, :, off:off + sizes[i]] = _vec_grads(a[i][s0:s1], g[i][:, s0:s1])
            off += sizes[i]
        symmetric_addmm_(FSS, Jc.reshape(-1, PS), 1.0, 1.0 / n)
        for j in L:  # F_Sj[p, (q, s)] = Σ_n ā_j[n, q] M_n[p, s], M_n = Σ_k J_S^k g_j^kᵀ
            M = torch.einsum("knp,kns->nps", Jc, g[j][:, s0:s1])
            FSL[j].view(PS, layers[j].in_dim, layers[j].d_out).add_(
                torch.einsum("nps,nq->pqs", M, a[j][s0:s1]), alpha=1.0 / n)
    _place(dense, FSS, S, S, sizes, offs)
    for j in L:
        _place(dense, FSL[j], S, [j], sizes, offs)
        _place(dense, FSL[j].t(), [j], S, sizes, offs)
    if L:
        _place(dense, plain([a[j] for j in L], [g[j] for j in L], [layers[j] for j in L]), L, L, sizes, offs)
    return dense
