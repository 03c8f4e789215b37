"""EKFAC (George et al. 2018): K-FAC's Kronecker eigenbasis with its eigenvalues replaced by the
second moments of the per-case gradients projected into it (docs/algorithm.md#ekfac).

A layer's K-FAC block is ``A ⊗ G = (U_A ⊗ U_G)(S_A ⊗ S_G)(U_A ⊗ U_G)ᵀ``. EKFAC keeps the basis and
replaces ``S_A ⊗ S_G`` by the best diagonal in it (least Frobenius error, George et al. 2018 §3.2):

    s_{o,i} = E[ (U_Gᵀ DW_n U_A)²_{o,i} ],   DW_n = Σ_t g_{n,t} ā_{n,t}ᵀ         (per-case gradients)
    F_ℓ ≈ (U_A ⊗ U_G) diag(vec s) (U_A ⊗ U_G)ᵀ
    (F_ℓ + γ² I)⁻¹ V = U_G [ (U_Gᵀ V U_A) ⊘ (s + γ²) ] U_Aᵀ                   (exact Tikhonov)

- :func:`eigenbasis` — ``U_A``, ``U_G`` (and the K-FAC eigenvalues) of the factors' snapshot,
  refreshed with the inverses (T₃);
- :func:`projected_moments` — one statistics batch's ``s`` (sampled or empirical targets: one
  ``g`` per case; exact expectation: summed over the output-Fisher square-root directions ``k``);
- :class:`EKFACScales` — the running state: the basis in use and ``s`` blended with the factors'
  ``ε_k = min(1 − 1/k, ε)``; at a basis refresh the running ``s`` is carried into the new basis as
  the diagonal, in that basis, of the previous EKFAC matrix (its Frobenius-best diagonal there);
- :class:`EKFACInverse` — the damped inverse the optimizers apply (``apply``, ``with_gamma``,
  ``dense``), and :meth:`EKFACInverse.matrix` (the undamped block-diagonal EKFAC matrix, for studies).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ..errors import KFACError
from . import decompositions as dec
from .factors import kron
from .inverses import as_gamma

__all__ = ["Basis", "eigenbasis", "projected_moments", "EKFACScales", "EKFACInverse", "ekfac_dense"]

#: Elements of one chunk of per-case projected gradients ``(k, n_chunk, d_out, in_dim)`` for
#: weight-sharing layers (bounds the scratch memory; no weight sharing needs none: one GEMM).
CHUNK_ELEMS = 2**24


class Basis(NamedTuple):
    """One layer's Kronecker eigenbasis: ``A = U_A diag(e_A) U_Aᵀ``, ``G = U_G diag(e_G) U_Gᵀ``."""

    e_A: Tensor
    U_A: Tensor
    e_G: Tensor
    U_G: Tensor


def eigenbasis(A: Sequence[Tensor], G: Sequence[Tensor], dtype: torch.dtype | None = None,
               names: Sequence[str] | None = None) -> list[Basis]:
    """The eigendecompositions of each layer's ``A`` and ``G`` (in ``dtype``; robust ``eigh``)."""
    names = list(names) if names is not None else [f"layer {i}" for i in range(len(A))]
    out = []
    for a, g, n in zip(A, G, names):
        dt = dtype or a.dtype
        e_A, U_A = dec.eigh(a.to(dt), f"A of {n}")
        e_G, U_G = dec.eigh(g.to(dt), f"G of {n}")
        out.append(Basis(e_A, U_A, e_G, U_G))
    return out


