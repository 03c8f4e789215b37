"""The exact (dense) Fisher of a small network, in the paper's parameter ordering.

``F = E[vec(DW) vec(DW)ᵀ]`` over all K-FAC layers (docs/conventions.md#parameters-and-vec): the matrix that
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

from dataclasses import dataclass, field
from typing import Sequence

import time

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import FisherTooLargeError, NonFiniteError, UnsupportedLayerError
from .factors import STAT_MODES, output_gradients
from .layers import KFACLayer, find_layers
from .losses import Loss, get_loss
from .exact_shared import fisher_from_jacobians, layer_locations, plan_shared
from .memory import refuse_if_too_large

__all__ = ["FisherMatrix", "exact_fisher", "estimate_exact_fisher_bytes"]

# Cases per chunk (the GEMMs' inner dimension) by default, and entries of one group's
# input-product buffer X_g (rows × cases): small enough to stay in cache between being
# written and being multiplied, large enough for efficient GEMMs (measured on 2 cores: one
# big packed X per chunk ran at ~95 GFLOP/s, cache-sized groups at ~145).
DEFAULT_CHUNK = 1024
GROUP_ELEMS = 6 * 2**20
DIAG_GROUPS = 32


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
        output unit 3, input unit 17; units numbered from 0) or ``"L1 b[3]"`` for a bias; for a
        convolution ``"L1 W[o3, c1, kh2, kw0]"`` (output channel, input channel, kernel row, kernel column)."""
        names: list[str] = []
        for i, l in enumerate(self.layers):
            for p in range(l.in_dim):  # column of [W | b]
                names.extend(f"L{i + 1} {l.param_label(r, p)}" for r in range(l.d_out))
        return names

    def __repr__(self) -> str:
        dims = "-".join([str(self.layers[0].d_in)] + [str(l.d_out) for l in self.layers])
        return (f"FisherMatrix(P={self.num_params}, layers={dims}, mode={self.mode!r}, loss={self.loss!r}, "
                f"cases={self.num_cases}, dtype={self.dtype})")


# ---------------------------------------------------------------------------------------------
# Planning: pairs, packed sizes, memory.

@dataclass
class _PairLayout:
    """How block pair ``(i, j)`` is packed: rows of ``M`` are input products ``ā_i[p] ā_j[q]``
    in groups of consecutive ``p`` (``q >= p0`` within a diagonal group, all ``q`` otherwise),
    columns are gradient products ``H[r, s]`` (upper triangle only for a diagonal block)."""

    diag: bool
    groups: list[tuple[int, int, int, int]]  # (p0, p1, q0, row offset)
    rows: int  # T_x
    cols: int  # T_y
    max_group_rows: int


