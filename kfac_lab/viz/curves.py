"""Line figures (pure: ``xarray.Dataset`` → ``plotly.graph_objects.Figure``).

- :func:`training_curves` — loss/error of one or several runs against iterations or seconds,
  with markers where a control changed (events);
- :func:`traces` — small multiples of the optimizer's controls λ, γ, α, μ, ρ;
- :func:`damping_figure` — Tikhonov vs re-scaled vs momentum against γ (``damping_study``);
- :func:`invariance_figure` — twin-network distance over training (``invariance_study``).

Training datasets have a dim ``step`` and optionally ``run`` (as ``Store.curves()`` returns);
variables as logged: ``loss``, ``error``, ``damping`` (λ), ``gamma``, ``alpha``, ``mu``, ``rho``,
``wall_time``, …; NaN where a run has no value (those points are left out of its line).

Every line trace of a run is tagged ``meta={"run", "variable", "x"}`` (``x``: ``"step"`` or
``"wall_time"``), so a live view can find it and put new arrays into it
(:class:`kfac_lab.lab.figures.FigureStream`) without reading its text.
"""
from __future__ import annotations

import json
from typing import Iterable, Sequence

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.colors import qualitative
from plotly.subplots import make_subplots

__all__ = ["training_curves", "traces", "damping_figure", "invariance_figure", "normalize_events", "curve_points",
           "TRACE_VARIABLES"]

PALETTE = qualitative.Plotly
TRACE_VARIABLES = ("damping", "gamma", "alpha", "mu", "rho")
ALIASES = {"lambda": "damping", "λ": "damping", "γ": "gamma", "α": "alpha", "μ": "mu", "ρ": "rho"}
SYMBOLS = {"damping": "λ (damping)", "gamma": "γ", "alpha": "α", "mu": "μ", "rho": "ρ", "loss": "loss",
           "error": "error", "wall_time": "wall time (s)", "step": "iteration"}
LOG_VARIABLES = {"damping", "gamma"}
EVENT_COLORS = {"configure": "#E45756", "rejected": "#B279A2", "start": "#54A24B", "pause": "#9D755D",
                "resume": "#72B7B2", "stop": "#79706E"}


def _runs(ds: xr.Dataset) -> list[tuple[str, xr.Dataset]]:
    if "step" not in ds.dims:
        raise ValueError(f"a training dataset needs a dim 'step'; this one has dims {dict(ds.sizes)}")
    if "run" in ds.dims:
        return [(str(r), ds.isel(run=i)) for i, r in enumerate(ds["run"].values)]
    name = str(ds.attrs.get("run_id", ds.attrs.get("name", "run")))
    return [(name, ds)]


