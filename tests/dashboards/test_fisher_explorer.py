"""The Fisher explorer's logic without a browser: settings → background study → figures."""
from __future__ import annotations

import pytest

from kfac_lab.dashboards import fisher_explorer as fe
from kfac_lab.dashboards.fisher_explorer import MAX_PARAMS, FisherExplorerPage
from kfac_lab.dashboards import FisherExplorerApp
from kfac_lab.lab.fisher import FISHER_VIEWS
from kfac_lab.store import Store

# the figure-1 network after one K-FAC iteration on 100 cases; its last two layers (630 weights)
SMALL = {"cases": 100, "kfac_steps": 1, "layers": [3, 4], "resolution": 64}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("fe") / "lab.zarr")


@pytest.fixture(scope="module")
def computed(store):
    app = FisherExplorerApp(store=store, **SMALL)
    return app, app.compute()


def test_figures_of_the_paper(computed):
    app, res = computed
    assert set(res.figures) == set(FISHER_VIEWS)
    f1 = res.figures["figure1"]
    assert [t.type for t in f1.data] == ["heatmap"] * 3
    # hover names both weights: the categories are the weights' labels (layer, unit, input)
    assert "row: %{y}" in f1.data[0].hovertemplate and "col: %{x}" in f1.data[0].hovertemplate
    assert str(f1.data[0].y[0]).startswith("L4 W[")
    assert res.fisher.sizes["row"] == 630 and res.notes == []
    assert "inverse error" in res.summary and "Σ bound" in res.summary
    assert "EKFAC" in res.summary and [t.name for t in res.figures["ekfac"].data] == ["exact", "kron", "ekfac", "relative error"]
    assert len(res.figures["inverse_quality"].data[-1].x) == 4  # F̆, F̂ vs F̃⁻¹; K-FAC, EKFAC vs (F + γ²I)⁻¹


def test_zoom_shows_every_weight_of_one_block(computed):
    app, _ = computed
    app.settings.zoom = "3,4"
    try:
        res = app.compute()
    finally:
        app.settings.zoom = "all"
    heat = res.figures["figure1"].data[0]
    assert len(heat.y) == 420 and len(heat.x) == 210        # L4 rows × L5 cols, one cell per weight
    assert heat.y[0] == "L4 W[0,0]" and heat.x[-1].startswith("L5 b[")


def test_validation_messages():
    app = FisherExplorerApp(store="memory://fe-validate.zarr", **SMALL)
    app.settings.layers = []
    assert app.validate() == {"layers": "choose at least one layer"}
    app.settings.layers = [0, 1]
    assert f"{MAX_PARAMS:,}" in app.validate()["layers"]
    app.settings.layers = [7]
    assert "no layer [7]" in app.validate()["layers"]
    assert app.request() == 0 and app.errors and not app.busy
    with pytest.raises(ValueError, match="layers"):
        app.compute()
    app.settings.source = "checkpoint"
    assert "run_id" in app.validate()
    app.settings.source = "study"
    assert "study" in app.validate()


def test_request_runs_in_the_background_with_progress(store):
    app = FisherExplorerApp(store=store, **SMALL)
    seen = []
    app.listeners.append(seen.append)
    gen = app.request()
    assert gen > 0 and app.busy
    res = app.wait(timeout=300)
    assert not app.busy and app.progress == 100 and res is not None
    assert "figure1" in res.figures and app.status.startswith("done in")
    assert seen[0] == "progress" and seen[-1] == "result"
    # a newer request supersedes an older one: only the newest result is applied
    app.settings.resolution = 128
    g1 = app.request()
    app.settings.resolution = 64
    g2 = app.request()
    assert g2 > g1
    app.wait(timeout=300)
    assert app.current == g2 and app.result.figures["figure1"].data[0].z.shape[0] <= 64


def test_errors_are_reported_not_raised(store):
    app = FisherExplorerApp(store=store, **{**SMALL, "gamma": 0.0})   # the softmax layer makes F̃ singular
    app.request()
    res = app.wait(timeout=300)
    if app.errors.get("compute"):                       # the inverse refused: a message
        assert "compute" in app.errors and not app.busy
    else:                                               # or figure 1 only, with notes for the rest
        assert "figure1" in res.figures and res.notes


