"""The Fisher explorer: the paper's figures 1, 2, 5–6 and eqns 3–4, live, on a network you pick.

The Panel page (:class:`FisherExplorerPage`, :func:`create_app`) over
:class:`~kfac_lab.dashboards.fisher_app.FisherExplorerApp` (the settings, the background
computation, the caches); the views it shows are :mod:`kfac_lab.lab.fisher`'s catalogue.

Serve with ``panel serve dashboards/fisher_explorer.py`` (see :mod:`kfac_lab.dashboards`).
"""

from __future__ import annotations


from .. import checks
from ..lab.fisher import FISHER_VIEWS
from .common import NumberField, attach, client_allowed, escape_html, parse_float, parse_int, refusal
from .fisher_app import (FAST_DEFAULTS, FIGURE1, MAX_PARAMS, SOURCES, TRAINED, FisherExplorerApp, FisherSettings,
                         build_figures, clear_caches, network_layers, warm_up)

__all__ = ["FisherExplorerPage", "create_app", "FisherExplorerApp", "FisherSettings", "FAST_DEFAULTS", "MAX_PARAMS",
           "network_layers", "clear_caches", "warm_up", "build_figures"]


# --------------------------------------------------------------------------- the page
class FisherExplorerPage:
    """The Panel page over a :class:`FisherExplorerApp`. Build with :func:`create_app`."""

    def __init__(self, app: FisherExplorerApp, autostart: bool = True):
        import panel as pn

        self.app = app
        s = app.settings
        self.source = pn.widgets.Select(label="Network", options=SOURCES, value=s.source, width=300,
                                        css_classes=["kfac-source"])
        self.run = pn.widgets.Select(label="Run (with checkpoints)", options={}, width=300)
        self.step = pn.widgets.Select(label="Checkpoint step", options={}, width=300)
        self.study = pn.widgets.Select(label="Saved study", options=[], width=300)
        self.stage = NumberField("Training stage (K-FAC iterations)", s.kfac_steps,
                                 lambda t: parse_int(t, "training stage", minimum=0, maximum=200),
                                 lambda v: setattr(s, "kfac_steps", v), name="stage")
        self.cases = NumberField("Cases N", s.cases, lambda t: parse_int(t, "cases", minimum=10, maximum=100_000),
                                 lambda v: setattr(s, "cases", v), name="cases")
        self.layers = pn.widgets.MultiChoice(label="Layers", options={}, value=[], width=300)
        self.layers_msg = pn.pane.HTML("", styles={"color": "#b00020", "font-size": "12px"},
                                       css_classes=["kfac-message"], width=300)
        self.mode = pn.widgets.RadioButtonGroup(label="Mode", options=["exact", "sampled"], value=s.mode)
        self.samples = NumberField("Samples per case", s.samples,
                                   lambda t: parse_int(t, "samples", minimum=1, maximum=1000),
                                   lambda v: setattr(s, "samples", v), name="samples")
        self.gamma = NumberField("Damping γ of the inverses", float(s.gamma),
                                 lambda t: parse_float(t, "damping γ", minimum=0.0),
                                 lambda v: setattr(s, "gamma", v), name="gamma")
        self.cumulants = pn.widgets.Checkbox(label="cumulants (eqns 3–4)", value=s.cumulants)
        self.resolution = pn.widgets.Select(label="Display resolution (cells per side)",
                                            options=[64, 128, 256, 512], value=s.resolution, width=300)
        self.zoom = pn.widgets.Select(label="Show", options={"all layers": "all"}, value="all", width=300,
                                      css_classes=["kfac-zoom"])
        self.compute = pn.widgets.Button(label="Compute", color="primary", width=140, css_classes=["kfac-compute"])
        self.save = pn.widgets.Button(label="Save study to store", width=150, disabled=True)
        self.progress = pn.indicators.Progress(value=0, max=100, width=300, visible=False,
                                               bar_color="primary")
        self.status = pn.pane.Markdown("", width=300, css_classes=["kfac-status"])
        self.message = pn.pane.HTML("", styles={"color": "#b00020", "font-size": "12px"},
                                    css_classes=["kfac-message"], width=300)
        self.panes = {n: pn.pane.Plotly(None, config={"displaylogo": False, "responsive": True},
                                        sizing_mode="stretch_width", css_classes=[f"kfac-fig-{n}"])
                      for n in FISHER_VIEWS}
        self.notes = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.tabs = pn.Tabs(
            ("F, F̃ and F − F̃ (fig. 1)", self.panes["figure1"]),
            ("F vs F̃ vs EKFAC", self.panes["ekfac"]),
            ("F̃⁻¹ and block averages (fig. 2)", pn.Column(self.panes["figure2"], self.panes["block_averages"],
                                                          sizing_mode="stretch_width")),
            ("Inverse quality (figs. 5–6)", self.panes["inverse_quality"]),
            ("Cumulants (eqns 3–4)", pn.Column(self.panes["cumulant_maps"], self.panes["cumulant_totals"],
                                               sizing_mode="stretch_width")),
            dynamic=True, sizing_mode="stretch_width")

        self._refresh_sources()
        self.source.param.watch(self._on_source, "value")
        self.run.param.watch(self._on_run, "value")
        self.step.param.watch(lambda e: setattr(s, "checkpoint_step", e.new), "value")
        self.study.param.watch(lambda e: setattr(s, "study", e.new or ""), "value")
        self.layers.param.watch(self._on_layers, "value")
        self.mode.param.watch(lambda e: setattr(s, "mode", e.new), "value")
        self.cumulants.param.watch(lambda e: setattr(s, "cumulants", e.new), "value")
        self.resolution.param.watch(self._on_view, "value")
        self.zoom.param.watch(self._on_view, "value")
        self.compute.on_click(lambda e: self.app.request())
        self.save.on_click(self._on_save)
        app.listeners.append(self._on_app)

        sidebar = pn.Column(
            pn.pane.Markdown("### Network"), self.source, self.run, self.step, self.study, self.stage, self.cases,
            pn.pane.Markdown("### Study"), self.layers, self.layers_msg, "Mode", self.mode, self.samples,
            self.gamma, self.cumulants,
            pn.pane.Markdown("### Display"), self.resolution, self.zoom,
            pn.Row(self.compute, self.save), self.progress, self.status, self.message,
            width=330)
        header = pn.pane.Markdown(
            "## K-FAC Fisher explorer\nThe exact Fisher F against K-FAC's Kronecker-factored F̃ (Martens & Grosse "
            "2015, figures 1, 2, 5–6; eqns 3–4). Hover a cell to see the two weights it couples (layer, output unit, "
            "input unit; `b` = bias; on a convolution: output channel `o`, input channel `c`, kernel row `kh` and "
            "column `kw`). The figure-1 CNN adds KFC-expand, KFC-reduce and EKFAC side by side (tab *F vs F̃ vs "
            "EKFAC*). Large matrices are block-averaged for display: pick one layer pair under "
            "*Show* to see every weight.", sizing_mode="stretch_width")
        self.layout = pn.Row(sidebar, pn.Column(header, self.tabs, self.notes, sizing_mode="stretch_width"),
                             sizing_mode="stretch_width")
        self._update_visibility()
        if autostart and s.source == FIGURE1:
            self.app.request()

    # -- widget → settings ---------------------------------------------------------
    def _refresh_sources(self) -> None:
        s = self.app.settings
        runs = self.app.checkpointed_runs()
        self.run.options = runs
        if s.run_id in runs.values():
            self.run.value = s.run_id
        studies = self.app.saved_studies()
        self.study.options = studies
        if s.study in studies:
            self.study.value = s.study
        self._refresh_layers()

    def _refresh_layers(self) -> None:
        s = self.app.settings
        choices = self.app.layer_choices()
        self.layers.options = {f"{lab} ({p:,} params)": i for i, lab, p in choices}
        valid = [i for i in s.layers if i in {c[0] for c in choices}]
        if not valid and choices:  # another network (e.g. the CNN): as many of its layers as a study allows
            total = 0
            for i, _, p in choices:
                if total + p <= MAX_PARAMS:
                    valid.append(i)
                    total += p
            s.layers = valid
        self.layers.value = valid
        self._refresh_zoom()

    def _refresh_zoom(self) -> None:
        s = self.app.settings
        opts = {"all layers": "all"}
        for i in s.layers:
            for j in s.layers:
                opts[f"block L{i + 1} × L{j + 1} (every weight)"] = f"{i},{j}"
        self.zoom.options = opts
        if s.zoom not in opts.values():
            s.zoom = "all"
        self.zoom.value = s.zoom

    def _on_source(self, event) -> None:
        self.app.settings.source = event.new
        self.app.settings.layers = []   # another network: its own layers (as many as a study allows)
        self._refresh_sources()
        self._update_visibility()

    def _on_run(self, event) -> None:
        s = self.app.settings
        s.run_id = event.new or ""
        steps = self.app._checkpoint_steps(s.run_id) if s.run_id else []
        self.step.options = {"latest": None, **{str(k): k for k in steps[::-1]}}
        self.step.value = None
        self._refresh_layers()

    def _on_layers(self, event) -> None:
        s = self.app.settings
        s.layers = sorted(int(v) for v in event.new)
        errs = self.app.validate()
        self.layers_msg.object = escape_html(errs.get("layers", ""))
        self._refresh_zoom()

    def _on_view(self, event) -> None:
        s = self.app.settings
        s.resolution = self.resolution.value
        s.zoom = self.zoom.value or "all"
        if self.app.result is not None or self.app.busy:
            self.app.request()  # the studies are cached (or being computed): only the figures are redrawn

    def _on_save(self, event) -> None:
        try:
            names = self.app.save_study()
        except Exception as exc:  # noqa: BLE001
            self.message.object = escape_html(f"could not save: {exc}")
            return
        self.message.object = ""
        self.status.object = "saved as " + ", ".join(f"`{n}`" for n in names)
        self.study.options = self.app.saved_studies()

    def _update_visibility(self) -> None:
        src = self.app.settings.source
        self.run.visible = self.step.visible = src == "checkpoint"
        self.study.visible = src == "study"
        self.stage.input.visible = src in TRAINED
        for w in (self.cases.input, self.layers, self.mode, self.samples.input, self.gamma.input, self.cumulants):
            w.visible = src != "study"

    # -- app → page (on the session's event loop) ------------------------------------------
    def _on_app(self, what: str) -> None:
        app = self.app
        self.progress.visible = app.busy
        self.progress.value = int(app.progress)
        self.compute.disabled = False
        self.status.object = escape_html(app.status)
        msgs = [v for k, v in app.errors.items() if k not in ("layers",)]
        self.message.object = "<br>".join(escape_html(m) for m in msgs)
        self.layers_msg.object = escape_html(app.errors.get("layers", ""))
        if what == "partial" and app.result is not None:
            for name, fig in app.result.figures.items():  # figure 1 now; the others stay until "result"
                self.panes[name].object = fig
                self.panes[name].visible = True
        if what == "result" and app.result is not None:
            for name, pane in self.panes.items():
                fig = app.result.figures.get(name)
                if pane.object is not fig:
                    pane.object = fig
                pane.visible = fig is not None
            self.notes.object = "\n".join(f"- {n}" for n in app.result.notes)
            self.save.disabled = app.settings.source == "study"

    def __panel__(self):
        return self.layout


def create_app(store=None, autostart: bool = True, **settings):
    """The Fisher explorer page for one browser session (``panel serve`` calls this per visit).

    ``settings`` override :class:`FisherSettings` defaults (e.g. ``**FAST_DEFAULTS``). With
    ``autostart`` the study of ``settings`` is computed at once (:func:`warm_up` the first time,
    so a server warmed with ``panel serve --warm`` has it ready for the first visitor).
    """
    import panel as pn

    pn.extension("plotly", sizing_mode="fixed")
    if autostart:
        warm_up(**settings)
    if not client_allowed():
        return pn.Column(refusal("The K-FAC Fisher explorer"))
    app = FisherExplorerApp(store=store, **settings)
    page = FisherExplorerPage(app, autostart=autostart)
    attach(app.poll, app.close, period_ms=150)
    return pn.Column(page, sizing_mode="stretch_width")


__getattr__ = checks.module_getattr(__name__, deprecated={"FisherExplorer": "FisherExplorerApp"}, home="kfac_lab.dashboards")