def curve_points(run: xr.Dataset, x: str, var: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, y, steps)`` of one run's curve of ``var`` against ``x``: the points where both are
    finite (what a line trace of :func:`training_curves` or :func:`traces` holds)."""
    steps = np.asarray(run["step"].values)
    xs = steps.astype(np.float64) if x == "step" else np.asarray(run[x].values, dtype=np.float64)
    ys = np.asarray(run[var].values, dtype=np.float64)
    keep = np.isfinite(xs) & np.isfinite(ys)
    return xs[keep], ys[keep], steps[keep]


def normalize_events(ds: xr.Dataset | None, events: Iterable[dict] | None) -> list[dict]:
    """Events as dicts ``{"step", "kind", "run"?, …details}``: the given list, or — when ``events``
    is None — the dataset's ``event_step``/``event_kind``/``event_details`` variables (a run loaded
    from a store), or its ``events`` attr (JSON list). Sorted by step."""
    out: list[dict] = []
    if events is not None:
        for e in events:
            if not isinstance(e, dict) or "step" not in e:
                raise ValueError(f"an event must be a dict with at least a 'step' (and a 'kind'), got {e!r}")
            out.append(dict(e))
    elif ds is not None and "event_step" in ds.variables:
        kinds = ds["event_kind"].values if "event_kind" in ds.variables else [""] * ds["event_step"].size
        details = ds["event_details"].values if "event_details" in ds.variables else ["{}"] * ds["event_step"].size
        for s, k, d in zip(np.ravel(ds["event_step"].values), np.ravel(kinds), np.ravel(details)):
            try:
                extra = json.loads(d) if isinstance(d, str) and d else {}
            except json.JSONDecodeError:
                extra = {"details": d}
            out.append({"step": int(s), "kind": str(k), **(extra if isinstance(extra, dict) else {"details": extra})})
    elif ds is not None and isinstance(ds.attrs.get("events"), str):
        try:
            out = [dict(e) for e in json.loads(ds.attrs["events"])]
        except (json.JSONDecodeError, TypeError, ValueError):
            out = []
    return sorted(out, key=lambda e: e["step"])


def _event_text(e: dict) -> str:
    details = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("step", "kind", "run"))
    run = f" [{e['run']}]" if "run" in e else ""
    return f"step {e['step']}{run}: {e.get('kind', 'event')}" + (f"<br>{details}" if details else "")


def _add_events(fig: go.Figure, ds: xr.Dataset, runs, events: list[dict], x: str, var: str | None,
                row: int | None = None, col: int | None = None, marker: bool = True) -> None:
    """Vertical dotted lines at the events and (``marker``) a marker on the run's ``var`` curve."""
    if not events:
        return
    by_name = dict(runs)
    px, py, texts, colors = [], [], [], []
    for e in events:
        run = by_name.get(str(e.get("run")), runs[0][1])
        steps = np.asarray(run["step"].values)
        pos = int(np.searchsorted(steps, e["step"], side="right")) - 1  # the last logged step <= event
        if x == "step":
            xv = float(e["step"])
        else:
            vals = np.asarray(run[x].values, dtype=np.float64)
            ok = np.flatnonzero(np.isfinite(vals[: pos + 1])) if pos >= 0 else []
            if len(ok) == 0:
                continue
            xv = float(vals[ok[-1]])
        color = EVENT_COLORS.get(str(e.get("kind")), "#E45756")
        kw = {} if row is None else dict(row=row, col=col)
        fig.add_vline(x=xv, line=dict(color=color, width=1, dash="dot"), **kw)
        if marker and var is not None and var in run:
            ys = np.asarray(run[var].values, dtype=np.float64)
            ok = np.flatnonzero(np.isfinite(ys[: pos + 1])) if pos >= 0 else []
            if len(ok):
                px.append(xv)
                py.append(float(ys[ok[-1]]))
                texts.append(_event_text(e))
                colors.append(color)
    if px:
        tr = go.Scatter(x=px, y=py, mode="markers", name="events", marker=dict(symbol="diamond", size=10, color=colors,
                                                                           line=dict(width=1, color="black")),
                        text=texts, hovertemplate="%{text}<extra>event</extra>")
        if row is None:
            fig.add_trace(tr)
        else:
            fig.add_trace(tr, row=row, col=col)


def training_curves(ds: xr.Dataset, x: str = "step", log_y: bool = True, events: Sequence[dict] | None = None,
                    y: str | Sequence[str] | None = None, title: str | None = None) -> go.Figure:
    """Training curves of one or several runs (dims ``step`` and optionally ``run``).

    ``x``: ``"step"`` (iterations) or ``"wall_time"`` (seconds; a variable of the dataset).
    ``y``: the variable(s) to draw (default ``"loss"``, else ``"error"``, else the first numeric
    variable). ``log_y``: logarithmic y axis. ``events``: dicts ``{step, kind, run?, …}`` (a
    control changed, a step was rejected, …) drawn as dotted vertical lines with a marker on the
    curve carrying the details in its hover text; default: the events stored in the dataset."""
    runs = _runs(ds)
    if x not in ("step", "wall_time"):
        raise ValueError(f"x={x!r}: choose 'step' or 'wall_time'")
    if x == "wall_time" and "wall_time" not in ds.variables:
        raise ValueError("x='wall_time' needs a 'wall_time' variable in the dataset (seconds since the start)")
    if y is None:
        numeric = [v for v in ds.data_vars if "step" in ds[v].dims and np.issubdtype(ds[v].dtype, np.number)
                   and v != "wall_time"]
        y = ["loss"] if "loss" in ds.data_vars else ["error"] if "error" in ds.data_vars else numeric[:1]
        if not y:
            raise ValueError(f"no numeric variable over 'step' to draw; variables: {sorted(ds.data_vars)}")
    ys = [y] if isinstance(y, str) else list(y)
    ys = [ALIASES.get(v, v) for v in ys]
    missing = [v for v in ys if v not in ds.data_vars]
    if missing:
        raise ValueError(f"variables {missing} are not in the dataset; it has {sorted(ds.data_vars)}")
    fig = go.Figure()
    dashes = ["solid", "dash", "dot", "dashdot"]
    for r, (name, run) in enumerate(runs):
        for k, var in enumerate(ys):
            xs, vals, steps = curve_points(run, x, var)
            label = name if len(ys) == 1 else f"{name} · {var}"
            fig.add_trace(go.Scatter(
                x=xs, y=vals, mode="lines", name=label, legendgroup=name,
                line=dict(color=PALETTE[r % len(PALETTE)], dash=dashes[k % len(dashes)]),
                customdata=steps, meta={"run": name, "variable": var, "x": x},
                hovertemplate=f"{label}<br>step %{{customdata}}<br>{var}: %{{y:.5g}}<extra></extra>"))
    evs = normalize_events(ds, events)
    _add_events(fig, ds, runs, evs, x, ys[0])
    fig.update_xaxes(title_text=SYMBOLS.get(x, x))
    fig.update_yaxes(title_text=", ".join(SYMBOLS.get(v, v) for v in ys), type="log" if log_y else "linear")
    fig.update_layout(title=dict(text=title or f"{', '.join(ys)} against {'iterations' if x == 'step' else 'seconds'}"),
                      hovermode="closest")
    return fig


