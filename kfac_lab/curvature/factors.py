"""Kronecker factors Ā_{i,j} = E[ā_i ā_jᵀ] and G_{i,j} = E[g_i g_jᵀ] (M&G 2015 §3, §5;
docs/algorithm.md#statistics).

Index convention: ``A[(i, j)]`` pairs the *inputs* of layers ``i`` and ``j`` (the paper's
``Ā_{i-1,j-1}``), ``G[(i, j)]`` their output gradients, so ``F̃`` block ``(i, j)`` is
``A[(i, j)] ⊗ G[(i, j)]`` in code indices. Only ``i <= j`` is stored; ``(j, i)`` is the transpose.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from .. import checks
from ..errors import KFACError
from .layers import Capture, KFACLayer
from .losses import Loss, get_loss

PAIR_SETS = ("diag", "tridiag", "all")
STAT_MODES = ("sampled", "empirical", "exact")
#: The two Kronecker approximations of a weight-sharing layer (docs/algorithm.md#weight-sharing).
WEIGHT_SHARING = ("expand", "reduce")


def check_weight_sharing(value, owner: str = "weight_sharing") -> str:
    """``value`` if it names a weight-sharing approximation, else a ValueError saying the choices."""
    if not isinstance(value, str) or value not in WEIGHT_SHARING:
        raise ValueError(f"{owner}={value!r}: choose 'expand' (KFC, Grosse & Martens 2016: Ω = E[Σ_t ā_t ā_tᵀ], "
                         "Γ = E[Σ_t g_t g_tᵀ]/|T|; the default) or 'reduce' (Eschenhagen et al. 2023: ā averaged "
                         "and g summed over the locations t)")
    return value


def _layer_rows(a: Tensor, g: Tensor, weight_sharing: str) -> tuple[Tensor, int, Tensor, int]:
    """``(X_a, s_a, X_g, s_g)`` with a layer's diagonal factors ``A = X_aᵀ X_a / s_a``, ``G = X_gᵀ X_g / s_g``.

    ``a``: ``(m, I)`` or ``(m, T, I)`` (weight sharing); ``g``: ``(m, O)`` / ``(k, m, O)`` or
    ``(m, T, O)`` / ``(k, m, T, O)``. "expand" (KFC, Grosse & Martens 2016 §3.1, eqs. 9–10):
    ``Ω = (1/m) Σ_{n,t} ā āᵀ``, ``Γ = (1/(m|T|)) Σ_{n,t,k} g gᵀ``; "reduce" (Eschenhagen et al. 2023
    §3.2): ``(1/m) Σ_n ā̄ ā̄ᵀ`` with ``ā̄ = mean_t ā`` and ``(1/m) Σ_{n,k} ḡ ḡᵀ`` with ``ḡ = Σ_t g``."""
    m, d = a.shape[0], g.shape[-1]
    if a.dim() == 2:
        return a, m, g.reshape(-1, d), m
    if weight_sharing == "expand":
        return a.reshape(-1, a.shape[-1]), m, g.reshape(-1, d), m * a.shape[1]
    return a.mean(1), m, g.sum(-2).reshape(-1, d), m


def _cross_rows(a: Tensor, g: Tensor, weight_sharing: str) -> tuple[Tensor, Tensor]:
    """Per-case vectors ``(u, v)`` (``v`` rows ``(k·m, O)``) whose products give a layer's share of
    the cross-layer factors: "expand" ``u = Σ_t ā_t / √|T|``, ``v = mean_t g_t``; "reduce"
    ``u = mean_t ā_t``, ``v = Σ_t g_t`` (the layer's own reduced vectors); ``(ā, g)`` without sharing."""
    d = g.shape[-1]
    if a.dim() == 2:
        return a, g.reshape(-1, d)
    if weight_sharing == "expand":
        return a.sum(1).div_(a.shape[1] ** 0.5), g.mean(-2).reshape(-1, d)
    return a.mean(1), g.sum(-2).reshape(-1, d)


def factor_operands(a: Sequence[Tensor], g: Sequence[Tensor], pairs: Sequence[tuple[int, int]],
                    weight_sharing: str = "expand") -> dict:
    """For each pair ``(i, j)``: ``((X_i, X_j, s), (Y_i, Y_j, t))`` with the mini-batch factors
    ``A_{i,j} = X_iᵀ X_j / s`` and ``G_{i,j} = Y_iᵀ Y_j / t`` (one GEMM each).

    Diagonal pairs of weight-sharing layers follow ``weight_sharing`` (:func:`_layer_rows`). A cross
    pair with a weight-sharing layer (the all-pairs ``F̃`` of the studies; the block-tridiagonal
    inverse refuses such models) uses :func:`_cross_rows`: for "expand" the factors of one model
    in which every layer is seen at one uniformly drawn location, independently across layers —
    its diagonal blocks are KFC's Ω and Γ, so every ``[A_ij]`` and ``[G_ij]`` is one Gram matrix and
    the Khatri–Rao ``F̃`` stays positive semi-definite; for "reduce" the reduced vectors
    (docs/algorithm.md#weight-sharing)."""
    check_weight_sharing(weight_sharing)
    m = a[0].shape[0]
    own, red = {}, {}
    out = {}
    for i, j in pairs:
        if i == j:
            if i not in own:
                own[i] = _layer_rows(a[i], g[i], weight_sharing)
            xa, sa, xg, sg = own[i]
            out[(i, j)] = ((xa, xa, sa), (xg, xg, sg))
        else:
            for l in (i, j):
                if l not in red:
                    red[l] = _cross_rows(a[l], g[l], weight_sharing)
            out[(i, j)] = ((red[i][0], red[j][0], m), (red[i][1], red[j][1], m))
    return out


def factor_pairs(n_layers: int, pairs: str | Iterable[tuple[int, int]] = "tridiag") -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i <= j``: ``"diag"`` (block-diagonal), ``"tridiag"`` (+ adjacent),
    ``"all"`` (every pair, for analysis), or an explicit iterable."""
    if isinstance(pairs, str):
        if pairs not in PAIR_SETS:
            raise ValueError(f"pairs={pairs!r}: choose one of {PAIR_SETS} or pass a list of (i, j)")
        span = {"diag": 0, "tridiag": 1, "all": n_layers}[pairs]
        return [(i, j) for i in range(n_layers) for j in range(i, min(n_layers, i + span + 1))]
    out = sorted({(min(i, j), max(i, j)) for i, j in pairs})
    for i, j in out:
        if not (0 <= i < n_layers and 0 <= j < n_layers):
            raise ValueError(f"factor pair {(i, j)} is out of range for {n_layers} layers")
    return out


def batch_factors(
    a: Sequence[Tensor], g: Sequence[Tensor], pairs: Sequence[tuple[int, int]], weight_sharing: str = "expand"
) -> tuple[dict, dict]:
    """Mini-batch factors.

    ``a[i]``: ā of layer ``i``, shape ``(m, in_dim_i)``. ``g[i]``: per-case ``g``, shape
    ``(m, d_out_i)`` or ``(k, m, d_out_i)`` for ``k`` directions per case (summed over ``k``).
    Returns ``A[(i,j)] = a_iᵀ a_j / m`` and ``G[(i,j)] = Σ_k g_iᵀ g_j / m``. A weight-sharing
    layer's ``a[i]`` is ``(m, T, in_dim_i)`` and its ``g[i]`` ``(…, m, T, d_out_i)``: its factors
    follow ``weight_sharing`` (:func:`factor_operands`).
    """
    ops = factor_operands(a, g, pairs, weight_sharing)
    A = {k: xa.t() @ xb / s for k, ((xa, xb, s), _) in ops.items()}
    G = {k: ya.t() @ yb / t for k, (_, (ya, yb, t)) in ops.items()}
    return A, G


def output_gradients(
    model: nn.Module,
    layers: Sequence[KFACLayer],
    loss: str | Loss,
    x: Tensor,
    y: Tensor | None = None,
    mode: str = "sampled",
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """One forward pass and the backward passes that give per-case ``g`` for every layer.

    ``mode``: ``"sampled"`` — targets drawn from the model's predictive distribution,
    ``samples`` per case, each weighted ``1/samples`` (M&G 2015 §5; the default and the paper's);
    ``"empirical"`` — the training targets ``y`` (the *empirical* Fisher, a different matrix);
    ``"exact"`` — the exact expectation, backpropagating the columns of ``F_R^{½}``.
    Returns ``(a, g, z)``: ``a[i]`` shape ``(m, in_dim_i)``, ``g[i]`` shape ``(k, m, d_out_i)``
    with ``Σ_k g gᵀ`` the per-case output-gradient second moment, and the outputs ``z``; a
    weight-sharing layer's are ``(m, T, in_dim_i)`` and ``(k, m, T, d_out_i)``.
    """
    loss = get_loss(loss)
    if mode not in STAT_MODES:
        raise ValueError(f"mode={mode!r}: choose one of {STAT_MODES}")
    if mode == "empirical" and y is None:
        raise ValueError("mode='empirical' uses the training targets: pass y")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    checks.batch_dtype(x, layers[0].module.weight.dtype, "the curvature statistics")
    with torch.enable_grad(), Capture(layers, grads=False, outputs=True) as cap:
        z = model(x)
    missing = [l.name for p, l in enumerate(layers) if cap.s[p] is None]
    if missing:
        raise KFACError(f"layers {missing} did not run in the forward pass; exclude them")
    z2 = z.reshape(z.shape[0], -1)
    if mode == "exact":
        directions = loss.fisher_sqrt(z2.detach())  # (k, m, c)
    elif mode == "empirical":
        loss.check_target(z2, y)
        directions = loss.grad_output(z2.detach(), y).unsqueeze(0)
    else:
        # targets drawn from finite values (a NaN logit would stop torch.multinomial); non-finite
        # outputs still give non-finite g through grad_output, which the callers' checks reject
        zs = torch.nan_to_num(z2.detach())
        directions = torch.stack(
            [loss.grad_output(z2.detach(), loss.sample(zs, generator)) for _ in range(samples)]
        ) / samples**0.5
    directions = directions.reshape(directions.shape[0], *z.shape)
    s = list(cap.s)
    g = _batched_grad(z, s, directions)
    a = list(cap.a)
    g = [l.outputs(gi, lead=2) for gi, l in zip(g, layers)]
    return a, g, z.detach()


def _batched_grad(z: Tensor, s: list[Tensor], directions: Tensor) -> list[Tensor]:
    """``∂(directions_k · z)/∂s_i`` for every k at once (vmap over the backward pass)."""
    k = directions.shape[0]
    if k == 1:
        return [gi.unsqueeze(0) for gi in torch.autograd.grad(z, s, directions[0])]
    try:
        return list(torch.autograd.grad(z, s, directions, is_grads_batched=True))
    except RuntimeError:  # an op without a batching rule: loop over directions instead
        outs = [torch.autograd.grad(z, s, d, retain_graph=True) for d in directions]
        return [torch.stack(col) for col in zip(*outs)]


# A diagonal factor's update from at least this many rows computes only its lower blocks: below
# it the rank-m update is bound by passes over the factor, and splitting it only adds passes
# (measured, 2 CPU cores: no gain at 125 rows; 25–30 % less time at 625 rows for d ≈ 1000).
SYMMETRIC_MIN_ROWS = 512
SYMMETRIC_BLOCK = 256


def symmetric_addmm_(out: Tensor, x: Tensor, beta: float, alpha: float, block: int = SYMMETRIC_BLOCK) -> Tensor:
    """``out ← β·out + α·xᵀx`` in place for a symmetric ``out`` (shape ``(d, d)``; ``x``: ``(m, d)``),
    computing only the lower blocks of a recursive 2×2 split and mirroring the rest — about half
    the flops of one GEMM for large ``d`` (``torch`` exposes no ``syrk``)."""
    d = out.shape[-1]
    if d <= block:
        return out.addmm_(x.t(), x, beta=beta, alpha=alpha)
    k = d // 2
    symmetric_addmm_(out[:k, :k], x[:, :k], beta, alpha, block)
    out[k:, :k].addmm_(x[:, k:].t(), x[:, :k], beta=beta, alpha=alpha)
    symmetric_addmm_(out[k:, k:], x[:, k:], beta, alpha, block)
    out[:k, k:].copy_(out[k:, :k].t())
    return out


class KroneckerFactors:
    """Running estimates of ``A[(i,j)]`` and ``G[(i,j)]`` (M&G 2015 §5).

    ``update`` blends a mini-batch estimate in with ``ε_k = min(1 − 1/k, decay)`` at the
    ``k``-th update: ``new = ε·old + (1−ε)·batch``. By default the diagonal and adjacent pairs
    are kept (so block-diagonal and block-tridiagonal inverses can be switched at any time).
    """

    def __init__(self, n_layers: int, pairs: str | Iterable[tuple[int, int]] = "tridiag", decay: float = 0.95):
        decay = checks.number("ema_decay (ε's cap)", decay, minimum=0.0, below=1.0, need="in [0, 1)")
        self.n_layers = n_layers
        self.pairs = factor_pairs(n_layers, pairs)
        self.decay = decay
        self.k = 0
        self.A: dict[tuple[int, int], Tensor] = {}
        self.G: dict[tuple[int, int], Tensor] = {}

    def epsilon(self, k: int | None = None) -> float:
        """``ε_k = min(1 − 1/k, decay)`` for the ``k``-th update (the next one by default)."""
        k = self.k + 1 if k is None else k
        return min(1.0 - 1.0 / k, self.decay)

    def update(self, A_batch: dict, G_batch: dict) -> None:
        """Blend in one mini-batch's factors (dicts keyed by the pairs; extra keys ignored)."""
        eps = self.epsilon()
        for store, batch in ((self.A, A_batch), (self.G, G_batch)):
            for key in self.pairs:
                new = batch[key]
                if key not in store or eps == 0.0:
                    store[key] = new.clone()
                else:
                    store[key].mul_(eps).add_(new, alpha=1.0 - eps)
        self.k += 1

    def update_from_cases(self, a: Sequence[Tensor], g: Sequence[Tensor], weight_sharing: str = "expand") -> None:
        """``update(*batch_factors(a, g, self.pairs, weight_sharing))`` fused: each factor is one
        GEMM that scales the old value in place, ``F ← ε F + (1−ε)/s · xᵢᵀ xⱼ`` (no batch matrices,
        no extra passes over the factors). ``a[i]``: ``(m, in_dim_i)``; ``g[i]``: ``(m, d_out_i)``
        or ``(k, m, d_out_i)`` (summed over ``k``); with weight sharing ``(m, T, …)``, as for
        ``batch_factors``."""
        eps = self.epsilon()
        ops = factor_operands(a, g, self.pairs, weight_sharing)
        for side, store in enumerate((self.A, self.G)):
            for (i, j) in self.pairs:
                x, y, scale = ops[(i, j)][side]
                old = store.get((i, j))
                if old is None or eps == 0.0:
                    store[(i, j)] = torch.mm(x.t(), y).div_(scale)
                elif i == j and x.shape[0] >= SYMMETRIC_MIN_ROWS:
                    symmetric_addmm_(old, x, eps, (1.0 - eps) / scale)
                else:
                    old.addmm_(x.t(), y, beta=eps, alpha=(1.0 - eps) / scale)
        self.k += 1

    def diag(self) -> tuple[list[Tensor], list[Tensor]]:
        """``([A_0, …], [G_0, …])``: the diagonal factors per layer."""
        n = self.n_layers
        return [self.A[(i, i)] for i in range(n)], [self.G[(i, i)] for i in range(n)]

    def off_diag(self) -> tuple[list[Tensor], list[Tensor]]:
        """``([A_{0,1}, …], [G_{0,1}, …])``: the adjacent cross factors (for the tridiagonal inverse)."""
        if any((i, i + 1) not in self.A for i in range(self.n_layers - 1)):
            raise KFACError("the adjacent cross factors were not collected: use pairs='tridiag' or 'all'")
        n = self.n_layers
        return [self.A[(i, i + 1)] for i in range(n - 1)], [self.G[(i, i + 1)] for i in range(n - 1)]

    def block(self, i: int, j: int) -> tuple[Tensor, Tensor]:
        """``(A_{i,j}, G_{i,j})`` for any stored pair, transposing when ``i > j``."""
        if (min(i, j), max(i, j)) not in self.A:
            raise KFACError(f"factor pair ({i}, {j}) was not collected (pairs={self.pairs})")
        if i <= j:
            return self.A[(i, j)], self.G[(i, j)]
        return self.A[(j, i)].t(), self.G[(j, i)].t()

    def state_dict(self) -> dict:
        return {
            "k": self.k,
            "decay": self.decay,
            "pairs": [list(p) for p in self.pairs],
            "A": {f"{i},{j}": t for (i, j), t in self.A.items()},
            "G": {f"{i},{j}": t for (i, j), t in self.G.items()},
        }

    def load_state_dict(self, state: dict, dims: tuple[Sequence[int], Sequence[int]] | None = None,
                        dtype: torch.dtype | None = None, device=None, checker=None) -> None:
        """Load a ``state_dict()``, all or nothing: pairs, ``k``, ``decay`` and every factor's shape
        (against ``dims`` = ``(in_dims, out_dims)`` per layer when given, else against each other)
        and finiteness are checked before anything changes. ``dtype``/``device``: convert the
        factors (as ``torch.optim`` does with its state). ``checker``: names the owner in errors."""
        from ..optim.state_check import Checker, check_factor_state

        c = checker or Checker("KroneckerFactors")
        check_factor_state(c, state, self.pairs, *(dims if dims is not None else (None, None)))
        parse = lambda key: tuple(int(v) for v in key.split(","))  # noqa: E731
        conv = lambda t: t.detach().to(device=device, dtype=dtype, copy=True)  # noqa: E731
        A = {parse(k): conv(t) for k, t in state["A"].items()}
        G = {parse(k): conv(t) for k, t in state["G"].items()}
        self.k, self.decay, self.A, self.G = int(state["k"]), float(state["decay"]), A, G


def kron(a: Tensor, b: Tensor) -> Tensor:
    """``a ⊗ b`` for matrices (``torch.kron`` 2.13 fails on some size-1 transposed views)."""
    (p, q), (r, s) = a.shape, b.shape
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(p * r, q * s)


def vec(mat: Tensor) -> Tensor:
    """Column-stacking ``vec`` (the paper's): ``vec(M)[p·rows + r] = M[r, p]``; batch dims kept."""
    return mat.transpose(-1, -2).reshape(*mat.shape[:-2], -1)


def unvec(v: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of ``vec``: a ``(..., rows·cols)`` vector back to ``(..., rows, cols)``."""
    return v.reshape(*v.shape[:-1], cols, rows).transpose(-1, -2)


def params_to_vector(mats: Sequence[Tensor]) -> Tensor:
    """Concatenate ``vec([W_i | b_i])`` over layers: the paper's parameter ordering."""
    return torch.cat([vec(m) for m in mats], dim=-1)


def vector_to_params(v: Tensor, layers: Sequence[KFACLayer]) -> list[Tensor]:
    """Split a paper-ordered vector back into per-layer ``[W | b]`` matrices."""
    out, start = [], 0
    for l in layers:
        out.append(unvec(v[..., start:start + l.num_params], l.d_out, l.in_dim))
        start += l.num_params
    return out


def kron_fisher_dense(factors: KroneckerFactors | tuple[dict, dict], layers: Sequence[KFACLayer]) -> Tensor:
    """``F̃`` (the Khatri–Rao product, M&G 2015 §3): every block ``A_{i,j} ⊗ G_{i,j}``, shape ``(P, P)``.

    Needs all pairs. For small networks only (P = total parameters)."""
    A, G = (factors.A, factors.G) if isinstance(factors, KroneckerFactors) else factors
    n = len(layers)
    rows = []
    for i in range(n):
        row = []
        for j in range(n):
            key = (min(i, j), max(i, j))
            if key not in A:
                raise KFACError(f"F̃ needs every factor pair; ({i}, {j}) is missing: collect with pairs='all'")
            Aij, Gij = (A[key], G[key]) if i <= j else (A[key].t(), G[key].t())
            row.append(kron(Aij, Gij))
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)
