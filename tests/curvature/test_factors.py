import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from kfac_lab.curvature import (KroneckerFactors, batch_factors, factor_pairs, find_layers, kron_fisher_dense,
                                output_gradients, params_to_vector, vec, vector_to_params)
from kfac_lab.curvature.factors import SYMMETRIC_BLOCK, SYMMETRIC_MIN_ROWS, symmetric_addmm_

DT = torch.float64


def make_mlp(sizes, biases, act=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b, bias=biases[i]))
        if i < len(sizes) - 2:
            mods.append(act())
    return nn.Sequential(*mods).to(DT)


def test_factor_pairs():
    assert factor_pairs(3, "diag") == [(0, 0), (1, 1), (2, 2)]
    assert factor_pairs(3, "tridiag") == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2)]
    assert len(factor_pairs(4, "all")) == 10
    assert factor_pairs(3, [(1, 0), (2, 2)]) == [(0, 1), (2, 2)]
    with pytest.raises(ValueError, match="choose one of"):
        factor_pairs(3, "banded")


def test_batch_factors_are_expectations_of_outer_products():
    torch.manual_seed(0)
    a = [torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT)]
    g = [torch.randn(2, 6, 4, dtype=DT), torch.randn(2, 6, 5, dtype=DT)]
    A, G = batch_factors(a, g, [(0, 0), (0, 1), (1, 1)])
    brute_A = sum(torch.outer(a[0][n], a[1][n]) for n in range(6)) / 6
    brute_G = sum(torch.outer(g[0][k, n], g[1][k, n]) for n in range(6) for k in range(2)) / 6
    torch.testing.assert_close(A[(0, 1)], brute_A)
    torch.testing.assert_close(G[(0, 1)], brute_G)


def test_running_average_uses_epsilon_schedule():
    f = KroneckerFactors(1, "diag", decay=0.95)
    assert [f.epsilon(k) for k in (1, 2, 10, 100)] == [0.0, 0.5, 0.9, 0.95]
    batches = [torch.full((1, 1), float(v), dtype=DT) for v in (1, 3, 5)]
    for b in batches:
        f.update({(0, 0): b}, {(0, 0): 2 * b})
    # k=1: 1; k=2: 0.5*1 + 0.5*3 = 2; k=3: (2/3)*2 + (1/3)*5 = 3
    assert f.A[(0, 0)].item() == pytest.approx(3.0)
    assert f.G[(0, 0)].item() == pytest.approx(6.0)
    f2 = KroneckerFactors(1, "diag")
    f2.load_state_dict(f.state_dict())
    assert f2.k == 3 and torch.equal(f2.A[(0, 0)], f.A[(0, 0)])
    with pytest.raises(ValueError, match="decay"):
        KroneckerFactors(1, decay=1.0)


def test_fused_update_from_cases_equals_update_of_batch_factors():
    torch.manual_seed(1)
    fused, plain = KroneckerFactors(3, "tridiag", decay=0.9), KroneckerFactors(3, "tridiag", decay=0.9)
    for step in range(5):
        a = [torch.randn(7, d, dtype=DT) for d in (4, 3, 5)]
        g = [torch.randn(2, 7, d, dtype=DT) if step % 2 else torch.randn(7, d, dtype=DT) for d in (3, 5, 2)]
        fused.update_from_cases(a, g)
        plain.update(*batch_factors(a, g, plain.pairs))
    assert fused.k == plain.k == 5
    for key in plain.pairs:
        torch.testing.assert_close(fused.A[key], plain.A[key])
        torch.testing.assert_close(fused.G[key], plain.G[key])


@pytest.mark.parametrize("d, block", [(9, 4), (40, 7), (6, 8)])
def test_symmetric_addmm_equals_the_full_product(d, block):
    torch.manual_seed(2)
    x = torch.randn(30, d, dtype=DT)
    old = torch.randn(d, d, dtype=DT)
    old = old + old.T
    expected = 0.9 * old + 0.25 * x.T @ x
    out = symmetric_addmm_(old.clone(), x, 0.9, 0.25, block=block)  # several levels of the split
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, out.T)


def test_fused_update_takes_the_symmetric_path_for_many_rows():
    """Diagonal factors from >= SYMMETRIC_MIN_ROWS rows are updated through ``symmetric_addmm_``
    (lower blocks only): same values as the plain batch factors, still symmetric."""
    torch.manual_seed(3)
    m = SYMMETRIC_MIN_ROWS + 3
    fused, plain = KroneckerFactors(2, "tridiag", decay=0.9), KroneckerFactors(2, "tridiag", decay=0.9)
    for _ in range(3):
        a = [torch.randn(m, d, dtype=DT) for d in (SYMMETRIC_BLOCK + 5, 6)]
        g = [torch.randn(m, d, dtype=DT) for d in (6, 2 * SYMMETRIC_BLOCK + 1)]
        fused.update_from_cases(a, g)
        plain.update(*batch_factors(a, g, plain.pairs))
    for key in plain.pairs:
        torch.testing.assert_close(fused.A[key], plain.A[key])
        torch.testing.assert_close(fused.G[key], plain.G[key])
    torch.testing.assert_close(fused.A[(0, 0)], fused.A[(0, 0)].T)
    torch.testing.assert_close(fused.G[(1, 1)], fused.G[(1, 1)].T)


