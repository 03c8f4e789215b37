"""The exact (dense) Fisher of a small network, in the paper's parameter ordering.

``F = E[vec(DW) vec(DW)ᵀ]`` over all K-FAC layers (ALGORITHM.md §1, §12): the matrix that
K-FAC's ``F̃`` approximates, for studies on small networks such as the 256-20-20-20-20-10
network of figures 1–2. Parameters are ordered layer by layer, each layer's ``[W | b]``
stacked by columns (``vec``), so block ``(i, j)`` is indexed
``[p·d_out_i + r, q·d_out_j + s]`` and equals ``E Σ_k ā_i[p] g_i^k[r] ā_j[q] g_j^k[s]``.

How it is computed. Per case, the gradient of layer ``i`` for direction ``k`` is
``ā_i ⊗ g_i^k``, so the per-case contribution to block ``(i, j)`` is
``(ā_i ā_jᵀ) ⊗ H_n`` with ``H_n = Σ_k g_i^k g_j^kᵀ``. Summed over cases this is ONE matrix
product ``Xᵀ Y`` with ``X[n] = vec(ā_i ā_jᵀ)`` and ``Y[n] = vec(H_n)``, then a permutation of
indices: ``N·P_i·P_j`` multiply-adds instead of the ``k·N·P_i·P_j`` of stacking per-direction
gradients. A diagonal block is symmetric in ``(p, q)`` and in ``(r, s)`` per case, so only
the upper-triangular pairs are multiplied (about 4× less work) and then unpacked. Cases are
processed in chunks through preallocated buffers; only blocks ``i <= j`` are computed, the
others are mirrored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import FisherTooLargeError, NonFiniteError
from .factors import STAT_MODES, output_gradients
from .layers import KFACLayer, find_layers
from .losses import Loss, get_loss

__all__ = ["FisherMatrix", "exact_fisher", "estimate_exact_fisher_bytes"]

# Scratch buffers per chunk of cases are sized to about this many bytes by default: large
# enough for efficient GEMMs (hundreds of cases per product), small enough to stay in memory
# that is already mapped (fresh large allocations per chunk cost as much as the GEMM).
DEFAULT_SCRATCH_BYTES = 96 * 2**20
MAX_DEFAULT_CHUNK = 2048


@dataclass
class FisherMatrix:
    """A dense Fisher (or GGN) matrix in the paper's ordering, with its block structure.

    ``dense`` is ``(P, P)``; layer ``i`` owns rows ``offsets[i] : offsets[i] + sizes[i]``,
    ordered ``vec([W_i | b_i])`` (column-stacked, bias = last column).
    """

    dense: Tensor
    layers: list[KFACLayer]
    mode: str = "exact"
    loss: str = ""
    num_cases: int = 0
    samples: int = 1
    offsets: tuple[int, ...] = field(init=False)
    sizes: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        self.sizes = tuple(l.num_params for l in self.layers)
        self.offsets = tuple(int(v) for v in np.cumsum((0,) + self.sizes[:-1]))
        if self.dense.shape != (self.num_params, self.num_params):
            raise ValueError(
                f"dense has shape {tuple(self.dense.shape)}, the layers have {self.num_params} parameters"
            )

    @property
    def num_params(self) -> int:
        return int(sum(self.sizes))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.dense.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.dense.dtype

    def slice(self, i: int) -> slice:
        """Rows (and columns) of layer ``i``."""
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])

    def block(self, i: int, j: int) -> Tensor:
        """Block ``(i, j)``, shape ``(P_i, P_j)``: a view into ``dense`` (no copy)."""
        n = len(self.layers)
        if not (-n <= i < n and -n <= j < n):
            raise IndexError(f"block ({i}, {j}) is out of range for {n} layers")
        return self.dense[self.slice(i % n), self.slice(j % n)]

    def to_numpy(self) -> np.ndarray:
        return self.dense.detach().cpu().numpy()

    def __array__(self, dtype=None, copy=None):
        arr = self.to_numpy()
        if dtype is not None and arr.dtype != dtype:
            return arr.astype(dtype)
        return arr.copy() if copy else arr

    def param_names(self) -> list[str]:
        """One label per row: ``"L1 W[3,17]"`` (layer 1 of the paper, i.e. ``layers[0]``;
        output unit 3, input unit 17; units numbered from 0) or ``"L1 b[3]"`` for a bias."""
        names: list[str] = []
        for i, l in enumerate(self.layers):
            tag = f"L{i + 1}"
            for p in range(l.in_dim):  # column of [W | b]
                if l.has_bias and p == l.d_in:
                    names.extend(f"{tag} b[{r}]" for r in range(l.d_out))
                else:
                    names.extend(f"{tag} W[{r},{p}]" for r in range(l.d_out))
        return names

    def __repr__(self) -> str:
        dims = "-".join([str(self.layers[0].d_in)] + [str(l.d_out) for l in self.layers])
        return (f"FisherMatrix(P={self.num_params}, layers={dims}, mode={self.mode!r}, loss={self.loss!r}, "
                f"cases={self.num_cases}, dtype={self.dtype})")


# ---------------------------------------------------------------------------------------------
# Planning: pairs, packed sizes, memory.

def _pair_sizes(li: KFACLayer, lj: KFACLayer, diag: bool) -> tuple[int, int]:
    """Columns of X (input products) and Y (gradient products) for one block pair."""
    if diag:
        return li.in_dim * (li.in_dim + 1) // 2, li.d_out * (li.d_out + 1) // 2
    return li.in_dim * lj.in_dim, li.d_out * lj.d_out


def _fmt_bytes(b: float) -> str:
    if b >= 2**30:
        return f"{b / 2**30:.2f} GB"
    return f"{b / 2**20:.1f} MB"


@dataclass
class _Plan:
    chunk: int
    dense_bytes: int
    fixed_bytes: int  # scratch that does not scale with the chunk
    per_case_bytes: int  # scratch per case of a chunk (and the stored ā, g)
    input_bytes: int  # ā and g for all cases

    @property
    def total(self) -> int:
        return self.dense_bytes + self.fixed_bytes + self.chunk * self.per_case_bytes + self.input_bytes


def _plan(layers: Sequence[KFACLayer], n: int, k: int, itemsize: int, max_bytes: int,
          chunk_size: int | None) -> _Plan:
    P = sum(l.num_params for l in layers)
    dense = P * P * itemsize
    L = len(layers)
    max_x = max_y = max_m = max_h = 0
    for i in range(L):
        for j in range(i, L):
            tx, ty = _pair_sizes(layers[i], layers[j], i == j)
            max_x, max_y, max_m = max(max_x, tx), max(max_y, ty), max(max_m, tx * ty)
            max_h = max(max_h, layers[i].d_out * layers[j].d_out)
    # M accumulator + its unpacking temporaries (bounded to about one M each)
    fixed = 3 * max_m * itemsize
    # per case: X, Y, full H, transposed ā chunks
    per_case = (max_x + max_y + max_h + sum(l.in_dim for l in layers)) * itemsize
    inputs = n * (sum(l.in_dim for l in layers) + k * sum(l.d_out for l in layers)) * itemsize
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        chunk = min(int(chunk_size), n)
    else:
        room = max_bytes - dense - fixed - inputs
        chunk = max(1, min(n, MAX_DEFAULT_CHUNK, DEFAULT_SCRATCH_BYTES // per_case,
                           max(room, 0) // per_case))
    plan = _Plan(chunk, dense, fixed, per_case, inputs)
    if plan.total > max_bytes:
        names = ", ".join(f"{l.name or '?'} ({l.num_params:,})" for l in layers)
        raise FisherTooLargeError(
            f"the exact Fisher of {P:,} parameters needs about {_fmt_bytes(plan.total)} "
            f"({_fmt_bytes(dense)} for the {P:,}×{P:,} matrix at {itemsize} bytes per entry, "
            f"{_fmt_bytes(plan.total - dense)} for per-case statistics and scratch with chunks of "
            f"{chunk} cases), above max_bytes = {_fmt_bytes(max_bytes)}. Parameters per layer: {names}. "
            "To reduce it: restrict it to fewer layers (layers=[...], e.g. the middle layers), use a "
            "smaller model or a float32 dtype, pass a smaller chunk_size, or raise max_bytes if the "
            "memory is there."
        )
    return plan


def estimate_exact_fisher_bytes(layers: Sequence[KFACLayer], num_cases: int, directions: int = 1,
                                dtype: torch.dtype = torch.float32, chunk_size: int | None = None) -> int:
    """Bytes ``exact_fisher`` would use (dense matrix + statistics + scratch) — without computing it."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return _plan(list(layers), num_cases, directions, itemsize, 2**62, chunk_size).total