def test_checkpoint_of_a_training_run(store):
    from kfac_lab.train import Session

    s = Session("tiny", "kfac", store=store, checkpoint_every=2)
    s.run(steps=4)
    app = FisherExplorerApp(store=store, source="checkpoint", run_id=s.run_id, layers=[1, 2], cases=200,
                         cumulants=False, resolution=64)
    labels = {i: lab for i, lab, _ in app.layer_choices()}
    assert labels == {0: "L1: 64→16", 1: "L2: 16→4", 2: "L3: 4→16", 3: "L4: 16→64"}
    assert any(rid == s.run_id for rid in app.checkpointed_runs().values())
    assert app._checkpoint_steps(s.run_id) == [2, 4]
    res = app.compute()
    assert "figure1" in res.figures and f"run {s.run_id}" in res.summary
    assert res.fisher.attrs["loss"] == "bernoulli"


def test_save_and_reopen_a_study(computed, store):
    app, res = computed
    app.result = res
    names = app.save_study()
    assert len(names) == 2 and set(names) <= set(store.studies())
    other = FisherExplorerApp(store=store, source="study", study=names[0], resolution=64)
    res2 = other.compute()
    assert "figure1" in res2.figures and "cumulant_maps" not in res2.figures


def test_page_without_a_browser(store):
    app = FisherExplorerApp(store=store, **SMALL)
    page = FisherExplorerPage(app, autostart=False)
    assert page.panes["figure1"].object is None
    page.layers.value = []
    assert "at least one layer" in page.layers_msg.object
    page.layers.value = [3, 4]
    page.cases.input.value = "ten"
    assert "not a number" in page.cases.error and app.settings.cases == 100
    page.cases.input.value = "5"
    assert "≥ 10" in page.cases.error
    page.compute.clicks += 1
    app.wait(timeout=300)
    assert page.panes["figure1"].object is not None and not page.progress.visible
    assert "done in" in page.status.object
    zoom_values = list(page.zoom.options.values())
    assert zoom_values[0] == "all" and "3,4" in zoom_values
    page.source.value = "checkpoint"
    assert page.run.visible and not page.stage.input.visible
    app.close()
    assert app.closed


def test_figure1_is_shown_before_the_cumulants(store):
    fe.clear_caches()
    app = FisherExplorerApp(store=store, **{**SMALL, "seed": 3})   # not cached by the other tests
    page = FisherExplorerPage(app, autostart=False)
    seen = []
    app.listeners.append(seen.append)
    app.request()
    res = app.wait(timeout=300)
    assert seen.index("partial") < seen.index("result")
    assert set(res.figures) >= {"figure1", "cumulant_maps"}
    # figure 1 of the partial result is the one kept (not sent to the browser twice)
    assert page.panes["figure1"].object is res.figures["figure1"]
    app.close()


def test_warm_up_computes_the_study_once_for_the_first_visitor(store):
    fe.clear_caches()
    settings = {**SMALL, "seed": 4}
    future = fe.warm_up(**settings)
    assert future is not None and fe.warm_up(**settings) is None    # once per process
    future.result(timeout=300)
    app = FisherExplorerApp(store=store, **settings)
    seen = []
    app.listeners.append(seen.append)
    app.request()
    res = app.wait(timeout=300)
    assert "partial" not in seen and "figure1" in res.figures     # everything came from the cache
    assert fe.warm_up(source="checkpoint") is None                   # needs a store and a run: not warmed


def test_panel_serve_warms_the_apps():
    from kfac_lab.dashboards.common import panel_serve_args

    assert "--warm" in panel_serve_args()


def test_damping_setting_is_a_deprecated_alias_of_gamma():
    with pytest.warns(DeprecationWarning, match="damping= is the deprecated name of gamma="):
        app = FisherExplorerApp(store=None, damping=0.5)
    assert app.settings.gamma == 0.5
    with pytest.raises(TypeError, match="not both"):
        FisherExplorerApp(store=None, damping=0.5, gamma=0.5)