def _pair_layout(li: KFACLayer, lj: KFACLayer, diag: bool, chunk: int) -> _PairLayout:
    Ii, Ij = li.in_dim, lj.in_dim
    target = max(1, GROUP_ELEMS // max(1, chunk))
    groups, off, biggest = [], 0, 0
    p0 = 0
    # a diagonal group computes its own lower triangle too: with groups of ≤ I/DIAG_GROUPS rows
    # that is ≤ ~1/DIAG_GROUPS extra work
    cap = -(-Ii // DIAG_GROUPS) if diag else Ii
    while p0 < Ii:
        q0 = p0 if diag else 0
        w = Ij - q0
        p1 = min(Ii, p0 + max(1, min(cap, target // w)))
        groups.append((p0, p1, q0, off))
        off += (p1 - p0) * w
        biggest = max(biggest, (p1 - p0) * w)
        p0 = p1
    cols = li.d_out * (li.d_out + 1) // 2 if diag else li.d_out * lj.d_out
    return _PairLayout(diag, groups, off, cols, biggest)


@dataclass
class _Plan:
    chunk: int
    dense_bytes: int
    fixed_bytes: int  # scratch that does not scale with the chunk
    per_case_bytes: int  # scratch per case of a chunk
    input_bytes: int  # ā and g (with copies) for all cases

    @property
    def total(self) -> int:
        return self.dense_bytes + self.fixed_bytes + self.chunk * self.per_case_bytes + self.input_bytes


def _scratch_sizes(layers: Sequence[KFACLayer], chunk: int) -> tuple[int, int, int, int]:
    """Largest M (entries), X group rows, Y columns and H entries over all block pairs."""
    L = len(layers)
    max_m = max_xg = max_y = max_h = 0
    for i in range(L):
        for j in range(i, L):
            lay = _pair_layout(layers[i], layers[j], i == j, chunk)
            max_m = max(max_m, lay.rows * lay.cols)
            max_xg, max_y = max(max_xg, lay.max_group_rows), max(max_y, lay.cols)
            max_h = max(max_h, layers[i].d_out * layers[j].d_out)
    return max_m, max_xg, max_y, max_h


def _plan(layers: Sequence[KFACLayer], n: int, k: int, itemsize: int, max_bytes: int,
          chunk_size: int | None) -> _Plan:
    P = sum(l.num_params for l in layers)
    dense = P * P * itemsize
    # ā, and g three times over: the batched backward's intermediates, g, its case-major copy
    inputs = n * (sum(l.in_dim for l in layers) + 3 * k * sum(l.d_out for l in layers)) * itemsize

    def plan_for(chunk: int) -> _Plan:
        max_m, max_xg, max_y, max_h = _scratch_sizes(layers, chunk)
        # the accumulator M plus the temporaries of unpacking a diagonal block (≤ ~1.5 M)
        fixed = 3 * max_m * itemsize
        # per case: one group of input products, Y, H, and two transposed ā
        per_case = (max_xg + max_y + max_h + 2 * max(l.in_dim for l in layers)) * itemsize
        return _Plan(chunk, dense, fixed, per_case, inputs)

    if chunk_size is not None:
        if isinstance(chunk_size, bool) or int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        plan = plan_for(min(int(chunk_size), n))
    else:
        plan = plan_for(min(n, DEFAULT_CHUNK))
        while plan.total > max_bytes and plan.chunk > 1:  # smaller chunks before refusing
            plan = plan_for(max(1, plan.chunk // 4))
    names = ", ".join(f"{l.name or '?'} ({l.num_params:,})" for l in layers)
    refuse_if_too_large(
        f"the exact Fisher of {P:,} parameters",
        {f"the {P:,}×{P:,} matrix at {itemsize} bytes per entry": dense,
         f"the per-case statistics of {n:,} cases and scratch": plan.total - dense},
        max_bytes,
        f"restrict it to fewer layers (layers=[...], e.g. the middle layers; parameters per layer: {names}), "
        "use a smaller model, fewer cases (or sampled targets) or a float32 dtype",
        error=FisherTooLargeError)
    return plan


def estimate_exact_fisher_bytes(layers: Sequence[KFACLayer], num_cases: int, directions: int = 1,
                                dtype: torch.dtype = torch.float32, chunk_size: int | None = None,
                                locations: Sequence[int] | None = None) -> int:
    """Bytes ``exact_fisher`` would use (dense matrix + statistics + scratch) — without computing it.
    ``locations``: ``|T|`` per layer when some share weights (0 for one that does not;
    :func:`~.exact_shared.layer_locations` measures them)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if locations is not None and any(locations):
        plain = [l for l, t in zip(layers, locations) if not t]
        extra = _plan(plain, num_cases, directions, itemsize, 2**200, chunk_size).total if plain else 0
        return plan_shared(list(layers), locations, num_cases, directions, itemsize, 2**200, chunk_size, extra)[1]
    return _plan(list(layers), num_cases, directions, itemsize, 2**200, chunk_size).total


# ---------------------------------------------------------------------------------------------
# Input handling.

def _resolve_layers(model: nn.Module, layers, x: Tensor) -> list[KFACLayer]:
    """K-FAC layers numbered 0..n-1 in the given order (forward order when ``layers`` is None)."""
    if layers is None:
        try:
            return find_layers(model, example_input=x[:1])
        except UnsupportedLayerError as e:
            raise UnsupportedLayerError(
                f"{e} — for exact_fisher, pass layers=[...] with the nn.Linear / nn.Conv2d layers (or their names) "
                "to include"
            ) from e
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
                known = ", ".join(repr(n) for n, m in by_name.items() if isinstance(m, (nn.Linear, nn.Conv2d)))
                raise ValueError(f"layers: the model has no module named {item!r}; its linear layers: {known}")
            name, module = item, by_name[item]
        elif isinstance(item, nn.Module):
            name, module = named.get(id(item), "?"), item
        else:
            raise TypeError(f"layers takes KFACLayer objects, modules or module names, not {type(item).__name__}")
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or getattr(module, "groups", 1) > 1:
            raise ValueError(f"layers: {name!r} is a {type(module).__name__}; the exact Fisher supports nn.Linear "
                             "and nn.Conv2d (groups=1)")
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
    locations = layer_locations(model, layers, x[:1])
    if any(locations):  # weight sharing: the per-case Jacobians (exact_shared), plain blocks as below
        plain_layers = [l for l, t in zip(layers, locations) if not t]
        plain_plan = _plan(plain_layers, n, k, itemsize, max_bytes, chunk_size) if plain_layers else None
        chunk, _ = plan_shared(layers, locations, n, k, itemsize, max_bytes, chunk_size,
                               plain_bytes=plain_plan.total if plain_plan else 0)
    else:
        chunk = _plan(layers, n, k, itemsize, max_bytes, chunk_size).chunk

    a, g, z = output_gradients(model, layers, loss, x, y, mode=mode, samples=int(samples), generator=generator)
    _check_finite(z, "the network's output", "check the model's weights and inputs")
    for l, gi in zip(layers, g):
        _check_finite(gi, f"the output gradients of layer {l.name!r}", "check the model's weights and inputs")
    a = [ai.to(dtype) for ai in a]
    g = [gi.to(dtype) for gi in g]
    if any(locations):
        dense = fisher_from_jacobians(a, g, layers, chunk, dtype, plain=lambda a_, g_, ls: _fisher_from_stats(
            a_, g_, ls, plain_plan.chunk, dtype))
    else:
        dense = _fisher_from_stats(a, g, layers, chunk, dtype)
    return FisherMatrix(dense, layers, mode=mode, loss=loss.name, num_cases=n,
                        samples=int(samples) if mode == "sampled" else 1)


def _diag_row_index(lay: _PairLayout, I: int, device) -> Tensor:
    """Row of ``M`` holding ``ā[p] ā[q]`` for every ``(p, q)`` of a diagonal block (symmetric)."""
    idx = torch.empty(I, I, dtype=torch.long)
    for p0, p1, q0, off in lay.groups:
        w = I - q0
        for p in range(p0, p1):
            row = off + (p - p0) * w + torch.arange(p - q0, w)  # q = p .. I-1
            idx[p, p:] = row
            idx[p:, p] = row
    return idx.to(device)


def _triu_index(d: int, device) -> tuple[Tensor, Tensor]:
    """Flat indices ``r·d + s`` of the upper-triangular pairs ``r <= s`` (row order), and the
    packed position of every ``(r, s)`` (symmetric)."""
    rows, cols = torch.triu_indices(d, d)
    packed = torch.empty(d, d, dtype=torch.long)
    t = torch.arange(rows.numel())
    packed[rows, cols] = t
    packed[cols, rows] = t
    return (rows * d + cols).to(device), packed.to(device)


def _fisher_from_stats(a: list[Tensor], g: list[Tensor], layers: list[KFACLayer], chunk: int,
                       dtype: torch.dtype, timings: dict | None = None) -> Tensor:
    """``(1/N) Σ_n Σ_k (ā_i ⊗ g_i^k)(ā_j ⊗ g_j^k)ᵀ`` for every block, from ā ``(N, I_i)`` and g ``(k, N, O_i)``.

    For block ``(i, j)``, ``M[(p, q), (r, s)] = (1/N) Σ_n ā_i[n,p] ā_j[n,q] H_n[r,s]`` is
    accumulated chunk by chunk, one GEMM per group of rows (``X_g @ Y``, ``X_g`` = the group's
    input products, cases last; ``Y`` = the cases' ``H_n``), then permuted into place.
    ``timings``: if a dict, receives the wall time of every block pair ``(i, j)`` (profiling).
    """
    device = a[0].device
    n = a[0].shape[0]
    L = len(layers)
    sizes = [l.num_params for l in layers]
    offs = [0]
    for s in sizes[:-1]:
        offs.append(offs[-1] + s)
    P = sum(sizes)
    dense = torch.empty(P, P, dtype=dtype, device=device)

    # One scratch region per role, reused by every pair and chunk.
    max_m, max_xg, max_y, max_h = _scratch_sizes(layers, chunk)
    max_in = max(l.in_dim for l in layers)
    xbuf = torch.empty(max_xg * chunk, dtype=dtype, device=device)
    ybuf = torch.empty(max_y * chunk, dtype=dtype, device=device)
    hbuf = torch.empty(max_h * chunk, dtype=dtype, device=device)
    mbuf = torch.empty(max_m, dtype=dtype, device=device)
    atbuf = [torch.empty(max_in * chunk, dtype=dtype, device=device) for _ in range(2)]
    # g per case with directions last: (N, O_i, k), so all H_n of a chunk are one bmm.
    g_nok = [gi.permute(1, 2, 0).contiguous() for gi in g]
    tri_h = {l.d_out: _triu_index(l.d_out, device) for l in layers}
    scale = 1.0 / n

    # Pair-outer, chunk-inner: one accumulator M at a time (accumulating all pairs at once
    # would cost another ~P²/2 entries); transposing ā per chunk is cheap.
    for i in range(L):
        for j in range(i, L):
            t0 = time.perf_counter() if timings is not None else 0.0
            li, lj = layers[i], layers[j]
            diag = i == j
            lay = _pair_layout(li, lj, diag, chunk)
            Ii, Ij, Oi, Oj = li.in_dim, lj.in_dim, li.d_out, lj.d_out
            M = mbuf[: lay.rows * lay.cols].view(lay.rows, lay.cols)
            M.zero_()
            for s0 in range(0, n, chunk):
                s1 = min(s0 + chunk, n)
                m = s1 - s0
                ati = atbuf[0][: Ii * m].view(Ii, m)
                ati.copy_(a[i][s0:s1].t())
                if diag:
                    atj = ati
                    H = hbuf[: m * Oi * Oi].view(m, Oi * Oi)
                    torch.bmm(g_nok[i][s0:s1], g_nok[i][s0:s1].transpose(1, 2), out=H.view(m, Oi, Oi))
                    Y = ybuf[: m * lay.cols].view(m, lay.cols)
                    torch.index_select(H, 1, tri_h[Oi][0], out=Y)
                else:
                    atj = atbuf[1][: Ij * m].view(Ij, m)
                    atj.copy_(a[j][s0:s1].t())
                    Y = ybuf[: m * lay.cols].view(m, lay.cols)
                    torch.bmm(g_nok[i][s0:s1], g_nok[j][s0:s1].transpose(1, 2), out=Y.view(m, Oi, Oj))
                for p0, p1, q0, off in lay.groups:
                    w = Ij - q0
                    rows = (p1 - p0) * w
                    X = xbuf[: rows * m].view(rows, m)
                    torch.mul(ati[p0:p1].unsqueeze(1), atj[q0:].unsqueeze(0), out=X.view(p1 - p0, w, m))
                    M[off:off + rows].addmm_(X, Y, alpha=scale)
            block = dense[offs[i]:offs[i] + sizes[i], offs[j]:offs[j] + sizes[j]]
            if diag:
                _unpack_diag(M, block, Ii, Oi, _diag_row_index(lay, Ii, device), tri_h[Oi][1], max_m // 2)
            else:
                # M[(p, q), (r, s)] -> F[(p, r), (q, s)]
                block.view(Ii, Oi, Ij, Oj).copy_(M.view(Ii, Ij, Oi, Oj).permute(0, 2, 1, 3))
                dense[offs[j]:offs[j] + sizes[j], offs[i]:offs[i] + sizes[i]].copy_(block.t())
            if timings is not None:
                timings[(i, j)] = time.perf_counter() - t0
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