def traces(ds: xr.Dataset, variables: Sequence[str] = TRACE_VARIABLES, x: str = "step",
           events: Sequence[dict] | None = None) -> go.Figure:
    """Small multiples of K-FAC's controls over training: λ, γ (log scale), α, μ, ρ (linear), one
    row each (variables the dataset lacks are skipped), one colour per run, shared x axis; event
    lines on every row."""
    runs = _runs(ds)
    present = [ALIASES.get(v, v) for v in variables if ALIASES.get(v, v) in ds.data_vars]
    if not present:
        raise ValueError(f"none of {list(variables)} is in the dataset; it has {sorted(ds.data_vars)}")
    if x == "wall_time" and "wall_time" not in ds.variables:
        raise ValueError("x='wall_time' needs a 'wall_time' variable in the dataset")
    fig = make_subplots(rows=len(present), cols=1, shared_xaxes=True, vertical_spacing=0.25 / len(present),
                        subplot_titles=[SYMBOLS.get(v, v) for v in present])
    evs = normalize_events(ds, events)
    for i, var in enumerate(present, start=1):
        for r, (name, run) in enumerate(runs):
            xs, vals, steps = curve_points(run, x, var)
            fig.add_trace(go.Scatter(x=xs, y=vals, mode="lines", name=name, legendgroup=name, showlegend=(i == 1),
                                     line=dict(color=PALETTE[r % len(PALETTE)]), customdata=steps,
                                     meta={"run": name, "variable": var, "x": x},
                                     hovertemplate=f"{name}<br>step %{{customdata}}<br>{var}: %{{y:.5g}}<extra></extra>"),
                          row=i, col=1)
        positive = all(np.all(np.asarray(run[var].values, dtype=np.float64)[
            np.isfinite(np.asarray(run[var].values, dtype=np.float64))] > 0) for _, run in runs)
        fig.update_yaxes(title_text=SYMBOLS.get(var, var), type="log" if var in LOG_VARIABLES and positive else "linear",
                         row=i, col=1)
        _add_events(fig, ds, runs, evs, x, None, row=i, col=1, marker=False)
    fig.update_xaxes(title_text=SYMBOLS.get(x, x), row=len(present), col=1)
    fig.update_layout(height=max(300, 170 * len(present)), title=dict(text="K-FAC controls over training"))
    return fig


