"""TrainingLabWidget, headless: kernel-side values only (widgets are never drawn here).

The "tiny" problem (64-16-4-16-64 autoencoder) keeps every step at milliseconds; each test runs
a bounded number of steps and closes its lab.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kfac_lab.widgets import TrainingLabWidget


def wait_until(cond, timeout=60.0, every=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(every)
    return cond()


@pytest.fixture
def lab():
    labs = []

    def make(*args, **kw):
        kw.setdefault("drainer", False)
        kw.setdefault("eval_every", 5)
        kw.setdefault("checkpoint_every", None)
        lab = TrainingLabWidget(*args, **kw)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()


def test_builds_idle_with_controls_figures_and_the_session(lab):
    tl = lab("tiny", optimizers=("kfac", "sgd"))
    assert [s.optimizer_name for s in tl.sessions] == ["kfac", "sgd"]
    assert tl.session is tl.sessions[0] and tl.session.status == "idle"
    assert tl.sessions[1].store is tl.store is tl.session.store  # one store for all runs
    for key in ("start", "pause", "stop", "damping", "damping_text", "adapt_damping", "approx", "momentum",
                "lr_mode", "lr", "message", "status", "target"):
        assert key in tl.controls, key
    cfg = tl.session.optimizer.config
    assert tl.controls["damping_text"].value == cfg.damping == 150.0
    assert tl.controls["approx"].value == cfg.approx == "blockdiag"
    assert tl.controls["momentum"].value is True and tl.controls["lr_mode"].value == "adaptive"
    assert set(tl.figures) == {"iterations", "seconds", "traces"} and tl.figure is tl.figures["iterations"]
    assert [t.name for t in tl.figure.data] == ["kfac", "sgd"]
    assert all(len(t.x) == 0 for t in tl.figure.data)
    assert "application/vnd.jupyter.widget-view+json" in tl._repr_mimebundle_()
    assert "idle" in tl.controls["status"].value


def test_figure_data_grow_while_training(lab):
    tl = lab("tiny", optimizers=("kfac",), eval_every=2)
    tl.start(steps=400)
    sizes = []
    assert wait_until(lambda: tl.flush() and len(tl.figure.data[0].x) > 0, timeout=60)
    sizes.append(len(tl.figure.data[0].x))
    assert wait_until(lambda: (tl.flush() or True) and len(tl.figure.data[0].x) > sizes[0], timeout=60)
    sizes.append(len(tl.figure.data[0].x))
    assert tl.session.running or tl.session.status == "finished"
    tl.stop()
    assert tl.session.status in ("stopped", "finished")
    n = len(tl.figure.data[0].x)
    assert n >= sizes[1] > sizes[0]
    # error vs iterations: x are steps; vs seconds: x are training seconds, increasing
    steps = np.asarray(tl.figure.data[0].x)
    assert np.all(np.diff(steps) > 0) and steps[0] == 1
    secs = np.asarray(tl.figures["seconds"].data[0].x)
    assert len(secs) == n and np.all(np.diff(secs) > 0)
    # the traces: λ, γ, α, μ, ρ and batch-size rows, one point per step logged
    names = [t.yaxis for t in tl.figures["traces"].data]
    assert len(names) == 6
    lam = np.asarray(tl.figures["traces"].data[0].y)
    assert len(lam) == tl.session.step and np.all(lam > 0)
    ds = tl.dataset()
    assert ds.sizes["step"] == tl.session.step and list(ds["run"].values) == ["kfac"]


def test_approximation_toggle_switches_to_ekfac(lab):
    from kfac_lab.curvature.ekfac import EKFACInverse

    tl = lab("tiny", optimizers=("kfac",))
    assert ("EKFAC", "ekfac") in tl.controls["approx"].options
    tl.start(steps=3)
    tl.wait(timeout=120)
    tl.controls["approx"].value = "ekfac"
    assert tl.controls["message"].value == ""
    tl.start(steps=3)
    tl.wait(timeout=120)
    assert tl.session.optimizer.config.approx == "ekfac"
    assert isinstance(tl.session.optimizer.curvature.inverse, EKFACInverse)


def test_control_change_reaches_the_optimizer_and_draws_a_marker(lab):
    tl = lab("tiny", optimizers=("kfac",))
    tl.start(steps=20)
    tl.wait(timeout=120)
    first = tl.session.step
    tl.controls["damping_text"].value = 30.0          # typed λ: slider follows
    assert tl.controls["damping"].value == pytest.approx(30.0)
    tl.controls["approx"].value = "tridiag"
    tl.controls["momentum"].value = False
    tl.controls["adapt_damping"].value = False
    assert tl.controls["message"].value == ""
    tl.start(steps=10)
    tl.wait(timeout=120)
    cfg = tl.session.optimizer.config
    assert (cfg.approx, cfg.momentum, cfg.adapt_damping) == ("tridiag", False, False)
    assert tl.session.optimizer.damping == pytest.approx(30.0)  # not adapted any more
    controls = [e for e in tl.events if e["kind"] == "control"]
    assert {e["step"] for e in controls} == {first + 1}
    changed = {k for e in controls for k in e if k not in ("step", "kind", "run")}
    assert changed == {"damping", "approx", "momentum", "adapt_damping"}
    # the store has the same events (the dashboards read them from there)
    stored = [e for e in tl.store.events(tl.session.run_id) if e["kind"] == "control"]
    assert {e["step"] for e in stored} == {first + 1}
    # a marker: a dotted vertical line at the step, and a diamond on the curve
    lines = [s for s in tl.figure.layout.shapes if s.type == "line"]
    assert any(s.x0 == first + 1 for s in lines)
    markers = [t for t in tl.figure.data if t.name == "events"]
    assert markers and first + 1 in list(markers[0].x)


def test_fixed_learning_rate_and_back(lab):
    tl = lab("tiny", optimizers=("kfac",))
    assert tl.controls["lr"].disabled
    tl.controls["lr"].value = 0.5
    tl.controls["lr_mode"].value = "fixed"
    assert not tl.controls["lr"].disabled
    tl.start(steps=3)
    tl.wait(timeout=60)
    assert tl.session.optimizer.config.lr == pytest.approx(0.5)
    tl.controls["lr_mode"].value = "adaptive"
    tl.start(steps=2)
    tl.wait(timeout=60)
    assert tl.session.optimizer.config.lr is None


def test_bad_damping_shows_a_message_and_training_keeps_running(lab):
    tl = lab("tiny", optimizers=("kfac",), drainer=True, refresh=0.05)
    tl.start(steps=100_000)
    assert wait_until(lambda: tl.session.step >= 3, timeout=60)
    tl.controls["damping_text"].value = -5.0
    msg = tl.controls["message"].value
    assert "must be &gt; 0" in msg and "-5" in msg   # the Panel page's message (HTML-escaped)
    # the slider did not take the refused value (it still follows the adaptive λ, so it may move)
    assert tl.controls["damping"].value > 0
    step = tl.session.step
    assert wait_until(lambda: tl.session.step > step + 3, timeout=60), "training goes on"
    assert tl.session.running and tl.session.optimizer.config.damping > 0
    assert not any(e.get("kind") == "configure" and e.get("damping") == -5.0 for e in tl.session.optimizer.events)
    assert not [e for e in tl.store.events(tl.session.run_id) if e["kind"] == "control"]
    # a good value clears the message
    tl.controls["damping_text"].value = 50.0
    assert tl.controls["message"].value == ""
    # the drainer thread has been drawing meanwhile, without anyone calling flush()
    assert wait_until(lambda: len(tl.figure.data[0].x) > 1, timeout=60)
    tl.close()
    assert tl.session.status == "stopped"
    assert not tl._thread.is_alive()


def test_pause_resume_stop_buttons(lab):
    tl = lab("tiny", optimizers=("kfac", "adam"))
    tl.controls["start"].click()
    assert all(s.running for s in tl.sessions)
    assert not tl.controls["pause"].disabled and not tl.controls["stop"].disabled
    assert wait_until(lambda: all(s.step >= 2 for s in tl.sessions), timeout=60)
    tl.controls["pause"].click()
    assert tl.controls["pause"].description == "resume"
    assert wait_until(lambda: all(s.status == "paused" for s in tl.sessions), timeout=60)
    steps = [s.step for s in tl.sessions]
    time.sleep(0.3)
    assert [s.step for s in tl.sessions] == steps
    tl.controls["start"].click()                     # start on a paused lab resumes it
    assert tl.controls["pause"].description == "pause"
    assert wait_until(lambda: all(s.step > k for s, k in zip(tl.sessions, steps)), timeout=60)
    tl.pause()
    assert wait_until(lambda: all(s.status == "paused" for s in tl.sessions), timeout=60)
    steps = [s.step for s in tl.sessions]
    tl.controls["pause"].click()                     # the same button resumes
    assert tl.controls["pause"].description == "pause"
    assert wait_until(lambda: all(s.step > k for s, k in zip(tl.sessions, steps)), timeout=60)
    tl.controls["stop"].click()
    assert wait_until(lambda: all(not s.running for s in tl.sessions), timeout=60)
    tl.flush()
    assert all(s.status == "stopped" for s in tl.sessions)
    assert tl.controls["stop"].disabled and not tl.controls["start"].disabled
    assert "stopped" in tl.controls["status"].value


def test_controls_target_only_the_kfac_runs(lab):
    tl = lab("tiny", optimizers=[("kfac", {}, "block-diag"), ("kfac", {"approx": "tridiag"}, "tridiag"), "sgd"])
    assert tl.labels == ["block-diag", "tridiag", "sgd"]
    assert tl.controls["target"].layout.display != "none"
    # starts on a named option (a front end shows its label; index None would be a blank box)
    assert tl.controls["target"].label == "all K-FAC runs" and tl.controls["target"].value is None
    tl.controls["damping_text"].value = 20.0           # all K-FAC runs
    tl.controls["target"].value = tl.sessions[1].run_id
    tl.controls["momentum"].value = False              # the tridiag run only
    tl.start(steps=2)
    tl.wait(timeout=120)
    a, b, sgd = tl.sessions
    assert a.optimizer.config.damping == b.optimizer.config.damping == 20.0
    assert a.optimizer.config.momentum is True and b.optimizer.config.momentum is False
    assert not [e for e in tl.store.events(sgd.run_id) if e["kind"] == "control"]


def test_sgd_only_lab_disables_the_kfac_controls(lab):
    tl = lab("tiny", optimizers=("sgd",))
    assert tl.controls["damping"].disabled and tl.controls["approx"].disabled
    with pytest.raises(ValueError, match="no K-FAC run"):
        tl.set(damping=3.0)
    tl.start(steps=5)
    tl.wait(timeout=60)
    assert len(tl.figure.data[0].x) >= 1
    assert [t.meta["variable"] for t in tl.figures["traces"].data] == ["mu", "batch_size"]  # SGD: μ, no λ


def test_shares_a_store_given_by_path(tmp_path):
    from kfac_lab.store import Store

    path = tmp_path / "lab.zarr"
    with TrainingLabWidget("tiny", optimizers=("kfac",), store=str(path), drainer=False, checkpoint_every=None) as tl:
        tl.start(steps=4)
        tl.wait(timeout=60)
        rid = tl.session.run_id
    assert tl.session.status in ("finished", "stopped")
    with Store(path, mode="r") as st:
        assert rid in st.runs().index
        assert st.load_run(rid).sizes["step"] == 4
        assert st.runs().loc[rid, "label"] == "kfac"


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown optimizer"):
        TrainingLabWidget("tiny", optimizers=("lbfgs",), drainer=False)
    with pytest.raises(ValueError, match="unknown problem"):
        TrainingLabWidget("nope", drainer=False)
    with pytest.raises(ValueError, match="refresh"):
        TrainingLabWidget("tiny", refresh=0, drainer=False)


def test_close_is_idempotent_and_leaves_no_thread(lab):
    before = {t.name for t in threading.enumerate()}
    tl = lab("tiny", optimizers=("kfac",), drainer=True)
    tl.start(steps=10_000)
    assert wait_until(lambda: tl.session.step >= 1, timeout=60)
    tl.close()
    tl.close()
    left = {t.name for t in threading.enumerate() if t.is_alive()} - before
    assert not [n for n in left if n.startswith("kfac_lab")], left


def test_long_runs_are_decimated_for_display_not_in_the_data(lab, monkeypatch):
    import kfac_lab.lab.runs as runs

    monkeypatch.setattr(runs, "MAX_POINTS", 20)
    tl = lab("tiny", optimizers=("sgd",), eval_every=5)
    tl.start(steps=120)
    tl.wait(timeout=120)
    assert tl.dataset().sizes["step"] == 120                    # everything received is kept
    shown = np.asarray(tl.figures["traces"].data[0].x)
    assert 20 <= len(shown) <= 41 and shown[-1] == 120           # a stride through the rows, the last kept
    errors = np.asarray(tl.figure.data[0].x)
    assert 20 <= len(errors) <= 25 and errors[-1] == 120         # evaluation rows: 1, 5, 10, …, 120


def test_damping_controls_follow_adaptive_lambda_and_a_user_move_overrides(lab):
    tl = lab("tiny", optimizers=("kfac",))
    c = tl.controls
    tl.start(steps=40)
    tl.wait(timeout=120)                               # flush: the λ controls follow the optimizer
    last = float(tl.dataset()["damping"].values[0, -1])
    assert last != pytest.approx(150.0, rel=0.2)       # the Levenberg–Marquardt rule moved λ
    assert c["damping_text"].value == pytest.approx(last, rel=1e-3)
    assert c["damping"].value == pytest.approx(last, rel=1e-3)
    c["damping_text"].value = 3.0                      # the user's λ: it stands until applied …
    tl.flush()
    assert c["damping_text"].value == 3.0 and c["damping"].value == pytest.approx(3.0)
    first = tl.session.step
    tl.start(steps=15)
    tl.wait(timeout=120)
    ds = tl.dataset()
    at = float(ds["damping"].sel(step=first + 1).values[0])
    assert 3.0 / 1.4 <= at <= 3.0 * 1.4                # … then adaptation goes on from it
    assert c["damping_text"].value == pytest.approx(float(ds["damping"].values[0, -1]), rel=1e-3)
    assert tl.session.optimizer.config.damping == 3.0  # the controls' echo was not sent back as a setting
    c["adapt_damping"].value = False                   # off: the controls keep the user's value
    c["damping_text"].value = 7.0
    tl.start(steps=5)
    tl.wait(timeout=120)
    assert c["damping_text"].value == 7.0 and tl.session.optimizer.damping == pytest.approx(7.0)