# the figure-1 CNN after one K-FAC iteration on 60 cases
CNN = {"source": "fig1-cnn", "cases": 60, "kfac_steps": 1, "resolution": 64}


def test_the_figure1_cnn_is_a_network_of_the_explorer(store):
    app = FisherExplorerApp(store=store, layers=[0, 1], **CNN)
    assert app.layer_choices() == [(0, "L1: conv 1→6, 5×5", 156), (1, "L2: conv 6→12, 3×3", 660),
                                   (2, "L3: 192→10", 1930)]
    assert app.validate() == {}
    res = app.compute()
    # F beside KFC-expand, KFC-reduce and EKFAC, one colour scale, with their errors
    side = res.figures["ekfac"]
    assert [t.name for t in side.data if t.type == "heatmap"] == ["exact", "kron", "kron_reduce", "ekfac"]
    assert [a.text for a in side.layout.annotations][:4] == ["exact Fisher F", "KFC-expand F̃", "KFC-reduce F̃",
                                                             "EKFAC"]
    assert "block-averaged 816×816" in side.layout.title.text and "kernel row kh" in side.layout.title.text
    # two convolutions with different numbers of locations: no cumulants, no F̃⁻¹, each said once, with why
    assert any(n.startswith("cumulants (eqns 3–4) not computed") and "same number of output locations" in n
               for n in res.notes)
    # F̃⁻¹ and the block-diagonal inverse (the tridiagonal one is not defined with weight sharing)
    q = res.figures["inverse_quality"]
    assert [t.name for t in q.data if t.type == "heatmap"] == ["kron_inverse", "blockdiag_inverse", "ekfac_inverse"]
    assert "no block-tridiagonal" in q.layout.title.text and "no tridiagonal" in res.summary
    # one block at full resolution: hover names layer, output channel, input channel, kernel row/column
    app.settings.zoom = "0,0"
    heat = app.compute().figures["ekfac"].data[0]
    assert len(heat.y) == len(heat.x) == 156
    assert heat.y[0] == "L1 W[o0, c0, kh0, kw0]" and heat.y[-1] == "L1 b[o5]" and heat.x[6] == "L1 W[o0, c0, kh0, kw1]"


def test_one_convolution_has_every_tab(store):
    app = FisherExplorerApp(store=store, layers=[1], **CNN)
    res = app.compute()
    assert set(res.figures) == set(FISHER_VIEWS) and res.notes == []
    assert res.cumulant.attrs["locations"] == 16          # (case, location) draws of the 4×4 output grid
    assert [t.name for t in res.figures["inverse_quality"].data if t.type == "heatmap"] == [
        "kron_inverse", "blockdiag_inverse", "ekfac_inverse"]


def test_a_singular_kron_leaves_the_inverse_tabs_out_and_says_why(store):
    """The CNN's softmax layer at γ = 0: its G is singular, so F̃ has no inverse — the study keeps F,
    F̃ and EKFAC (figure 1, F vs F̃ vs EKFAC) and one note names the cause and the fix."""
    app = FisherExplorerApp(store=store, layers=[2], gamma=0.0, cumulants=False, **CNN)
    res = app.compute()
    assert {"figure1", "ekfac"} <= set(res.figures) and "inverse_quality" not in res.figures
    (note,) = res.notes
    assert note.startswith("F̃⁻¹ and the inverse quality (figures 2, 5–6) not computed") and "gamma > 0" in note


def test_the_page_switches_to_the_cnn_with_its_own_layers(store):
    app = FisherExplorerApp(store=store, **SMALL)
    page = FisherExplorerPage(app, autostart=False)
    page.source.value = "fig1-cnn"
    assert app.settings.layers == [0, 1, 2] and page.layers.value == [0, 1, 2]   # 2,746 parameters: all fit
    assert list(page.layers.options) == ["L1: conv 1→6, 5×5 (156 params)", "L2: conv 6→12, 3×3 (660 params)",
                                         "L3: 192→10 (1,930 params)"]
    assert page.stage.input.visible and app.validate() == {}
    page.source.value = "figure1"
    assert app.settings.layers == [1, 2, 3, 4]          # the paper's middle four: the first layer alone is too big
    app.close()
