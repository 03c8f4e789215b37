"""One way to build an inverse: ``from_factors`` and ``from_pieces`` (pieces computed elsewhere, as
the ranks of DistributedKFAC compute them) give the same inverse; ``damping=`` is a deprecated alias."""
import pytest
import torch

from kfac_lab.curvature import (BlockDiagonalInverse, BlockTridiagonalInverse, as_gamma, make_inverse, pi_factor,
                                tridiagonal_side)
from kfac_lab.curvature import decompositions as dec
from kfac_lab.curvature.inverses import add_to_diagonal

from .test_inverses import factors_of, rand_grads


def same(us, vs):
    return all(torch.equal(u, v) for u, v in zip(us, vs))


def test_blockdiag_from_pieces_equals_from_factors_bit_for_bit():
    layers, _, _, A, G, _, _ = factors_of([5, 4, 3], [True, True])
    V, gamma = rand_grads(layers), as_gamma(0.2, A[0])  # γ as the inverse holds it (a 0-d tensor)
    ref = BlockDiagonalInverse.from_factors(A, G, gamma)
    pi = [pi_factor(a, g) for a, g in zip(A, G)]
    A_inv = [dec.cholesky_inverse(add_to_diagonal(a, p * gamma), "A") for a, p in zip(A, pi)]
    G_inv = [dec.cholesky_inverse(add_to_diagonal(g, gamma / p), "G") for g, p in zip(G, pi)]
    torch.testing.assert_close(A_inv[0], torch.linalg.inv(add_to_diagonal(A[0], pi[0] * gamma)))
    built = BlockDiagonalInverse.from_pieces(A, G, gamma, A_inv=A_inv, G_inv=G_inv)
    assert same(built.apply(V), ref.apply(V)) and torch.equal(built.dense(), ref.dense())
    # exact Tikhonov from eigendecompositions computed elsewhere
    eig = [(dec.eigh(a, "A"), dec.eigh(g, "G")) for a, g in zip(A, G)]
    tik = BlockDiagonalInverse.from_pieces(A, G, gamma, damping_type="tikhonov", eig=eig)
    assert same(tik.apply(V), BlockDiagonalInverse(A, G, gamma, damping_type="tikhonov").apply(V))
    assert tik.with_gamma(0.5)._eig is eig  # no new eigendecomposition
    with pytest.raises(ValueError, match="either A_inv and G_inv, or eig"):
        BlockDiagonalInverse.from_pieces(A, G, gamma, A_inv=A_inv)
    with pytest.raises(ValueError, match=r"damped factor inverses of layer 1 have shapes"):
        BlockDiagonalInverse.from_pieces(A, G, gamma, A_inv=[A_inv[0], A_inv[0]], G_inv=G_inv)


def test_tridiag_from_pieces_of_tridiagonal_side_equals_from_factors_bit_for_bit():
    layers, _, _, A, G, Ao, Go = factors_of([5, 4, 4, 3], [True, False, True])
    V, gamma, n = rand_grads(layers), as_gamma(0.1, A[0]), len(A)
    ref = BlockTridiagonalInverse.from_factors(A, G, Ao, Go, gamma)
    pi = [pi_factor(a, g) for a, g in zip(A, G)]
    LA = [dec.cholesky(add_to_diagonal(a, p * gamma), "A") for a, p in zip(A, pi)]
    LG = [dec.cholesky(add_to_diagonal(g, gamma / p), "G") for g, p in zip(G, pi)]
    # each side is what one rank computes for one layer
    sides_A = [tridiagonal_side(LA[i], LA[i + 1], Ao[i], "A") for i in range(n - 1)]
    sides_G = [tridiagonal_side(LG[i], LG[i + 1], Go[i], "G") for i in range(n - 1)]
    built = BlockTridiagonalInverse.from_pieces(A, G, Ao, Go, gamma, sides_A=sides_A, sides_G=sides_G,
                                                last_A_inv=dec.inverse_from_cholesky(LA[-1]),
                                                last_G_inv=dec.inverse_from_cholesky(LG[-1]))
    assert same(built.apply(V), ref.apply(V))
    assert int(built.clamped) == int(ref.clamped) == 0
    # the pieces are the paper's: Ψ^A_i = A_{i,i+1} Ad_{i+1}⁻¹ (M&G 2015 §4.3)
    Ad_next = add_to_diagonal(A[1], pi[1] * gamma)
    torch.testing.assert_close(sides_A[0].psi, Ao[0] @ torch.linalg.inv(Ad_next))
    with pytest.raises(ValueError, match="ℓ−1 = 2 tridiagonal sides"):
        BlockTridiagonalInverse.from_pieces(A, G, Ao, Go, gamma, sides_A=sides_A[:1], sides_G=sides_G,
                                            last_A_inv=LA[-1], last_G_inv=LG[-1])


def test_damping_keyword_is_a_deprecated_alias_of_damping_type():
    layers, _, _, A, G, Ao, Go = factors_of([4, 3, 2], [True, True])
    V = rand_grads(layers)
    with pytest.warns(DeprecationWarning, match=r"damping_type="):
        old = BlockDiagonalInverse(A, G, 0.3, damping="tikhonov")
    assert old.damping_type == "tikhonov"
    assert same(old.apply(V), BlockDiagonalInverse(A, G, 0.3, damping_type="tikhonov").apply(V))
    with pytest.warns(DeprecationWarning, match=r"make_inverse\(damping=\.\.\.\) is deprecated"):
        inv = make_inverse("blockdiag", A, G, gamma=0.3, damping="factored")
    assert inv.damping_type == "factored"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="factored Tikhonov"):
        BlockTridiagonalInverse(A, G, Ao, Go, 0.3, damping="tikhonov")
    with pytest.raises(ValueError, match="factored Tikhonov"):
        make_inverse("tridiag", A, G, Ao, Go, gamma=0.3, damping_type="tikhonov")
