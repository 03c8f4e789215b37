"""The training labs' figures, and how they follow growing data.

Both front ends draw the same three figures with :mod:`kfac_lab.viz` — a metric against
iterations, against training seconds, and the λ, γ, α, μ, ρ and batch-size traces — and keep
them current with a :class:`FigureStream`: rebuilt by viz when the figure's shape changes (a
run, an event, a trace row, a log axis), otherwise new arrays put into the traces viz tagged
(``meta={"run", "variable", "x"}``) — a few ms instead of a rebuild.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["TRACE_VARIABLES", "FIGURES", "curve_figure", "traces_figure", "trace_rows", "empty_figure",
           "FigureStream"]

#: Rows of the traces figure, those some run has logged: K-FAC's λ, γ, α, μ, ρ (SGD-Nesterov and
#: Adam log μ, their momentum / β₁) and the batch size (the growing schedule, M&G 2015 §13).
TRACE_VARIABLES = ("damping", "gamma", "alpha", "mu", "rho", "batch_size")
#: The three figures: key → (x variable, title). The curves draw the lab's chosen metric.
FIGURES = {"iterations": ("step", "training {metric} against iterations"),
           "seconds": ("wall_time", "training {metric} against seconds"),
           "traces": ("step", "λ, γ, α, μ, ρ and batch size")}
_MARGIN = dict(l=55, r=15, t=50, b=40)


def curve_figure(ds, events: list, key: str = "iterations", metric: str = "error", log_y: bool = True):
    """The curves of ``metric`` (``"error"`` or ``"loss"``) of every run against iterations
    (``key="iterations"``) or training seconds (``"seconds"``), with the event markers."""
    from .. import viz

    x, title = FIGURES[key]
    fig = viz.training_curves(ds, x=x, y=metric, log_y=log_y, events=events, title=title.format(metric=metric))
    fig.update_layout(margin=_MARGIN, uirevision="kfac_lab")
    return fig


def trace_rows(ds) -> list[str]:
    """The rows of the traces figure: the :data:`TRACE_VARIABLES` some run has a value of
    (the batch size alone before any)."""
    rows = [v for v in TRACE_VARIABLES if v in ds.data_vars and np.isfinite(ds[v].values).any()]
    return rows or ["batch_size"]


def traces_figure(ds, events: list, row_height: int = 115):
    """One row per :func:`trace_rows` variable, one line per run, event lines on every row."""
    from .. import viz

    rows = trace_rows(ds)
    fig = viz.traces(ds, variables=rows, events=events)
    fig.update_layout(height=row_height * len(rows) + 80, margin=dict(_MARGIN, l=60),
                      title=dict(text=FIGURES["traces"][1]), uirevision="kfac_lab")
    return fig


def empty_figure(key: str, running: bool, metric: str = "error"):
    """The placeholder before a run has points: "press Start", or "waiting for the first step…"."""
    import plotly.graph_objects as go

    text = "waiting for the first step…" if running else "press Start"
    fig = go.Figure()
    fig.update_layout(title=dict(text=FIGURES[key][1].format(metric=metric)), margin=_MARGIN,
                      annotations=[dict(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                                        font=dict(size=16, color="#888"))])
    return fig


def _shape(ds, events: list) -> tuple:
    """What a patch cannot follow: the runs, the events, per variable which runs have a value,
    and for λ and γ whether all values are positive (viz puts them on a log axis then)."""
    from ..viz.curves import LOG_VARIABLES

    per_var = []
    for v in sorted(ds.data_vars):
        vals = np.asarray(ds[v].values, dtype=np.float64)
        finite = np.isfinite(vals)
        per_var.append((v, tuple(finite.any(axis=-1)), v in LOG_VARIABLES and bool(np.all(vals[finite] > 0))))
    return tuple(str(r) for r in ds["run"].values), len(events), tuple(per_var)


class FigureStream:
    """A figure that follows growing data.

    ``build(ds, events)`` makes the figure with :mod:`kfac_lab.viz`. :meth:`update` rebuilds it
    when its shape (runs, events, which variables have values, λ/γ positivity) or the caller's
    ``options`` (the metric, the axis scale) changed since the last build, and otherwise returns
    the new ``(x, y, steps)`` of each tagged line trace — what a front end writes into its figure.
    """

    def __init__(self, build: Callable[[Any, list], Any]):
        self.build = build
        self.key = None
        self.base: dict | None = None          # the last build, as plotly JSON
        self.slots: list[tuple[int, str, str, str]] = []

    def reset(self) -> None:
        self.key = self.base = None
        self.slots = []

    def update(self, ds, events: list, options: tuple = ()):
        """``("figure", fig)`` after a rebuild, or ``("arrays", [(trace index, x, y, steps), …])``."""
        key = (_shape(ds, events), options)
        if self.base is None or key != self.key:
            fig = self.build(ds, events)
            self.base, self.key = fig.to_plotly_json(), key
            self.slots = [(i, str(m["run"]), str(m["variable"]), str(m["x"]))
                          for i, tr in enumerate(self.base["data"])
                          if isinstance(m := tr.get("meta"), dict) and {"run", "variable", "x"} <= set(m)]
            return "figure", fig
        return "arrays", self.arrays(ds)

    def arrays(self, ds) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """The new arrays of every tagged trace of the last build (runs or variables ``ds`` lacks: skipped)."""
        from ..viz import curve_points

        runs = {str(r): i for i, r in enumerate(ds["run"].values)}
        out = []
        for i, run, var, x in self.slots:
            r = runs.get(run)
            if r is None or var not in ds.data_vars or (x != "step" and x not in ds.data_vars):
                continue
            out.append((i, *curve_points(ds.isel(run=r), x, var)))
        return out

    def figure(self, ds, events: list, options: tuple = ()):
        """The current figure as a new ``go.Figure`` (rebuilt, or the last build with new arrays)."""
        import plotly.graph_objects as go

        kind, value = self.update(ds, events, options)
        if kind == "figure":
            return value
        data = list(self.base["data"])
        for i, xs, ys, steps in value:
            data[i] = {**data[i], "x": xs, "y": ys, "customdata": steps}
        return go.Figure(data=data, layout=self.base["layout"], _validate=False)
