import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kfac_lab.curvature import (BlockDiagonalInverse, BlockTridiagonalInverse, batch_factors, factor_pairs,
                                find_layers, kron_fisher_dense, make_inverse, output_gradients, params_to_vector,
                                pi_factor)
from kfac_lab.curvature.inverses import aligned_width
from kfac_lab.errors import DecompositionError, KFACError

from .test_factors import DT, make_mlp


def factors_of(sizes, biases, m=300, seed=0, loss="gaussian"):
    model = make_mlp(sizes, biases, seed=seed)
    layers = find_layers(model)
    x = torch.randn(m, sizes[0], dtype=DT)
    a, g, _ = output_gradients(model, layers, loss, x, mode="sampled", samples=2, generator=torch.Generator().manual_seed(seed))
    A, G = batch_factors(a, g, factor_pairs(len(layers), "all"))
    n = len(layers)
    return layers, A, G, [A[(i, i)] for i in range(n)], [G[(i, i)] for i in range(n)], \
        [A[(i, i + 1)] for i in range(n - 1)], [G[(i, i + 1)] for i in range(n - 1)]


def offsets(layers):
    off = [0]
    for l in layers:
        off.append(off[-1] + l.num_params)
    return off


def rand_grads(layers, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(l.d_out, l.in_dim, dtype=DT, generator=gen) for l in layers]


def test_pi_is_ratio_of_average_traces():
    A, G = torch.diag(torch.tensor([2.0, 4.0], dtype=DT)), torch.diag(torch.tensor([1.0, 1.0, 7.0], dtype=DT))
    assert pi_factor(A, G).item() == pytest.approx(math.sqrt((6 / 2) / (9 / 3)))


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_blockdiag_factored_apply_equals_dense_inverse_of_damped_blockdiag(method):
    layers, _, _, A, G, _, _ = factors_of([4, 3, 3, 2], [True, False, True])
    gamma = 0.3
    damped = []
    for a, g in zip(A, G):
        pi = pi_factor(a, g)
        damped.append(torch.kron(a + pi * gamma * torch.eye(len(a), dtype=DT), g + gamma / pi * torch.eye(len(g), dtype=DT)))
    expected = torch.linalg.inv(torch.block_diag(*damped))
    inv = BlockDiagonalInverse(A, G, gamma, method=method)
    V = rand_grads(layers)
    torch.testing.assert_close(params_to_vector(inv.apply(V)), expected @ params_to_vector(V))
    torch.testing.assert_close(inv.dense(), expected)


def test_apply_pads_wide_rows_and_equals_the_plain_products():
    """``(V A⁻¹)`` goes through a buffer whose rows are padded to ``aligned_width``: the result is
    ``G⁻¹ V A⁻¹`` all the same, for padded (81 → 96), aligned (96) and narrow (20) widths."""
    gen = torch.Generator().manual_seed(4)
    spd = lambda n: (lambda x: x.T @ x / (3 * n))(torch.randn(3 * n, n, dtype=DT, generator=gen))
    widths = [81, 96, 20]
    A, G = [spd(d) for d in widths], [spd(5) for _ in widths]
    inv = BlockDiagonalInverse(A, G, 0.1)
    V = [torch.randn(5, d, dtype=DT, generator=gen) for d in widths]
    for v, u, a_inv, g_inv in zip(V, inv.apply(V), inv.A_inv, inv.G_inv):
        torch.testing.assert_close(u, g_inv @ v @ a_inv)
        assert u.is_contiguous()
    assert [aligned_width(d) for d in widths] == [96, 96, 20]
    assert inv._right_padded(0).shape == (81, 96) and inv._right_padded(1) is inv.A_inv[1]


def test_blockdiag_exact_tikhonov_and_gamma_change_reuse_eigh():
    layers, _, _, A, G, _, _ = factors_of([4, 3, 2], [True, True])
    V = rand_grads(layers)
    inv = BlockDiagonalInverse(A, G, 0.5, damping_type="tikhonov")
    for gamma in (0.5, 0.05):
        inv_g = inv.with_gamma(gamma)
        assert inv_g._eig is inv._eig  # no new eigendecomposition
        expected = torch.linalg.inv(torch.block_diag(*[torch.kron(a, g) + gamma**2 * torch.eye(a.shape[0] * g.shape[0], dtype=DT)
                                                       for a, g in zip(A, G)]))
        torch.testing.assert_close(params_to_vector(inv_g.apply(V)), expected @ params_to_vector(V))
        torch.testing.assert_close(inv_g.dense(), expected)  # the dense matrix of exact Tikhonov too
    fe = BlockDiagonalInverse(A, G, 0.5, method="eigh")
    torch.testing.assert_close(fe.with_gamma(0.1).dense(), BlockDiagonalInverse(A, G, 0.1, method="cholesky").dense())


