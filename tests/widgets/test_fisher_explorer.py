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


def test_max_size_keeps_the_heatmaps_light(studies):
    fe = FisherExplorerWidget(studies, max_size=16)
    heat = fe.figure.data[0]
    assert len(heat.y) <= 16 and "block-averaged" in fe.figure.layout.title.text
    fe.show(view="block_averages")                          # not a matrix view: no resolution to apply
    with pytest.raises(ValueError, match="max_size"):
        FisherExplorerWidget(studies, max_size=2)
