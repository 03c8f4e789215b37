"""fisher_study against the curvature core (exact Fisher, Khatri–Rao F̃, the inverse classes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from kfac_lab.analysis import fisher_study
from kfac_lab.analysis.fisher import dense_via_apply
from kfac_lab.curvature import (BlockDiagonalInverse, BlockTridiagonalInverse, batch_factors, factor_pairs,
                                find_layers, kron_fisher_dense, output_gradients, pi_factor)
from kfac_lab.curvature.exact import exact_fisher
from kfac_lab.curvature.factors import kron
from kfac_lab.errors import KFACError

from .conftest import DT, tiny_data, tiny_net


@pytest.fixture(scope="module")
def gaussian_study():
    """All layers, Gaussian output (no singular factor), exact mode, undamped."""
    model = tiny_net()
    x, _ = tiny_data()
    return model, x, fisher_study(model, "gaussian", x)


def reference_factors(model, loss, x, mode="exact", samples=1, seed=0):
    layers = find_layers(model)
    gen = torch.Generator().manual_seed(seed)
    a, g, _ = output_gradients(model, layers, loss, x, mode=mode, samples=samples, generator=gen)
    A, G = batch_factors(a, g, factor_pairs(len(layers), "all"))
    return layers, A, G


def test_matrices_equal_the_curvature_core(gaussian_study):
    model, x, ds = gaussian_study
    layers, A, G = reference_factors(model, "gaussian", x)
    F = exact_fisher(model, "gaussian", x, dtype=DT).dense.numpy()
    K = kron_fisher_dense((A, G), layers).numpy()
    np.testing.assert_allclose(ds["exact"].values, F, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ds["kron"].values, K, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ds["difference"].values, F - K, rtol=1e-12, atol=1e-14)
    n = len(layers)
    Ad, Gd = [A[(i, i)] for i in range(n)], [G[(i, i)] for i in range(n)]
    bd = BlockDiagonalInverse(Ad, Gd, 0.0).dense().numpy()
    td = BlockTridiagonalInverse(Ad, Gd, [A[(i, i + 1)] for i in range(n - 1)],
                                 [G[(i, i + 1)] for i in range(n - 1)], 0.0).dense().numpy()
    np.testing.assert_allclose(ds["blockdiag_inverse"].values, bd, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ds["tridiag_inverse"].values, td, rtol=1e-7, atol=1e-7 * np.abs(td).max())
    P = K.shape[0]
    np.testing.assert_allclose(ds["kron_inverse"].values @ K, np.eye(P), atol=1e-8)
    for i, l in enumerate(layers):
        np.testing.assert_allclose(ds[f"A_{i}"].values, A[(i, i)].numpy())
        np.testing.assert_allclose(ds[f"G_{i}"].values, G[(i, i)].numpy())
        assert ds[f"A_{i}"].dims == (f"a{i}_row", f"a{i}_col")
        assert list(ds[f"a{i}_row"].values) == list(range(l.d_in)) + [-1]


def test_relative_errors_are_consistent(gaussian_study):
    _, _, ds = gaussian_study
    ref = ds["kron_inverse"].values
    for kind in ("blockdiag", "tridiag"):
        X = ds[f"{kind}_inverse"].values
        expect = np.linalg.norm(X - ref) / np.linalg.norm(ref)
        assert float(ds[f"{kind}_rel_error"]) == pytest.approx(expect, rel=1e-10)
        blocks = ds[f"{kind}_block_rel_error"].values
        assert np.sqrt((blocks**2).sum()) == pytest.approx(expect, rel=1e-10)
    # block-diagonal: off-diagonal blocks of F̆⁻¹ are 0, so the error there is all of F̃⁻¹'s block
    bmap = ds["blockdiag_block_rel_error"].values
    starts, stops = ds["block_start"].values, ds["block_stop"].values
    for i in range(3):
        for j in range(3):
            blk = ref[starts[i]:stops[i], starts[j]:stops[j]]
            if i != j:
                assert bmap[i, j] == pytest.approx(np.linalg.norm(blk) / np.linalg.norm(ref), rel=1e-10)
            assert ds["block_mean_abs"].values[i, j] == pytest.approx(np.abs(blk).mean(), rel=1e-12)
    # tridiagonal: exact on the tridiagonal blocks of F̃ ⇒ better than block-diagonal here
    assert float(ds["tridiag_rel_error"]) < float(ds["blockdiag_rel_error"])


def test_ekfac_variables(gaussian_study):
    """EKFAC from the study's own statistics: block-diagonal, F's diagonal in each block's Kronecker
    eigenbasis (so no farther from F's block than A ⊗ G), its damped inverse and errors consistent."""
    model, x, ds = gaussian_study
    layers, A, G = reference_factors(model, "gaussian", x)
    E, F, K = ds["ekfac"].values, ds["exact"].values, ds["kron"].values
    starts, stops = ds["block_start"].values, ds["block_stop"].values
    for i in range(len(layers)):
        sl = slice(starts[i], stops[i])
        Q = kron(torch.linalg.eigh(A[(i, i)])[1], torch.linalg.eigh(G[(i, i)])[1]).numpy()
        np.testing.assert_allclose(np.diag(Q.T @ E[sl, sl] @ Q), np.diag(Q.T @ F[sl, sl] @ Q), rtol=1e-9, atol=1e-13)
        tol = 1e-12 * np.linalg.norm(F[sl, sl])  # the output layer: K-FAC is exact there (G = I), both are rounding
        assert np.linalg.norm(F[sl, sl] - E[sl, sl]) <= np.linalg.norm(F[sl, sl] - K[sl, sl]) + tol
        for j in range(len(layers)):
            if i != j:
                assert not E[sl, starts[j]:stops[j]].any()
    # γ = 0 here: the inverses are the plain ones
    P = F.shape[0]
    np.testing.assert_allclose(ds["ekfac_inverse"].values @ E, np.eye(P), atol=1e-7)
    ref = np.linalg.inv(F)
    err = np.linalg.norm(ds["ekfac_inverse"].values - ref) / np.linalg.norm(ref)
    assert float(ds["ekfac_rel_error"]) == pytest.approx(err, rel=1e-8)
    assert np.sqrt((ds["ekfac_block_rel_error"].values ** 2).sum()) == pytest.approx(err, rel=1e-8)
    bd = np.linalg.inv(_blockdiag(K, starts, stops))
    assert float(ds["blockdiag_exact_rel_error"]) == pytest.approx(np.linalg.norm(bd - ref) / np.linalg.norm(ref),
                                                                   rel=1e-8)


def _blockdiag(M, starts, stops):
    out = np.zeros_like(M)
    for a, b in zip(starts, stops):
        out[a:b, a:b] = M[a:b, a:b]
    return out


def test_ekfac_damping_and_singular_output_layer():
    """Under a softmax the output layer's scales have zeros (like its G): γ > 0 is needed, and the
    error against (F + γ²I)⁻¹ uses EKFAC's own exact Tikhonov damping."""
    model = tiny_net(sizes=(4, 3, 3))
    x, _ = tiny_data(m=30)
    with pytest.raises(KFACError, match="gamma > 0"):
        fisher_study(model, "categorical", x, layers=[1])
    ds = fisher_study(model, "categorical", x, gamma=0.1)
    E, F = ds["ekfac"].values, ds["exact"].values
    shift = 0.01 * np.eye(F.shape[0])
    np.testing.assert_allclose(ds["ekfac_inverse"].values, np.linalg.inv(E + shift), rtol=1e-8, atol=1e-10)
    ref = np.linalg.inv(F + shift)
    assert float(ds["ekfac_rel_error"]) == pytest.approx(
        np.linalg.norm(ds["ekfac_inverse"].values - ref) / np.linalg.norm(ref), rel=1e-8)


def test_tridiag_beats_blockdiag_on_a_correlated_chain():
    """A deeper narrow chain, where adjacent layers are strongly coupled."""
    model = tiny_net(sizes=(3, 3, 3, 3, 3, 2), seed=3)
    x, _ = tiny_data(m=60, d=3, seed=4)
    ds = fisher_study(model, "gaussian", x)
    assert float(ds["tridiag_rel_error"]) < float(ds["blockdiag_rel_error"])
    # the tridiagonal inverse's error lives outside the tridiagonal band of F̃ mostly
    assert float(ds["tridiag_rel_error"]) < 0.9 * float(ds["blockdiag_rel_error"])


def test_coords_labels_and_bias(gaussian_study):
    model, _, ds = gaussian_study
    assert ds["exact"].dims == ("row", "col")
    assert ds.sizes["row"] == 5 * 3 + 4 * 3 + 4 * 2
    lab = list(ds["label"].values)
    # layer 0: in_dim 5 (4 + bias), d_out 3; entry p*3 + r is W[r, p]
    assert lab[:4] == ["L1 W[0,0]", "L1 W[1,0]", "L1 W[2,0]", "L1 W[0,1]"]
    assert lab[12:15] == ["L1 b[0]", "L1 b[1]", "L1 b[2]"]
    assert lab[15] == "L2 W[0,0]" and lab[-1] == "L3 b[1]"
    bias = ds["is_bias"].values
    assert bias.sum() == 3 + 3 + 2
    assert (ds["in_unit"].values[bias] == -1).all() and (ds["in_unit"].values[~bias] >= 0).all()
    assert list(ds["col_label"].values) == lab
    assert list(ds["block_label"].values) == ["L1", "L2", "L3"]
    # the coordinates agree with the math: F̃ at (bias r, bias s) of a layer is G[r, s], and at
    # (W[r,p], W[r,p]) it is A[p,p] G[r,r]
    for k in range(3):
        rows = np.flatnonzero((ds["layer"].values == k) & bias)
        G = ds[f"G_{k}"].values
        np.testing.assert_allclose(ds["kron"].values[np.ix_(rows, rows)], G[np.ix_(ds["out_unit"].values[rows],
                                                                                 ds["out_unit"].values[rows])])
        w = np.flatnonzero((ds["layer"].values == k) & ~bias)
        p, r = ds["in_unit"].values[w], ds["out_unit"].values[w]
        np.testing.assert_allclose(np.diag(ds["kron"].values)[w], ds[f"A_{k}"].values[p, p] * G[r, r])
        # bias rows of the exact F equal those of F̃ (ā = 1 for the bias)
        np.testing.assert_allclose(ds["exact"].values[np.ix_(rows, rows)], ds["kron"].values[np.ix_(rows, rows)],
                                   atol=1e-14)


def test_attrs_are_plain(gaussian_study):
    _, x, ds = gaussian_study
    for k, v in ds.attrs.items():
        assert type(v) in (str, int, float), (k, type(v))
    for k in ("model", "loss", "samples", "seed", "mode", "kfac_lab_version", "created", "num_cases", "gamma"):
        assert k in ds.attrs
    assert ds.attrs["loss"] == "gaussian" and ds.attrs["mode"] == "exact" and ds.attrs["num_cases"] == x.shape[0]
    assert ds.attrs["model"].startswith("Sequential 4-3-3-2")


def test_layer_subset_and_singular_output_layer():
    model = tiny_net()
    x, _ = tiny_data()
    with pytest.raises(KFACError, match="singular.*softmax|softmax.*singular"):
        fisher_study(model, "categorical", x)
    fig1 = fisher_study(model, "categorical", x, inverses=False)
    assert "kron_inverse" not in fig1 and "exact" in fig1
    inner = fisher_study(model, "categorical", x, layers=[0, 1])
    assert list(np.unique(inner["layer"].values)) == [0, 1]
    assert list(inner["block_row"].values) == [0, 1]
    # the subset is the principal submatrix of the full F
    n = inner.sizes["row"]
    np.testing.assert_allclose(inner["exact"].values, fig1["exact"].values[:n, :n], rtol=1e-12, atol=1e-15)
    last = fisher_study(model, "categorical", x, layers=[2], inverses=False)
    assert last["label"].values[0] == "L3 W[0,0]" and "A_2" in last and "a2_row" in last.dims
    with pytest.raises(ValueError, match="out of range"):
        fisher_study(model, "categorical", x, layers=[5])


def test_gamma_is_factored_tikhonov_on_the_diagonal_blocks():
    model = tiny_net()
    x, _ = tiny_data()
    gamma = 0.3
    ds = fisher_study(model, "categorical", x, gamma=gamma)
    layers, A, G = reference_factors(model, "categorical", x)
    K = kron_fisher_dense((A, G), layers).clone()
    start = 0
    for i, l in enumerate(layers):
        a, g = A[(i, i)], G[(i, i)]
        pi = pi_factor(a, g)
        s = slice(start, start + l.num_params)
        K[s, s] = kron(a + pi * gamma * torch.eye(a.shape[0], dtype=DT), g + gamma / pi * torch.eye(g.shape[0], dtype=DT))
        start += l.num_params
    np.testing.assert_allclose(ds["kron_inverse"].values @ K.numpy(), np.eye(K.shape[0]), atol=1e-9)
    n = len(layers)
    Ad, Gd = [A[(i, i)] for i in range(n)], [G[(i, i)] for i in range(n)]
    np.testing.assert_allclose(ds["blockdiag_inverse"].values, BlockDiagonalInverse(Ad, Gd, gamma).dense().numpy(),
                               rtol=1e-10)
    assert ds.attrs["gamma"] == gamma
    # the old spelling, damping= (γ here; λ everywhere else), still works for one release, with a warning
    with pytest.warns(DeprecationWarning, match=r"fisher_study: damping= is the deprecated name of gamma="):
        old = fisher_study(model, "categorical", x, damping=gamma)
    for name in ("kron_inverse", "blockdiag_inverse", "tridiag_inverse"):
        np.testing.assert_array_equal(old[name].values, ds[name].values)
    with pytest.raises(TypeError, match="not both"):
        fisher_study(model, "categorical", x, gamma=gamma, damping=gamma)


def test_sampled_mode_uses_the_same_draws_for_F_and_F_tilde():
    model = tiny_net()
    x, _ = tiny_data()
    ds = fisher_study(model, "categorical", x, mode="sampled", samples=3, seed=5, inverses=False)
    layers, A, G = reference_factors(model, "categorical", x, mode="sampled", samples=3, seed=5)
    np.testing.assert_allclose(ds["kron"].values, kron_fisher_dense((A, G), layers).numpy(), rtol=1e-12)
    bias = np.flatnonzero(ds["is_bias"].values)
    np.testing.assert_allclose(ds["exact"].values[np.ix_(bias, bias)], ds["kron"].values[np.ix_(bias, bias)],
                               atol=1e-14)
    assert ds.attrs["samples"] == 3
    other = fisher_study(model, "categorical", x, mode="sampled", samples=3, seed=6, inverses=False)
    assert not np.allclose(other["kron"].values, ds["kron"].values)


def test_dense_via_apply_equals_dense():
    g = torch.Generator().manual_seed(0)
    layers = find_layers(tiny_net(sizes=(3, 4, 2, 3)))
    A, G = [], []
    for l in layers:
        X = torch.randn(50, l.in_dim, generator=g, dtype=DT)
        Y = torch.randn(50, l.d_out, generator=g, dtype=DT)
        A.append(X.t() @ X / 50)
        G.append(Y.t() @ Y / 50)
    A_off = [0.3 * A[i][:, :1] @ A[i + 1][:1, :] / A[i][0, 0] for i in range(2)]
    G_off = [0.3 * G[i][:, :1] @ G[i + 1][:1, :] / G[i][0, 0] for i in range(2)]
    inv = BlockTridiagonalInverse(A, G, A_off, G_off, 0.1)
    np.testing.assert_allclose(dense_via_apply(inv, layers).numpy(), inv.dense().numpy(), rtol=1e-9, atol=1e-11)


def test_round_trips_through_zarr_and_netcdf(gaussian_study, tmp_path):
    _, _, ds = gaussian_study
    ds.to_zarr(tmp_path / "study.zarr", consolidated=False)
    back = xr.open_zarr(tmp_path / "study.zarr", consolidated=False).load()
    xr.testing.assert_identical(back.drop_encoding() if hasattr(back, "drop_encoding") else back, ds)
    if "h5netcdf" in xr.backends.list_engines():
        ds.to_netcdf(tmp_path / "study.nc", engine="h5netcdf")
        with xr.open_dataset(tmp_path / "study.nc", engine="h5netcdf") as nc:
            nc = nc.load()
        np.testing.assert_array_equal(nc["exact"].values, ds["exact"].values)
        assert list(nc["label"].values) == list(ds["label"].values)
        np.testing.assert_array_equal(nc["is_bias"].values, ds["is_bias"].values)
        assert nc.attrs == ds.attrs


def test_ekfac_variables_survive_the_store_and_reach_the_explorers(gaussian_study, tmp_path):
    from kfac_lab.lab.fisher import available_views, build_view
    from kfac_lab.store import Store

    _, _, ds = gaussian_study
    store = Store(tmp_path / "lab.zarr")
    store.save_study("ekfac-study", ds)
    back = store.load_study("ekfac-study")
    for v in ("ekfac", "ekfac_inverse", "ekfac_rel_error", "ekfac_block_rel_error", "blockdiag_exact_rel_error"):
        np.testing.assert_array_equal(back[v].values, ds[v].values)
    assert {"ekfac", "inverse_quality"} <= set(available_views(back))
    assert [t.name for t in build_view(back, "ekfac").data if t.type == "heatmap"] == ["exact", "kron", "ekfac"]


def test_a_singular_exact_fisher_leaves_out_only_ekfacs_inverse_comparison():
    """Fewer cases than parameters: F is singular at γ = 0 while F̃ is not; the paper's figures are
    computed, EKFAC's inverse comparison is left out (said in the attrs), the figure shows two bars."""
    from kfac_lab import viz

    model = tiny_net(sizes=(4, 5, 5, 2))
    x, _ = tiny_data(m=6)
    ds = fisher_study(model, "gaussian", x)
    assert "ekfac" in ds and "ekfac_inverse" not in ds and "tridiag_rel_error" in ds
    assert ds.attrs["ekfac_inverses"].startswith("left out:") and "singular" in ds.attrs["ekfac_inverses"]
    bars = [t for t in viz.inverse_quality(ds).data if t.type == "bar"]
    assert len(bars[0].y) == 2
    assert "computed" in fisher_study(model, "gaussian", x, gamma=0.1).attrs["ekfac_inverses"]
