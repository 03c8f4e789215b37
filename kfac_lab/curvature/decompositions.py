"""Robust symmetric factorisations: symmetrise, retry in float64, then with jitter, then a clear error."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DecompositionError


def symmetrize(M: Tensor) -> Tensor:
    return 0.5 * (M + M.transpose(-1, -2))


def _check_finite(M: Tensor, what: str) -> None:
    if not bool(torch.isfinite(M).all()):
        raise DecompositionError(
            f"{what} holds NaN or inf, so it cannot be decomposed: the statistics went non-finite "
            "(check the inputs; raise the damping or lower the learning rate)"
        )


def _jitter(M: Tensor, scale: float) -> Tensor:
    d = M.shape[-1]
    level = M.diagonal().abs().mean().clamp(min=torch.finfo(M.dtype).tiny) * scale
    return M + level * torch.eye(d, dtype=M.dtype, device=M.device)


def eigh(M: Tensor, what: str = "matrix") -> tuple[Tensor, Tensor]:
    """``(evals ascending, evecs)`` of the symmetric part of ``M``, in ``M``'s dtype.

    Tries ``torch.linalg.eigh``; on failure retries in float64, then with a diagonal jitter of
    1e-10 and 1e-6 of the mean diagonal, and only then raises ``DecompositionError`` naming ``what``.
    A result holding NaN counts as a failure: MKL's float32 ``syevd`` with 2 threads was seen to
    return NaN eigenvectors, without an error, for a finite matrix with hundreds of zero eigenvalues
    (the rank-deficient ``C`` of the tridiagonal inverse, Appendix B).
    """
    _check_finite(M, what)
    M = symmetrize(M)
    attempts = [lambda: M, lambda: M.double(), lambda: _jitter(M.double(), 1e-10), lambda: _jitter(M.double(), 1e-6)]
    last = None
    for attempt in attempts:
        try:
            e, Q = torch.linalg.eigh(attempt())
        except (RuntimeError, torch.linalg.LinAlgError) as exc:  # pragma: no branch
            last = exc
            continue
        if bool(torch.isfinite(e).all()) and bool(torch.isfinite(Q).all()):
            return e.to(M.dtype), Q.to(M.dtype)
        last = RuntimeError("torch.linalg.eigh returned NaN/inf for a finite matrix")
    raise DecompositionError(f"eigendecomposition of {what} (shape {tuple(M.shape)}) failed after retries in float64 and with jitter: {last}")


def cholesky_inverse(M: Tensor, what: str = "matrix") -> Tensor:
    """``M⁻¹`` for a symmetric positive-definite ``M`` via Cholesky, with the same retries as ``eigh``.

    ``M⁻¹ = L⁻ᵀ L⁻¹`` with both halves computed blockwise by GEMMs (``inverse_from_cholesky``)."""
    return inverse_from_cholesky(cholesky(M, what)).to(M.dtype)


# Below this size the triangular pieces go to LAPACK/BLAS directly (one trsm, one GEMM); measured
# on 2 CPU cores: 512 beats 256 by 5–12 % at n = 785…1001 (smaller GEMMs run far below peak).
BLOCK = 512


def inverse_from_cholesky(L: Tensor, block: int = BLOCK) -> Tensor:
    """``(L Lᵀ)⁻¹ = L⁻ᵀ L⁻¹`` from a lower Cholesky factor ``L`` (shape ``(n, n)``).

    Recursive 2×2 blocking, the way LAPACK's ``trtri`` and ``lauum`` work, but with every large
    product a GEMM: about 4n³/3 flops instead of the 3n³ of a triangular solve against ``I``
    (n³) followed by a full ``L⁻ᵀ @ L⁻¹`` (2n³) — ``torch`` exposes neither ``trtri`` nor ``syrk``,
    and MKL's ``potri`` measured slower still (benchmarks/bench_kfac_step.py)."""
    if L.dim() != 2:  # batches of factors: one trsm and one GEMM, batched
        L_inv = torch.linalg.solve_triangular(L, torch.eye(L.shape[-1], dtype=L.dtype, device=L.device), upper=False)
        return L_inv.transpose(-1, -2) @ L_inv
    return _gram_of_lower(lower_triangular_inverse(L, block), block)


def lower_triangular_inverse(L: Tensor, block: int = BLOCK) -> Tensor:
    """``L⁻¹`` for lower-triangular ``L``: ``[[L₁₁, 0], [L₂₁, L₂₂]]⁻¹ = [[X₁₁, 0], [−X₂₂ L₂₁ X₁₁, X₂₂]]``."""
    n = L.shape[-1]
    if n <= block:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    k = n // 2
    X = L.new_zeros(n, n)
    X11 = lower_triangular_inverse(L[:k, :k], block)
    X22 = lower_triangular_inverse(L[k:, k:], block)
    X[:k, :k] = X11
    X[k:, k:] = X22
    X[k:, :k] = X22 @ (L[k:, :k] @ X11)
    X[k:, :k].neg_()
    return X


def _gram_of_lower(X: Tensor, block: int) -> Tensor:
    """``Xᵀ X`` for lower-triangular ``X`` (symmetric result): with ``X = [[X₁₁, 0], [X₂₁, X₂₂]]``,
    ``XᵀX = [[X₁₁ᵀX₁₁ + X₂₁ᵀX₂₁, X₂₁ᵀX₂₂], [X₂₂ᵀX₂₁, X₂₂ᵀX₂₂]]``."""
    n = X.shape[-1]
    if n <= block:
        return X.T @ X
    k = n // 2
    X21 = X[k:, :k]
    out = X.new_empty(n, n)
    out[:k, :k] = torch.addmm(_gram_of_lower(X[:k, :k], block), X21.T, X21)
    out[k:, :k] = X[k:, k:].T @ X21
    out[:k, k:] = out[k:, :k].T
    out[k:, k:] = _gram_of_lower(X[k:, k:], block)
    return out


def cholesky(M: Tensor, what: str = "matrix") -> Tensor:
    """Lower Cholesky factor of the symmetric part of ``M`` (retries: float64, then jitter).

    Fast path: factor the lower triangle as is (what LAPACK reads) and accept it when it
    succeeded with a finite diagonal (any NaN/inf in the lower triangle reaches ``L``'s diagonal);
    otherwise check, symmetrise and retry as below."""
    if M.dim() == 2:
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) == 0 and bool(torch.isfinite(L.diagonal()).all()):
            return L
    _check_finite(M, what)
    M = symmetrize(M)
    for attempt in (lambda: M, lambda: M.double(), lambda: _jitter(M.double(), 1e-10), lambda: _jitter(M.double(), 1e-6)):
        L, info = torch.linalg.cholesky_ex(attempt())
        if not bool((info != 0).any()):
            return L.to(M.dtype)
    raise DecompositionError(
        f"Cholesky factorisation of {what} (shape {tuple(M.shape)}) failed: it is not positive definite "
        "even with jitter; raise the damping (gamma) so the damped factor is positive definite"
    )
