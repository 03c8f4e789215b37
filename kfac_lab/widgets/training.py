"""``TrainingLab``: the training lab inside Jupyter (ipywidgets + plotly ``FigureWidget``).

A thin shell over :class:`kfac_lab.train.Session` (training, live controls, logging to the
store) and :mod:`kfac_lab.viz` (every figure), mirroring the Panel training lab.

Threads — the rule of the lab (STACK_NOTES.md, "Notebooks"):

* each session trains in its own background thread and only *hands data over*: one metric dict
  per step on its bounded ``session.updates`` queue (full: the oldest is dropped; training never
  waits for the UI);
* one small *drainer* thread takes everything queued, at most every ``refresh`` seconds (slower
  when drawing takes long, so the UI never eats the training's CPU), rebuilds the figures with
  :mod:`kfac_lab.viz` and copies them into the ``FigureWidget`` s inside ``batch_update()`` —
  it sets widget **values** only (never prints, never uses ``Output`` widgets);
* control callbacks run in the kernel's main thread and only call ``session.set(...)``, which
  validates at once and applies at the next step boundary (a ``"control"`` event at that step,
  drawn as a marker).

Headless (tests, nbclient) nothing is drawn, but every value is there: ``lab.flush()`` drains
synchronously and ``lab.figure.data[0].x`` holds the iterations.
"""
from __future__ import annotations

import html
import math
import queue
import threading
import time
from typing import Any, Iterable

import numpy as np

__all__ = ["TrainingLab", "CURVE_VARIABLES", "TRACE_VARIABLES", "MARKER_KINDS", "MAX_POINTS"]

#: Per-step values the lab keeps (what its figures draw).
CURVE_VARIABLES = ("error", "loss", "wall_time", "damping", "gamma", "alpha", "mu", "rho")
#: The traces figure's rows (those some run logged).
TRACE_VARIABLES = ("damping", "gamma", "alpha", "mu", "rho")
#: Points per curve sent to the front end (longer runs are decimated, evaluation rows kept).
MAX_POINTS = 1500
#: Event kinds drawn as markers: a control changed, a step was rejected, a run failed.
MARKER_KINDS = ("control", "control_rejected", "rejected", "failed", "interrupted")
_APPROX = [("block-diagonal", "blockdiag"), ("block-tridiagonal", "tridiag")]
_LR_MODES = [("adaptive α (exact-F model)", "adaptive"), ("fixed", "fixed")]
_TRACE_HEIGHT = 110


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
        raise ValueError("TrainingLab: give at least one optimizer")
    labels = [lab for _, _, lab in out]
    for i, lab in enumerate(labels):  # unique labels: they name the runs in the figures
        if labels.count(lab) > 1:
            labels[i] = f"{lab} #{labels[:i].count(lab) + 1}"
    return [(n, o, lab) for (n, o, _), lab in zip(out, labels)]


