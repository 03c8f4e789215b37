"""lab.runs: buffers, marker events, decimation, the (run, step) dataset (against brute force)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kfac_lab.lab.runs import MARKER_KINDS, MAX_POINTS, METRICS, RunBuffer, keep_indices, runs_dataset, stored_buffer


def test_buffer_keeps_steps_in_order_and_only_marker_events():
    b = RunBuffer("r", "run", "kfac")
    assert b.add({"step": 1, "loss": 2.0, "events": [{"step": 1, "kind": "control", "damping": 3.0},
                                                      {"step": 1, "kind": "configure", "damping": 3.0}]})
    assert not b.add({"step": 1, "loss": 9.0})                       # a step already received
    assert not b.add({"step": 2, "status": "finished", "events": [{"step": 2, "kind": "finished"}]})
    assert b.add({"step": 3, "loss": 1.0, "error": True})            # a bool is not a metric value
    assert b.columns["step"] == [1.0, 3.0] and b.columns["loss"] == [2.0, 1.0]
    assert math.isnan(b.columns["error"][1])
    assert [e["kind"] for e in b.events] == ["control"] and b.events[0]["run"] == "run"
    assert "configure" not in MARKER_KINDS and "finished" not in MARKER_KINDS


@pytest.mark.parametrize("n,limit", [(5, 10), (10, 10), (11, 10), (1000, 37), (20000, MAX_POINTS)])
def test_keep_indices_against_the_rule(n, limit):
    every7 = np.arange(n) % 7 == 0
    idx = keep_indices(n, [every7], limit=limit)
    assert np.all(np.diff(idx) > 0) and idx[0] == 0 and idx[-1] == n - 1
    if n <= limit:
        assert list(idx) == list(range(n))
        return
    assert len(idx) <= 2 * limit
    # brute force: the stride through all rows, and through the masked rows, are both in
    want = set(np.linspace(0, n - 1, limit).astype(np.int64))
    rows = np.flatnonzero(every7)
    if len(rows) > limit:
        rows = rows[np.linspace(0, len(rows) - 1, limit).astype(np.int64)]
    want |= set(rows)
    assert set(idx) == want


def test_dataset_decimates_but_keeps_evaluations():
    b = RunBuffer("r", "run", "kfac")
    for k in range(1, 20001):
        b.add({"step": k, "loss": 1.0 / k, "error": (1.0 / k if k % 10 == 0 else math.nan), "wall_time": k * 0.01})
    ds = runs_dataset([b])
    assert ds.sizes["step"] <= 2 * MAX_POINTS + 1
    assert int(ds["step"].values[-1]) == 20000
    assert np.isfinite(ds["error"].values).sum() >= MAX_POINTS - 1
    full = runs_dataset([b], decimate=False)
    assert full.sizes["step"] == 20000
    kept = ds["step"].values
    np.testing.assert_array_equal(ds["loss"].values[0], full["loss"].sel(step=kept).values[0])


def test_dataset_aligns_runs_on_the_union_of_steps():
    a, b = RunBuffer("a", "A", "kfac"), RunBuffer("b", "B", "sgd")
    for k in (1, 2, 4):
        a.add({"step": k, "loss": float(k)})
    for k in (2, 3):
        b.add({"step": k, "loss": 10.0 * k, "mu": 0.9})
    ds = runs_dataset([a, b], attrs={"problem": "tiny"})
    assert list(ds["run"].values) == ["A", "B"] and list(ds["step"].values) == [1, 2, 3, 4]
    np.testing.assert_array_equal(ds["loss"].values, [[1, 2, np.nan, 4], [np.nan, 20, 30, np.nan]])
    assert set(ds.data_vars) == set(METRICS[1:]) and ds.attrs["problem"] == "tiny"


def test_stored_buffer_reads_rows_and_marker_events(tmp_path):
    from kfac_lab.store import Store

    with Store(tmp_path / "s.zarr") as st:
        rid = st.new_run(attrs={"optimizer": "kfac"})
        for k in range(1, 6):
            st.log(rid, k, loss=1.0 / k, damping=150.0)
        st.event(rid, 3, "control", damping=3.0)
        st.event(rid, 5, "finished")
        st.flush(rid)
        buf = stored_buffer(st, rid, "stored")
    assert buf.columns["step"] == [1.0, 2.0, 3.0, 4.0, 5.0] and buf.columns["damping"] == [150.0] * 5
    assert all(math.isnan(v) for v in buf.columns["error"])
    assert [(e["step"], e["kind"]) for e in buf.events] == [(3, "control")] and buf.optimizer == "kfac"
