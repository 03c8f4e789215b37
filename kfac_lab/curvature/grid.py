"""The γ grid's candidates without their explicit inverses (M&G 2015 §6.6; docs/algorithm.md#γ-the-grid).

Every T2 iterations K-FAC tries γ ∈ {ω₂γ, γ, γ/ω₂} and keeps the one whose update minimises the
quadratic model M(δ). Each candidate's update needs only ``Δ_c = −F̆_c⁻¹∇h`` once, so here a
candidate is the Cholesky factors of its factored-Tikhonov-damped factors (M&G 2015 §6.3),
``A_i + π_i γ I = L_A L_Aᵀ`` and ``G_i + γ/π_i I = L_G L_Gᵀ``, applied by triangular solves:
``F̆_c⁻¹ v = (G_i + γ/π_i I)⁻¹ V_i (A_i + π_i γ I)⁻¹`` — the same ``Δ_c`` as the explicit inverse's,
for a Cholesky (n³/3 flops per factor) instead of a Cholesky and an explicit ``L⁻ᵀL⁻¹`` (n³ in all).
Only the winner's explicit inverse is built (:meth:`CholeskyCandidates.inverse`, from the
factor it already has), for the GEMM-speed applications of the next T3 steps.

For the block-tridiagonal inverse the candidates are ranked the same way (by the block-diagonal
inverse's updates) and only the winner's ``F̂⁻¹`` is built (``KFAC(gamma_grid="fast")``: measured
to pick the γ the three full inverses pick, tests/optim/test_gamma_grid.py); ``gamma_grid="full"``
builds all three, as the paper does.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import decompositions as dec
from .inverses import BlockDiagonalInverse, _check_shapes, add_to_diagonal, as_gamma, pi_factor

__all__ = ["CholeskyCandidates", "CholeskyInverse"]


class CholeskyInverse:
    """``F̆⁻¹`` at one γ held as the Cholesky factors of the damped factors; :meth:`apply` by
    triangular solves, as ``BlockDiagonalInverse.apply`` does with GEMMs."""

    def __init__(self, A: Sequence[Tensor], G: Sequence[Tensor], pi: Sequence[Tensor], gamma, dtype: torch.dtype,
                 names: Sequence[str]):
        self.A, self.G, self.pi, self.dtype, self.names = A, G, pi, dtype, names
        self.gamma = as_gamma(gamma, A[0])
        γ = self.gamma
        self.L_A = [dec.cholesky(add_to_diagonal(a, p * γ), f"damped A of {n}") for a, p, n in zip(A, pi, names)]
        self.L_G = [dec.cholesky(add_to_diagonal(g, γ / p), f"damped G of {n}") for g, p, n in zip(G, pi, names)]

    def apply(self, V: Sequence[Tensor]) -> list[Tensor]:
        """``(G_i + γ/π_i I)⁻¹ V_i (A_i + π_i γ I)⁻¹`` per layer; ``V[i]`` shape ``(..., d_out_i, in_dim_i)``."""
        _check_shapes(V, self.A, self.G)
        out = []
        solve = torch.linalg.solve_triangular
        for v, la, lg in zip(V, self.L_A, self.L_G):
            dt = v.dtype
            # on Vᵀ (the layout LAPACK reads without a copy): Ad⁻¹ Vᵀ = L_A⁻ᵀ L_A⁻¹ Vᵀ, then · Gd⁻¹ from the
            # right; four triangular solves measured 10–30 % faster than two torch.cholesky_solve
            w = solve(la, v.to(self.dtype).mT, upper=False)
            w = solve(la.mT, w, upper=True)
            w = solve(lg.mT, w, upper=True, left=False)
            w = solve(lg, w, upper=False, left=False)
            out.append(w.mT.to(dt))
        return out

    def inverse(self) -> BlockDiagonalInverse:
        """The explicit ``BlockDiagonalInverse`` at this γ, from the Cholesky factors held here."""
        return BlockDiagonalInverse.from_pieces(
            self.A, self.G, self.gamma, damping_type="factored", inverse_dtype=self.dtype, names=self.names,
            A_inv=[dec.inverse_from_cholesky(L) for L in self.L_A], G_inv=[dec.inverse_from_cholesky(L) for L in self.L_G])


class CholeskyCandidates:
    """One :class:`CholeskyInverse` per γ of ``gammas`` for the diagonal factors ``A``, ``G`` (cast
    to ``inverse_dtype``; π per layer computed once). Index them like a list. ``wrap(candidate, γ)``:
    what each candidate is extended by (the engine: its diagonal Fisher blocks damped at that γ)."""

    def __init__(self, A: Sequence[Tensor], G: Sequence[Tensor], gammas: Sequence[float],
                 inverse_dtype: torch.dtype | None = None, names: Sequence[str] | None = None, wrap=None):
        if len(A) != len(G) or not A:
            raise ValueError(f"need one A and one G per layer, got {len(A)} and {len(G)}")
        dtype = inverse_dtype or A[0].dtype
        A = [a.to(dtype) for a in A]
        G = [g.to(dtype) for g in G]
        names = list(names) if names is not None else [f"layer {i}" for i in range(len(A))]
        pi = [pi_factor(a, g) for a, g in zip(A, G)]
        self.gammas = [float(g) for g in gammas]
        self.candidates = [CholeskyInverse(A, G, pi, g, dtype, names) for g in self.gammas]
        if wrap is not None:
            self.candidates = [wrap(c, g) for c, g in zip(self.candidates, self.gammas)]

    def __len__(self) -> int:
        return len(self.candidates)

    def __getitem__(self, c: int) -> CholeskyInverse:
        return self.candidates[c]

    def __iter__(self):
        return iter(self.candidates)
