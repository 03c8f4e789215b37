"""Damped inverses of the approximate Fisher (M&G 2015 §4.2, §4.3, §6.3, Appendix B;
docs/algorithm.md#block-diagonal-inverse).

Both classes act on lists of per-layer ``[W | b]``-shaped matrices ``V_i`` (shape
``(..., d_out_i, in_dim_i)``, leading batch dims allowed) and return ``F⁻¹ v`` in the same shape.

Damping ``gamma`` (γ):
- ``"factored"`` — factored Tikhonov (M&G 2015 §6.3): ``(A_i + π_i γ I) ⊗ (G_i + (γ/π_i) I)`` with
  ``π_i = sqrt((tr A_i / dim A_i) / (tr G_i / dim G_i))``. The paper's choice; γ starts at
  ``sqrt(λ + η)``.
- ``"tikhonov"`` — exact Tikhonov: ``A_i ⊗ G_i + γ² I`` via eigendecompositions (Appendix B
  with C = D = I). Block-diagonal only. (γ² so the same γ means the same order of damping.)
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ..errors import KFACError
from . import decompositions as dec
from .factors import kron

DAMPINGS = ("factored", "tikhonov")
METHODS = ("auto", "cholesky", "eigh")


def damping_type_argument(damping_type: str, damping, owner: str) -> str:
    """``damping_type``, or the deprecated ``damping=`` keyword that named it until now (a
    ``DeprecationWarning``; ``damping`` is λ elsewhere in the library)."""
    if damping is None:
        return damping_type
    warnings.warn(f"{owner}(damping=...) is deprecated: the kind of damping is now damping_type= "
                  "('damping' means λ everywhere else); the old keyword goes in the next release",
                  DeprecationWarning, stacklevel=3)
    return damping


def pi_factor(A: Tensor, G: Tensor) -> Tensor:
    """π = sqrt( [tr(A)/dim A] / [tr(G)/dim G] ) (M&G 2015 §6.3), a 0-d tensor (no host sync)."""
    tiny = torch.finfo(A.dtype).eps
    mean_a = (A.diagonal().sum() / A.shape[0]).clamp(min=tiny)
    mean_g = (G.diagonal().sum() / G.shape[0]).clamp(min=tiny)
    return torch.sqrt(mean_a / mean_g)


def as_gamma(gamma, ref: Tensor) -> Tensor:
    """γ as a 0-d tensor of ``ref``'s dtype and device (checked: a scalar, >= 0)."""
    g = torch.as_tensor(gamma, dtype=ref.dtype, device=ref.device)
    if g.dim() != 0:
        raise ValueError(f"gamma must be a scalar, got shape {tuple(g.shape)}")
    if not isinstance(gamma, Tensor) and not gamma >= 0:
        raise ValueError(f"gamma (the damping) must be >= 0, got {gamma}; use a positive value such as sqrt(lambda + eta)")
    return g


def _eye_like(M: Tensor) -> Tensor:
    return torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)


def add_to_diagonal(M: Tensor, shift: Tensor) -> Tensor:
    """``M + shift·I`` as a new matrix (one copy, the diagonal shifted in place; no ``eye``)."""
    out = M.clone()
    out.diagonal().add_(shift)
    return out


