"""The Training lab page: train a preset problem with K-FAC, SGD-Nesterov or Adam and steer it live.

:class:`TrainingLabPage` / :func:`create_app` — the Panel page over a
:class:`~kfac_lab.dashboards.training_app.TrainingLabApp` (sessions, live controls, compare)
whose runs are a :class:`~kfac_lab.lab.monitor.RunMonitor` — the model the Jupyter widget
(:class:`kfac_lab.widgets.TrainingLabWidget`) shows too: the same buffers, dataset, decimation,
status text, control ranges and figures (:mod:`kfac_lab.lab`). A periodic callback on the
session's own event loop polls the runs and refreshes the figures: cheaply (new arrays into the
last figure) most of the time, through :mod:`kfac_lab.viz` when the structure changes (a run or
an event appears, a view option flips). Closing the tab stops its training threads.

Serve with ``panel serve dashboards/training_lab.py`` (see :mod:`kfac_lab.dashboards`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from .. import checks
from ..lab.controls import APPROX, DAMPING_GRID, LIVE_CONTROLS, LR_MODES, nearest_damping, shown_damping
from ..lab.figures import FigureStream, curve_figure, empty_figure, traces_figure
from .common import NumberField, attach, client_allowed, escape_html, parse_float, parse_int, refusal
from .training_app import (DEFAULT_STEPS, OPTIMIZERS, PROBLEMS, TrainingLabApp, TrainingSettings,  # noqa: F401
                           _stop_all)  # the server's exit hook: the serve harness and tests reach it here

__all__ = ["TrainingLabPage", "create_app", "TrainingLabApp", "TrainingSettings", "PROBLEMS", "OPTIMIZERS",
           "DEFAULT_STEPS", "LIVE_CONTROLS", "DAMPING_GRID", "nearest_damping"]

#: The page's figure panes → the figures of :data:`kfac_lab.lab.figures.FIGURES`.
FIGURE_KEYS = {"step": "iterations", "time": "seconds", "traces": "traces"}


# --------------------------------------------------------------------------- the page
class TrainingLabPage:
    """The Panel page over a :class:`TrainingLabApp`. Build with :func:`create_app`."""

    # The browser draws each figure on the cores training uses (a redraw of a 1,500-point figure
    # costs it tens of ms of CPU): measured with a tiny problem streaming, chromium used 24 % of a
    # core at 0.5 / 1 / 3 s and 13 % at 1 / 2 / 5 s; with mnist-small (GEMMs on both cores) that
    # still cost ~13 % of its steps, hence the slower secondary figures. A new event or run is
    # drawn at once anyway (every figure).
    REDRAW_S = 1.0       # the curves against iterations at most this often (at once for a new event)
    TIME_S = 3.0         # the curves against seconds at most this often
    TRACES_S = 10.0      # the λ, γ, α, μ, ρ figure at most this often
    STATUS_S = 1.0       # the status cards (step, steps/s) at most this often

    def __init__(self, lab: TrainingLabApp):
        import panel as pn

        self.lab = lab
        s = lab.settings
        w = 300
        msg = {"color": "#b00020", "font-size": "12px"}
        # -- run setup
        self.problem = pn.widgets.Select(label="Problem", options=PROBLEMS, value=s.problem, width=w,
                                         css_classes=["kfac-problem"])
        self.optimizer = pn.widgets.Select(label="Optimizer", options=OPTIMIZERS, value=s.optimizer, width=w)
        self.race = pn.widgets.Checkbox(label="Race a second optimizer (same problem and seed)", value=s.race)
        self.optimizer_b = pn.widgets.Select(label="Second optimizer", options=OPTIMIZERS, value=s.optimizer_b,
                                             width=w, visible=s.race)
        self.seed = NumberField("Seed", s.seed, lambda t: parse_int(t, "seed", minimum=0, maximum=checks.SEED_MAX),
                                lambda v: setattr(s, "seed", v), name="seed")
        self.steps = NumberField("Steps per start (0 = until stopped)", s.steps,
                                 lambda t: parse_int(t, "steps", minimum=0), lambda v: setattr(s, "steps", v),
                                 name="steps")
        self.start_b = pn.widgets.Button(label="Start", color="primary", width=70, css_classes=["kfac-start"])
        self.pause_b = pn.widgets.Button(label="Pause", width=70, css_classes=["kfac-pause"])
        self.stop_b = pn.widgets.Button(label="Stop", width=70, css_classes=["kfac-stop"])
        self.reset_b = pn.widgets.Button(label="Reset", width=70, css_classes=["kfac-reset"])
        self.branch_b = pn.widgets.Button(label="New run from here", width=150, css_classes=["kfac-branch"])
        self.command_msg = pn.pane.HTML("", styles=msg, css_classes=["kfac-message"], width=w)
        # -- live controls
        self.damping_slider = pn.widgets.DiscreteSlider(
            label="Damping λ (log scale)", options={f"{v:g}": v for v in DAMPING_GRID},
            value=nearest_damping(s.damping), width=w, css_classes=["kfac-damping-slider"])
        self.damping = NumberField("λ (type a value, Enter)", float(s.damping),
                                   lambda t: parse_float(t, "damping λ", positive=True),
                                   lambda v: self._typed("damping", v), name="damping")
        self.adapt = pn.widgets.Checkbox(label="adaptive λ (Levenberg–Marquardt)", value=s.adapt_damping,
                                         css_classes=["kfac-adapt"])
        self.approx = pn.widgets.RadioButtonGroup(label="Approximation", options=APPROX, value=s.approx,
                                                  css_classes=["kfac-approx"])
        self.approx_note = pn.pane.HTML("", styles=msg, css_classes=["kfac-approx-note"], width=w)
        self._show_approx_state()
        self.momentum = pn.widgets.Checkbox(label="momentum (α and μ from the quadratic model)", value=s.momentum,
                                            css_classes=["kfac-momentum"])
        self.lr_mode = pn.widgets.RadioButtonGroup(label="Learning rate α", options=LR_MODES, value=s.lr_mode,
                                                   css_classes=["kfac-lr-mode"])
        self.lr = NumberField("fixed α", float(s.lr), lambda t: parse_float(t, "learning rate α", positive=True),
                              lambda v: self._typed("lr", v), name="lr")
        self.control_msg = pn.pane.HTML("", styles=msg, css_classes=["kfac-message"], width=w)
        # -- view and compare
        self.metric = pn.widgets.RadioButtonGroup(label="Metric", options={"training error": "error", "loss": "loss"},
                                                  value=s.metric)
        self.log_y = pn.widgets.Checkbox(label="log scale", value=s.log_y)
        self.compare = pn.widgets.MultiChoice(label="Compare with stored runs", options={}, value=[], width=w,
                                              css_classes=["kfac-compare"])
        self.refresh_b = pn.widgets.Button(label="Refresh list", width=110)
        self.continue_b = pn.widgets.Button(label="Continue selected run", width=170)
        self.compare_msg = pn.pane.HTML("", styles=msg, css_classes=["kfac-message"], width=w)
        # -- output
        self.status = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["kfac-status"])
        cfg = {"displaylogo": False, "responsive": True}
        self.fig_step = pn.pane.Plotly(None, config=cfg, sizing_mode="stretch_width", height=380,
                                       css_classes=["kfac-fig-step"])
        self.fig_time = pn.pane.Plotly(None, config=cfg, sizing_mode="stretch_width", height=380,
                                       css_classes=["kfac-fig-time"])
        self.fig_traces = pn.pane.Plotly(None, config=cfg, sizing_mode="stretch_width", height=760,
                                         css_classes=["kfac-fig-traces"])
        self.streams = {
            "step": FigureStream(lambda ds, ev: self._curves(ds, ev, "iterations")),
            "time": FigureStream(lambda ds, ev: self._curves(ds, ev, "seconds")),
            "traces": FigureStream(lambda ds, ev: traces_figure(ds, ev, row_height=120)),
        }
        self._drawn = {name: (-1, -1, 0.0) for name in self.streams}  # version, structure, time
        self._last_status = 0.0
        self._typed_at = -math.inf  # when the λ box last got a keystroke (it is not overwritten then)
        self.damping.input.param.watch(lambda e: setattr(self, "_typed_at", time.monotonic()), "value_input")

        # -- wiring
        self.problem.param.watch(self._on_problem, "value")
        self.optimizer.param.watch(lambda e: setattr(s, "optimizer", e.new), "value")
        self.optimizer_b.param.watch(lambda e: setattr(s, "optimizer_b", e.new), "value")
        self.race.param.watch(self._on_race, "value")
        self.start_b.on_click(lambda e: self._command(lab.start))
        self.pause_b.on_click(self._on_pause)
        self.stop_b.on_click(lambda e: self._command(lab.stop))
        self.reset_b.on_click(lambda e: self._command(lab.reset))
        self.branch_b.on_click(lambda e: self._command(lab.new_run_from_here, "branch"))
        self.damping_slider.param.watch(self._on_slider, "value_throttled")
        self.adapt.param.watch(lambda e: self._control("adapt_damping", e.new, widget=self.adapt, old=e.old), "value")
        self.approx.param.watch(lambda e: self._control("approx", e.new, widget=self.approx, old=e.old), "value")
        self.momentum.param.watch(lambda e: self._control("momentum", e.new, widget=self.momentum, old=e.old), "value")
        self.lr_mode.param.watch(self._on_lr_mode, "value")
        self.metric.param.watch(self._on_view, "value")
        self.log_y.param.watch(self._on_view, "value")
        self.compare.param.watch(lambda e: (lab.set_compare(e.new), self.refresh()), "value")
        self.refresh_b.on_click(lambda e: self._refresh_runs())
        self.continue_b.on_click(self._on_continue)
        self._refresh_runs()

        sidebar = pn.Column(
            pn.pane.Markdown("### Run"), self.problem, self.optimizer, self.race, self.optimizer_b, self.seed,
            self.steps, pn.Row(self.start_b, self.pause_b, self.stop_b, self.reset_b), self.branch_b,
            self.command_msg,
            pn.pane.Markdown("### Live controls (K-FAC)"), self.damping_slider, self.damping,
            self.adapt, "Approximation", self.approx, self.approx_note, self.momentum,
            "Learning rate α", self.lr_mode, self.lr, self.control_msg,
            pn.pane.Markdown("### View"), self.metric, self.log_y,
            pn.pane.Markdown("### Earlier runs"), self.compare, pn.Row(self.refresh_b, self.continue_b),
            self.compare_msg,
            width=w + 30)
        header = pn.pane.Markdown(
            "## K-FAC training lab\nTrain a problem of Martens & Grosse (2015) and steer K-FAC while it runs: "
            "every change takes effect at the next step boundary, is saved as an event with the run and is "
            "marked ◆ on the curves. Runs are saved to the store as they go; earlier ones can be compared.",
            sizing_mode="stretch_width")
        main = pn.Column(header, self.status, pn.Row(self.fig_step, self.fig_time, sizing_mode="stretch_width"),
                         self.fig_traces, sizing_mode="stretch_width")
        self.layout = pn.Row(sidebar, main, sizing_mode="stretch_width")
        self.refresh(force=True)

    # -- events from widgets ----------------------------------------------------------------
    def _command(self, fn: Callable[[], bool], key: str = "start") -> None:
        fn()
        self.command_msg.object = escape_html(self.lab.messages.get(key, "") or self.lab.messages.get("start", ""))
        self._update_status()
        self.refresh(force=True)

    def _on_pause(self, event) -> None:
        lab = self.lab
        if lab.status == "paused":
            lab.resume()
            self.pause_b.label = "Pause"
        else:
            lab.pause()
            self.pause_b.label = "Resume"
        self._update_status()

    def _on_problem(self, event) -> None:
        self.lab.choose_problem(event.new)
        s = self.lab.settings
        self.steps.show(s.steps)
        self.damping.show(float(s.damping))
        self._quiet_set(self.damping_slider, nearest_damping(s.damping))
        self._show_approx_state()

    def _show_approx_state(self) -> None:
        """The approximation toggle as the chosen problem allows: disabled, with the reason as its
        tooltip and as a note under it, when the model refuses the block-tridiagonal inverse."""
        reason = self.lab.tridiag_unavailable
        self.approx.disabled = bool(reason)
        self.approx.description = reason
        self.approx_note.object = escape_html(reason or "")
        self.approx_note.visible = bool(reason)
        if self.approx.value != self.lab.settings.approx:
            self._quiet_set(self.approx, self.lab.settings.approx)

    def _on_race(self, event) -> None:
        self.lab.settings.race = event.new
        self.optimizer_b.visible = event.new

    def _on_slider(self, event) -> None:
        if getattr(self, "_quiet", False) or event.new is None:
            return
        if self._control("damping", event.new):
            self.damping.show(float(event.new))
        else:
            self.damping.set_error(self.lab.messages.get("damping", ""))

    def _on_lr_mode(self, event) -> None:
        self._control("lr_mode", event.new, widget=self.lr_mode, old=event.old)

    def _control(self, name: str, value: Any, widget=None, old=None) -> bool:
        """Apply a live control; on refusal show why and put the widget back."""
        if getattr(self, "_quiet", False):
            return True
        ok = self.lab.set_control(name, value)
        text = self.lab.messages.get(name, "")
        self.control_msg.object = escape_html(text)
        if ok and name == "damping":
            self._quiet_set(self.damping_slider, nearest_damping(float(value)))
        if not ok and widget is not None:
            self._quiet_set(widget, old)
        self._update_status()
        return ok

    def _typed(self, name: str, value: Any) -> None:
        """A typed λ or α: applied, or ValueError for the NumberField to show next to its box."""
        if not self.lab.set_control(name, value):
            raise ValueError(self.lab.messages.get(name, f"{name}: refused"))
        self.control_msg.object = ""
        if name == "damping":
            self._quiet_set(self.damping_slider, nearest_damping(float(value)))
        self._update_status()

    def _quiet_set(self, widget, value) -> None:
        self._quiet = True
        try:
            widget.value = value
        finally:
            self._quiet = False

    def _on_view(self, event) -> None:
        s = self.lab.settings
        s.metric, s.log_y = self.metric.value, self.log_y.value
        self.refresh(force=True)

    def _refresh_runs(self) -> None:
        runs = self.lab.stored_runs()
        keep = [r for r in self.compare.value if r in runs.values()]
        self.compare.options = runs
        self.compare.value = keep
        self.compare_msg.object = escape_html(self.lab.messages.pop("compare", ""))

    def _on_continue(self, event) -> None:
        if not self.compare.value:
            self.compare_msg.object = "choose a run in the list first"
            return
        self.lab.continue_run(self.compare.value[0])
        self.compare_msg.object = escape_html(self.lab.messages.get("continue", ""))
        self.refresh(force=True)

    # -- drawing (on the session's loop) ------------------------------------------------------
    def _curves(self, ds, events, key):
        s = self.lab.settings
        fig = curve_figure(ds, events, key, metric=s.metric, log_y=s.log_y)
        fig.update_layout(legend=dict(orientation="h", y=-0.2))
        return fig

    def _follow_damping(self) -> None:
        """While adaptive λ is on, the λ slider (and the λ box, unless being typed in) show the λ
        the optimizer has reached; moving either still sets λ (see :meth:`TrainingLabApp.live_damping`)."""
        lam = self.lab.live_damping()
        if lam is None:
            return
        nearest = nearest_damping(lam)
        if self.damping_slider.value != nearest:
            self._quiet_set(self.damping_slider, nearest)
        shown = shown_damping(lam)
        if (time.monotonic() - self._typed_at > 5.0 and not self.damping.error
                and self.damping.input.value != self.damping.fmt(shown)):
            self.damping.show(shown)

    def refresh(self, force: bool = False) -> None:
        """Poll the sessions and redraw what is due (the periodic callback, every 100 ms).

        The curves against iterations follow the data every ``REDRAW_S`` and at once when a run
        or an event appears (the marker of a control change); the curves against seconds do the
        same one tick later, and the trace figure (six subplots: slow to build and to draw)
        every ``TRACES_S`` — a figure rebuilt for a new event is never held up behind another,
        and a figure still showing "press Start" is drawn as soon as a run has points."""
        lab = self.lab
        lab.poll()
        now = time.monotonic()
        if force or now - self._last_status >= self.STATUS_S:
            self._update_status()
            self._last_status = now
        due = []
        # the curves change only when the drawn metric has a new value (the training error is
        # evaluated every eval_every steps); the traces with every step
        curve_version = (lab.metric_versions.get(lab.settings.metric, 0), lab.structure, lab.settings.metric,
                         lab.settings.log_y, len(lab.settings.compare))
        for name, every in (("step", self.REDRAW_S), ("time", self.TIME_S), ("traces", self.TRACES_S)):
            drawn_version, drawn_structure, last = self._drawn[name]
            version = lab.version if name == "traces" else curve_version
            empty = self.streams[name].base is None  # the placeholder: replace it as soon as there are points
            if force or (name != "traces" and drawn_structure != lab.structure) or (
                    drawn_version != version and (empty or now - last >= every)):
                due.append(name)
        if not force and "step" in due and self._drawn["step"][1] != lab.structure:
            due = ["step"]  # a new event or run: its marker first, the other figures next tick
        if not due:
            return
        ds, events = lab.dataset()
        s = lab.settings
        panes = {"step": self.fig_step, "time": self.fig_time, "traces": self.fig_traces}
        for name in due:
            if ds is None:
                panes[name].object = empty_figure(FIGURE_KEYS[name], lab.running, s.metric)
                self.streams[name].reset()
            else:
                options = (s.metric, s.log_y) if name != "traces" else ()
                panes[name].object = self.streams[name].figure(ds, events, options)
            self._drawn[name] = (lab.version if name == "traces" else curve_version, lab.structure, now)

    def _update_status(self) -> None:
        lab = self.lab
        self._follow_damping()
        parts = []
        for sess in lab.sessions:
            st = lab.monitor.status(sess, lab.store)
            fail = f"<br><b>failed:</b> {escape_html(st.failure)}" if st.failure else ""
            parts.append(
                f"<div class='kfac-card' style='border:1px solid #ddd;border-radius:6px;padding:6px 10px;"
                f"margin:4px;min-width:260px'><b>{escape_html(st.label)}</b> — {escape_html(st.text)}"
                f"<br><small>{escape_html(st.footnote)}</small>{fail}</div>")
        notice = f"<div style='color:#555'>{escape_html(lab.notice)}</div>" if lab.notice else ""
        html = (f"<div style='display:flex;flex-wrap:wrap'>{''.join(parts)}</div>{notice}" if parts
                else f"<div style='color:#555'>{escape_html(lab.notice or 'idle — choose a problem and press Start')}</div>")
        if self.status.object != html:
            self.status.object = html
        paused = lab.status == "paused"
        label = "Resume" if paused else "Pause"
        if self.pause_b.label != label:
            self.pause_b.label = label

    def __panel__(self):
        return self.layout


def create_app(store=None, **settings):
    """The Training lab page for one browser session (``panel serve`` calls this per visit).
    ``settings`` override :class:`TrainingSettings` defaults (e.g. ``problem="tiny"``)."""
    import panel as pn

    pn.extension("plotly", sizing_mode="fixed")
    if not client_allowed():
        return pn.Column(refusal("The K-FAC training lab"))
    lab = TrainingLabApp(store=store, **settings)
    page = TrainingLabPage(lab)
    attach(page.refresh, lab.close, period_ms=100)
    return pn.Column(page, sizing_mode="stretch_width")


__getattr__ = checks.module_getattr(__name__, deprecated={"TrainingLab": "TrainingLabApp"}, home="kfac_lab.dashboards")