# ---------------------------------------------------------------------------------------------
# Input handling.

def _resolve_layers(model: nn.Module, layers, x: Tensor) -> list[KFACLayer]:
    """K-FAC layers numbered 0..n-1 in the given order (forward order when ``layers`` is None)."""
    if layers is None:
        return find_layers(model, example_input=x[:1])
    if isinstance(layers, (KFACLayer, nn.Module, str)):
        layers = [layers]
    named = {id(m): n for n, m in model.named_modules()}
    by_name = dict(model.named_modules())
    out: list[tuple[str, nn.Linear]] = []
    for item in layers:
        if isinstance(item, KFACLayer):
            name, module = item.name, item.module
        elif isinstance(item, str):
            if item not in by_name:
                known = ", ".join(repr(n) for n, m in by_name.items() if isinstance(m, nn.Linear))
                raise ValueError(f"layers: the model has no module named {item!r}; its linear layers: {known}")
            name, module = item, by_name[item]
        elif isinstance(item, nn.Module):
            name, module = named.get(id(item), "?"), item
        else:
            raise TypeError(f"layers takes KFACLayer objects, modules or module names, not {type(item).__name__}")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"layers: {name!r} is a {type(module).__name__}; the exact Fisher supports nn.Linear")
        if id(module) not in named:
            raise ValueError(f"layers: module {name!r} is not part of the model")
        if any(m is module for _, m in out):
            raise ValueError(f"layers: {name!r} is listed twice")
        out.append((name, module))
    if not out:
        raise ValueError("layers is empty: pass at least one layer (or None for all)")
    return [KFACLayer(i, n, m) for i, (n, m) in enumerate(out)]


