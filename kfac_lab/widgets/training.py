"""``TrainingLabWidget``: the training lab inside Jupyter (ipywidgets + plotly ``FigureWidget``).

A view over :class:`kfac_lab.train.Session` (training, live controls, logging to the store) and
the labs' model :mod:`kfac_lab.lab` — the same run buffers, dataset and decimation, status
text, control ranges and checks, and figures (:mod:`kfac_lab.viz`, kept current by a
:class:`~kfac_lab.lab.figures.FigureStream`) as the Panel training lab.

Threads — the rule of the lab (docs/architecture.md#the-data-flow):

* each session trains in its own background thread and only *hands data over*: one metric dict
  per step on its bounded ``session.updates`` queue (full: the oldest is dropped; training never
  waits for the UI);
* one small *drainer* thread takes everything queued, at most every ``refresh`` seconds (slower
  when drawing takes long, so the UI never eats the training's CPU), rebuilds the figures with
  :mod:`kfac_lab.viz` and copies them into the ``FigureWidget`` s inside ``batch_update()`` —
  it sets widget **values** only (never prints, never uses ``Output`` widgets);
* control callbacks run in the kernel's main thread and only call ``session.set(...)``, which
  validates at once and applies at the next step boundary (a ``"control"`` event at that step,
  drawn as a marker);
* while adaptive λ is on, the drainer moves the λ slider and box to the λ the optimizer has
  reached (values only; a user's λ stands until the optimizer has taken it, then adaptation
  goes on from it).

Headless (tests, nbclient) nothing is drawn, but every value is there: ``lab.flush()`` drains
synchronously and ``lab.figure.data[0].x`` holds the iterations.
"""
from __future__ import annotations

import html
import math
import threading
import time
from typing import Any, Iterable

from .. import checks
from ..lab.controls import APPROX, DAMPING_MAX, DAMPING_MIN, LR_MODES, LiveControls, shown_damping
from ..lab.figures import FigureStream, curve_figure, traces_figure
from ..lab.monitor import RunMonitor

__all__ = ["TrainingLabWidget"]


def _entries(optimizers) -> list[tuple[str, dict, str]]:
    """``(name, options, label)`` per contender: names, or ``(name, options[, label])`` tuples."""
    from ..train import canonical_optimizer

    if isinstance(optimizers, str):
        optimizers = (optimizers,)
    out: list[tuple[str, dict, str]] = []
    for i, item in enumerate(optimizers):
        if isinstance(item, str):
            name, options, label = item, {}, None
        elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 3:
            name = item[0]
            options = dict(item[1]) if len(item) > 1 and item[1] else {}
            label = item[2] if len(item) > 2 else None
        else:
            raise ValueError(f"optimizers[{i}] = {item!r}: give a name ('kfac', 'sgd', 'adam') or "
                             "(name, options[, label]), e.g. ('kfac', {'approx': 'tridiag'}, 'tridiag')")
        name = canonical_optimizer(name)
        if label is None:
            label = name + "".join(f" {k}={v}" for k, v in options.items())
        out.append((name, options, str(label)))
    if not out:
        raise ValueError("TrainingLabWidget: give at least one optimizer")
    labels = [lab for _, _, lab in out]
    for i, lab in enumerate(labels):  # unique labels: they name the runs in the figures
        if labels.count(lab) > 1:
            labels[i] = f"{lab} #{labels[:i].count(lab) + 1}"
    return [(n, o, lab) for (n, o, _), lab in zip(out, labels)]


def _slider(lam: float) -> float:
    """Where the λ slider shows ``lam``: clipped to its range."""
    return min(max(float(lam), DAMPING_MIN), DAMPING_MAX)


