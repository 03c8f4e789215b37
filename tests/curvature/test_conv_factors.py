"""KFC factors of convolution layers (and Linear on (N, T, d) inputs) against curvlinops' KFACLinearOperator."""
import pytest
import torch
from torch import nn

from kfac_lab.curvature import CurvatureEngine, batch_factors, find_layers, output_gradients
from kfac_lab.errors import UnsupportedApproximationError, UnsupportedLayerError

curvlinops = pytest.importorskip("curvlinops")


def cnn(bias=True, padding_mode="zeros"):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias, padding_mode=padding_mode), nn.Tanh(),
        nn.Conv2d(3, 4, (2, 3), stride=1, padding="same", dilation=2, bias=not bias), nn.ReLU(),
        nn.Conv2d(4, 2, 2, stride=(1, 2), padding=(1, 0)), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(2 * 6 * 2, 5, bias=bias),
    ).double()


def seq_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Flatten(), nn.Linear(2 * 6, 3)).double()


def curvlinops_products(model, x, y, approx, V):
    """Their KFAC (type-2: the exact expectation) times the per-parameter tensors ``V``."""
    params = [p for p in model.parameters()]
    op = curvlinops.KFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type="type-2",
                                       kfac_approx=approx, check_deterministic=False,
                                       separate_weight_and_bias=False)
    out = op @ [v.clone() for v in V]
    return list(out)


def our_products(model, x, approx, V):
    eng = CurvatureEngine(model, "categorical", pairs="diag", weight_sharing=approx)
    eng.update_factors(eng.statistics(x, None, "exact"))
    out, pos = [], 0
    for l in eng.layers:
        A, G = eng.factors.A[(l.index, l.index)], eng.factors.G[(l.index, l.index)]
        w, b = V[pos], (V[pos + 1] if l.has_bias else None)
        pos += 1 + l.has_bias
        mw, mb = l.from_matrix(G @ l.to_matrix(w, b) @ A)  # (A ⊗ G) vec(V) = vec(G V A)
        out += [mw] + ([mb] if mb is not None else [])
    return out


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_factors_match_curvlinops(approx, bias):
    model = cnn(bias)
    x = torch.randn(7, 2, 9, 9, dtype=torch.float64)
    y = torch.randint(0, 5, (7,))
    torch.manual_seed(3)
    V = [torch.randn_like(p) for p in model.parameters()]
    theirs = curvlinops_products(model, x, y, approx, V)
    ours = our_products(model, x, approx, V)
    assert len(theirs) == len(ours)
    for t, o in zip(theirs, ours):
        torch.testing.assert_close(o, t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_linear_on_sequences_matches_curvlinops(approx):
    model = seq_model()
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    V = [torch.randn_like(p) for p in model.parameters()]
    theirs = curvlinops_products(model, x, y, approx, V)
    ours = our_products(model, x, approx, V)
    for t, o in zip(theirs, ours):
        torch.testing.assert_close(o, t, rtol=1e-9, atol=1e-12)


def test_statistics_shapes_follow_the_contract():
    model = cnn()
    x = torch.randn(4, 2, 9, 9, dtype=torch.float64)
    layers = find_layers(model)
    a, g, _ = output_gradients(model, layers, "categorical", x, mode="exact")
    T = [25, 25, 12]
    for i, l in enumerate(layers[:3]):
        assert a[i].shape == (4, T[i], l.in_dim) and g[i].shape == (5, 4, T[i], l.d_out)
    assert a[3].shape == (4, layers[3].in_dim) and g[3].shape == (5, 4, layers[3].d_out)
    # the per-case gradient Σ_t g_t ā_tᵀ summed over cases is the batch gradient
    model.zero_grad()
    y = torch.randint(0, 5, (4,))
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    a, g, _ = output_gradients(model, layers, "categorical", x, y, mode="empirical")
    for i, l in enumerate(layers):
        DW = torch.einsum("nto,nti->oi", g[i][0], a[i]) if a[i].dim() == 3 else g[i][0].t() @ a[i]
        torch.testing.assert_close(DW, l.grad_matrix())


def test_padding_modes_give_the_modules_patches():
    """ā from any padding mode: Σ_t W ā_t reproduces the convolution's output."""
    for mode in ("zeros", "reflect", "replicate", "circular"):
        conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode).double()
        l = find_layers(conv)[0]
        x = torch.randn(2, 2, 6, 5, dtype=torch.float64)
        s = torch.einsum("nti,oi->nto", l.inputs(x), l.weight_matrix())
        torch.testing.assert_close(l.outputs(conv(x)), s)