def test_tridiag_undamped_structure_and_agreement_with_kron_fisher():
    # inner layers only: the output layer's G is singular under softmax (docs/algorithm.md#analysis)
    layers, Af, Gf, A, G, Ao, Go = factors_of([5, 4, 3, 3, 2], [True, True, False, True], m=400, loss="categorical")
    inner = 2
    inv = BlockTridiagonalInverse(A[:inner + 1], G[:inner + 1], Ao[:inner], Go[:inner], gamma=0.0)
    D = inv.dense()
    Ft = kron_fisher_dense((Af, Gf), layers)
    off = offsets(layers[:inner + 1])
    Fhat = torch.linalg.inv(D)
    for i in range(inner + 1):
        for j in range(inner + 1):
            blk = lambda M: M[off[i]:off[i + 1], off[j]:off[j + 1]]
            if abs(i - j) <= 1:
                torch.testing.assert_close(blk(Fhat), blk(Ft), rtol=1e-6, atol=1e-8)
            else:
                assert blk(D).abs().max() == 0
    V = rand_grads(layers[:inner + 1])
    u, d = params_to_vector(inv.apply(V)), D @ params_to_vector(V)
    assert ((u - d).norm() / d.norm()).item() < 1e-7


@settings(max_examples=12, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=2, max_size=5), data=st.data(),
       gamma=st.floats(0.01, 3.0), m=st.integers(5, 40))
def test_tridiag_damped_apply_equals_dense_and_matches_damped_blocks(sizes, data, gamma, m):
    biases = data.draw(st.lists(st.booleans(), min_size=len(sizes) - 1, max_size=len(sizes) - 1))
    layers, _, _, A, G, Ao, Go = factors_of(sizes, biases, m=m)
    inv = make_inverse("tridiag", A, G, Ao, Go, gamma=gamma)
    V = rand_grads(layers)
    D = inv.dense()
    torch.testing.assert_close(params_to_vector(inv.apply(V)), D @ params_to_vector(V), rtol=1e-7, atol=1e-9)
    # inverse of F̂⁻¹ agrees with F̃ (diagonal blocks damped) on the tridiagonal blocks
    Fhat = torch.linalg.inv(D)
    off = offsets(layers)
    for i in range(len(layers)):
        ad, gd = inv.damped(i)
        torch.testing.assert_close(Fhat[off[i]:off[i + 1], off[i]:off[i + 1]], torch.kron(ad, gd), rtol=1e-6, atol=1e-8)
        if i + 1 < len(layers):
            torch.testing.assert_close(Fhat[off[i]:off[i + 1], off[i + 1]:off[i + 2]], torch.kron(Ao[i], Go[i]), rtol=1e-6, atol=1e-8)


def test_single_layer_tridiag_equals_blockdiag():
    layers, _, _, A, G, Ao, Go = factors_of([3, 2], [True])
    V = rand_grads(layers)
    torch.testing.assert_close(make_inverse("tridiag", A, G, Ao, Go, gamma=0.2).apply(V)[0],
                               make_inverse("blockdiag", A, G, gamma=0.2).apply(V)[0])


def test_apply_batches_and_dtypes():
    layers, _, _, A, G, Ao, Go = factors_of([3, 3, 2], [True, True])
    Vb = [torch.randn(5, l.d_out, l.in_dim, dtype=DT) for l in layers]
    for approx in ("blockdiag", "tridiag"):
        inv = make_inverse(approx, A, G, Ao, Go, gamma=0.2)
        Ub = inv.apply(Vb)
        U0 = inv.apply([v[2] for v in Vb])
        torch.testing.assert_close(Ub[1][2], U0[1])
    inv32 = make_inverse("tridiag", [a.float() for a in A], [g.float() for g in G], [a.float() for a in Ao],
                         [g.float() for g in Go], gamma=0.2, inverse_dtype=torch.float64)
    out = inv32.apply([v[0].float() for v in Vb])
    assert out[0].dtype == torch.float32 and inv32.K_A[0].dtype == torch.float64


def test_bad_inputs_give_clear_errors():
    layers, _, _, A, G, Ao, Go = factors_of([3, 3, 2], [True, True])
    with pytest.raises(ValueError, match="gamma .* must be >= 0"):
        BlockDiagonalInverse(A, G, -1.0)
    with pytest.raises(ValueError, match="factored Tikhonov"):
        BlockTridiagonalInverse(A, G, Ao, Go, 0.1, damping_type="tikhonov")
    with pytest.raises(ValueError, match="choose 'blockdiag'"):
        make_inverse("kron", A, G)
    with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
        BlockDiagonalInverse(A, G, 0.1).apply([torch.zeros(2, 2, dtype=DT), torch.zeros(2, 4, dtype=DT)])
    bad = [A[0].clone(), A[1]]
    bad[0][0, 0] = float("nan")
    with pytest.raises(DecompositionError, match="A of layer 0"):
        BlockDiagonalInverse(bad, G, 0.1, method="eigh")
    indefinite = [-torch.eye(4, dtype=DT), A[1]]
    with pytest.raises(DecompositionError, match="damped A of first"):
        BlockDiagonalInverse(indefinite, G, 0.01, names=["first", "second"])
    with pytest.raises(KFACError, match="singular"):
        BlockDiagonalInverse([torch.zeros(4, 4, dtype=DT), A[1]], G, 0.0, method="eigh")