class BlockDiagonalInverse:
    """``F̆⁻¹`` (M&G 2015 §4.2): ``U_i = (G_i + γ/π_i I)⁻¹ V_i (A_i + π_i γ I)⁻¹`` per layer.

    ``A[i]``: shape ``(in_dim_i, in_dim_i)``; ``G[i]``: ``(d_out_i, d_out_i)``.
    ``damping_type``: ``"factored"`` or ``"tikhonov"`` (module doc; ``damping=`` is its deprecated
    spelling). ``method``: ``"cholesky"`` (cheapest for one γ), ``"eigh"`` (decompose once; then
    ``with_gamma`` costs one GEMM per factor), ``"auto"`` (eigh for exact Tikhonov, which
    needs it, else Cholesky — measured faster, see benchmarks/). ``inverse_dtype`` sets the
    precision of the decompositions and of the stored inverses.

    Two ways to build one (both through ``__init__``): :meth:`from_factors` computes every piece;
    :meth:`from_pieces` takes pieces computed elsewhere (another rank): the damped factor
    inverses (``method="cholesky"``) or the eigendecompositions (``method="eigh"``).
    """

    def __init__(self, A: Sequence[Tensor], G: Sequence[Tensor], gamma, damping_type: str = "factored",
                 method: str = "auto", inverse_dtype: torch.dtype | None = None,
                 names: Sequence[str] | None = None, *, eig: Sequence | None = None,
                 inverses: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None, damping: str | None = None):
        damping_type = damping_type_argument(damping_type, damping, "BlockDiagonalInverse")
        if damping_type not in DAMPINGS:
            raise ValueError(f"damping_type={damping_type!r}: choose one of {DAMPINGS}")
        if method not in METHODS:
            raise ValueError(f"method={method!r}: choose one of {METHODS}")
        if len(A) != len(G) or not A:
            raise ValueError(f"need one A and one G per layer, got {len(A)} and {len(G)}")
        if method == "auto":
            method = "eigh" if damping_type == "tikhonov" else "cholesky"
        if damping_type == "tikhonov" and method != "eigh":
            raise ValueError("exact Tikhonov damping needs method='eigh' (it is applied in the eigenbasis)")
        if inverses is not None and method != "cholesky":
            raise ValueError("damped factor inverses as pieces go with method='cholesky' (eigh takes eig=)")
        self.damping_type, self.method = damping_type, method
        self.dtype = inverse_dtype or A[0].dtype
        self.A = [a.to(self.dtype) for a in A]
        self.G = [g.to(self.dtype) for g in G]
        self.names = list(names) if names is not None else [f"layer {i}" for i in range(len(A))]
        self.gamma = as_gamma(gamma, self.A[0])
        self.pi = [pi_factor(a, g) for a, g in zip(self.A, self.G)]
        self._eig = None if method != "eigh" else eig if eig is not None else [
            (dec.eigh(a, f"A of {n}"), dec.eigh(g, f"G of {n}")) for a, g, n in zip(self.A, self.G, self.names)]
        self._padded: dict = {}
        if inverses is not None:
            self.A_inv, self.G_inv = list(inverses[0]), list(inverses[1])
            _check_pieces("damped factor inverses", self.A_inv, self.A, self.G_inv, self.G)
        else:
            self._build()

    @classmethod
    def from_factors(cls, A, G, gamma, damping_type: str = "factored", method: str = "auto",
                     inverse_dtype: torch.dtype | None = None, names=None) -> "BlockDiagonalInverse":
        """Decompose the damped factors here (the usual way)."""
        return cls(A, G, gamma, damping_type, method, inverse_dtype, names)

    @classmethod
    def from_pieces(cls, A, G, gamma, *, damping_type: str = "factored", inverse_dtype: torch.dtype | None = None,
                    names=None, A_inv=None, G_inv=None, eig=None) -> "BlockDiagonalInverse":
        """Assemble from pieces computed elsewhere: ``A_inv[i] = (A_i + π_i γ I)⁻¹`` and ``G_inv[i] =
        (G_i + γ/π_i I)⁻¹`` (Cholesky), or ``eig[i] = ((e_A, Q_A), (e_G, Q_G))``, the
        eigendecompositions of ``A_i`` and ``G_i`` (eigh; exact Tikhonov needs these)."""
        if (A_inv is None) == (eig is None) or (A_inv is None) != (G_inv is None):
            raise ValueError("from_pieces takes either A_inv and G_inv, or eig")
        if eig is not None:
            return cls(A, G, gamma, damping_type, "eigh", inverse_dtype, names, eig=eig)
        return cls(A, G, gamma, damping_type, "cholesky", inverse_dtype, names, inverses=(A_inv, G_inv))

    def _build(self) -> None:
        γ = self.gamma
        self.A_inv, self.G_inv = [], []
        if self.damping_type == "tikhonov":
            return
        for i, (a, g, π, n) in enumerate(zip(self.A, self.G, self.pi, self.names)):
            if self.method == "cholesky":
                self.A_inv.append(dec.cholesky_inverse(add_to_diagonal(a, π * γ), f"damped A of {n}"))
                self.G_inv.append(dec.cholesky_inverse(add_to_diagonal(g, γ / π), f"damped G of {n}"))
            else:
                (ea, Qa), (eg, Qg) = self._eig[i]
                self.A_inv.append(_from_eig(Qa, 1.0 / (ea.clamp(min=0) + π * γ), f"damped A of {n}"))
                self.G_inv.append(_from_eig(Qg, 1.0 / (eg.clamp(min=0) + γ / π), f"damped G of {n}"))

    def with_gamma(self, gamma) -> "BlockDiagonalInverse":
        """The same factors with another γ; reuses the eigendecompositions when ``method="eigh"``."""
        return BlockDiagonalInverse(self.A, self.G, gamma, self.damping_type, self.method, self.dtype, self.names,
                                    eig=self._eig)

    def apply(self, V: Sequence[Tensor]) -> list[Tensor]:
        """``F̆⁻¹ v`` per layer; ``V[i]`` shape ``(..., d_out_i, in_dim_i)``."""
        _check_shapes(V, self.A, self.G)
        out = []
        for i, v in enumerate(V):
            dt = v.dtype
            v = v.to(self.dtype)
            if self.damping_type == "tikhonov":
                (ea, Qa), (eg, Qg) = self._eig[i]
                inner = Qg.t() @ v @ Qa
                inner = inner / (eg.clamp(min=0).unsqueeze(1) * ea.clamp(min=0).unsqueeze(0) + self.gamma**2)
                u = Qg @ inner @ Qa.t()
            elif v.dim() == 2:
                # (V A⁻¹) first, into a buffer whose row length is a multiple of 16: the odd
                # [W|b] widths (785, 1001, …) otherwise cost MKL ~5 % in both GEMMs
                right = self._right_padded(i)
                u = self.G_inv[i] @ (v @ right)[:, : v.shape[1]]
            else:
                u = self.G_inv[i] @ v @ self.A_inv[i]
            out.append(u.to(dt))
        return out

    def _right_padded(self, i: int) -> Tensor:
        """``A_inv[i]`` with zero columns appended up to ``aligned_width`` (built once per inverse, on first use)."""
        cache = self._padded
        if i not in cache:
            a = self.A_inv[i]
            d = a.shape[-1]
            width = aligned_width(d)
            if width == d:
                cache[i] = a
            else:
                cache[i] = a.new_zeros(d, width)
                cache[i][:, :d] = a
        return cache[i]

    def dense(self) -> Tensor:
        """The whole ``F̆⁻¹`` as a dense ``(P, P)`` matrix in the paper's ordering (small nets)."""
        blocks = []
        for i in range(len(self.A)):
            if self.damping_type == "tikhonov":
                (ea, Qa), (eg, Qg) = self._eig[i]
                Q = kron(Qa, Qg)
                # eigenvalues of A ⊗ G: every product ea_k · eg_l, in kron(Qa, Qg)'s column order
                d = 1.0 / (torch.outer(ea.clamp(min=0), eg.clamp(min=0)).reshape(-1) + self.gamma**2)
                blocks.append((Q * d) @ Q.t())
            else:
                blocks.append(kron(self.A_inv[i], self.G_inv[i]))
        return torch.block_diag(*blocks)


