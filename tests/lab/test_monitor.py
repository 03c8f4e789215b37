"""lab.monitor: the hand-over from (fake) sessions, pending controls, the followed λ, status text."""
from __future__ import annotations

import math

import pytest

from kfac_lab.lab.monitor import RunMonitor

from .fakes import FakeSession


def test_poll_moves_updates_into_buffers_and_counts_versions():
    s = FakeSession()
    m = RunMonitor()
    m.track(s, "K-FAC")
    v0, st0 = m.version, m.structure
    assert not m.poll([s])
    s.emit(1, 0.1, loss=2.0, damping=150.0)
    s.emit(2, 0.2, loss=1.5, error=0.5, damping=150.0,
           events=[{"step": 2, "kind": "control", "approx": "tridiag"}, {"step": 2, "kind": "configure"}])
    assert m.poll([s])
    buf = m.buffers[s.run_id]
    assert buf.n == 2 and [e["kind"] for e in buf.events] == ["control"]
    assert m.version == v0 + 1 and m.structure == st0 + 1          # one new marker: one rebuild
    assert m.metric_versions == {"loss": 2, "error": 1}
    ds, events = m.dataset()
    assert list(ds["run"].values) == ["K-FAC"] and list(ds["step"].values) == [1, 2] and len(events) == 1


def test_a_users_damping_stands_until_the_run_applies_it():
    s = FakeSession()
    m = RunMonitor()
    m.track(s, "K-FAC")
    s.emit(1, 0.1, loss=1.0, damping=150.0)
    m.poll([s])
    assert m.live_damping(s) == 150.0 and m.live_damping(s, adapt=False) is None
    m.sent(s, {"damping": 3.0})
    s.emit(2, 0.2, loss=1.0, damping=142.5)                       # a step before the change is applied
    m.poll([s])
    assert m.live_damping(s) is None                               # the user's 3 is still shown
    s.emit(3, 0.3, loss=1.0, damping=3.0, events=[{"step": 3, "kind": "control", "damping": 3.0}])
    m.poll([s])
    assert m.live_damping(s) == 3.0                                # applied: follow the optimizer again
    m.sent(s, {"approx": "tridiag"})
    assert m.take_pending(s.run_id) == {"approx": "tridiag"} and m.take_pending(s.run_id) == {}


def test_status_text_says_what_the_run_is_doing():
    s = FakeSession(approx="tridiag", momentum=False)
    m = RunMonitor()
    m.track(s, "K-FAC · 0001")
    for k in range(1, 11):
        s.emit(k, 0.5 * k, loss=1.0, error=0.25, damping=12.345)
    m.poll([s])
    st = m.status(s)
    assert st.label == "K-FAC · 0001" and st.failure == ""
    assert st.text == "running · step 10 · 2.0 steps/s · 5.0 s · error 0.25 · λ 12.3 · tridiag, momentum off"
    assert st.footnote == f"run {s.run_id} · saved to step 0"
    s.status, s.error = "failed", FloatingPointError("loss is nan")
    assert m.status(s).failure == "FloatingPointError: loss is nan"


def test_status_of_a_baseline_has_no_lambda_nor_approximation():
    s = FakeSession(optimizer_name="sgd")
    s.optimizer.config = None
    m = RunMonitor()
    m.track(s, "SGD")
    assert m.status(s).text == "idle · step 0 · 0.0 steps/s · 0.0 s · error —"


def test_a_run_tracked_again_keeps_its_rows_and_counts_its_rate_afresh():
    s = FakeSession()
    m = RunMonitor()
    m.track(s, "K-FAC")
    s.emit(1, 1.0, loss=1.0)
    m.poll([s])
    m.track(s, "ignored: already watched")
    s.emit(5, 3.0, loss=1.0)
    m.poll([s])
    assert m.buffers[s.run_id].label == "K-FAC" and m.buffers[s.run_id].n == 2
    assert m.rate(s) == pytest.approx(4 / 2.0)
    m.clear()
    assert m.dataset() == (None, []) and not math.isnan(m.version)