def test_eigh_retries_in_float64(monkeypatch):
    from kfac_lab.curvature import decompositions as dec
    real = torch.linalg.eigh
    calls = []

    def flaky(M):
        calls.append(M.dtype)
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated failure to converge")
        return real(M)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    e, Q = dec.eigh(torch.eye(3) * 2, "test factor")
    assert calls == [torch.float32, torch.float64] and e.dtype == torch.float32
    torch.testing.assert_close(e, torch.full((3,), 2.0))


def test_eigh_retries_when_the_solver_silently_returns_nan(monkeypatch):
    # seen with MKL's float32 syevd on 2 threads: NaN eigenvectors, no error, finite input
    from kfac_lab.curvature import decompositions as dec
    real = torch.linalg.eigh
    calls = []

    def nan_vectors(M):
        calls.append(M.dtype)
        e, Q = real(M)
        if M.dtype == torch.float32:
            Q = Q.clone()
            Q[:, -1] = float("nan")
        return e, Q

    monkeypatch.setattr(torch.linalg, "eigh", nan_vectors)
    M = torch.diag(torch.tensor([0.0, 0.0, 1.0, 3.0]))
    e, Q = dec.eigh(M, "rank-deficient C")
    assert calls == [torch.float32, torch.float64] and Q.dtype == torch.float32
    assert bool(torch.isfinite(Q).all())
    torch.testing.assert_close((Q * e) @ Q.t(), M)


def test_tridiag_stays_positive_definite_when_rounding_pushes_s_to_one():
    # two perfectly correlated layers: C = A and D = G up to rounding, so s ≈ 1 at γ → 0
    torch.manual_seed(0)
    a = torch.randn(200, 3, dtype=torch.float32)
    A = a.t() @ a / 200
    g = torch.randn(200, 2, dtype=torch.float32)
    G = g.t() @ g / 200
    inv = BlockTridiagonalInverse([A, A], [G, G], [A], [G], gamma=1e-7)
    assert int(inv.clamped) > 0
    out = inv.apply([torch.ones(2, 3), torch.ones(2, 3)])
    assert all(torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize("n", [1, 5, 8, 9, 31, 64, 101])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_from_cholesky_equals_the_dense_inverse(n, dtype):
    from kfac_lab.curvature import decompositions as dec
    g = torch.Generator().manual_seed(n)
    X = torch.randn(2 * n + 3, n, generator=g, dtype=torch.float64)
    M = X.t() @ X / (2 * n + 3) + 0.1 * torch.eye(n, dtype=torch.float64)
    L = torch.linalg.cholesky(M).to(dtype)
    inv = dec.inverse_from_cholesky(L)
    torch.testing.assert_close(inv, inv.t())
    ref = torch.linalg.inv(M)
    err = float((inv.double() - ref).norm() / ref.norm())
    assert err < (1e-5 if dtype == torch.float32 else 1e-12)
    # only the lower triangle is read (LAPACK's potri): garbage above it changes nothing
    assert torch.equal(dec.inverse_from_cholesky(L + torch.ones_like(L).triu(1)), inv)
    # a batch of factors: each its own inverse
    batch = dec.inverse_from_cholesky(torch.stack([L, 2 * L]))
    assert float((batch[0] - inv).norm() / inv.norm()) < (1e-5 if dtype == torch.float32 else 1e-12)
    assert float((batch[1] - inv / 4).norm() / inv.norm()) < (1e-5 if dtype == torch.float32 else 1e-12)


def test_sandwich_takes_the_cheaper_order_and_folds_the_subtraction():
    from kfac_lab.curvature.inverses import sandwich
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)  # noqa: E731
    for m, k, n, q in [(7, 3, 9, 2), (2, 9, 3, 8), (5, 5, 5, 5)]:
        P, X, Q, V = r(m, k), r(k, n), r(n, q), r(m, q)
        torch.testing.assert_close(sandwich(P, X, Q), P @ X @ Q)
        torch.testing.assert_close(sandwich(P, X, Q, minus=V), V - P @ X @ Q)
        Xb, Vb = r(4, k, n), r(4, m, q)  # leading batch dims
        torch.testing.assert_close(sandwich(P, Xb, Q, minus=Vb), Vb - P @ Xb @ Q)
    # the order: with P (m×k), X (k×n), Q (n×q), (PX)Q costs mkn + mnq and P(XQ) knq + mkq multiply-adds
    from torch.utils.flop_counter import FlopCounterMode
    for (m, k, n, q) in [(100, 10, 100, 10), (10, 100, 10, 100)]:
        P, X, Q = r(m, k), r(k, n), r(n, q)
        for minus in (None, r(m, q)):  # the folded subtraction takes the same order
            with FlopCounterMode(display=False) as counter:
                sandwich(P, X, Q, minus=minus)
            assert counter.get_total_flops() == 2 * min(m * k * n + m * n * q, k * n * q + m * k * q) == 40_000
