"""FisherExplorerWidget, headless: selectors → viz figures in a FigureWidget (kernel-side values)."""
from __future__ import annotations

import pytest
import torch

from kfac_lab import analysis, viz
from kfac_lab.models import mlp
from kfac_lab.store import Store
from kfac_lab.widgets import FISHER_VIEWS, FisherExplorerWidget


@pytest.fixture(scope="module")
def studies():
    torch.manual_seed(0)
    model = mlp([6, 5, 4, 3], "tanh")
    x = torch.randn(64, 6)
    fisher = analysis.fisher_study(model, "categorical", x, gamma=1e-2)
    cum = analysis.cumulant_study(model, "categorical", x, mode="exact")
    return {"fisher": fisher, "cumulants": cum}


def test_views_follow_the_study_variables(studies):
    fe = FisherExplorerWidget(studies)
    c = fe.controls
    assert list(c["study"].options) == ["fisher", "cumulants"]
    assert [v for _, v in c["view"].options] == ["figure1", "ekfac", "figure2", "block_averages", "inverse_quality"]
    assert c["view"].value == "figure1"
    assert [t.name for t in fe.figure.data] == ["exact", "kron", "difference"]
    c["study"].value = "cumulants"
    assert [v for _, v in c["view"].options] == ["cumulant_maps", "cumulant_totals"]
    assert fe.figure.data[0].name == "error"
    c["view"].value = "cumulant_totals"
    assert fe.figure.data[0].type == "bar"
    assert fe.available_views(studies["fisher"]) == ["figure1", "ekfac", "figure2", "block_averages", "inverse_quality"]
    assert set(FISHER_VIEWS) >= set(fe.available_views()) and fe.message.value == ""


def test_each_view_is_the_viz_figure(studies):
    fe = FisherExplorerWidget(studies)
    builders = {"figure1": viz.fisher_heatmaps, "ekfac": viz.approximation_heatmaps, "figure2": viz.inverse_heatmaps,
                "block_averages": viz.block_average_map, "inverse_quality": viz.inverse_quality}
    for view, build in builders.items():
        fig = fe.show(view=view, study="fisher")
        ref = build(studies["fisher"])
        assert [t.type for t in fig.data] == [t.type for t in ref.data], view
        assert fig.layout.title.text == ref.layout.title.text
        for a, b in zip(fig.data, ref.data):
            if a.type == "heatmap":
                assert (a.z == b.z).all() if hasattr(a.z, "all") else a.z == b.z


def test_colour_range_and_scale(studies):
    fe = FisherExplorerWidget(studies, view="figure1")
    assert fe.controls["clip"].value == "default"     # viz's own default range
    fe.controls["clip"].value = None
    full = fe.figure.layout.coloraxis.cmax
    fe.controls["clip"].value = 0.95
    clipped = fe.figure.layout.coloraxis.cmax
    assert 0 < clipped < full
    fe.controls["colorscale"].value = "Cividis"
    first = fe.figure.layout.coloraxis.colorscale[0][1]
    assert fe.figure.layout.coloraxis2.colorscale[0][1] == first
    fe.controls["view"].value = "block_averages"    # a trace colour scale, no colour axis
    assert fe.figure.data[0].colorscale[0][1] == first
    fe.controls["colorscale"].value = None
    assert fe.figure.data[0].colorscale[0][1] != first


def test_from_a_store_and_refresh(studies, tmp_path):
    path = tmp_path / "lab.zarr"
    with Store(path) as st:
        st.save_study("fig1", studies["fisher"])
    fe = FisherExplorerWidget(str(path))                  # opened read-only from its path
    assert list(fe.controls["study"].options) == ["fig1"]
    assert fe.figure.data[0].name == "exact"
    with Store(path) as st:
        st.save_study("cum", studies["cumulants"])
    fe.refresh()
    assert list(fe.controls["study"].options) == ["cum", "fig1"]
    assert fe.controls["study"].value == "fig1"
    fe.show(study="cum", view="cumulant_totals")
    assert fe.figure.data[0].type == "bar"
    fe.close()


def test_one_dataset_and_errors(studies):
    fe = FisherExplorerWidget(studies["cumulants"])
    assert fe.controls["view"].value == "cumulant_maps"
    with pytest.raises(ValueError, match="not available"):
        fe.show(view="figure1")
    with pytest.raises(ValueError, match="choose one of"):
        fe.show(view="nope")
    with pytest.raises(TypeError):
        FisherExplorerWidget(42)
    with pytest.raises(ValueError, match="no study"):
        FisherExplorerWidget({})
    import xarray as xr

    other = FisherExplorerWidget({"empty": xr.Dataset({"a": ("x", [1.0])})})
    assert other.controls["view"].options == ()
    assert "none of the variables" in other.message.value



