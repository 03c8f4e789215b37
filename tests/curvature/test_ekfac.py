"""EKFAC (curvature/ekfac.py) against curvlinops' EKFACLinearOperator, brute force, the exact Fisher,
and through the engine of the optimizers (float64)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_lab.curvature import batch_factors, factor_pairs, find_layers, output_gradients
from kfac_lab.curvature.ekfac import (Basis, EKFACInverse, EKFACScales, eigenbasis, ekfac_dense, kron_dense,
                                      projected_moments, rotate)
from kfac_lab.curvature.exact import exact_fisher
from kfac_lab.curvature.factors import kron
from kfac_lab.errors import KFACError
from kfac_lab.optim import KFACPreconditioner

from .test_exact import mlp, paper_perm, targets

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]

DT = torch.float64


def ekfac_of(model, x, y=None, mode="exact"):
    """Our EKFAC matrix of ``model`` on ``x``: factors, basis and scales from the same per-case statistics."""
    layers = find_layers(model)
    a, g, _ = output_gradients(model, layers, "categorical", x, y, mode=mode)
    A, G = batch_factors(a, g, factor_pairs(len(layers), "diag"))
    basis = eigenbasis([A[(i, i)] for i in range(len(layers))], [G[(i, i)] for i in range(len(layers))])
    scales = [projected_moments(ai, gi, b) for ai, gi, b in zip(a, g, basis)]
    return basis, scales, A, G, a, g


def curvlinops_ekfac(model, x, y, fisher_type):
    from curvlinops import EKFACLinearOperator

    params = [p for p in model.parameters()]
    op = EKFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type=fisher_type,
                             separate_weight_and_bias=False, check_deterministic=False, progressbar=False)
    dense = op @ torch.eye(op.shape[1], dtype=DT)
    p = paper_perm(model)
    return dense[p][:, p]


# ------------------------------------------------------------------------------------------
# Against an independent implementation

@pytest.mark.parametrize("bias", [True, False, [True, False, True]], ids=["bias", "no-bias", "mixed"])
@pytest.mark.parametrize("mode,fisher_type", [("exact", "type-2"), ("empirical", "empirical")])
def test_matches_curvlinops(bias, mode, fisher_type):
    # curvlinops' type-2 EKFAC is the exact expectation over the outputs (its Hessian square root of
    # the mean cross-entropy, rescaled to a mean over cases): our "exact" statistics; its empirical
    # EKFAC uses the given targets: ours "empirical". Weight and bias form one block ([W | b]).
    model = mlp([5, 4, 4, 3], bias=bias)
    x = torch.randn(40, 5, dtype=DT)
    y = targets("categorical", 40, 3)
    basis, scales, *_ = ekfac_of(model, x, y, mode)
    ours = ekfac_dense(basis, scales)
    theirs = curvlinops_ekfac(model, x, y, fisher_type)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)


def test_preconditioner_engine_matches_curvlinops():
    """Through the optimizers' path: one exact-statistics step on the whole batch (k = 1: the EMA
    takes the batch) leaves the engine holding curvlinops' EKFAC, and the step it applies is
    (EKFAC + γ² I)⁻¹ ∇."""
    model = mlp([5, 4, 3])
    x = torch.randn(32, 5, dtype=DT)
    y = targets("categorical", 32, 3)
    pre = KFACPreconditioner(model, "categorical", approx="ekfac", gamma=0.1, stats_mode="exact", stats_fraction=1.0,
                             kl_clip=None)
    nn.CrossEntropyLoss()(model(x), y).backward()
    grads = [l.grad_matrix().clone() for l in pre.layers]
    pre.step(x)
    inv = pre.curvature.inverse
    assert isinstance(inv, EKFACInverse) and pre.curvature.ekfac.k == 1
    theirs = curvlinops_ekfac(model, x, y, "type-2")
    torch.testing.assert_close(inv.matrix(), theirs, rtol=1e-7, atol=1e-10)
    flat = torch.cat([g.t().reshape(-1) for g in grads])
    want = torch.linalg.solve(theirs + 0.01 * torch.eye(len(flat), dtype=DT), flat)
    got = torch.cat([l.grad_matrix().t().reshape(-1) for l in pre.layers])
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


# ------------------------------------------------------------------------------------------
# Brute force

def naive_scales(a, g, b: Basis):
    """``(1/n) Σ_n Σ_k (U_Gᵀ DW_{n,k} U_A)²`` one case (and direction) at a time."""
    if g.dim() == a.dim():
        g = g.unsqueeze(0)
    if a.dim() == 2:
        a, g = a.unsqueeze(1), g.unsqueeze(2)
    s = 0
    for n in range(a.shape[0]):
        for k in range(g.shape[0]):
            DW = sum(torch.outer(g[k, n, t], a[n, t]) for t in range(a.shape[1]))
            s = s + (b.U_G.t() @ DW @ b.U_A) ** 2
    return s / a.shape[0]


def random_basis(d_in, d_out, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qa = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=DT))[0]
    qg = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=DT))[0]
    return Basis(torch.ones(d_in, dtype=DT), qa, torch.ones(d_out, dtype=DT), qg)


@pytest.mark.parametrize("shape", ["plain", "directions", "sharing", "sharing+directions"])
def test_scales_equal_naive_projected_second_moments(shape):
    n, T, k, d_in, d_out = 7, 4, 3, 5, 3
    b = random_basis(d_in, d_out)
    sharing, dirs = "sharing" in shape, "directions" in shape
    a = torch.randn(n, T, d_in, dtype=DT) if sharing else torch.randn(n, d_in, dtype=DT)
    g = torch.randn(*((k,) if dirs else ()), *a.shape[:-1], d_out, dtype=DT)
    torch.testing.assert_close(projected_moments(a, g, b, weight=0.25), 0.25 * naive_scales(a, g, b))


def test_weight_sharing_with_one_location_is_the_plain_layer(monkeypatch):
    import kfac_lab.curvature.ekfac as ek

    monkeypatch.setattr(ek, "CHUNK_ELEMS", 40)  # several chunks of cases
    b = random_basis(6, 4)
    a, g = torch.randn(9, 6, dtype=DT), torch.randn(2, 9, 4, dtype=DT)
    torch.testing.assert_close(projected_moments(a[:, None], g[:, :, None], b), projected_moments(a, g, b))


def test_mismatched_statistics_are_refused():
    b = random_basis(5, 3)
    with pytest.raises(ValueError, match="do not match"):
        projected_moments(torch.randn(4, 5, dtype=DT), torch.randn(6, 3, dtype=DT), b)


def test_dense_matrix_is_the_kronecker_formula():
    bases = [random_basis(5, 3, seed=5), random_basis(2, 4, seed=6)]
    ds = [torch.rand(3, 5, dtype=DT), torch.rand(4, 2, dtype=DT)]
    torch.testing.assert_close(ekfac_dense(bases, ds), torch.block_diag(*(kron_dense(b, d) for b, d in zip(bases, ds))))


def test_rotation_is_the_diagonal_of_the_old_matrix_in_the_new_basis():
    old, new = random_basis(4, 3, seed=1), random_basis(4, 3, seed=2)
    s = torch.rand(3, 4, dtype=DT)
    M = ekfac_dense([old], [s])
    Q = kron(new.U_A, new.U_G)
    want = torch.diagonal(Q.t() @ M @ Q)
    torch.testing.assert_close(rotate(s, old, new).t().reshape(-1), want)
    torch.testing.assert_close(rotate(s, old, old), s)  # the same basis: unchanged


# ------------------------------------------------------------------------------------------
# Against the exact Fisher: EKFAC is the best diagonal in the Kronecker eigenbasis

def test_ekfac_is_optimal_in_the_eigenbasis():
    model = mlp([6, 5, 4, 3])
    x = torch.randn(60, 6, dtype=DT)
    basis, scales, A, G, *_ = ekfac_of(model, x)
    F = exact_fisher(model, "categorical", x).dense
    start = 0
    for i, (b, s) in enumerate(zip(basis, scales)):
        P = s.numel()
        Fii = F[start:start + P, start:start + P]
        start += P
        Q = kron(b.U_A, b.U_G)
        # its eigenvalues are the exact block's diagonal in that basis …
        torch.testing.assert_close(s.t().reshape(-1), torch.diagonal(Q.t() @ Fii @ Q), rtol=1e-9, atol=1e-12)
        E = ekfac_dense([b], [s])
        K = kron(A[(i, i)], G[(i, i)])
        err_ekfac = float(torch.linalg.matrix_norm(Fii - E))
        err_kfac = float(torch.linalg.matrix_norm(Fii - K))
        # … so its Frobenius error is at most K-FAC's (both are diagonal in the same basis)
        assert err_ekfac <= err_kfac * (1 + 1e-12), (i, err_ekfac, err_kfac)
        # and no other diagonal in the basis does better (a perturbed one is worse)
        worse = ekfac_dense([b], [s * (1 + 0.1 * torch.rand_like(s))])
        assert float(torch.linalg.matrix_norm(Fii - worse)) > err_ekfac


# ------------------------------------------------------------------------------------------
# The inverse

def test_inverse_apply_and_dense_agree_with_the_matrix():
    state = EKFACScales(0.95)
    state.set_basis([random_basis(4, 3, seed=3), random_basis(3, 2, seed=4)])
    state.blend([torch.rand(3, 4, dtype=DT), torch.rand(2, 3, dtype=DT)])
    inv = EKFACInverse(state, 0.3)
    M = inv.matrix()
    dense = inv.dense()
    torch.testing.assert_close(dense, torch.linalg.inv(M + 0.09 * torch.eye(M.shape[0], dtype=DT)))
    V = [torch.randn(3, 4, dtype=DT), torch.randn(2, 3, dtype=DT)]
    flat = torch.cat([v.t().reshape(-1) for v in V])
    got = torch.cat([u.t().reshape(-1) for u in inv.apply(V)])
    torch.testing.assert_close(got, dense @ flat)
    torch.testing.assert_close(inv.with_gamma(0.3).apply(V)[1], inv.apply(V)[1])
    with pytest.raises(ValueError, match="shape"):
        inv.apply([V[1], V[0]])
    state.scales[0].zero_()
    with pytest.raises(KFACError, match="gamma > 0"):
        EKFACInverse(state, 0.0).dense()


def test_scales_blend_with_the_factors_schedule():
    state = EKFACScales(0.9)
    state.set_basis([random_basis(2, 2)])
    b1, b2, b3 = (torch.full((2, 2), v, dtype=DT) for v in (1.0, 3.0, 5.0))
    state.blend([b1])
    state.blend([b2])   # ε₂ = 1/2
    torch.testing.assert_close(state.scales[0], torch.full((2, 2), 2.0, dtype=DT))
    state.blend([b3])   # ε₃ = min(2/3, 0.9)
    torch.testing.assert_close(state.scales[0], torch.full((2, 2), 2.0 * 2 / 3 + 5.0 / 3, dtype=DT))
    assert state.k == 3
    with pytest.raises(KFACError, match="eigenbasis"):
        EKFACScales(0.9).batch([torch.ones(1, 2)], [torch.ones(1, 2)])
