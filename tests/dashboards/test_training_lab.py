"""The Training lab's logic without a browser: controls → optimizer → events in the store."""
from __future__ import annotations

import math
import time

import param
import pytest

from kfac_lab.dashboards import TrainingLabApp
from kfac_lab.dashboards.training_lab import DAMPING_GRID, TrainingLabPage, TrainingSettings, nearest_damping
from kfac_lab.store import Store


def wait_for(cond, timeout=60.0, poll=None, every=0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if poll is not None:
            poll()
        if cond():
            return True
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture
def lab(tmp_path):
    lab = TrainingLabApp(store=Store(tmp_path / "lab.zarr", flush_interval=0.5), problem="tiny", steps=0)
    yield lab
    lab.close(wait=True, timeout=30)


def steps_of(lab, i=0):
    return lab.buffers[lab.sessions[i].run_id].n


def test_settings_defaults_and_problem_presets(tmp_path):
    s = TrainingSettings()
    assert s.optimizer == "kfac" and s.approx == "blockdiag" and s.momentum and s.adapt_damping
    assert s.kfac_options() == {"damping": 150.0, "adapt_damping": True, "approx": "blockdiag", "momentum": True,
                                "lr": None}
    lab = TrainingLabApp(store=tmp_path / "s.zarr")
    lab.choose_problem("figure1")
    assert lab.settings.damping == 1.0          # the problem's own K-FAC default
    lab.choose_problem("tiny")
    assert lab.settings.damping == 150.0 and lab.settings.steps == 3000
    assert nearest_damping(140.0) == 150.0 and nearest_damping(0.0) == DAMPING_GRID[0]


def test_both_initial_dampings_are_offered_and_labelled(lab):
    from kfac_lab.dashboards.training_app import OPTIMIZERS

    assert OPTIMIZERS["K-FAC (λ₀ = 150, paper)"] == "kfac" and OPTIMIZERS["K-FAC (auto λ₀)"] == "kfac-auto"
    lab.settings.optimizer, lab.settings.race, lab.settings.optimizer_b = "kfac-auto", True, "kfac"
    assert lab.start(), lab.messages
    auto, paper = lab.sessions
    assert auto.optimizer.config.damping == "auto" and paper.optimizer.config.damping == 150.0
    wait_for(lambda: steps_of(lab, 0) >= 2, poll=lab.poll)
    assert auto.optimizer.initial_damping is not None and paper.optimizer.initial_damping is None
    labels = [lab.label(lab.menu_value(x), x.run_id) for x in lab.sessions]
    assert labels[0].startswith("K-FAC (auto λ₀) · ") and labels[1].startswith("K-FAC · ")


def test_controls_reach_the_optimizer_and_the_store(lab):
    assert lab.start(), lab.messages
    sess = lab.sessions[0]
    wait_for(lambda: steps_of(lab) >= 3, poll=lab.poll)
    assert lab.set_control("approx", "block-tridiagonal")
    assert lab.set_control("momentum", False)
    assert lab.set_control("damping", "30")
    assert lab.set_control("adapt_damping", False)
    assert lab.set_control("lr", 0.05)            # kept for "fixed" mode; adaptive α goes on
    assert lab.set_control("lr_mode", "fixed")
    cfg = lambda: sess.optimizer.config  # noqa: E731
    wait_for(lambda: cfg().approx == "tridiag" and not cfg().momentum and cfg().lr == 0.05, poll=lab.poll, timeout=20)
    assert not cfg().adapt_damping and sess.optimizer.damping == 30.0
    # the events, at the step where they took effect, in the buffer (drawn as markers) ...
    buf = lab.buffers[sess.run_id]
    wait_for(lambda: sum(e["kind"] == "control" for e in buf.events) >= 5, poll=lab.poll)
    controls = [e for e in buf.events if e["kind"] == "control"]
    assert {k for e in controls for k in e} >= {"approx", "momentum", "damping", "adapt_damping", "lr"}
    assert all(e["run"] == buf.label for e in controls)
    # ... and in the store
    stored = [e for e in lab.events_in_store() if e["kind"] == "control"]
    assert [e["approx"] for e in stored if "approx" in e] == ["tridiag"]
    assert [e["damping"] for e in stored if "damping" in e] == [30.0]
    assert [e["lr"] for e in stored if "lr" in e] == [0.05]
    assert lab.settings.approx == "tridiag" and lab.settings.damping == 30.0
    # the figures' dataset carries the run and its events
    ds, events = lab.dataset()
    assert ds.sizes["run"] == 1 and ds.sizes["step"] >= 3 and len(events) >= 5


def test_bad_input_gives_a_message_and_training_goes_on(lab):
    lab.start()
    sess = lab.sessions[0]
    wait_for(lambda: sess.step >= 2)
    for value, text in [("abc", "not a number"), (-1, "must be > 0"), ("", "enter a number"), ("nan", "finite")]:
        assert not lab.set_control("damping", value)
        assert text in lab.messages["damping"]
    assert not lab.set_control("approx", "diagonal") and "choose one of" in lab.messages["approx"]
    assert not lab.set_control("lr", "x") and "not a number" in lab.messages["lr"]
    assert not lab.set_control("weight_decay", 1.0) and "not a live control" in lab.messages["weight_decay"]
    assert lab.settings.damping == 150.0
    k = sess.step
    wait_for(lambda: sess.step > k + 2)
    assert sess.status == "running" and sess.error is None
    assert lab.set_control("damping", 10.0) and "damping" not in lab.messages


def test_pause_resume_stop_and_more_steps(lab):
    lab.settings.steps = 0
    lab.start()
    sess = lab.sessions[0]
    wait_for(lambda: sess.step >= 2)
    lab.pause()
    wait_for(lambda: lab.status == "paused")
    k = sess.step
    time.sleep(0.3)
    assert sess.step == k
    assert lab.start()   # Start on a paused lab resumes it
    wait_for(lambda: sess.step > k)
    lab.stop(wait=True)
    assert lab.status == "stopped"
    n = sess.step
    lab.settings.steps = 3
    assert lab.start()   # Start after a stop: 3 more steps on the same run
    wait_for(lambda: lab.status == "finished")
    assert sess.step == n + 3
    lab.poll()
    assert lab.buffers[sess.run_id].n == sess.step


def test_reset_keeps_runs_in_the_store_for_comparison(lab):
    lab.start()
    rid = lab.sessions[0].run_id
    wait_for(lambda: steps_of(lab) >= 3, poll=lab.poll)
    lab.reset()
    assert lab.sessions == [] and lab.buffers == {} and lab.dataset() == (None, [])
    wait_for(lambda: rid in lab.stored_runs().values() and lab.store.runs().loc[rid, "steps"] >= 3)
    lab.set_compare([rid])
    ds, _ = lab.dataset()
    assert ds.sizes["run"] == 1 and "(stored)" in str(ds["run"].values[0])


def test_new_run_from_here_branches(lab):
    lab.start()
    parent = lab.sessions[0]
    wait_for(lambda: parent.step >= 3)
    lab.set_control("approx", "tridiag")
    assert lab.new_run_from_here(), lab.messages
    child = lab.sessions[0]
    assert child.run_id != parent.run_id and child.step >= 3
    wait_for(lambda: child.step >= parent.step + 2)
    assert child.optimizer.config.approx == "tridiag"
    attrs = lab.store.runs().loc[child.run_id]
    assert attrs["parent_run"] == parent.run_id
    lab.poll()
    assert {parent.run_id, child.run_id} <= set(lab.buffers)
    assert any(e["kind"] == "branched" for e in lab.buffers[child.run_id].events)
    wait_for(lambda: parent.status == "stopped")


def test_race_two_optimizers_controls_reach_kfac_only(tmp_path):
    lab = TrainingLabApp(store=tmp_path / "race.zarr", problem="tiny", race=True, optimizer="kfac", optimizer_b="adam",
                      steps=0)
    try:
        assert lab.start(), lab.messages
        kfac, adam = lab.sessions
        assert (kfac.optimizer_name, adam.optimizer_name) == ("kfac", "adam")
        assert kfac.seed == adam.seed and kfac.problem.name == adam.problem.name
        wait_for(lambda: steps_of(lab, 0) >= 3 and steps_of(lab, 1) >= 3, poll=lab.poll)
        assert lab.set_control("momentum", False)
        wait_for(lambda: not kfac.optimizer.config.momentum)
        assert not any(e["kind"] == "control" for e in lab.buffers[adam.run_id].events)
        ds, _ = lab.dataset()
        assert ds.sizes["run"] == 2
    finally:
        lab.close(wait=True, timeout=30)


def test_continue_a_stored_run(lab):
    lab.settings.steps = 5
    lab.start()
    rid = lab.sessions[0].run_id
    wait_for(lambda: lab.status == "finished")
    lab.reset()
    lab.settings.steps = 4
    assert lab.continue_run(rid), lab.messages
    sess = lab.sessions[0]
    assert sess.run_id == rid
    wait_for(lambda: lab.status == "finished")
    assert sess.step == 9
    lab.poll()
    assert lab.buffers[rid].n == 9


def test_start_failure_is_a_message(tmp_path):
    lab = TrainingLabApp(store=tmp_path / "f.zarr", problem="tiny")
    lab.settings.param.update(damping=1e-300)  # the optimizer refuses it? then a message; else it starts
    lab.settings.eval_every = 1
    lab._session = lambda *a, **k: (_ for _ in ()).throw(ValueError("no data for this problem"))
    assert not lab.start()
    assert "no data for this problem" in lab.messages["start"] and lab.sessions == []
    lab.close()


def test_close_stops_the_threads(lab):
    lab.start()
    sess = lab.sessions[0]
    wait_for(lambda: sess.step >= 2)
    lab.close(wait=True, timeout=30)
    assert not sess.running and sess.status == "stopped"
    assert sess.run_id in lab.store.runs().index


def test_page_without_a_browser(lab):
    page = TrainingLabPage(lab)
    assert page.fig_step.object is not None          # an empty figure before Start
    page.start_b.clicks += 1
    sess = lab.sessions[0]
    wait_for(lambda: sess.step >= 3)
    page.refresh(force=True)
    fig = page.fig_step.object
    assert len(fig.data) >= 1 and len(fig.data[0].x) >= 1
    page.approx.value = "tridiag"
    page.momentum.value = False
    page.damping.input.value = "abc"
    assert "not a number" in page.damping.error
    page.damping.input.value = "25"
    assert page.damping.error == "" and page.damping_slider.value == 30.0
    wait_for(lambda: sess.optimizer.config.approx == "tridiag" and not sess.optimizer.config.momentum
             and sess.optimizer.config.damping == 25.0)

    def markers():
        page.refresh(force=True)
        names = [d.name for d in page.fig_step.object.data]
        return "events" in names

    wait_for(markers)
    ev = [d for d in page.fig_step.object.data if d.name == "events"][0]
    text = " ".join(ev.text)
    assert "approx=tridiag" in text and "momentum=False" in text and "damping=25.0" in text
    page.stop_b.clicks += 1
    wait_for(lambda: lab.status == "stopped")


def test_shutdown_hook_stops_and_flushes_every_step(tmp_path):
    from kfac_lab.dashboards.training_lab import _stop_all

    store = Store(tmp_path / "hook.zarr", flush_every=1000, flush_interval=None)  # nothing flushed on its own
    lab = TrainingLabApp(store=store, problem="tiny", steps=0)
    lab.start()
    sess = lab.sessions[0]
    wait_for(lambda: sess.step >= 5)
    _stop_all()                                   # what the server's exit runs
    assert not sess.running and store.pending() == 0
    reader = Store(tmp_path / "hook.zarr", mode="r")
    assert int(reader.runs().loc[sess.run_id, "steps"]) == sess.step
    assert reader.events(sess.run_id)[-1]["kind"] == "stopped"
    assert reader.checkpoints(sess.run_id)[-1] == sess.step


CRASH = """
import os, signal, sys, time
from kfac_lab.dashboards import TrainingLabApp
lab = TrainingLabApp(store=sys.argv[1], problem="tiny", steps=0)
lab.start()
s = lab.sessions[0]
while s.step < 150:
    time.sleep(0.01)
print(s.run_id, flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)   # a crash: no exit hook runs
raise KeyboardInterrupt                    # Ctrl-C: the exit hooks stop and flush
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["interrupt", "kill"])
def test_a_crashed_or_stopped_server_keeps_the_run(tmp_path, how):
    import subprocess
    import sys

    path = tmp_path / f"{how}.zarr"
    out = subprocess.run([sys.executable, "-c", CRASH, str(path), how], capture_output=True, text=True, timeout=300)
    run_id = out.stdout.split()[0]
    store = Store(path, mode="r")
    row = store.runs().loc[run_id]
    ds = store.load_run(run_id)
    steps = ds["step"].values
    assert list(steps) == list(range(1, len(steps) + 1))      # committed rows: contiguous, none half-written
    if how == "interrupt":
        assert store.events(run_id)[-1]["kind"] == "stopped"
        assert store.checkpoints(run_id)[-1] == int(row["last_step"]) >= 150
    else:  # rows up to the last checkpoint or flush survive (at most the last 2 s are lost)
        assert int(row["steps"]) >= 100 and store.checkpoints(run_id)[-1] <= int(row["last_step"])


def test_damping_slider_follows_adaptive_lambda_and_a_user_move_overrides(lab):
    page = TrainingLabPage(lab)
    assert page.damping_slider.value == 150.0
    page.start_b.clicks += 1
    sess = lab.sessions[0]
    # the Levenberg–Marquardt rule moves λ every T1 = 5 steps: the slider and the λ box follow
    wait_for(lambda: lab.live_damping() is not None and abs(math.log(lab.live_damping() / 150.0)) > 0.5,
             poll=lab.poll)
    page._update_status()
    lam = lab.live_damping()
    assert page.damping_slider.value == nearest_damping(lam) != 150.0
    assert float(page.damping.input.value) == pytest.approx(lam, rel=1e-2)
    # the user's move wins: the slider stays where it was put until the optimizer has taken it …
    with param.edit_constant(page.damping_slider):  # what a drag released at 3 sends
        page.damping_slider.param.update(value=3.0, value_throttled=3.0)
    assert lab.live_damping() is None
    page._update_status()
    assert page.damping_slider.value == 3.0 and page.damping.input.value == "3"
    wait_for(lambda: lab.live_damping() is not None, poll=lab.poll)
    # … and adaptation goes on from the user's λ
    control = [e for e in lab.buffers[sess.run_id].events if e.get("kind") == "control" and "damping" in e][-1]
    cols = lab.buffers[sess.run_id].columns
    at = cols["damping"][cols["step"].index(float(control["step"]))]
    assert 3.0 / 1.4 <= at <= 3.0 * 1.4
    page._update_status()
    assert page.damping_slider.value == nearest_damping(lab.live_damping())
    # adaptive λ off: nothing to follow, the slider shows what the user set
    assert lab.set_control("adapt_damping", False)
    assert lab.live_damping() is None


def test_traces_draw_as_soon_as_a_run_has_points(lab):
    page = TrainingLabPage(lab)
    text = lambda fig: " ".join(a.text for a in fig.layout.annotations)  # noqa: E731
    assert "press Start" in text(page.fig_traces.object)
    page.start_b.clicks += 1
    wait_for(lambda: steps_of(lab) >= 2, poll=lab.poll)
    page.refresh()      # not forced, and well within TRACES_S of the Start's redraw
    fig = page.fig_traces.object
    assert "press Start" not in text(fig)
    assert any(len(t.x) >= 1 for t in fig.data if t.name != "events")


def test_a_huge_seed_typed_into_the_page_is_refused_with_a_message(lab):
    page = TrainingLabPage(lab)
    before = lab.settings.seed
    assert not page.seed.submit(str(10**30))
    assert "seed" in page.seed.message.object and "≤" in page.seed.message.object
    assert lab.settings.seed == before      # the setting kept its value: nothing reaches torch.manual_seed
    assert page.seed.submit("7") and lab.settings.seed == 7