def _check_finite(t: Tensor, what: str, fix: str) -> None:
    if t.is_floating_point() or t.is_complex():
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{what} holds NaN or inf values; {fix}")


# ---------------------------------------------------------------------------------------------
# The computation.

def exact_fisher(
    model: nn.Module,
    loss: str | Loss,
    x: Tensor,
    y: Tensor | None = None,
    mode: str = "exact",
    samples: int = 1,
    layers: Sequence[KFACLayer | nn.Module | str] | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    max_bytes: int = 2**31,
    chunk_size: int | None = None,
) -> FisherMatrix:
    """The dense Fisher ``F`` of ``model`` on the cases ``x``, in the paper's ordering.

    ``mode``: ``"exact"`` — the expectation under the model's predictive distribution
    (``(1/N) Σ_n J_nᵀ F_R J_n``, equal to the GGN for these losses); ``"sampled"`` — ``samples``
    targets drawn from the model per case (an unbiased estimate of it); ``"empirical"`` — the
    training targets ``y`` (the *empirical* Fisher, a different matrix).
    ``layers``: which ``nn.Linear`` layers (KFACLayer objects, modules or names; default all, in
    forward order); the result covers their parameters only, in the given order.
    ``dtype``: dtype of the products and the result (default: the model's); e.g. float64 for
    a float32 model gives a float64 accumulation.
    ``max_bytes``: refuse with ``FisherTooLargeError`` before allocating if the matrix plus
    scratch would exceed it. ``chunk_size``: cases per GEMM (default: sized automatically).
    """
    loss = get_loss(loss)
    if mode not in STAT_MODES:
        raise ValueError(f"mode={mode!r}: choose one of {STAT_MODES}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of cases, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have a leading dimension of cases, got a scalar")
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("x holds no cases (shape[0] == 0): the Fisher is an average over cases")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    _check_finite(x, "the input x", "clean the data before computing the Fisher")
    if mode == "empirical":
        if y is None:
            raise ValueError("mode='empirical' uses the training targets: pass y")
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if y.shape[:1] != x.shape[:1]:
            raise ValueError(f"y has {y.shape[0] if y.dim() else 0} cases but x has {n}")
        _check_finite(y, "the targets y", "clean the targets before computing the empirical Fisher")
    layers = _resolve_layers(model, layers, x)

    with torch.no_grad():
        c = int(model(x[:1]).reshape(1, -1).shape[1])
    k = {"exact": c, "sampled": int(samples), "empirical": 1}[mode]
    if dtype is None:
        dtype = layers[0].module.weight.dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    itemsize = torch.empty(0, dtype=dtype).element_size()
    plan = _plan(layers, n, k, itemsize, max_bytes, chunk_size)

    a, g, z = output_gradients(model, layers, loss, x, y, mode=mode, samples=int(samples), generator=generator)
    _check_finite(z, "the network's output", "check the model's weights and inputs")
    for l, gi in zip(layers, g):
        _check_finite(gi, f"the output gradients of layer {l.name!r}", "check the model's weights and inputs")
    a = [ai.to(dtype) for ai in a]
    g = [gi.to(dtype) for gi in g]
    dense = _fisher_from_stats(a, g, layers, plan.chunk, dtype)
    return FisherMatrix(dense, layers, mode=mode, loss=loss.name, num_cases=n,
                        samples=int(samples) if mode == "sampled" else 1)