def test_grouped_convolution_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError, match=r"0 \(Conv2d, groups=2\).*exclude"):
        find_layers(model)
    assert [l.name for l in find_layers(model, exclude=["0"])] == ["2"]


def test_tridiag_is_refused_with_the_reason():
    eng = CurvatureEngine(cnn(), "categorical")
    assert "'0'" in eng.tridiag_unavailable and "blockdiag" in eng.tridiag_unavailable
    assert eng.factors.pairs == [(i, i) for i in range(4)]  # no cross factors collected
    eng.update_factors(eng.statistics(torch.randn(3, 2, 9, 9, dtype=torch.float64), None, "sampled"))
    with pytest.raises(UnsupportedApproximationError, match="no cross-layer model for weight sharing"):
        eng.refresh("tridiag", [1.0], "factored")
    eng.refresh("blockdiag", [1.0], "factored")
    assert CurvatureEngine(seq_model()[:2], "gaussian").tridiag_unavailable is None


def test_weight_sharing_is_validated():
    with pytest.raises(ValueError, match="weight_sharing='mean'.*'expand'.*'reduce'"):
        CurvatureEngine(cnn(), "categorical", weight_sharing="mean")


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_cross_factors_keep_the_khatri_rao_fisher_psd(approx):
    """All pairs: each of [A_ij] and [G_ij] is one Gram matrix (so F̃ is PSD), its diagonal blocks the
    layer's own factors; "expand" cross factors are E[Σ_t ā_i/√T_i (Σ_t ā_j/√T_j)ᵀ] and E[ḡ_i ḡ_jᵀ] (means)."""
    model = seq_model()
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    layers = find_layers(model)
    a, g, _ = output_gradients(model, layers, "categorical", x, mode="exact")
    pairs = [(i, j) for i in range(3) for j in range(i, 3)]
    A, G = batch_factors(a, g, pairs, approx)
    T = 6
    if approx == "expand":
        u = [a[0].sum(1) / T ** 0.5, a[1].sum(1) / T ** 0.5, a[2]]
        v = [g[0].mean(2), g[1].mean(2), g[2]]
        torch.testing.assert_close(G[(0, 0)], torch.einsum("knto,kntp->op", g[0], g[0]) / (5 * T))
    else:
        u = [a[0].mean(1), a[1].mean(1), a[2]]
        v = [g[0].sum(2), g[1].sum(2), g[2]]
        torch.testing.assert_close(G[(0, 0)], torch.einsum("kno,knp->op", v[0], v[0]) / 5)
    torch.testing.assert_close(A[(0, 1)], u[0].t() @ u[1] / 5)
    torch.testing.assert_close(A[(1, 2)], u[1].t() @ u[2] / 5)
    torch.testing.assert_close(G[(0, 1)], torch.einsum("kno,knp->op", v[0], v[1]) / 5)
    from kfac_lab.curvature import kron_fisher_dense
    Ft = kron_fisher_dense((A, G), layers)
    assert torch.linalg.eigvalsh(Ft).min() > -1e-12 * torch.linalg.eigvalsh(Ft).max()


@pytest.mark.parametrize("k,s,d", [((3, 2), (2, 1), (1, 2)), ((1, 1), (1, 1), (1, 1)), ((4, 4), (3, 3), (2, 1))])
def test_patches_are_unfolds(k, s, d):
    from kfac_lab.curvature.layers import patches

    x = torch.randn(3, 2, 11, 12, dtype=torch.float64)
    ref = nn.functional.unfold(x, k, dilation=d, stride=s).transpose(1, 2)
    torch.testing.assert_close(patches(x, k, s, d), ref, rtol=0, atol=0)