def aligned_width(d: int) -> int:
    """Row length of the ``V A⁻¹`` buffer in ``BlockDiagonalInverse.apply``: ``d`` rounded up to a
    multiple of 16 from 64 on (narrower products gain nothing from it)."""
    return d if d < 64 else -(-d // 16) * 16


def _from_eig(Q: Tensor, d: Tensor, what: str) -> Tensor:
    if not bool(torch.isfinite(d).all()):
        raise KFACError(f"{what} is singular at this damping: use gamma > 0")
    return (Q * d) @ Q.t()


def _check_pieces(what: str, X: Sequence[Tensor], A: Sequence[Tensor], Y: Sequence[Tensor], G: Sequence[Tensor]) -> None:
    """Pieces per layer with the shapes of the factors they belong to."""
    if len(X) != len(A) or len(Y) != len(G):
        raise ValueError(f"{what}: need one per layer ({len(A)}), got {len(X)} and {len(Y)}")
    for i, (x, a, y, g) in enumerate(zip(X, A, Y, G)):
        if x.shape != a.shape or y.shape != g.shape:
            raise ValueError(f"{what} of layer {i} have shapes {tuple(x.shape)}, {tuple(y.shape)}; "
                             f"the factors have {tuple(a.shape)}, {tuple(g.shape)}")


def _check_shapes(V, A, G) -> None:
    if len(V) != len(A):
        raise ValueError(f"expected {len(A)} per-layer matrices, got {len(V)}")
    for i, (v, a, g) in enumerate(zip(V, A, G)):
        if tuple(v.shape[-2:]) != (g.shape[0], a.shape[0]):
            raise ValueError(
                f"layer {i}: expected a [W | b] matrix of shape ({g.shape[0]}, {a.shape[0]}), got {tuple(v.shape)}"
            )


class BlockTridiagonalInverse:
    """``F̂⁻¹ = Ξᵀ Λ Ξ`` (M&G 2015 §4.3): the inverse of the matrix that agrees with ``F̃`` on the
    tridiagonal blocks and whose inverse is block-tridiagonal (a chain over layers).

    ``A[i]``, ``G[i]``: diagonal factors; ``A_off[i] = A_{i,i+1}`` (``in_dim_i × in_dim_{i+1}``)
    and ``G_off[i] = G_{i,i+1}`` (``d_out_i × d_out_{i+1}``), ``i = 0 … ℓ−2``. The diagonal
    blocks use the factored-Tikhonov-damped factors ``Ad_i = A_i + π_i γ I``,
    ``Gd_i = G_i + γ/π_i I``; then
    ``Ψ^A_i = A_{i,i+1} Ad_{i+1}⁻¹``, ``Ψ^G_i = G_{i,i+1} Gd_{i+1}⁻¹``,
    ``Σ_i = Ad_i⊗Gd_i − C_i⊗D_i`` with ``C_i = Ψ^A_i A_{i+1,i}``, ``D_i = Ψ^G_i G_{i+1,i}``,
    ``Σ_ℓ = Ad_ℓ⊗Gd_ℓ``; ``Σ_i⁻¹`` by Appendix B via the generalised eigenproblems
    ``C x = s Ad x`` and ``D y = t Gd y`` (Cholesky + one ``eigh`` each).
    """

    def __init__(self, A: Sequence[Tensor], G: Sequence[Tensor], A_off: Sequence[Tensor], G_off: Sequence[Tensor],
                 gamma, damping_type: str = "factored", inverse_dtype: torch.dtype | None = None,
                 names: Sequence[str] | None = None, *, sides: tuple[Sequence, Sequence] | None = None,
                 last: tuple[Tensor, Tensor] | None = None, damping: str | None = None):
        damping_type = damping_type_argument(damping_type, damping, "BlockTridiagonalInverse")
        if damping_type != "factored":
            raise ValueError(
                "the block-tridiagonal inverse needs factored Tikhonov damping (damping_type='factored'): "
                "with exact Tikhonov the blocks are no longer Kronecker products"
            )
        n = len(A)
        if len(G) != n or len(A_off) != n - 1 or len(G_off) != n - 1 or n == 0:
            raise ValueError(f"need ℓ diagonal and ℓ−1 adjacent factors; got {len(A)}, {len(G)}, {len(A_off)}, {len(G_off)}")
        if (sides is None) != (last is None):
            raise ValueError("pieces of a block-tridiagonal inverse: give both sides= and last=, or neither")
        self.damping_type = damping_type
        self.dtype = inverse_dtype or A[0].dtype
        cast = lambda ts: [t.to(self.dtype) for t in ts]
        self.A, self.G, self.A_off, self.G_off = cast(A), cast(G), cast(A_off), cast(G_off)
        self.names = list(names) if names is not None else [f"layer {i}" for i in range(n)]
        for i in range(n - 1):
            if self.A_off[i].shape != (self.A[i].shape[0], self.A[i + 1].shape[0]) or \
               self.G_off[i].shape != (self.G[i].shape[0], self.G[i + 1].shape[0]):
                raise ValueError(f"adjacent factors {i},{i + 1} have shapes {tuple(self.A_off[i].shape)}, "
                                 f"{tuple(self.G_off[i].shape)} that do not match the diagonal factors")
        self.gamma = as_gamma(gamma, self.A[0])
        self.pi = [pi_factor(a, g) for a, g in zip(self.A, self.G)]
        if sides is None:
            sides, last = self._compute_pieces()
        sides_A, sides_G = list(sides[0]), list(sides[1])
        if len(sides_A) != n - 1 or len(sides_G) != n - 1:
            raise ValueError(f"need ℓ−1 = {n - 1} tridiagonal sides per factor, got {len(sides_A)} and {len(sides_G)}")
        self.psi_A, self.K_A, self.s_A = (list(t) for t in zip(*sides_A)) if n > 1 else ([], [], [])
        self.psi_G, self.K_G, self.s_G = (list(t) for t in zip(*sides_G)) if n > 1 else ([], [], [])
        self.last_A_inv, self.last_G_inv = last
        # eigenvalues clamped below 1 (0-d count)
        self.clamped = sum((clamp_conditional(self.s_A[i], self.s_G[i]) for i in range(n - 1)),
                           torch.zeros((), dtype=torch.int64, device=self.A[0].device))

    @classmethod
    def from_factors(cls, A, G, A_off, G_off, gamma, inverse_dtype: torch.dtype | None = None,
                     names=None) -> "BlockTridiagonalInverse":
        """Compute every piece here (the usual way)."""
        return cls(A, G, A_off, G_off, gamma, "factored", inverse_dtype, names)

    @classmethod
    def from_pieces(cls, A, G, A_off, G_off, gamma, *, sides_A, sides_G, last_A_inv, last_G_inv,
                    inverse_dtype: torch.dtype | None = None, names=None) -> "BlockTridiagonalInverse":
        """Assemble from pieces computed elsewhere: ``sides_A[i]``, ``sides_G[i]`` — the
        :func:`tridiagonal_side` of layer ``i`` (``i = 0 … ℓ−2``) for the A and G factors —
        and the damped inverses of the last layer's factors."""
        return cls(A, G, A_off, G_off, gamma, "factored", inverse_dtype, names,
                   sides=(sides_A, sides_G), last=(last_A_inv, last_G_inv))

    def damped(self, i: int) -> tuple[Tensor, Tensor]:
        """``(Ad_i, Gd_i)``: the factored-Tikhonov-damped diagonal factors of layer ``i``."""
        a, g, π, γ = self.A[i], self.G[i], self.pi[i], self.gamma
        return add_to_diagonal(a, π * γ), add_to_diagonal(g, γ / π)

    def _compute_pieces(self):
        n = len(self.A)
        damped = [self.damped(i) for i in range(n)]
        chol = [(dec.cholesky(ad, f"damped A of {nm}"), dec.cholesky(gd, f"damped G of {nm}"))
                for (ad, gd), nm in zip(damped, self.names)]
        sides_A = [tridiagonal_side(chol[i][0], chol[i + 1][0], self.A_off[i], f"Σ A-side of {self.names[i]}")
                   for i in range(n - 1)]
        sides_G = [tridiagonal_side(chol[i][1], chol[i + 1][1], self.G_off[i], f"Σ G-side of {self.names[i]}")
                   for i in range(n - 1)]
        La, Lg = chol[-1]
        return (sides_A, sides_G), (dec.inverse_from_cholesky(La), dec.inverse_from_cholesky(Lg))

    def with_gamma(self, gamma) -> "BlockTridiagonalInverse":
        """The same factors with another γ (Ψ and Σ depend on γ, so everything is rebuilt)."""
        return BlockTridiagonalInverse(self.A, self.G, self.A_off, self.G_off, gamma, self.damping_type, self.dtype,
                                       self.names)

    def apply(self, V: Sequence[Tensor]) -> list[Tensor]:
        """``F̂⁻¹ v = Ξᵀ Λ Ξ v``; ``V[i]`` shape ``(..., d_out_i, in_dim_i)``."""
        _check_shapes(V, self.A, self.G)
        n = len(V)
        dt = V[0].dtype
        V = [v.to(self.dtype) for v in V]
        # Ξ: Y_i = V_i − Ψ^G_i V_{i+1} Ψ^Aᵀ_i
        Y = [sandwich(self.psi_G[i], V[i + 1], self.psi_A[i].t(), minus=V[i]) for i in range(n - 1)] + [V[-1]]
        # Λ: Z_i = Σ_i⁻¹ Y_i = K_G [(K_Gᵀ Y K_A) ⊘ (11ᵀ − s_G s_Aᵀ)] K_Aᵀ
        Z = []
        for i in range(n - 1):
            inner = sandwich(self.K_G[i].t(), Y[i], self.K_A[i])
            inner = inner.div_(1.0 - self.s_G[i].unsqueeze(1) * self.s_A[i].unsqueeze(0))
            Z.append(sandwich(self.K_G[i], inner, self.K_A[i].t()))
        Z.append(sandwich(self.last_G_inv, Y[-1], self.last_A_inv))
        # Ξᵀ: U_i = Z_i − Ψ^Gᵀ_{i−1} Z_{i−1} Ψ^A_{i−1}
        U = [Z[0]] + [sandwich(self.psi_G[i - 1].t(), Z[i - 1], self.psi_A[i - 1], minus=Z[i]) for i in range(1, n)]
        return [u.to(dt) for u in U]

    def dense(self) -> Tensor:
        """``F̂⁻¹`` as a dense ``(P, P)`` matrix built independently of ``apply``: Ψ and Σ as
        explicit Kronecker products, each ``Σ_i`` inverted with ``torch.linalg.inv`` (small nets)."""
        n = len(self.A)
        damped = [self.damped(i) for i in range(n)]
        sizes = [a.shape[0] * g.shape[0] for a, g in zip(self.A, self.G)]
        P = sum(sizes)
        offs = [sum(sizes[:i]) for i in range(n)]
        Xi = torch.eye(P, dtype=self.dtype, device=self.A[0].device)
        lam_blocks = []
        for i in range(n):
            Fii = kron(*damped[i])
            if i < n - 1:
                Fij = kron(self.A_off[i], self.G_off[i])
                Fjj = kron(*damped[i + 1])
                Psi = Fij @ torch.linalg.inv(Fjj)
                Xi[offs[i]:offs[i] + sizes[i], offs[i + 1]:offs[i + 1] + sizes[i + 1]] = -Psi
                Sigma = Fii - Psi @ Fjj @ Psi.t()
            else:
                Sigma = Fii
            lam_blocks.append(torch.linalg.inv(dec.symmetrize(Sigma)))
        return Xi.t() @ torch.block_diag(*lam_blocks) @ Xi


def sandwich(P: Tensor, X: Tensor, Q: Tensor, minus: Tensor | None = None) -> Tensor:
    """``P X Q`` (``P`` ``(m, k)``, ``X`` ``(…, k, n)``, ``Q`` ``(n, q)``) in the order with fewer flops:
    ``(P X) Q`` costs ``mkn + mnq``, ``P (X Q)`` ``knq + mkq`` — for the tridiagonal inverse's Ψ products
    between layers of different widths the two differ by up to 40 % (the MNIST autoencoder: 8 % of
    the whole application). With ``minus``: ``minus − P X Q``, for a 2-D ``X`` folded into the last
    GEMM (no temporary for the product)."""
    m, k = P.shape
    n, q = Q.shape
    left_first = m * k * n + m * n * q <= k * n * q + m * k * q
    if minus is not None and X.dim() == 2:
        return torch.addmm(minus, P @ X, Q, alpha=-1) if left_first else torch.addmm(minus, P, X @ Q, alpha=-1)
    out = (P @ X) @ Q if left_first else P @ (X @ Q)
    return out if minus is None else minus - out


def clamp_conditional(s_A: Tensor, s_G: Tensor) -> Tensor:
    """Clamp the Appendix-B eigenvalues in place below 1; returns how many were clamped (0-d).

    In exact arithmetic 0 ≤ s < 1 on both sides (``C ≺ Ad``, ``D ≺ Gd``: Schur complements of a
    PSD Khatri–Rao block), so ``Σ ≻ 0``. Rounding (float32, small γ, nearly collinear layers) can
    push ``s`` to 1; clamping keeps ``1 − s_G s_Aᵀ ≥ tol`` and ``Σ`` positive definite."""
    tol = 10 * torch.finfo(s_A.dtype).eps
    over = (s_A > 1 - tol).sum() + (s_G > 1 - tol).sum()
    s_A.clamp_(max=1 - tol)
    s_G.clamp_(max=1 - tol)
    return over


def generalized_eig(C: Tensor, L: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """``K, s`` with ``Kᵀ M K = I`` and ``Kᵀ C K = diag(s)`` where ``M = L Lᵀ`` (Appendix B).

    ``L⁻¹ C L⁻ᵀ = E S Eᵀ``; ``K = L⁻ᵀ E``. Then ``(M⊗N − C⊗D)⁻¹ = (K_M⊗K_N)(I − S⊗T)⁻¹(K_M⊗K_N)ᵀ``.
    """
    X = torch.linalg.solve_triangular(L, C, upper=False)          # L⁻¹ C
    X = torch.linalg.solve_triangular(L, X.t(), upper=False)      # L⁻¹ (L⁻¹ C)ᵀ = L⁻¹ C L⁻ᵀ
    s, E = dec.eigh(X, what)
    K = torch.linalg.solve_triangular(L.t(), E, upper=True)       # L⁻ᵀ E
    return K, s.clamp(min=0)


class TridiagonalSide(NamedTuple):
    """One layer's pieces of ``F̂⁻¹`` for one factor (A or G): ``psi`` = ``Ψ_i = F_{i,i+1} Fd_{i+1}⁻¹``,
    and ``K``, ``s`` of the generalised eigenproblem ``C x = s Fd_i x`` with ``C = Ψ_i F_{i+1,i}``
    (M&G 2015 §4.3, Appendix B)."""

    psi: Tensor
    K: Tensor
    s: Tensor


def tridiagonal_side(L_i: Tensor, L_next: Tensor, F_off: Tensor, what: str) -> TridiagonalSide:
    """The pieces a rank computes for one layer ``i`` and one factor: ``L_i``, ``L_next`` are the
    Cholesky factors of the damped ``Fd_i``, ``Fd_{i+1}``; ``F_off = F_{i,i+1}``."""
    psi = torch.cholesky_solve(F_off.t(), L_next).t()  # Ψ_i = F_{i,i+1} Fd_{i+1}⁻¹ (two triangular solves)
    K, s = generalized_eig(psi @ F_off.t(), L_i, what)
    return TridiagonalSide(psi, K, s)


def make_inverse(approx: str, A, G, A_off=None, G_off=None, gamma=1.0, damping_type="factored",
                 method="auto", inverse_dtype=None, names=None, *, damping=None):
    """``BlockDiagonalInverse`` (``approx="blockdiag"``) or ``BlockTridiagonalInverse`` (``"tridiag"``)
    from the factors (``damping=`` is the deprecated spelling of ``damping_type=``)."""
    damping_type = damping_type_argument(damping_type, damping, "make_inverse")
    if approx == "blockdiag":
        return BlockDiagonalInverse.from_factors(A, G, gamma, damping_type, method, inverse_dtype, names)
    if approx == "tridiag":
        if A_off is None or G_off is None:
            raise KFACError("the block-tridiagonal inverse needs the adjacent cross factors A_{i,i+1}, G_{i,i+1}")
        if damping_type != "factored":
            raise ValueError("the block-tridiagonal inverse needs factored Tikhonov damping (damping_type='factored')")
        return BlockTridiagonalInverse.from_factors(A, G, A_off, G_off, gamma, inverse_dtype, names)
    raise ValueError(f"approx={approx!r}: choose 'blockdiag' (block-diagonal) or 'tridiag' (block-tridiagonal)")