class TrainingLabWidget:
    """Train one or several optimizers on a problem, live, with controls and streaming curves.

    Args:
        problem: a problem name (``"mnist-small"``, ``"mnist"``, ``"curves"``, ``"figure1"``,
            ``"tiny"``) or a :class:`~kfac_lab.train.Problem`.
        optimizers: names (``"kfac"``, ``"sgd"``, ``"adam"``) or ``(name, options[, label])``
            tuples — one :class:`~kfac_lab.train.Session` each, racing side by side, e.g.
            ``("kfac", "sgd")`` or ``[("kfac", {}, "block-diag"), ("kfac", {"approx": "tridiag"},
            "tridiag")]``.
        store: a :class:`~kfac_lab.store.Store`, a path (e.g. the dashboards' ``runs/lab.zarr``,
            so they show these runs too) or None (an in-memory store). All sessions share it.
        seed, batch_size, eval_every, checkpoint_every: passed to every Session.
        steps, seconds: the budget of each press of *start* (more steps / training seconds from
            then); neither: train until *stop*.
        session_options: further keywords for every Session (``eval_cases``, ``polyak`` …).
        refresh: shortest interval (seconds) between two redraws by the drainer thread.
        drainer: start the drainer thread (False: call :meth:`flush` yourself).
        height: height in pixels of each curve figure (the traces figure is taller).

    The controls (``lab.controls``; they act on the K-FAC runs — all of them, or the one picked
    in ``controls["target"]`` when there are several): ``damping`` (log slider) and
    ``damping_text`` (typed; a bad value is reported in ``controls["message"]`` and nothing
    changes), ``adapt_damping``, ``approx``, ``momentum``, ``lr_mode`` (adaptive α from the
    exact-F quadratic model, or fixed) with ``lr``; buttons ``start``, ``pause`` (pause /
    resume) and ``stop``; ``status`` (HTML).

    Figures (``lab.figures``; ``lab.figure`` is the first): ``"iterations"`` (error against
    iterations), ``"seconds"`` (against training seconds) and ``"traces"`` (λ, γ, α, μ, ρ and
    the batch size, the rows some run logged), with a marker wherever a control changed — all
    built by :mod:`kfac_lab.lab.figures` with :mod:`kfac_lab.viz`.
    """

    def __init__(self, problem="mnist-small", optimizers: Iterable = ("kfac",), store=None, *, seed: int = 0,
                 steps: int | None = None, seconds: float | None = None, batch_size: int | None = None,
                 eval_every: int = 10, checkpoint_every: int | None = 100, session_options: dict | None = None,
                 refresh: float = 0.2, drainer: bool = True, height: int = 300):
        import ipywidgets as w
        import plotly.graph_objects as go

        from ..train import Session, open_store

        if not (isinstance(refresh, (int, float)) and refresh > 0):
            raise ValueError(f"refresh must be a positive number of seconds, got {refresh!r}")
        self.refresh = float(refresh)
        self.steps, self.seconds = steps, seconds
        self._height = int(height)
        self.store = open_store(store)
        entries = _entries(optimizers)
        self.labels = [lab for _, _, lab in entries]
        self.sessions = []
        try:
            for name, options, label in entries:
                self.sessions.append(Session(problem, name, self.store, seed=seed, batch_size=batch_size,
                                             optimizer_options=options, eval_every=eval_every,
                                             checkpoint_every=checkpoint_every,
                                             attrs={"label": label, "ui": "widgets.TrainingLabWidget"},
                                             **(session_options or {})))
        except Exception:
            for s in self.sessions:
                s.stop()
            raise
        self._label_of = {s.run_id: lab for s, lab in zip(self.sessions, self.labels)}
        self._kfac = [s for s in self.sessions if s.optimizer_name == "kfac"]
        #: The (first K-FAC) session: ``lab.session.optimizer.config`` is what the controls set.
        self.session = self._kfac[0] if self._kfac else self.sessions[0]

        # -- the runs (the drainer / flush and the controls share them under the lock)
        self.monitor = RunMonitor()
        for s, label in zip(self.sessions, self.labels):
            self.monitor.track(s, label)
        self._lock = threading.RLock()
        self._dirty = True
        self._last_build = 0.0
        self._closed = threading.Event()
        self._syncing = False
        self._following = threading.local()           # .on: the drainer is moving the λ controls

        # -- controls (their state and checks: LiveControls, as on the Panel page)
        cfg = self.session.optimizer.config if self._kfac else None
        self.live = LiveControls.of(cfg) if cfg is not None else LiveControls()
        reasons = [s.optimizer.curvature.tridiag_unavailable for s in self._kfac]
        self.live.tridiag_unavailable = next((r for r in reasons if r), None)
        no_tridiag = self.live.tridiag_unavailable
        lam, lr0 = self.live.damping, self.live.lr
        no_kfac = not self._kfac
        wide = {"description_width": "initial"}
        self.controls: dict[str, Any] = {
            "start": w.Button(description="start", icon="play", button_style="success", tooltip="train (all runs)"),
            "pause": w.Button(description="pause", icon="pause", tooltip="pause / resume at the next step boundary",
                              disabled=True),
            "stop": w.Button(description="stop", icon="stop", button_style="danger", disabled=True,
                             tooltip="stop at the next step boundary (a checkpoint is written)"),
            "damping": w.FloatLogSlider(value=_slider(lam), base=10, min=math.log10(DAMPING_MIN),
                                        max=math.log10(DAMPING_MAX), step=0.05,
                                        description="λ (damping)", readout_format=".3g", continuous_update=False,
                                        style=wide, disabled=no_kfac, layout=w.Layout(width="380px")),
            "damping_text": w.FloatText(value=lam, description="λ =", disabled=no_kfac,
                                        layout=w.Layout(width="160px"), style={"description_width": "30px"}),
            "message": w.HTML(value=""),
            "adapt_damping": w.Checkbox(value=self.live.adapt_damping, disabled=no_kfac,
                                        description="adaptive λ (Levenberg–Marquardt)", indent=False),
            "approx": w.ToggleButtons(options=list(APPROX.items()), value=self.live.approx,
                                      disabled=no_kfac or bool(no_tridiag), description="inverse",
                                      tooltips=[no_tridiag or "", no_tridiag or ""] if no_tridiag else [],
                                      style={"button_width": "130px"}),
            "approx_note": w.HTML(value=html.escape(no_tridiag or "")),
            "momentum": w.Checkbox(value=self.live.momentum, disabled=no_kfac,
                                   description="momentum (α, μ from the quadratic model)", indent=False),
            "lr_mode": w.ToggleButtons(options=list(LR_MODES.items()), disabled=no_kfac, description="step size",
                                       value=self.live.lr_mode, style={"button_width": "190px"}),
            "lr": w.FloatText(value=lr0, description="α =", disabled=no_kfac or self.live.lr_mode != "fixed",
                              layout=w.Layout(width="150px"), style={"description_width": "30px"}),
            "target": w.Dropdown(options=[("all K-FAC runs", None)]
                                 + [(self._label_of[s.run_id], s.run_id) for s in self._kfac],
                                 index=0, description="controls act on", style=wide,
                                 layout=w.Layout(width="320px", display="" if len(self._kfac) > 1 else "none")),
            "status": w.HTML(value=""),
        }
        c = self.controls
        c["start"].on_click(lambda _b: self._guard(self.start))
        c["pause"].on_click(lambda _b: self._guard(self._toggle_pause))
        c["stop"].on_click(lambda _b: self._guard(lambda: self.stop(wait=False)))
        c["damping"].observe(self._on_damping_slider, names="value")
        c["damping_text"].observe(self._on_damping_text, names="value")
        for name in ("adapt_damping", "approx", "momentum"):
            c[name].observe(lambda ch, name=name: self._control(name, ch["new"]), names="value")
        c["lr_mode"].observe(self._on_lr_mode, names="value")
        c["lr"].observe(self._on_lr, names="value")

        # -- figures (built by viz, copied into FigureWidgets; new arrays go into the tagged traces)
        self.streams = {"iterations": FigureStream(lambda ds, ev: curve_figure(ds, ev, "iterations")),
                        "seconds": FigureStream(lambda ds, ev: curve_figure(ds, ev, "seconds")),
                        "traces": FigureStream(traces_figure)}
        ds, events = self._display()
        self.figures = {k: go.FigureWidget(self._sized(k, st.update(ds, events)[1])) for k, st in self.streams.items()}
        #: error against iterations (``figures["iterations"]``).
        self.figure = self.figures["iterations"]

        title = w.HTML(value=f"<b>{html.escape(self.session.problem.describe())}</b> — runs: "
                             + ", ".join(f"{html.escape(lab)} (<code>{s.run_id}</code>)"
                                         for s, lab in zip(self.sessions, self.labels)))
        kfac_row = [w.HBox([c["damping"], c["damping_text"], c["message"]]),
                    w.HBox([c["adapt_damping"], c["momentum"], c["target"]]),
                    w.HBox([c["approx"]]), c["approx_note"],
                    w.HBox([c["lr_mode"], c["lr"]])]
        half = w.Layout(width="50%")
        self.widget = w.VBox([
            title,
            w.HBox([c["start"], c["pause"], c["stop"], c["status"]]),
            *kfac_row,
            w.HBox([w.Box([self.figures["iterations"]], layout=half), w.Box([self.figures["seconds"]], layout=half)]),
            self.figures["traces"],
        ])
        self._update_status()
        self._thread = None
        #: The last exception of a redraw in the drainer thread (None: fine).
        self.draw_error: BaseException | None = None
        if drainer:
            self._thread = threading.Thread(target=self._drain_loop, name="kfac_lab-widgets-drainer", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ lifecycle
    def start(self, steps: int | None = None, seconds: float | None = None) -> "TrainingLabWidget":
        """Start (or continue) every run that is not running, each in its own thread: ``steps``
        / ``seconds`` more (default: the lab's ``steps``/``seconds``; neither: until stopped)."""
        steps = self.steps if steps is None and seconds is None else steps
        seconds = self.seconds if seconds is None and steps is None else seconds
        for s in self.sessions:
            if s.running:
                s.unpause()  # a paused run continues
            elif s.status != "failed":
                s.start(steps=steps, seconds=seconds)
        self.controls["pause"].description, self.controls["pause"].icon = "pause", "pause"
        self._update_status()
        return self

    def pause(self) -> None:
        """Pause every run at its next step boundary."""
        for s in self.sessions:
            s.pause()
        self.controls["pause"].description, self.controls["pause"].icon = "resume", "play"
        self._update_status()

    def resume(self) -> None:
        """Resume the paused runs."""
        for s in self.sessions:
            s.unpause()
        self.controls["pause"].description, self.controls["pause"].icon = "pause", "pause"
        self._update_status()

    def _toggle_pause(self) -> None:
        if self.controls["pause"].description == "resume":
            self.resume()
        else:
            self.pause()

    def stop(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop every run at its next step boundary (rows flushed, a checkpoint written)."""
        for s in self.sessions:
            s.stop(wait=False)
        if wait:
            for s in self.sessions:
                s.join(timeout)
            self.flush()
        self._update_status()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every run's budget is used up (or it stopped), then :meth:`flush`. True
        when all have ended within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = True
        for s in self.sessions:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ok = s.join(left) and ok
        self.flush()
        return ok

    def close(self) -> None:
        """Stop the runs and the drainer thread, draw the last data and close the widgets
        (the store stays open: ``lab.store.curves(...)`` still works)."""
        if self._closed.is_set():
            return
        self.stop(wait=True)
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self.store.flush()
        self.widget.close()
        for f in self.figures.values():
            f.close()
        for c in self.controls.values():
            c.close()

    def __enter__(self) -> "TrainingLabWidget":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ controls
    def _guard(self, fn) -> None:
        try:
            fn()
            self.controls["message"].value = ""
        except (ValueError, RuntimeError) as exc:
            self._say(str(exc))

    def _say(self, text: str) -> None:
        """A message next to the λ control (empty: clear it)."""
        self.controls["message"].value = f"<span style='color:#b00'>{html.escape(text)}</span>" if text else ""

    def _targets(self) -> list:
        rid = self.controls["target"].value
        return [s for s in self._kfac if rid is None or s.run_id == rid]

    def set(self, **changes) -> None:
        """Change K-FAC settings live on the targeted runs (what the controls do): validated now
        (``ValueError`` naming the problem; nothing changes), applied at each run's next step."""
        targets = self._targets()
        if not targets:
            raise ValueError("no K-FAC run in this lab: the controls set K-FAC's λ, approximation, momentum and α")
        for s in targets:
            if s.status == "failed":
                raise ValueError(f"run {self._label_of[s.run_id]!r} failed; start a new lab")
        with self._lock:
            for s in targets:
                s.set(**changes)
                self.monitor.sent(s, changes)

    def _follow_damping(self) -> None:
        """Move the λ controls to the λ the targeted (first) K-FAC run has reached, while
        adaptive λ is on and no λ set by the user is waiting to be applied."""
        c = self.controls
        targets = self._targets()
        lam = self.monitor.live_damping(targets[0] if targets else None, c["adapt_damping"].value)
        if lam is None or c["damping_text"].value == shown_damping(lam):
            return
        self._following.on = True
        try:
            c["damping_text"].value = shown_damping(lam)
            c["damping"].value = _slider(lam)
        finally:
            self._following.on = False

    def _control(self, name: str, value: Any) -> bool:
        """A control moved: checked by :class:`LiveControls` and sent to the targeted runs, or a
        message next to the λ control and nothing changes."""
        if self._syncing or getattr(self._following, "on", False):
            return False
        try:
            self.live.change(name, value, send=lambda changes: self.set(**changes))
        except (ValueError, RuntimeError) as exc:
            self._say(str(exc))
            return False
        self._say("")
        return True

    def _on_damping_slider(self, change) -> None:
        if self._syncing or getattr(self._following, "on", False):
            return
        lam = shown_damping(change["new"])
        if self._control("damping", lam):
            self._show_damping(lam, slider=False)

    def _on_damping_text(self, change) -> None:
        if self._control("damping", change["new"]):
            self._show_damping(float(change["new"]), text=False)

    def _show_damping(self, lam: float, slider: bool = True, text: bool = True) -> None:
        self._syncing = True
        try:
            if text:
                self.controls["damping_text"].value = lam
            if slider:
                self.controls["damping"].value = _slider(lam)
        finally:
            self._syncing = False

    def _on_lr_mode(self, change) -> None:
        if self._control("lr_mode", change["new"]):
            self.controls["lr"].disabled = change["new"] != "fixed"

    def _on_lr(self, change) -> None:
        self._control("lr", change["new"])

    # ------------------------------------------------------------------ data
    def dataset(self):
        """Everything the lab has received, as ``xarray.Dataset`` over ``(run, step)`` (run = the
        labels; NaN where a run has no value; not decimated) — the input of the viz functions."""
        with self._lock:
            return self.monitor.dataset(with_empty=True, decimate=False,
                                        attrs={"problem": self.session.problem.name})[0]

    @property
    def events(self) -> list[dict]:
        """The events drawn as markers: ``{"step", "kind", "run", …}`` (a control changed …)."""
        with self._lock:
            return [e for r in self.monitor.order for e in self.monitor.buffers[r].events]

    # ------------------------------------------------------------------ drawing
    def _display(self):
        """What the figures show: every run (a line each from the start), decimated."""
        return self.monitor.dataset(with_empty=True, attrs={"problem": self.session.problem.name})

    def _sized(self, key: str, fig):
        h = self._height if key != "traces" else max(self._height, int(fig.layout.height or 0))
        fig.update_layout(height=h, legend=dict(font=dict(size=10)))
        return fig

    def _redraw(self) -> None:
        ds, events = self._display()
        for key, stream in self.streams.items():
            kind, value = stream.update(ds, events)
            if kind == "figure":
                self._replace(key, self._sized(key, value))
                continue
            fw = self.figures[key]
            with fw.batch_update():
                for i, xs, ys, steps in value:
                    tr = fw.data[i]
                    tr.x, tr.y, tr.customdata = xs, ys, steps

    _PROPS = ("name", "legendgroup", "showlegend", "mode", "x", "y", "customdata", "text", "hovertemplate",
              "marker", "line", "xaxis", "yaxis", "meta")

    def _replace(self, key: str, fig) -> None:
        """Copy a figure built by viz into the FigureWidget ``key``, in place: common traces get
        the new values, extra ones are appended (never an empty moment for a reader in another
        thread); then the layout (event lines, the rows of the traces figure, log or linear axes)."""
        fw = self.figures[key]
        new = list(fig.data)
        with fw.batch_update():
            if any(a.type != b.type for a, b in zip(fw.data, new)):
                fw.data = ()
            n = min(len(fw.data), len(new))
            for old, tr in zip(fw.data[:n], new[:n]):
                for prop in self._PROPS:
                    val = tr[prop]
                    if val is not None or old[prop] is not None:
                        old[prop] = val
            if len(fw.data) > len(new):
                fw.data = fw.data[:len(new)]
            elif len(new) > n:
                fw.add_traces(new[n:])
            fw.layout = fig.layout  # uirevision: a reader's zoom survives

    def flush(self) -> bool:
        """Drain the sessions' queues now and redraw if anything arrived (synchronously, in the
        caller's thread — for headless use and tests). Returns True when something was drawn."""
        with self._lock:
            got = self.monitor.poll(self.sessions)
            self._follow_damping()
            if not (got or self._dirty):
                self._update_status()
                return False
            t0 = time.perf_counter()
            self._redraw()
            self._dirty = False
            self._last_build = time.perf_counter() - t0
            self._update_status()
            return True

    def _drain_loop(self) -> None:
        # Redraw at most every `refresh` s, and slower when drawing is slow (≤ ~25 % of a core).
        while not self._closed.wait(max(self.refresh, min(2.0, 3.0 * self._last_build))):
            try:
                self.flush()
                self.draw_error = None
            except Exception as exc:  # noqa: BLE001 - a drawing bug must not kill the drainer
                # never print from this thread: the error goes to the status label (a value)
                self.draw_error = exc
                try:
                    self.controls["status"].value += (f"<br><span style='color:#b00'>redraw failed: "
                                                      f"{html.escape(repr(exc))}</span>")
                except Exception:  # noqa: BLE001
                    pass
                time.sleep(1.0)

    def _update_status(self) -> None:
        parts = []
        for s in self.sessions:
            st = self.monitor.status(s, self.store)
            fail = f" <span style='color:#b00'>{html.escape(st.failure)}</span>" if st.failure else ""
            parts.append(f"<b>{html.escape(st.label)}</b> — {html.escape(st.text)}{fail}")
        running = any(s.running for s in self.sessions)
        c = self.controls
        c["status"].value = "<br>".join(parts)
        c["start"].disabled = all(s.running or s.status == "failed" for s in self.sessions)
        c["pause"].disabled = not running
        c["stop"].disabled = not running

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        runs = ", ".join(f"{lab}: {s.status} @ {s.step}" for s, lab in zip(self.sessions, self.labels))
        return f"TrainingLabWidget({self.session.problem.name!r}, {runs})"


__getattr__ = checks.module_getattr(__name__, deprecated={"TrainingLab": "TrainingLabWidget"}, home="kfac_lab.widgets")
