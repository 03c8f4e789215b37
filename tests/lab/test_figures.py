"""lab.figures: viz tags every line; a FigureStream's patch equals a rebuild on the same data,
and a change of shape (a new event, a new trace row) rebuilds."""
from __future__ import annotations

import math

import numpy as np

from kfac_lab.lab.figures import FigureStream, curve_figure, trace_rows, traces_figure
from kfac_lab.lab.runs import RunBuffer, runs_dataset


def buffers(n, seed=0):
    rng = np.random.default_rng(seed)
    a, b = RunBuffer("a", "K-FAC", "kfac"), RunBuffer("b", "SGD", "sgd")
    for k in range(1, n + 1):
        a.add({"step": k, "loss": rng.uniform(1, 2), "error": rng.uniform() if k % 5 == 0 else math.nan,
               "wall_time": 0.1 * k, "damping": 150.0 * 0.9 ** k, "gamma": 1.0, "alpha": 0.5, "mu": 0.1,
               "rho": 0.7, "batch_size": 100})
        b.add({"step": k, "loss": rng.uniform(1, 2), "error": rng.uniform() if k % 5 == 0 else math.nan,
               "wall_time": 0.05 * k, "mu": 0.9, "batch_size": 100})
    return [a, b]


def arrays(fig):
    return [(t.meta["run"], t.meta["variable"], list(t.x), list(t.y)) for t in fig.data if t.meta]


def test_viz_tags_every_line_with_its_run_variable_and_x():
    ds = runs_dataset(buffers(20))
    fig = curve_figure(ds, [], "seconds", metric="loss")
    assert [(t.meta["run"], t.meta["variable"], t.meta["x"]) for t in fig.data] == [
        ("K-FAC", "loss", "wall_time"), ("SGD", "loss", "wall_time")]
    tr = traces_figure(ds, [])
    assert trace_rows(ds) == ["damping", "gamma", "alpha", "mu", "rho", "batch_size"]
    assert {(t.meta["run"], t.meta["variable"]) for t in tr.data} >= {("SGD", "mu"), ("K-FAC", "damping")}


def test_a_patch_equals_a_rebuild_and_a_new_shape_rebuilds():
    bufs = buffers(30)
    stream = FigureStream(traces_figure)
    kind, _ = stream.update(runs_dataset(bufs), [])
    assert kind == "figure"
    more = buffers(60)                                   # the same runs, more rows
    ds = runs_dataset(more)
    patched = stream.figure(ds, [])
    assert stream.update(ds, [])[0] == "arrays"
    assert arrays(patched) == arrays(traces_figure(ds, []))
    events = [{"step": 40, "kind": "control", "run": "K-FAC", "damping": 3.0}]
    assert stream.update(ds, events)[0] == "figure"      # a marker: rebuilt with viz
    assert stream.update(ds, events, options=("loss",))[0] == "figure"  # a view option changed


def test_a_stream_rebuilds_when_a_run_gets_its_first_values():
    a = RunBuffer("a", "K-FAC", "kfac")
    stream = FigureStream(lambda ds, ev: curve_figure(ds, ev, "iterations"))
    assert stream.update(runs_dataset([a]), [])[0] == "figure"
    a.add({"step": 1, "loss": 1.0, "error": 0.5, "wall_time": 0.1})
    assert stream.update(runs_dataset([a]), [])[0] == "figure"
    a.add({"step": 2, "loss": 1.0, "error": 0.4, "wall_time": 0.2})
    kind, value = stream.update(runs_dataset([a]), [])
    assert kind == "arrays" and [list(x) for _, x, _, _ in value] == [[1.0, 2.0]]


def test_lambda_turning_non_positive_rebuilds_but_a_negative_rho_does_not():
    a = RunBuffer("a", "K-FAC", "kfac")
    for k in (1, 2):
        a.add({"step": k, "loss": 1.0, "damping": 1.0, "rho": 0.5, "batch_size": 10})
    stream = FigureStream(traces_figure)
    stream.update(runs_dataset([a]), [])
    a.add({"step": 3, "loss": 1.0, "damping": 1.0, "rho": -0.5, "batch_size": 10})   # ρ < 0: same axes
    assert stream.update(runs_dataset([a]), [])[0] == "arrays"
    a.add({"step": 4, "loss": 1.0, "damping": 0.0, "rho": 0.5, "batch_size": 10})    # λ = 0: no log axis
    kind, fig = stream.update(runs_dataset([a]), [])
    assert kind == "figure" and fig.layout.yaxis.type == "linear"
