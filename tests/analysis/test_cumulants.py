"""The cumulant decomposition of the Kronecker error (eqns 3–4) on data with known cumulants."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kfac_lab.analysis import cumulant_study, cumulant_terms, fisher_study

from .conftest import DT, tiny_data, tiny_net

P_TERMS = ("error", "kappa4", "kappa3_a", "kappa3_b", "bound", "residual", "kappa22", "mean_terms")


def with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def brute_force(a, g):
    """Every term from its definition, pair by pair (loops; tiny sizes only)."""
    k, m = g[0].shape[:2]
    # draws (k, m) flattened; per-weight variables ā (repeated over k) and g
    A = [ai.unsqueeze(0).expand(k, m, ai.shape[1]).reshape(k * m, -1) for ai in a]
    G = [gi.reshape(k * m, -1) for gi in g]
    weights = []
    for ai, gi in zip(A, G):
        for p in range(ai.shape[1]):
            for r in range(gi.shape[1]):
                weights.append((ai[:, p], gi[:, r]))
    E = lambda t: float(t.mean())  # noqa: E731
    P = len(weights)
    out = {t: np.zeros((P, P)) for t in ("error", "kappa4", "kappa3_a", "kappa3_b")}
    for u, v in itertools.product(range(P), range(P)):
        x, z = weights[u]
        y, w = weights[v]
        xc, yc, zc, wc = x - x.mean(), y - y.mean(), z - z.mean(), w - w.mean()
        out["error"][u, v] = E(x * y * z * w) - E(x * y) * E(z * w)
        out["kappa4"][u, v] = (E(xc * yc * zc * wc) - E(xc * yc) * E(zc * wc) - E(xc * zc) * E(yc * wc)
                               - E(xc * wc) * E(yc * zc))
        out["kappa3_a"][u, v] = E(x) * E(yc * zc * wc)
        out["kappa3_b"][u, v] = E(y) * E(xc * zc * wc)
    return out


def test_terms_equal_their_definitions():
    g0 = torch.Generator().manual_seed(0)
    a = [with_bias(torch.rand(30, 2, generator=g0, dtype=DT)), torch.rand(30, 2, generator=g0, dtype=DT) + 0.5]
    g = [torch.randn(2, 30, 2, generator=g0, dtype=DT) + 0.3, torch.randn(2, 30, 1, generator=g0, dtype=DT) ** 2]
    res = cumulant_terms(a, g)
    ref = brute_force(a, g)
    for t in ref:
        np.testing.assert_allclose(res[t].numpy(), ref[t], atol=1e-12, err_msg=t)
    np.testing.assert_allclose(res["bound"].numpy(), np.abs(ref["kappa4"]) + np.abs(ref["kappa3_a"])
                               + np.abs(ref["kappa3_b"]), atol=1e-12)
    # the full expansion is an identity, whatever the means
    assert res["identity_error"] < 1e-12
    assert res["total_error"] == pytest.approx(np.abs(ref["error"]).sum())
    assert res["total_bound"] == pytest.approx(float(res["bound"].sum()))


def test_independent_zero_mean_gaussians_give_zero_everything():
    gen = torch.Generator().manual_seed(1)
    m = 20000
    a = [torch.randn(m, 2, generator=gen, dtype=DT), torch.randn(m, 3, generator=gen, dtype=DT)]
    g = [torch.randn(1, m, 2, generator=gen, dtype=DT), torch.randn(1, m, 1, generator=gen, dtype=DT)]
    res = cumulant_terms(a, g)
    for t in P_TERMS:
        assert float(res[t].abs().max()) < 0.06, t  # sampling noise ~ 1/sqrt(m) = 0.007


def test_constructed_dependence_gives_the_predicted_values():
    """ā = 1 + x, g = ±x (both signs drawn for every case, so E[g | case] = 0 exactly) with
    x ∈ {−1, −1, 2}: E[x] = 0, E[x²] = 2, E[x³] = 2, E[x⁴] = 6. For the weight with itself:
    error = E[ā²g²] − E[ā²]E[g²] = (2 + 2·2 + 6) − 3·2 = 6, κ₄ = E[x⁴] − E[x²]² = 2,
    E[ā]κ(ā, g, g) = E[x³] = 2 (twice), residual 0, bound 6."""
    x = torch.tensor([[-1.0], [-1.0], [2.0]], dtype=DT)
    a = [1 + x]
    g = [torch.stack([x, -x])]
    res = cumulant_terms(a, g)
    assert float(res["error"][0, 0]) == pytest.approx(6.0, abs=1e-12)
    assert float(res["kappa4"][0, 0]) == pytest.approx(2.0, abs=1e-12)
    assert float(res["kappa3_a"][0, 0]) == pytest.approx(2.0, abs=1e-12)
    assert float(res["kappa3_b"][0, 0]) == pytest.approx(2.0, abs=1e-12)
    assert float(res["bound"][0, 0]) == pytest.approx(6.0, abs=1e-12)
    assert abs(float(res["residual"][0, 0])) < 1e-12
    # and with symmetric support (E[x³] = 0) the error is κ₄ alone: 8.5 − 2.5² = 2.25
    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]], dtype=DT)
    res = cumulant_terms([x], [torch.stack([x, -x])])
    assert float(res["error"][0, 0]) == pytest.approx(2.25, abs=1e-12)
    assert float(res["kappa4"][0, 0]) == pytest.approx(2.25, abs=1e-12)


def test_residual_vanishes_when_g_is_symmetric():
    """E[g | case] = 0 exactly (each case drawn with g and −g) ⇒ E[g] = 0 and κ(ā, g) = 0, so
    eqn 3 is exact: the residual is rounding."""
    gen = torch.Generator().manual_seed(2)
    m = 50
    a = [with_bias(torch.rand(m, 3, generator=gen, dtype=DT)), with_bias(torch.randn(m, 2, generator=gen, dtype=DT))]
    base = [torch.randn(2, m, 2, generator=gen, dtype=DT) ** 3, torch.randn(2, m, 3, generator=gen, dtype=DT) + 1.0]
    g = [torch.cat([b, -b]) for b in base]
    res = cumulant_terms(a, g)
    scale = float(res["error"].abs().max())
    assert scale > 0.1
    assert float(res["residual"].abs().max()) < 1e-12 * scale
    assert float(res["kappa22"].abs().max()) < 1e-12 * scale
    # without the symmetry the residual is not zero, but the full expansion still is exact
    res2 = cumulant_terms(a, base)
    assert float(res2["residual"].abs().max()) > 1e-3
    assert res2["identity_error"] < 1e-12 * float(res2["error"].abs().max())


def test_weights_equal_repeated_draws():
    gen = torch.Generator().manual_seed(3)
    a = [with_bias(torch.randn(6, 2, generator=gen, dtype=DT))]
    g = [torch.randn(1, 6, 2, generator=gen, dtype=DT)]
    w = torch.tensor([[1, 2, 1, 3, 1, 2]], dtype=DT)
    rep = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 5])
    weighted = cumulant_terms(a, g, weights=w / w.sum(), chunk=4)
    repeated = cumulant_terms([a[0][rep]], [g[0][:, rep]], chunk=3)
    for t in P_TERMS:
        np.testing.assert_allclose(weighted[t].numpy(), repeated[t].numpy(), atol=1e-12, err_msg=t)
    with pytest.raises(ValueError, match="sum to 1"):
        cumulant_terms(a, g, weights=w)


def test_cumulant_study_on_a_network_matches_the_fisher_study():
    model = tiny_net()
    x, _ = tiny_data()
    ex = cumulant_study(model, "categorical", x, layers=[0, 1], mode="exact")
    fs = fisher_study(model, "categorical", x, layers=[0, 1], inverses=False)
    np.testing.assert_allclose(ex["error"].values, fs["difference"].values, atol=1e-14)
    assert float(ex["total_residual"]) < 1e-10 * float(ex["total_error"])   # exact expectation: eqn 3 exact
    assert list(ex["label"].values) == list(fs["label"].values)
    assert float(ex["total_error"]) <= float(ex["total_bound"]) + float(ex["total_residual"]) + 1e-12
    sa = cumulant_study(model, "categorical", x, layers=[0, 1], samples=4, seed=3)
    fss = fisher_study(model, "categorical", x, layers=[0, 1], mode="sampled", samples=4, seed=3, inverses=False)
    np.testing.assert_allclose(sa["error"].values, fss["difference"].values, atol=1e-14)
    assert float(sa["total_residual"]) > 0  # a sample: E[g] and κ(ā, g) are not exactly 0
    assert float(sa["identity_error"]) < 1e-12
    assert sa.attrs["samples"] == 4 and sa.attrs["num_draws"] == 4 * x.shape[0]
    assert sa.attrs["paper_total_error"] == 2894.4
    be = sa["block_error"].values
    assert be.sum() == pytest.approx(float(sa["total_error"]))
    for k, v in sa.attrs.items():
        assert type(v) in (str, int, float), k
    with pytest.raises(ValueError, match="categorical"):
        cumulant_study(model, "gaussian", x, mode="exact")