def _triu_index(d: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Upper-triangular pairs ``(p <= q)`` in row order, and the packed index of every ``(p, q)``."""
    rows, cols = torch.triu_indices(d, d, device=device)
    packed = torch.empty(d, d, dtype=torch.long, device=device)
    t = torch.arange(rows.numel(), device=device)
    packed[rows, cols] = t
    packed[cols, rows] = t
    return rows, cols, packed


def _fisher_from_stats(a: list[Tensor], g: list[Tensor], layers: list[KFACLayer], chunk: int,
                       dtype: torch.dtype) -> Tensor:
    """``(1/N) Σ_n Σ_k (ā_i ⊗ g_i^k)(ā_j ⊗ g_j^k)ᵀ`` for every block, from ā ``(N, I_i)`` and g ``(k, N, O_i)``."""
    device = a[0].device
    n = a[0].shape[0]
    L = len(layers)
    sizes = [l.num_params for l in layers]
    offs = [0]
    for s in sizes[:-1]:
        offs.append(offs[-1] + s)
    P = sum(sizes)
    dense = torch.empty(P, P, dtype=dtype, device=device)

    # One flat scratch region per role, reused by every pair and chunk.
    max_x = max_y = max_m = max_h = 0
    for i in range(L):
        for j in range(i, L):
            tx, ty = _pair_sizes(layers[i], layers[j], i == j)
            max_x, max_y, max_m = max(max_x, tx), max(max_y, ty), max(max_m, tx * ty)
            max_h = max(max_h, layers[i].d_out * layers[j].d_out)
    xbuf = torch.empty(max_x * chunk, dtype=dtype, device=device)
    ybuf = torch.empty(max_y * chunk, dtype=dtype, device=device)
    hbuf = torch.empty(max_h * chunk, dtype=dtype, device=device)
    mbuf = torch.empty(max_m, dtype=dtype, device=device)
    # ā transposed per chunk (rows = input units): contiguous rows make the packing cheap.
    at_bufs = [torch.empty(l.in_dim * chunk, dtype=dtype, device=device) for l in layers]
    # g per case with directions last: (N, O_i, k), so H_n = g_i[n] g_j[n]ᵀ is one bmm.
    g_nok = [gi.permute(1, 2, 0).contiguous() for gi in g]
    tri_a = {l.in_dim: _triu_index(l.in_dim, device) for l in layers}
    tri_h = {l.d_out: _triu_index(l.d_out, device) for l in layers}
    scale = 1.0 / n

    # chunk-outer: the transposed ā of a chunk is shared by all pairs
    starts = list(range(0, n, chunk))
    ms: dict[tuple[int, int], Tensor] = {}
    # Accumulators for all pairs at once would cost ~P²/2 more memory; instead loop pair-outer
    # and rebuild the (cheap) transposed ā per chunk.
    for i in range(L):
        for j in range(i, L):
            li, lj = layers[i], layers[j]
            diag = i == j
            tx, ty = _pair_sizes(li, lj, diag)
            M = mbuf[: tx * ty].view(tx, ty)
            Ii, Ij, Oi, Oj = li.in_dim, lj.in_dim, li.d_out, lj.d_out
            for c_idx, s0 in enumerate(starts):
                s1 = min(s0 + chunk, n)
                m = s1 - s0
                # transposed ā for this chunk: (I, m)
                ati = at_bufs[i][: Ii * m].view(Ii, m)
                ati.copy_(a[i][s0:s1].t())
                if diag:
                    X = xbuf[: tx * m].view(tx, m)
                    start = 0
                    for p in range(Ii):  # rows p of the upper triangle: ā_p · ā_{p..}
                        w = Ii - p
                        torch.mul(ati[p:], ati[p], out=X[start:start + w])
                        start += w
                    H = hbuf[: m * Oi * Oi].view(m, Oi, Oi)
                    torch.bmm(g_nok[i][s0:s1], g_nok[i][s0:s1].transpose(1, 2), out=H)
                    Y = ybuf[: m * ty].view(m, ty)
                    torch.index_select(H.view(m, Oi * Oi), 1, tri_h[Oi][0] * Oi + tri_h[Oi][1], out=Y)
                else:
                    atj = at_bufs[j][: Ij * m].view(Ij, m)
                    atj.copy_(a[j][s0:s1].t())
                    X = xbuf[: tx * m].view(tx, m)
                    torch.mul(ati.unsqueeze(1), atj.unsqueeze(0), out=X.view(Ii, Ij, m))
                    Y = ybuf[: m * ty].view(m, ty)
                    torch.bmm(g_nok[i][s0:s1], g_nok[j][s0:s1].transpose(1, 2), out=Y.view(m, Oi, Oj))
                if c_idx == 0:
                    torch.mm(X, Y, out=M)
                    M.mul_(scale)
                else:
                    M.addmm_(X, Y, alpha=scale)
            block = dense[offs[i]:offs[i] + sizes[i], offs[j]:offs[j] + sizes[j]]
            if diag:
                _unpack_diag(M, block, Ii, Oi, tri_a[Ii][2], tri_h[Oi][2], max_m)
            else:
                # M[(p, q), (r, s)] -> F[(p, r), (q, s)]
                block.view(Ii, Oi, Ij, Oj).copy_(M.view(Ii, Ij, Oi, Oj).permute(0, 2, 1, 3))
                dense[offs[j]:offs[j] + sizes[j], offs[i]:offs[i] + sizes[i]].copy_(block.t())
    return dense


def _unpack_diag(M: Tensor, block: Tensor, I: int, O: int, ua: Tensor, uh: Tensor, budget: int) -> None:
    """``block[(p, r), (q, s)] = M[ua[p, q], uh[r, s]]`` for a packed symmetric diagonal block."""
    D = block.view(I, O, I, O)
    uh_flat = uh.reshape(-1)
    rows_per = max(1, budget // max(1, I * O * O))  # temporaries of about `budget` entries
    for p0 in range(0, I, rows_per):
        p1 = min(I, p0 + rows_per)
        R = M.index_select(0, ua[p0:p1].reshape(-1))  # ((p1-p0)·I, T_h)
        R = R.index_select(1, uh_flat).view(p1 - p0, I, O, O)  # [p, q, r, s]
        D[p0:p1].copy_(R.permute(0, 2, 1, 3))