def _finite(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


class TrainingLab:
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
    iterations), ``"seconds"`` (against training seconds) and ``"traces"`` (λ, γ, α, μ, ρ),
    with a marker wherever a control changed — all built by :mod:`kfac_lab.viz`.
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
                                             attrs={"label": label, "ui": "widgets.TrainingLab"},
                                             **(session_options or {})))
        except Exception:
            for s in self.sessions:
                s.stop()
            raise
        self._label_of = {s.run_id: lab for s, lab in zip(self.sessions, self.labels)}
        self._kfac = [s for s in self.sessions if s.optimizer_name == "kfac"]
        #: The (first K-FAC) session: ``lab.session.optimizer.config`` is what the controls set.
        self.session = self._kfac[0] if self._kfac else self.sessions[0]

        # -- data handed over by the training threads (only the drainer / flush touch these)
        self._rows: dict[str, dict[str, list]] = {lab: {"step": [], **{v: [] for v in CURVE_VARIABLES}}
                                                   for lab in self.labels}
        self._events: list[dict] = []
        self._failures: dict[str, str] = {}
        self._lock = threading.RLock()
        self._dirty = True
        self._last_build = 0.0
        self._closed = threading.Event()
        self._syncing = False

        # -- controls
        cfg = self.session.optimizer.config if self._kfac else None
        lam = float(cfg.damping) if cfg else 150.0
        lr0 = float(cfg.lr) if cfg is not None and cfg.lr is not None else 0.1
        no_kfac = not self._kfac
        wide = {"description_width": "initial"}
        self.controls: dict[str, Any] = {
            "start": w.Button(description="start", icon="play", button_style="success", tooltip="train (all runs)"),
            "pause": w.Button(description="pause", icon="pause", tooltip="pause / resume at the next step boundary",
                              disabled=True),
            "stop": w.Button(description="stop", icon="stop", button_style="danger", disabled=True,
                             tooltip="stop at the next step boundary (a checkpoint is written)"),
            "damping": w.FloatLogSlider(value=min(max(lam, 1e-4), 1e4), base=10, min=-4, max=4, step=0.05,
                                        description="λ (damping)", readout_format=".3g", continuous_update=False,
                                        style=wide, disabled=no_kfac, layout=w.Layout(width="380px")),
            "damping_text": w.FloatText(value=lam, description="λ =", disabled=no_kfac,
                                        layout=w.Layout(width="160px"), style={"description_width": "30px"}),
            "message": w.HTML(value=""),
            "adapt_damping": w.Checkbox(value=bool(cfg.adapt_damping) if cfg else True, disabled=no_kfac,
                                        description="adaptive λ (Levenberg–Marquardt)", indent=False),
            "approx": w.ToggleButtons(options=_APPROX, value=cfg.approx if cfg else "blockdiag", disabled=no_kfac,
                                      description="inverse", style={"button_width": "130px"}),
            "momentum": w.Checkbox(value=(cfg.momentum is not False) if cfg else True, disabled=no_kfac,
                                   description="momentum (α, μ from the quadratic model)", indent=False),
            "lr_mode": w.ToggleButtons(options=_LR_MODES, disabled=no_kfac, description="step size",
                                       value="adaptive" if cfg is None or cfg.lr is None else "fixed",
                                       style={"button_width": "190px"}),
            "lr": w.FloatText(value=lr0, description="α =", disabled=no_kfac or cfg is None or cfg.lr is None,
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
        c["adapt_damping"].observe(lambda ch: self._apply(adapt_damping=bool(ch["new"])), names="value")
        c["approx"].observe(lambda ch: self._apply(approx=ch["new"]), names="value")
        c["momentum"].observe(lambda ch: self._apply(momentum=bool(ch["new"])), names="value")
        c["lr_mode"].observe(self._on_lr_mode, names="value")
        c["lr"].observe(self._on_lr, names="value")

        # -- figures (built by viz, copied into FigureWidgets)
        ds = self._display_dataset()
        figs = self._build(ds)
        self.figures = {k: go.FigureWidget(f) for k, f in figs.items()}
        #: error against iterations (``figures["iterations"]``).
        self.figure = self.figures["iterations"]
        present = self._trace_vars(ds)
        self._slot_map = {k: self._slots(k, f, present) for k, f in figs.items()}
        self._key = self._structure_key(ds)

        title = w.HTML(value=f"<b>{html.escape(self.session.problem.describe())}</b> — runs: "
                             + ", ".join(f"{html.escape(lab)} (<code>{s.run_id}</code>)"
                                         for s, lab in zip(self.sessions, self.labels)))
        kfac_row = [w.HBox([c["damping"], c["damping_text"], c["message"]]),
                    w.HBox([c["adapt_damping"], c["momentum"], c["target"]]),
                    w.HBox([c["approx"]]),
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
    def start(self, steps: int | None = None, seconds: float | None = None) -> "TrainingLab":
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

    def __enter__(self) -> "TrainingLab":
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
        for s in targets:
            s.set(**changes)

    def _apply(self, **changes) -> None:
        if self._syncing:
            return
        try:
            self.set(**changes)
        except (ValueError, RuntimeError) as exc:
            self._say(str(exc))
            return
        self._say("")

    def _on_damping_slider(self, change) -> None:
        if self._syncing:
            return
        lam = float(change["new"])
        self._syncing = True
        try:
            self.controls["damping_text"].value = float(f"{lam:.4g}")
        finally:
            self._syncing = False
        self._apply(damping=float(f"{lam:.4g}"))

    def _on_damping_text(self, change) -> None:
        if self._syncing:
            return
        lam = change["new"]
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
            self._say(f"λ must be a positive number (the paper starts at 150); {lam!r} ignored — training goes on "
                      "with the current λ")
            return
        try:
            self.set(damping=float(lam))
        except (ValueError, RuntimeError) as exc:
            self._say(str(exc))
            return
        self._say("")
        self._syncing = True
        try:
            self.controls["damping"].value = min(max(float(lam), 1e-4), 1e4)
        finally:
            self._syncing = False

    def _on_lr_mode(self, change) -> None:
        fixed = change["new"] == "fixed"
        self.controls["lr"].disabled = not fixed
        if fixed:
            self._on_lr({"new": self.controls["lr"].value})
        else:
            self._apply(lr=None)

    def _on_lr(self, change) -> None:
        if self.controls["lr_mode"].value != "fixed" or self._syncing:
            return
        lr = change["new"]
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            self._say(f"α must be a positive number; {lr!r} ignored")
            return
        self._apply(lr=float(lr))

    # ------------------------------------------------------------------ data
    def _take(self) -> bool:
        """Move everything queued by the training threads into the lab's rows; True if any."""
        got = False
        for s in self.sessions:
            label = self._label_of[s.run_id]
            rows = self._rows[label]
            q = s.updates
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                got = True
                for e in item.get("events", ()):
                    if e.get("kind") in MARKER_KINDS:
                        self._events.append({**e, "run": label})
                if "status" in item and "loss" not in item:  # a failure notice, not a step
                    if item["status"] == "failed" and s.error is not None:
                        self._failures[label] = f"{type(s.error).__name__}: {s.error}"
                    continue
                step = int(item["step"])
                if rows["step"] and step <= rows["step"][-1]:
                    continue
                rows["step"].append(step)
                for v in CURVE_VARIABLES:
                    rows[v].append(_finite(item.get(v)))
        return got

    def dataset(self):
        """What the lab has received so far, as ``xarray.Dataset`` over ``(run, step)`` (run =
        the labels; NaN where a run has no value) — the input of the viz functions."""
        import numpy as np
        import xarray as xr

        with self._lock:
            steps = sorted(set().union(*[r["step"] for r in self._rows.values()]))
            pos = {s: i for i, s in enumerate(steps)}
            data = {}
            for v in CURVE_VARIABLES:
                block = np.full((len(self.labels), len(steps)), np.nan)
                for i, lab in enumerate(self.labels):
                    r = self._rows[lab]
                    if r["step"]:
                        block[i, [pos[s] for s in r["step"]]] = r[v]
                data[v] = (("run", "step"), block)
            coords = {"run": ("run", list(self.labels)), "step": ("step", np.asarray(steps, dtype=np.int64))}
            return xr.Dataset(data, coords=coords, attrs={"problem": self.session.problem.name})

    @property
    def events(self) -> list[dict]:
        """The events drawn as markers: ``{"step", "kind", "run", …}`` (a control changed …)."""
        with self._lock:
            return list(self._events)

    # ------------------------------------------------------------------ drawing
    def _display_dataset(self):
        """:meth:`dataset`, each run decimated to about ``MAX_POINTS`` rows (every evaluation
        row kept while they fit, the last row always) — what is sent to the front end."""
        ds = self.dataset()
        n = ds.sizes["step"]
        if n <= MAX_POINTS:
            return ds
        keep = np.zeros(n, dtype=bool)
        for i in range(ds.sizes["run"]):
            has = np.flatnonzero(np.isfinite(ds["loss"].values[i]))
            eva = np.flatnonzero(np.isfinite(ds["error"].values[i]))
            for idx in (has, eva):
                if len(idx) > MAX_POINTS:
                    idx = idx[np.linspace(0, len(idx) - 1, MAX_POINTS).astype(np.int64)]
                keep[idx] = True
            if len(has):
                keep[has[-1]] = True
        return ds.isel(step=np.flatnonzero(keep))

    def _trace_vars(self, ds=None) -> list[str]:
        """Rows of the traces figure, fixed for the lab's life (so its axes never move): λ, γ, α,
        μ, ρ with a K-FAC run; μ alone for SGD-Nesterov / Adam (their momentum / β₁)."""
        return list(TRACE_VARIABLES) if self._kfac else ["mu"]

    def _build(self, ds=None) -> dict:
        """The three figures, built by :mod:`kfac_lab.viz` from the (decimated) data."""
        from .. import viz

        ds = self._display_dataset() if ds is None else ds
        evs = self.events
        figs = {
            "iterations": viz.training_curves(ds, x="step", y="error", log_y=True, events=evs,
                                              title="training error against iterations"),
            "seconds": viz.training_curves(ds, x="wall_time", y="error", log_y=True, events=evs,
                                           title="training error against seconds"),
        }
        present = self._trace_vars(ds)
        figs["traces"] = viz.traces(ds, variables=present, x="step", events=evs)
        for k, f in figs.items():
            h = self._height if k != "traces" else max(self._height, 60 + _TRACE_HEIGHT * len(present))
            f.update_layout(height=h, margin=dict(l=55, r=20, t=50, b=40), uirevision="kfac_lab",
                            legend=dict(font=dict(size=10)))
        return figs

    def _slots(self, key: str, fig, present: list[str]) -> list[tuple[int, str, str, str]] | None:
        """``(trace index, run, variable, x)`` of each curve trace of a figure built by viz, so
        new data can go straight into its arrays; None when a curve cannot be placed."""
        runs = set(self.labels)
        out = []
        for i, t in enumerate(fig.data):
            if t.name == "events" or t.mode != "lines":
                continue
            run = t.legendgroup
            if run not in runs:
                return None
            if key == "traces":
                axis = t.yaxis or "y"
                row = int(axis[1:] or 1) - 1
                if row >= len(present):
                    return None
                out.append((i, run, present[row], "step"))
            else:
                out.append((i, run, "error", "step" if key == "iterations" else "wall_time"))
        return out

    def _structure_key(self, ds) -> tuple:
        with_data = tuple(lab for lab in self.labels if len(self._rows[lab]["step"]))
        return (with_data, len(self._events),
                tuple(bool(np.isfinite(ds["error"].values[i]).any()) for i in range(ds.sizes["run"])))

    def _redraw(self) -> None:
        ds = self._display_dataset()
        key = self._structure_key(ds)
        if key != self._key or any(v is None for v in self._slot_map.values()):
            # structure changed (a run's first rows, a new event, a trace row): rebuild with viz
            figs = self._build(ds)
            present = self._trace_vars(ds)
            for k, f in figs.items():
                self._replace(k, f)
                self._slot_map[k] = self._slots(k, f, present)
            self._key = key
            return
        steps = ds["step"].values
        pos = {lab: i for i, lab in enumerate(ds["run"].values)}
        for k, slots in self._slot_map.items():
            fw = self.figures[k]
            with fw.batch_update():
                for i, run, var, x in slots:
                    r = pos[run]
                    ys = ds[var].values[r]
                    xs = steps.astype(np.float64) if x == "step" else ds[x].values[r]
                    ok = np.isfinite(xs) & np.isfinite(ys)
                    tr = fw.data[i]
                    tr.x, tr.y, tr.customdata = xs[ok], ys[ok], steps[ok]
                if k == "traces":  # λ and γ switch to a log axis once positive (viz's rule)
                    for row, var in enumerate(self._trace_vars(ds), start=1):
                        v = ds[var].values
                        positive = bool(np.all(v[np.isfinite(v)] > 0))
                        want = "log" if var in ("damping", "gamma") and positive else "linear"
                        name = "yaxis" if row == 1 else f"yaxis{row}"
                        if fw.layout[name].type != want:
                            fw.layout[name].type = want

    _PROPS = ("name", "legendgroup", "showlegend", "mode", "x", "y", "customdata", "text", "hovertemplate",
              "marker", "line", "xaxis", "yaxis")

    def _replace(self, key: str, fig) -> None:
        """Copy a figure built by viz into the FigureWidget ``key``, in place: common traces get
        the new values, extra ones are appended (never an empty moment for a reader in another
        thread); the event lines; the y-axis types."""
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
            fw.layout.shapes = fig.layout.shapes
            # the axes are the same (fixed rows); only λ/γ may switch between linear and log
            for name in [k for k in fig.layout if k.startswith("yaxis")]:
                if fw.layout[name].type != fig.layout[name].type:
                    fw.layout[name].type = fig.layout[name].type

    def flush(self) -> bool:
        """Drain the sessions' queues now and redraw if anything arrived (synchronously, in the
        caller's thread — for headless use and tests). Returns True when something was drawn."""
        with self._lock:
            got = self._take()
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
        for s, lab in zip(self.sessions, self.labels):
            m = s.last_metrics or {}
            err = s.summary().get("error")
            bits = [f"<b>{html.escape(lab)}</b>: {s.status}", f"step {s.step}", f"{s.wall_time:.1f} s"]
            if err is not None:
                bits.append(f"error {err:.4g}")
            if s.optimizer_name == "kfac" and m.get("damping") is not None:
                bits.append(f"λ {m['damping']:.3g}")
            if lab in self._failures:
                bits.append(f"<span style='color:#b00'>{html.escape(self._failures[lab])}</span>")
            parts.append(", ".join(bits))
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
        return f"TrainingLab({self.session.problem.name!r}, {runs})"