@pytest.mark.parametrize("loss", ["categorical", "bernoulli", "gaussian"])
def test_sampled_factors_converge_to_exact_expectation(loss):
    model = make_mlp([4, 5, 3], [True, True])
    layers = find_layers(model)
    x = torch.randn(50, 4, dtype=DT)
    pairs = factor_pairs(2, "all")
    a, g, _ = output_gradients(model, layers, loss, x, mode="exact")
    _, G_exact = batch_factors(a, g, pairs)
    gen = torch.Generator().manual_seed(0)
    errors = []
    for samples in (4, 400):
        a, g, _ = output_gradients(model, layers, loss, x, mode="sampled", samples=samples, generator=gen)
        _, G = batch_factors(a, g, pairs)
        errors.append(max(((G[p] - G_exact[p]).norm() / G_exact[p].norm()).item() for p in pairs))
    assert errors[1] < 0.1 and errors[1] < errors[0]


def test_empirical_mode_uses_training_targets():
    model = make_mlp([3, 4, 2], [True, True])
    layers = find_layers(model)
    x, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 2, dtype=DT)
    a, g, z = output_gradients(model, layers, "gaussian", x, y, mode="empirical")
    torch.testing.assert_close(g[1][0], z - y)
    with pytest.raises(ValueError, match="pass y"):
        output_gradients(model, layers, "gaussian", x, mode="empirical")


def test_vec_is_column_stacking_and_round_trips():
    M = torch.arange(6.0).reshape(2, 3)
    assert vec(M).tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    model = make_mlp([3, 4, 2], [True, False])
    layers = find_layers(model)
    mats = [l.weight_matrix().detach() for l in layers]
    back = vector_to_params(params_to_vector(mats), layers)
    assert all(torch.equal(m, b) for m, b in zip(mats, back))


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=3, max_size=4), data=st.data(), m=st.integers(1, 12))
def test_kron_fisher_blocks_equal_kron_and_per_case_gradient_structure(sizes, data, m):
    biases = data.draw(st.lists(st.booleans(), min_size=len(sizes) - 1, max_size=len(sizes) - 1))
    model = make_mlp(sizes, biases)
    layers = find_layers(model)
    x = torch.randn(m, sizes[0], dtype=DT)
    a, g, _ = output_gradients(model, layers, "categorical" if sizes[-1] > 1 else "gaussian", x, mode="sampled")
    pairs = factor_pairs(len(layers), "all")
    A, G = batch_factors(a, g, pairs)
    F = kron_fisher_dense((A, G), layers)
    P = sum(l.num_params for l in layers)
    assert F.shape == (P, P)
    torch.testing.assert_close(F, F.t())
    off = [0]
    for l in layers:
        off.append(off[-1] + l.num_params)
    for i, j in pairs:
        torch.testing.assert_close(F[off[i]:off[i + 1], off[j]:off[j + 1]], torch.kron(A[(i, j)], G[(i, j)]))
    # per-case gradient of layer i in the paper's ordering is ā ⊗ g (vec of g āᵀ)
    n = 0
    for l in layers:
        per_case = vec(torch.outer(g[l.index][0, n], a[l.index][n]))
        torch.testing.assert_close(per_case, torch.kron(a[l.index][n], g[l.index][0, n]))


def test_load_state_dict_checks_before_changing_anything():
    from kfac_lab.optim.state_check import StateError

    torch.manual_seed(0)
    a = [torch.randn(16, 3), torch.randn(16, 5)]
    g = [torch.randn(16, 4), torch.randn(16, 2)]
    src = KroneckerFactors(2, "tridiag")
    src.update_from_cases(a, g)
    dst = KroneckerFactors(2, "tridiag")
    dst.update_from_cases([t * 2 for t in a], [t * 2 for t in g])
    before = {k: v.clone() for k, v in dst.A.items()}, dst.k
    bad = src.state_dict()
    bad["A"] = dict(bad["A"], **{"0,1": torch.zeros(3, 4)})  # inconsistent with A[0,0] and A[1,1]
    with pytest.raises(StateError, match=r"layers 0,1 cross factor A has shape \(3, 4\); this model needs \(3, 5\)"):
        dst.load_state_dict(bad)
    nan = src.state_dict()
    nan["G"] = dict(nan["G"], **{"1,1": torch.full((2, 2), float("nan"))})
    with pytest.raises(StateError, match=r"layer 1 factor G holds NaN or inf"):
        dst.load_state_dict(nan)
    with pytest.raises(StateError, match=r"layer 0 factor A has shape \(3, 3\); this model needs \(7, 7\)"):
        dst.load_state_dict(src.state_dict(), dims=([7, 5], [4, 2]))
    assert all(torch.equal(before[0][k], dst.A[k]) for k in before[0]) and dst.k == before[1]
    dst.load_state_dict(src.state_dict(), dtype=torch.float64)
    assert dst.A[(0, 0)].dtype == torch.float64 and torch.equal(dst.A[(0, 1)], src.A[(0, 1)].double())
