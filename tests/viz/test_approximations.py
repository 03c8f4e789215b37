"""F beside its approximations (K-FAC / KFC-expand, KFC-reduce, EKFAC): the figure, the explorers'
view and the relative errors, on a study Dataset of a small CNN's geometry (a convolution and a
linear layer), checked against brute-force norms and the unravelled weight shapes."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from kfac_lab.analysis.approximations import approximation_errors
from kfac_lab.curvature.geometry import LayerGeometry, parameter_coords
from kfac_lab.lab.fisher import available_views, build_view
from kfac_lab.viz import approximation_heatmaps
from kfac_lab.viz.fisher import CONV_HOVER

GEOMS = [LayerGeometry(0, 2, 1, (2, 2)), LayerGeometry(1, 3, 8)]   # conv 1→2 2×2 (+b), linear 8→3 (+b)
P = 2 * 5 + 3 * 9


def _study(names=("kron", "kron_reduce", "ekfac"), geoms=GEOMS, seed=0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    n = sum(g.num_params for g in geoms)
    X = rng.standard_normal((3 * n, n))
    F = X.T @ X / len(X)
    data = {"exact": (("row", "col"), F, {"symbol": "F"})}
    for k, name in enumerate(names):
        E = rng.standard_normal((n, n)) * 0.1 * (k + 1)
        data[name] = (("row", "col"), F + E + E.T, {})
    rc, cc = parameter_coords(geoms), parameter_coords(geoms, "col_")
    coords = {"row": np.arange(n), "col": np.arange(n), **{k: ("row", v) for k, v in rc.items()},
              **{k: ("col", v) for k, v in cc.items()}}
    return xr.Dataset({k: xr.Variable(*v) for k, v in data.items()}, coords=coords,
                      attrs={"model": "test CNN", "num_cases": 10, "mode": "exact"})


def test_panels_share_one_scale_and_the_bars_are_the_frobenius_errors():
    ds = _study()
    fig = approximation_heatmaps(ds, clip=None)
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert [t.name for t in heat] == ["exact", "kron", "kron_reduce", "ekfac"]
    assert {t.coloraxis for t in heat} == {"coloraxis"}
    F = ds["exact"].values
    bar = next(t for t in fig.data if t.type == "bar")
    want = [np.linalg.norm(F - ds[n].values) / np.linalg.norm(F) for n in ("kron", "kron_reduce", "ekfac")]
    np.testing.assert_allclose(bar.y, want, rtol=1e-12)
    assert list(bar.x) == ["KFC-expand F̃", "KFC-reduce F̃", "EKFAC"]
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:4] == ["exact Fisher F", "KFC-expand F̃", "KFC-reduce F̃", "EKFAC"]
    assert fig.layout.coloraxis.colorbar.title.text  # the colour bar says what it measures


def test_hover_names_layer_output_and_input_channel_and_kernel_position():
    ds = _study()
    heat = approximation_heatmaps(ds).data[0]
    assert list(heat.y) == [str(v) for v in ds["label"].values]       # one category per weight: its name
    # the first conv weight column-stacked: W[o, c, kh, kw] for o = 0, 1 at (c, kh, kw) = (0, 0, 0)
    assert heat.y[:3] == ("L1 W[o0, c0, kh0, kw0]", "L1 W[o1, c0, kh0, kw0]", "L1 W[o0, c0, kh0, kw1]")
    assert heat.y[8:10] == ("L1 b[o0]", "L1 b[o1]") and heat.x[-1] == "L2 b[2]"
    assert "row: %{y}" in heat.hovertemplate and "col: %{x}" in heat.hovertemplate
    fig = approximation_heatmaps(ds)
    assert CONV_HOVER in fig.layout.title.text


def test_large_matrices_are_block_averaged_and_the_title_says_so():
    fig = approximation_heatmaps(_study(), max_size=8)
    heat = fig.data[0]
    assert len(heat.y) <= 8 and "block-averaged 37×37" in fig.layout.title.text
    assert all("…" in str(v) or "[" in str(v) for v in heat.y)


def test_with_kron_alone_the_panel_is_plain_kfac():
    ds = _study(names=("kron", "ekfac"))
    fig = approximation_heatmaps(ds)
    assert [a.text for a in fig.layout.annotations][:3] == ["exact Fisher F", "K-FAC F̃", "EKFAC"]


def test_relative_errors_per_block_against_brute_force():
    ds = _study()
    err = approximation_errors(ds)
    F = ds["exact"].values
    layer = ds["layer"].values
    for name in ("kron", "kron_reduce", "ekfac"):
        X = ds[name].values
        assert float(err[f"rel_error_{name}"]) == pytest.approx(np.linalg.norm(F - X) / np.linalg.norm(F))
        for i in (0, 1):
            for j in (0, 1):
                b = np.ix_(layer == i, layer == j)
                want = np.linalg.norm(F[b] - X[b]) / np.linalg.norm(F[b])
                assert float(err[f"block_rel_error_{name}"].sel(block_row=i, block_col=j)) == pytest.approx(want)
    with pytest.raises(ValueError, match="lacks"):
        approximation_errors(ds, ["nope"])
    with pytest.raises(ValueError, match="exact"):
        approximation_errors(ds.drop_vars("exact"))


def test_the_explorers_view_appears_only_with_something_to_compare():
    assert "ekfac" in available_views(_study())
    assert "ekfac" in available_views(_study(names=("kron", "ekfac")))
    assert "ekfac" not in available_views(_study(names=("kron",)))
    with pytest.raises(ValueError, match="kron_reduce or ekfac"):
        build_view(_study(names=("kron",)), "ekfac")
    fig = build_view(_study(), "ekfac", zoom="0,1")        # one layer block, every weight
    heat = fig.data[0]
    assert len(heat.y) == 10 and len(heat.x) == 27
    assert heat.y[0].startswith("L1 W[o0, c0") and heat.x[0] == "L2 W[0,0]"