def damping_figure(ds: xr.Dataset, relative: bool = True, floor: float = -0.25) -> go.Figure:
    """``damping_study``: the quadratic-model decrease achieved by factored Tikhonov alone, with
    exact-F re-scaling, and with momentum, against γ (log x), with the ideal (exact damped Newton
    step) as a reference line and each method's best γ marked.

    ``relative=True`` plots ``(M(δ) − M(0)) / (M(δ*) − M(0))`` — the fraction of the optimal
    decrease (1 = ideal; ≤ 0 = no progress). The y axis starts at ``floor``: points below it
    (a Tikhonov step that *increases* M many times over) are drawn on the axis as ▼ with their
    value in the hover text, and a note on the figure says how many there are and the lowest.
    ``False`` plots ``M(δ) − M(0)`` itself (negative is progress; nothing is cut)."""
    kinds = [("tikhonov", "Tikhonov damping alone (α = 1)", "#4C78A8"),
             ("rescaled", "+ re-scaling by the exact F (α*)", "#F58518"),
             ("momentum", "+ momentum (α, μ)", "#54A24B")]
    need = [f"reduction_{k}" for k, _, _ in kinds] + ["reduction_ideal"]
    missing = [n for n in need if n not in ds.data_vars]
    if missing:
        raise ValueError(f"damping_figure needs {missing} (a damping_study dataset); it has {sorted(ds.data_vars)}")
    if "damping" in ds.dims:
        raise ValueError(f"this damping_study has {ds.sizes['damping']} values of λ: pick one, "
                         "e.g. damping_figure(ds.sel(damping=λ)) or ds.isel(damping=0)")
    g = np.asarray(ds["gamma"].values, dtype=np.float64)
    ideal = float(ds["reduction_ideal"])
    fig = go.Figure()
    cut = []
    for k, label, color in kinds:
        v = np.asarray(ds[f"reduction_{k}"].values, dtype=np.float64)
        yv = v / ideal if relative else v
        below = relative & (yv < floor)
        fig.add_trace(go.Scatter(x=g, y=np.where(below, floor, yv), mode="lines+markers", name=label,
                                 line=dict(color=color), customdata=yv,
                                 marker=dict(symbol=np.where(below, "triangle-down", "circle").tolist(),
                                             size=np.where(below, 11, 6).tolist()),
                                 hovertemplate="γ = %{x:.3g}<br>%{customdata:.4g}<extra>" + k + "</extra>"))
        if below.any():
            cut.append(f"{k}: {int(below.sum())} below {floor:g} (lowest {np.nanmin(yv):.3g})")
        b = int(np.nanargmin(v))
        fig.add_trace(go.Scatter(x=[g[b]], y=[yv[b]], mode="markers", name=f"best γ ({k})", showlegend=False,
                                 marker=dict(symbol="star", size=14, color=color, line=dict(width=1, color="black")),
                                 hovertemplate="best γ = %{x:.3g}<br>%{y:.4g}<extra>" + k + "</extra>"))
    ref = 1.0 if relative else ideal
    fig.add_hline(y=ref, line=dict(color="black", dash="dash"), annotation_text="ideal: −C⁻¹∇h",
                  annotation_position="bottom right")
    fig.update_xaxes(type="log", title_text="γ (factored Tikhonov damping)")
    if relative:
        fig.update_yaxes(title_text="fraction of the optimal decrease of M", range=[floor - 0.05, 1.1])
        if cut:
            fig.add_annotation(x=0, xref="paper", y=floor, yref="y", yanchor="bottom", xanchor="left", showarrow=False,
                               text="▼ = off the axis: " + "; ".join(cut), font=dict(size=11, color="#4C78A8"))
    else:
        fig.update_yaxes(title_text="M(δ) − M(0)  (negative is progress)")
    a = ds.attrs
    lam = float(ds["damping"]) if "damping" in ds.coords else a.get("damping")
    sub = f"λ = {lam:.3g}, η = {a['weight_decay']:.3g}" if lam is not None and "weight_decay" in a else ""
    fig.update_layout(title=dict(text=f"Tikhonov damping alone is not enough (figure 7)<br><sup>{sub}</sup>"))
    return fig


def invariance_figure(ds: xr.Dataset, log_y: bool = True) -> go.Figure:
    """``invariance_study``: relative distance between the twin's and the base network's
    predictions over training, per optimizer (line style) and variant (colour), log y. Exact
    zeros (e.g. at step 0) are not drawn on the log axis; a dotted line marks 1e-6."""
    if "distance" not in ds.data_vars:
        raise ValueError(f"invariance_figure needs a 'distance' variable (an invariance_study dataset); "
                         f"it has {sorted(ds.data_vars)}")
    fig = go.Figure()
    colors = {"logistic": "#4C78A8", "affine": "#F58518"}
    dashes = {"kfac": "solid", "sgd": "dash"}
    names = {"kfac": "K-FAC", "sgd": "SGD"}
    for o in ds["optimizer"].values:
        for v in ds["variant"].values:
            d = ds["distance"].sel(optimizer=o, variant=v)
            fig.add_trace(go.Scatter(
                x=np.asarray(ds["step"].values), y=np.asarray(d.values, dtype=np.float64), mode="lines+markers",
                name=f"{names.get(str(o), o)} · {v} twin",
                line=dict(color=colors.get(str(v)), dash=dashes.get(str(o), "solid")),
                hovertemplate="step %{x}<br>distance %{y:.3g}<extra>" + f"{o} / {v}" + "</extra>"))
    fig.add_hline(y=1e-6, line=dict(color="gray", dash="dot"))
    # (plotly places an hline's own annotation in linear units even on a log axis: add it by hand)
    fig.add_annotation(x=1, xref="paper", y=-6.0 if log_y else 1e-6, text="1e-6", showarrow=False, xanchor="right",
                       yanchor="bottom", font=dict(color="gray"))
    fig.update_xaxes(title_text="iteration")
    fig.update_yaxes(type="log" if log_y else "linear", title_text="‖z_twin − z_base‖ / ‖z_base‖", exponentformat="power")
    fig.update_layout(title=dict(text="Invariance to re-parameterisation: K-FAC vs gradient descent (Corollary 2)"))
    return fig
