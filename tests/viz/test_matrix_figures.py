"""Heatmap figures of the Fisher and cumulant studies: data, block lines, hover labels, down-sampling."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from kfac_lab import viz
from kfac_lab.viz.heatmaps import bin_edges, downsample, matrix_axes


@pytest.fixture(scope="module")
def studies():
    import torch

    from kfac_lab.analysis import cumulant_study, fisher_study
    from kfac_lab.models import mlp

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = mlp([4, 3, 3, 2], "tanh", dtype=torch.float64, seed=0)
    x = torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fs = fisher_study(model, "gaussian", x)
    cs = cumulant_study(model, "categorical", x, layers=[0, 1], samples=2)
    torch.set_num_threads(before)
    return fs, cs


def synthetic_study(sizes=(500, 400, 200), seed=0) -> xr.Dataset:
    """A (row, col) study dataset of P = sum(sizes) rows, three layers, without torch."""
    rng = np.random.default_rng(seed)
    P = sum(sizes)
    layer = np.concatenate([np.full(s, k + 1) for k, s in enumerate(sizes)])
    label = np.asarray([f"L{layer[i] + 1} W[{i % 7},{i}]" for i in range(P)], dtype=object)
    M = rng.standard_normal((P, P))
    coords = {"row": np.arange(P), "col": np.arange(P), "layer": ("row", layer), "label": ("row", label),
              "col_layer": ("col", layer), "col_label": ("col", label)}
    return xr.Dataset({"exact": (("row", "col"), M), "kron": (("row", "col"), M.T),
                       "difference": (("row", "col"), M - M.T)}, coords=coords)


def heatmaps(fig):
    return [t for t in fig.data if t.type == "heatmap"]


def lines(fig, xref=None):
    return [s for s in fig.layout.shapes if s.type == "line" and (xref is None or s.xref == xref)]


# ---------------------------------------------------------------------------------------------
# down-sampling

def test_downsample_block_means_and_shape():
    rng = np.random.default_rng(1)
    M = rng.standard_normal((1100, 700))
    small = downsample(M, 512)
    assert small.shape[0] <= 512 and small.shape[1] <= 512
    re, ce = bin_edges(1100, 512), bin_edges(700, 512)
    assert small.shape == (len(re) - 1, len(ce) - 1)
    for a, b in [(0, 0), (5, 7), (len(re) - 2, len(ce) - 2)]:
        assert small[a, b] == pytest.approx(M[re[a]:re[a + 1], ce[b]:ce[b + 1]].mean())
    # block means: the overall mean is preserved when all bins are equal
    M2 = rng.standard_normal((1024, 1024))
    s2 = downsample(M2, 512)
    assert s2.shape == (512, 512)
    np.testing.assert_allclose(s2, M2.reshape(512, 2, 512, 2).mean(axis=(1, 3)))
    # small matrices come back unchanged
    np.testing.assert_array_equal(downsample(M[:10, :20]), M[:10, :20])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), max_size=st.integers(1, 600),
       bounds=st.lists(st.integers(1, 2999), max_size=6))
def test_bin_edges_properties(n, max_size, bounds):
    e = bin_edges(n, max_size, bounds)
    assert e[0] == 0 and e[-1] == n
    assert np.all(np.diff(e) > 0)
    assert len(e) - 1 <= max_size
    inside = sorted({b for b in bounds if 0 < b < n})
    if len(inside) + 1 <= max_size:
        assert set(inside) <= set(e.tolist())  # no bin straddles a layer boundary
    if n <= max_size:
        np.testing.assert_array_equal(e, np.arange(n + 1))


# ---------------------------------------------------------------------------------------------
# figure 1

def test_fisher_heatmaps_show_the_data(studies):
    fs, _ = studies
    fig = viz.fisher_heatmaps(fs)
    hm = heatmaps(fig)
    assert [t.name for t in hm] == ["exact", "kron", "difference"]
    for t in hm:
        np.testing.assert_allclose(np.asarray(t.z, dtype=np.float64), fs[t.name].values, rtol=1e-6,
                                   atol=1e-7 * np.abs(fs[t.name].values).max())
        assert list(t.x) == list(fs["col_label"].values)      # hover names both weights
        assert list(t.y) == list(fs["label"].values)
        assert "%{x}" in t.hovertemplate and "%{y}" in t.hovertemplate
    # F and F̃ share a colour axis, the difference has its own (diverging, centred at 0)
    assert hm[0].coloraxis == hm[1].coloraxis == "coloraxis" and hm[2].coloraxis == "coloraxis2"
    assert fig.layout.coloraxis.cmin == -fig.layout.coloraxis.cmax
    assert fig.layout.coloraxis2.cmid == 0
    # block boundaries: 3 layers → 2 vertical + 2 horizontal lines per panel, at the block starts
    assert len(lines(fig)) == 3 * 4
    starts = fs["block_start"].values[1:]
    xs = sorted({s.x0 for s in lines(fig, "x") if s.x0 == s.x1})
    np.testing.assert_allclose(xs, starts - 0.5)
    assert "block-averaged" not in fig.layout.title.text


def test_downsampled_figure_is_marked_and_averaged():
    ds = synthetic_study()
    fig = viz.fisher_heatmaps(ds, max_size=256)
    hm = heatmaps(fig)
    axes = matrix_axes(ds, 256)
    z = np.asarray(hm[0].z)
    assert z.shape == axes.shape and max(z.shape) <= 256
    np.testing.assert_allclose(z, axes.reduce(ds["exact"].values), rtol=1e-6, atol=1e-6)
    a, b = 3, 5
    re, ce = axes.row_edges, axes.col_edges
    assert z[a, b] == pytest.approx(ds["exact"].values[re[a]:re[a + 1], ce[b]:ce[b + 1]].mean(), rel=1e-5)
    assert "block-averaged 1100×1100" in fig.layout.title.text
    assert fig.layout.meta["downsampled"] is True
    # bins do not straddle the layer boundaries (500, 900): the block lines are still exact
    for b in (500, 900):
        assert b in re
    assert " … " in hm[0].x[0]   # a bin's hover label spans its weights
    assert len(lines(fig, "x")) == 4
    # the default size fits 512
    assert max(np.asarray(heatmaps(viz.fisher_heatmaps(ds))[0].z).shape) <= 512


# ---------------------------------------------------------------------------------------------
# figures 2, 5, 6

def test_inverse_figures(studies):
    fs, _ = studies
    fig = viz.inverse_heatmaps(fs)
    assert [t.name for t in heatmaps(fig)] == ["kron", "kron_inverse"]
    np.testing.assert_allclose(np.asarray(heatmaps(fig)[1].z, dtype=float), fs["kron_inverse"].values, rtol=1e-6,
                               atol=1e-7 * np.abs(fs["kron_inverse"].values).max())
    bam = viz.block_average_map(fs)
    (t,) = bam.data
    np.testing.assert_allclose(np.asarray(t.z), fs["block_mean_abs"].values)
    assert list(t.x) == ["L1", "L2", "L3"] and t.text[0][0] == f"{fs['block_mean_abs'].values[0, 0]:.3g}"
    q = viz.inverse_quality(fs)
    assert [t.name for t in heatmaps(q)] == ["kron_inverse", "blockdiag_inverse", "tridiag_inverse", "ekfac_inverse"]
    assert {t.coloraxis for t in heatmaps(q)} == {"coloraxis"}   # one scale: directly comparable
    (bar,) = [t for t in q.data if t.type == "bar"]
    np.testing.assert_allclose(bar.y, [float(fs[v]) for v in ("blockdiag_rel_error", "tridiag_rel_error",
                                                              "blockdiag_exact_rel_error", "ekfac_rel_error")])
    assert list(bar.customdata[2:]) == ["‖X − (F + γ²I)⁻¹‖_F / ‖(F + γ²I)⁻¹‖_F"] * 2  # the reference, named
    # a study stored before EKFAC: the paper's two lines
    old = viz.inverse_quality(fs.drop_vars(["ekfac", "ekfac_inverse", "ekfac_rel_error", "blockdiag_exact_rel_error",
                                            "ekfac_block_rel_error"]))
    assert [t.name for t in heatmaps(old)] == ["kron_inverse", "blockdiag_inverse", "tridiag_inverse"]
    assert len([t for t in old.data if t.type == "bar"][0].y) == 2
    ek = viz.approximation_heatmaps(fs)   # F, F̃ and EKFAC (and KFC-reduce for a CNN)
    assert [t.name for t in heatmaps(ek)] == ["exact", "kron", "ekfac"]
    assert {t.coloraxis for t in heatmaps(ek)} == {"coloraxis"}


def test_missing_inverses_are_explained(studies):
    fs, _ = studies
    with pytest.raises(ValueError, match="inverses=False"):
        viz.inverse_quality(fs.drop_vars(["kron_inverse"]))


def test_subtitle_names_gamma_also_for_studies_saved_before_the_rename(studies):
    fs, _ = studies
    title = lambda ds: viz.block_average_map(ds).layout.title.text  # noqa: E731
    assert "γ = " not in title(fs)  # γ = 0: no damping to show
    new = fs.assign_attrs(gamma=0.25)
    old = fs.assign_attrs(damping=0.25)
    del old.attrs["gamma"]
    assert "γ = 0.25" in title(new) and "γ = 0.25" in title(old)


# ---------------------------------------------------------------------------------------------
# cumulants

def test_cumulant_figures(studies):
    _, cs = studies
    fig = viz.cumulant_maps(cs)
    hm = heatmaps(fig)
    assert [t.name for t in hm] == ["error", "kappa4", "kappa3_a", "kappa3_b", "bound"]
    for t in hm:
        np.testing.assert_allclose(np.asarray(t.z, dtype=float), cs[t.name].values, rtol=1e-6,
                                   atol=1e-7 * np.abs(cs[t.name].values).max() + 1e-300)
    assert hm[-1].coloraxis != hm[0].coloraxis
    assert len(heatmaps(viz.cumulant_maps(cs, include_residual=True))) == 6
    tot = viz.cumulant_totals(cs)
    this = tot.data[0]
    assert this.x[0] == "error" and this.x[1] == "bound"
    np.testing.assert_allclose(this.y[:2], [float(cs["total_error"]), float(cs["total_bound"])])
    paper = tot.data[1]
    np.testing.assert_allclose(paper.y, [2894.4, 4134.6])
    ratio = float(cs["total_error"]) / float(cs["total_bound"])
    assert f"{ratio:.3f}" in tot.layout.title.text


def test_viz_does_not_import_torch():
    code = "import sys, kfac_lab.viz; assert 'torch' not in sys.modules, 'viz imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_matrix_figure_titles_its_axes_and_colour_bars(studies):
    """Each heatmap panel names its axes, and each colour bar names what it colours."""
    fs, cs = studies
    figs = {"fisher_heatmaps": viz.fisher_heatmaps(fs), "inverse_heatmaps": viz.inverse_heatmaps(fs),
            "inverse_quality": viz.inverse_quality(fs), "cumulant_maps": viz.cumulant_maps(cs),
            "block_average_map": viz.block_average_map(fs),
            "block errors": viz.block_average_map(fs, var="blockdiag_block_rel_error")}
    for name, fig in figs.items():
        for t in heatmaps(fig):
            xa = fig.layout[(t.xaxis or "x").replace("x", "xaxis", 1)]
            ya = fig.layout[(t.yaxis or "y").replace("y", "yaxis", 1)]
            assert xa.title.text and ya.title.text, (name, t.name)
            bar = fig.layout[t.coloraxis].colorbar if t.coloraxis else t.colorbar
            assert bar.title.text, (name, t.name)
    assert figs["fisher_heatmaps"].layout.coloraxis.colorbar.title.text == "F / F̃"
    assert figs["fisher_heatmaps"].layout.coloraxis2.colorbar.title.text == "F − F̃"
    assert figs["block_average_map"].data[0].colorbar.title.text == "mean |entry|"
    assert figs["block errors"].data[0].colorbar.title.text == "relative error"