def projected_moments(a: Tensor, g: Tensor, basis: Basis, weight: float = 1.0) -> Tensor:
    """``weight · (1/n) Σ_n Σ_k (U_Gᵀ DW_{n,k} U_A)²``, shape ``(d_out, in_dim)`` (George et al. 2018,
    eq. for s*), in the basis' dtype.

    ``a``: ``(n, in_dim)`` or, for weight sharing, ``(n, T, in_dim)``; ``g``: the same with
    ``d_out`` (one direction per case) or with a leading ``k`` (the exact expectation's
    directions). Without weight sharing ``U_Gᵀ g aᵀ U_A = ĝ âᵀ``, so the squares are
    ``(ĝ²)(â²)ᵀ`` and the whole batch is one GEMM; with it, ``DW_n = Σ_t g_{n,t} ā_{n,t}ᵀ`` per
    case (``einsum("knto,nti->knoi")`` of the projected vectors), in chunks of cases."""
    dt = basis.U_A.dtype
    a, g = a.to(dt), g.to(dt)
    if g.dim() == a.dim():
        g = g.unsqueeze(0)
    if g.dim() != a.dim() + 1 or g.shape[1] != a.shape[0] or g.shape[2:-1] != a.shape[1:-1]:
        raise ValueError(f"per-case statistics of shapes {tuple(a.shape)} (ā) and {tuple(g.shape)} (g) do not "
                         "match: expected ā (n[, T], in_dim) and g ([k,] n[, T], d_out)")
    n = a.shape[0]
    a_hat = a @ basis.U_A
    g_hat = g @ basis.U_G
    if a.dim() == 2:
        return (g_hat.square().sum(0).t() @ a_hat.square()).mul_(weight / n)
    k, d_out, d_in = g.shape[0], g.shape[-1], a.shape[-1]
    step = max(1, CHUNK_ELEMS // max(1, k * d_out * d_in))
    s = a.new_zeros(d_out, d_in)
    for lo in range(0, n, step):
        per_case = torch.einsum("knto,nti->knoi", g_hat[:, lo:lo + step], a_hat[lo:lo + step])
        s += per_case.square().sum((0, 1))
    return s.mul_(weight / n)


def rotate(scales: Tensor, old: Basis, new: Basis) -> Tensor:
    """The diagonal, in the ``new`` basis, of ``(U_A ⊗ U_G) diag(vec s) (U_A ⊗ U_G)ᵀ`` built on
    ``old``: ``(R_G ∘ R_G) s (R_A ∘ R_A)ᵀ`` with ``R = U_newᵀ U_old`` (Kronecker rows square to
    Kronecker products: ``(R_A ⊗ R_G)^∘2 = R_A^∘2 ⊗ R_G^∘2``)."""
    R_A = (new.U_A.t() @ old.U_A).square_()
    R_G = (new.U_G.t() @ old.U_G).square_()
    return R_G @ scales @ R_A.t()


class EKFACScales:
    """EKFAC's running state: the eigenbasis in use (``basis``, one :class:`Basis` per layer; None
    before the first refresh) and the running scales ``scales[i]`` (``(d_out_i, in_dim_i)``),
    blended with ``ε_k = min(1 − 1/k, decay)`` at the ``k``-th update (M&G 2015 §5's schedule, the
    factors' cap ``decay``). Before the first update (``k = 0``) the scales are K-FAC's eigenvalues
    ``e_G e_Aᵀ`` in the basis (EKFAC starts as K-FAC; the first update replaces them)."""

    def __init__(self, decay: float):
        self.decay = float(decay)
        self.basis: list[Basis] | None = None
        self.scales: list[Tensor] | None = None
        self.k = 0

    def epsilon(self) -> float:
        """``ε_k`` of the next update."""
        return min(1.0 - 1.0 / (self.k + 1), self.decay)

    def set_basis(self, basis: list[Basis]) -> None:
        """Use ``basis`` from now on; the running scales are carried into it (:func:`rotate`), or,
        before any update, are its K-FAC eigenvalues."""
        if self.k > 0:
            self.scales = [rotate(s, old, new) for s, old, new in zip(self.scales, self.basis, basis)]
        else:
            self.scales = [torch.outer(b.e_G.clamp(min=0), b.e_A.clamp(min=0)) for b in basis]
        self.basis = list(basis)

    def batch(self, a: Sequence[Tensor] | None, g: Sequence[Tensor] | None, weight: float = 1.0) -> list[Tensor]:
        """One statistics batch's scales in the current basis (``a`` None: zeros, a share of no cases)."""
        if self.basis is None:
            raise KFACError("EKFAC's scales need the eigenbasis: refresh the inverse first")
        if a is None:
            return [b.U_G.new_zeros(b.U_G.shape[0], b.U_A.shape[0]) for b in self.basis]
        return [projected_moments(ai, gi, b, weight) for ai, gi, b in zip(a, g, self.basis)]

    def blend(self, batch: Sequence[Tensor]) -> None:
        """``s ← ε s + (1 − ε) s_batch`` (the first update takes the batch)."""
        eps = self.epsilon()
        if self.scales is None or eps == 0.0:
            self.scales = [b.clone() for b in batch]
        else:
            for s, b in zip(self.scales, batch):
                s.mul_(eps).add_(b, alpha=1.0 - eps)
        self.k += 1

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """``k``, the ``basis`` (per layer ``[e_A, U_A, e_G, U_G]``) and a copy of the ``scales`` (they
        are updated in place): plain tensors."""
        return {"k": self.k,
                "basis": None if self.basis is None else [list(b) for b in self.basis],
                "scales": None if self.scales is None else [s.clone() for s in self.scales]}

    @classmethod
    def checked(cls, state, checker, in_dims: Sequence[int], out_dims: Sequence[int], decay: float,
                dtype: torch.dtype, device) -> "EKFACScales | None":
        """A new state from a ``state_dict()`` (None stays None), every entry checked first with
        ``checker`` (shapes per layer, finiteness, orthonormal bases, scales ≥ 0, present with a
        basis) and converted to ``dtype`` on ``device``; a ``StateError`` names what does not fit."""
        if state is None:
            return None
        c = checker
        c.mapping(state, ("k", "basis", "scales"), "the saved EKFAC state")
        k = c.integer(state["k"], "the EKFAC scale update count k")
        conv = lambda t: t.detach().to(device=device, dtype=dtype, copy=True)  # noqa: E731
        out = cls(decay)
        out.k = k
        L = len(in_dims)
        if state["basis"] is not None:
            basis = state["basis"]
            if not isinstance(basis, (list, tuple)) or len(basis) != L:
                c.fail(f"the EKFAC basis must hold one entry per layer ({L})", c.hint)
            out.basis = []
            for i, (entry, di, do) in enumerate(zip(basis, in_dims, out_dims)):
                e_A, U_A, e_G, U_G = c.tensors(entry, f"the EKFAC basis of layer {i}",
                                               [(di,), (di, di), (do,), (do, do)])
                for U, what in ((U_A, "U_A"), (U_G, "U_G")):
                    U = U.double()
                    err = float((U.t() @ U - torch.eye(U.shape[0], dtype=U.dtype)).abs().max()) if U.numel() else 0.0
                    if err > 1e-3:
                        c.fail(f"the EKFAC basis {what} of layer {i} is not orthonormal (max |UᵀU − I| = {err:.3g})",
                               "the state is damaged")
                out.basis.append(Basis(*(conv(t) for t in (e_A, U_A, e_G, U_G))))
        if (state["scales"] is None) != (out.basis is None):
            c.fail("the EKFAC state holds " + ("an eigenbasis but no scales" if out.basis is not None else
                                               "scales but no eigenbasis"), "the state is damaged")
        if k > 0 and out.basis is None:
            c.fail(f"the EKFAC state has k = {k} updates but no eigenbasis", "the state is damaged")
        if state["scales"] is not None:
            scales = c.tensors(state["scales"], "the EKFAC scales", [(do, di) for di, do in zip(in_dims, out_dims)])
            if any(bool((s < 0).any()) for s in scales):
                c.fail("the EKFAC scales hold negative values (second moments are >= 0)", "the state is damaged")
            out.scales = [conv(s) for s in scales]
        return out


class EKFACInverse:
    """``(F_EKFAC + γ² I)⁻¹`` per layer (exact Tikhonov damping in the eigenbasis; γ² so that the
    same γ means the same order of damping as K-FAC's): the inverse the front ends apply.

    It reads ``state`` (an :class:`EKFACScales`) when applied, so it follows the scales that the
    engine re-estimates at every step; candidates of the γ grid share one state (``with_gamma``)."""

    def __init__(self, state: EKFACScales, gamma, names: Sequence[str] | None = None):
        if state.basis is None:
            raise KFACError("the EKFAC inverse needs an eigenbasis: refresh the inverse first")
        self.state = state
        self.dtype = state.basis[0].U_A.dtype
        self.gamma = as_gamma(gamma, state.basis[0].U_A)
        self.names = list(names) if names is not None else [f"layer {i}" for i in range(len(state.basis))]

    @property
    def scales(self) -> list[Tensor]:
        if self.state.scales is None:
            raise KFACError("EKFAC's scales have not been estimated yet: update them from statistics first")
        return self.state.scales

    def with_gamma(self, gamma) -> "EKFACInverse":
        """The same basis and scales with another γ (no decomposition)."""
        return EKFACInverse(self.state, gamma, self.names)

    def apply(self, V: Sequence[Tensor]) -> list[Tensor]:
        """``U_G [(U_Gᵀ V U_A) ⊘ (s + γ²)] U_Aᵀ`` per layer; ``V[i]`` shape ``(..., d_out_i, in_dim_i)``."""
        basis, scales = self.state.basis, self.scales
        if len(V) != len(basis):
            raise ValueError(f"expected {len(basis)} per-layer matrices, got {len(V)}")
        out = []
        for i, (v, b, s) in enumerate(zip(V, basis, scales)):
            if tuple(v.shape[-2:]) != tuple(s.shape):
                raise ValueError(f"layer {i}: expected a [W | b] matrix of shape {tuple(s.shape)}, got {tuple(v.shape)}")
            dt = v.dtype
            v = v.to(self.dtype)
            inner = (b.U_G.t() @ v @ b.U_A) / (s + self.gamma**2)
            out.append((b.U_G @ inner @ b.U_A.t()).to(dt))
        return out

    def dense(self) -> Tensor:
        """The whole damped inverse as a dense ``(P, P)`` matrix in the paper's ordering (small nets)."""
        d = [s + self.gamma**2 for s in self.scales]
        if any(bool((x <= 0).any()) for x in d):
            raise KFACError("the EKFAC matrix is singular at this damping (some scales are 0): use gamma > 0")
        return ekfac_dense(self.state.basis, [1.0 / x for x in d])

    def matrix(self) -> Tensor:
        """The undamped block-diagonal EKFAC matrix ``(U_A ⊗ U_G) diag(vec s) (U_A ⊗ U_G)ᵀ`` per block."""
        return ekfac_dense(self.state.basis, self.scales)


def ekfac_dense(basis: Sequence[Basis], diagonals: Sequence[Tensor]) -> Tensor:
    """``block_diag_i((U_A ⊗ U_G) diag(vec d_i) (U_A ⊗ U_G)ᵀ)`` in the paper's ordering (column-stacked
    ``vec``: ``(U_A ⊗ U_G)ᵀ vec V = vec(U_Gᵀ V U_A)``, so entry ``(o, i)`` of ``d`` is ``vec`` index ``i·d_out + o``).

    Entry ``[(p, o), (q, r)] = Σ_j U_G[o, j] U_G[r, j] X_j[p, q]`` with ``X_j = U_A diag(d[j, :]) U_Aᵀ``:
    ``d_out·d_in³ + d_in²·d_out³`` multiply-adds per block instead of the ``2 (d_in d_out)³`` of
    ``Q diag Qᵀ`` with ``Q = U_A ⊗ U_G`` (``kron_dense``, the plain formula, is kept for the tests)."""
    blocks = []
    for b, d in zip(basis, diagonals):
        d_out, d_in = d.shape
        X = (b.U_A.unsqueeze(0) * d.unsqueeze(1)) @ b.U_A.t()               # (d_out, d_in, d_in): X_j
        M = torch.einsum("oj,rj,jpq->poqr", b.U_G, b.U_G, X)
        blocks.append(M.reshape(d_in * d_out, d_in * d_out))
    return torch.block_diag(*blocks)


def kron_dense(b: Basis, d: Tensor) -> Tensor:
    """One block ``(U_A ⊗ U_G) diag(vec d) (U_A ⊗ U_G)ᵀ`` by the plain formula (``O((d_in d_out)³)``)."""
    Q = kron(b.U_A, b.U_G)
    return (Q * d.t().reshape(-1)) @ Q.t()