def test_every_selector_starts_on_a_named_option(studies):
    """A front end shows the selected option's label: none may start with no selection (index
    None — what ``value=None`` means to ipywidgets 8 even when an option's value is None)."""
    import ipywidgets as w

    fe = FisherExplorerWidget(studies)
    for name, c in fe.controls.items():
        if isinstance(c, w.widgets.widget_selection._Selection):
            assert c.index is not None, f"{name} starts blank"
    assert fe.controls["colorscale"].label == "default" and fe.controls["colorscale"].value is None


# ------------------------------------------------------------------ figure-1 sliders (N, stage, γ, layers)
def layers_of(ds) -> list[int]:
    import json

    return json.loads(ds.attrs["layers"])


@pytest.fixture(scope="module")
def live():
    from kfac_lab.dashboards.fisher_app import clear_caches

    clear_caches()
    fe = FisherExplorerWidget.figure1(cases=100, kfac_steps=0, layers=[2, 3], cumulants=False)
    yield fe
    fe.close()


def test_figure1_sliders_recompute_the_study(live):
    """Each control changes the study the views show, exactly as fisher_study computes it."""
    from kfac_lab.analysis import figure1_setup

    net = live.network
    assert set(net.controls) == {"cases", "kfac_steps", "gamma"} and sorted(net.layers) == [0, 1, 2, 3, 4]
    assert live.study.attrs["num_cases"] == 100 and layers_of(live.study) == [2, 3]
    assert live.study.attrs["gamma"] == 0.0 and "kron_inverse" in live.study
    net.controls["cases"].value = 200                        # N
    assert live.study.attrs["num_cases"] == 200
    net.layers[1].value = True                               # layers: L2 joins
    assert layers_of(live.study) == [1, 2, 3] and live.study.sizes["row"] == 3 * 21 * 20
    net.controls["gamma"].value = 1e-2                       # γ
    assert live.study.attrs["gamma"] == 1e-2
    net.controls["kfac_steps"].value = 1                     # training stage
    model, x = figure1_setup(n=200, seed=0, kfac_steps=1)
    ref = analysis.fisher_study(model, "categorical", x, layers=[1, 2, 3], gamma=1e-2, seed=0)
    for var in ("exact", "kron", "tridiag_inverse"):
        assert abs(live.study[var].values - ref[var].values).max() <= 1e-9 * abs(ref[var].values).max(), var
    assert live.figure.data[0].name == "exact" and "200 cases" in net.status.value


def test_figure1_sliders_refusals_keep_the_study(live):
    net = live.network
    net.layers[1].value = net.layers[2].value = False
    before = live.study
    assert layers_of(before) == [3]
    net.layers[3].value = False                              # no layer: refused, the old study stays
    assert "at least one layer" in net.message.value and live.study is before
    net.layers[0].value = True                               # L1 (5,140 parameters): too large for a dense study
    assert "parameters" in net.message.value and live.study is before
    net.layers[0].value = False
    net.controls["gamma"].value = 0.0
    net.layers[4].value = True                               # the softmax layer at γ = 0: F and F̃ only, and why
    assert layers_of(live.study) == [4] and "kron_inverse" not in live.study
    assert "singular" in net.message.value
    assert [v for _, v in live.controls["view"].options] == ["figure1", "ekfac"]  # no inverse views


def test_figure1_takes_a_gamma_between_the_stops():
    fe = FisherExplorerWidget.figure1(cases=100, kfac_steps=0, layers=[3], gamma=0.5, cumulants=False)
    slider = fe.network.controls["gamma"]
    assert slider.value == 0.5 and 0.5 in [v for _, v in slider.options] and fe.study.attrs["gamma"] == 0.5
    fe.close()


def test_light_explorer_shows_plotly_json_not_a_figure_widget(studies):
    """light=True: the figure travels as plotly JSON in an Output widget (no plotly.js in the
    widget state); the selectors work the same."""
    import ipywidgets as w

    fe = FisherExplorerWidget(studies, light=True)
    out = fe._box.children[0]
    assert isinstance(out, w.Output) and not isinstance(fe.figure, w.DOMWidget)
    shown = out.outputs[0]["data"]["application/vnd.plotly.v1+json"]
    assert [t["name"] for t in shown["data"]] == ["exact", "kron", "difference"]
    fe.controls["view"].value = "block_averages"
    assert fe._box.children[0] is not out and fe.figure.data[0].type == "heatmap"
    fe.close()


def test_max_size_keeps_the_heatmaps_light(studies):
    fe = FisherExplorerWidget(studies, max_size=16)
    heat = fe.figure.data[0]
    assert len(heat.y) <= 16 and "block-averaged" in fe.figure.layout.title.text
    fe.show(view="block_averages")                          # not a matrix view: no resolution to apply
    with pytest.raises(ValueError, match="max_size"):
        FisherExplorerWidget(studies, max_size=2)
