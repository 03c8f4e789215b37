"""Session: logging, live controls from another thread, pause/stop, failures, checkpoints,
crash + resume (bit for bit), branching, the update queue. All on the "tiny" problem."""
import math
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from kfac_lab.store import Store
from kfac_lab.train import Problem, Session, get_problem

TIMEOUT = 60.0


def wait_for(cond, timeout=TIMEOUT, what="condition"):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def rows(store, run_id):
    store.flush()
    return store.load_run(run_id)


KFAC_METRICS = {"loss", "objective", "wall_time", "batch_size", "damping", "gamma", "alpha", "mu", "approx",
                "momentum", "rejected", "inverses_refreshed", "model_change", "delta_norm", "time_gradient",
                "time_statistics", "time_inverses", "time_precondition", "time_quadratic_model", "error", "nll",
                "eval_seconds"}


def test_run_in_thread_logs_contiguous_steps_and_all_metrics():
    s = Session("tiny", "kfac", eval_every=4, checkpoint_every=None)
    assert s.status == "idle" and s.store.path.startswith("memory://")
    out = s.run(steps=10)
    assert out["status"] == "finished" and out["step"] == 10 and s.status == "finished"
    ds = rows(s.store, s.run_id)
    assert ds.step.values.tolist() == list(range(1, 11))
    assert KFAC_METRICS <= set(ds.data_vars), KFAC_METRICS - set(ds.data_vars)
    err = ds.error.values
    evaluated = [k for k, v in zip(range(1, 11), err) if np.isfinite(v)]
    assert evaluated == [1, 4, 8, 10]          # step 1, every eval_every, and the last step
    assert np.all(np.diff(ds.wall_time.values) > 0)
    assert set(ds.approx.values) == {"blockdiag"} and np.all(ds.momentum.values == 1.0)
    attrs = ds.attrs
    assert attrs["problem"] == "tiny" and attrs["optimizer"] == "kfac" and attrs["seed"] == 0
    assert attrs["damping"] == 150.0 and attrs["approx"] == "blockdiag"  # all hyper-parameters, flat
    # run() continues with more steps
    s.run(steps=3)
    assert rows(s.store, s.run_id).step.values.tolist() == list(range(1, 14))
    with pytest.raises(ValueError, match="steps= or seconds="):
        Session("tiny", "sgd").run()


@pytest.mark.parametrize("opt, keys", [("sgd", {"lr", "mu", "time_grad", "time_update"}),
                                       ("adam", {"lr", "mu", "time_total"})])
def test_baselines_in_a_background_thread(opt, keys):
    s = Session("tiny", opt, steps=12, eval_every=5)
    s.start()
    assert s.join(TIMEOUT) and s.status == "finished" and s.error is None
    ds = rows(s.store, s.run_id)
    assert ds.step.values.tolist() == list(range(1, 13))
    assert keys <= set(ds.data_vars)
    assert s.store.checkpoints(s.run_id) == [12]
    kinds = [e["kind"] for e in s.store.events(s.run_id)]
    assert kinds == ["finished"]


def test_seconds_budget_and_determinism():
    a = Session("tiny", "kfac", checkpoint_every=None)
    a.run(seconds=0.05)
    assert a.wall_time >= 0.05 and a.status == "finished"
    b = Session("tiny", "kfac", checkpoint_every=None)
    b.run(steps=a.step)
    la, lb = rows(a.store, a.run_id).loss.values, rows(b.store, b.run_id).loss.values
    np.testing.assert_array_equal(la, lb)       # same seed: same batches, same samples, same steps
    c = Session("tiny", "kfac", seed=1, checkpoint_every=None)
    c.run(steps=3)
    assert not np.array_equal(rows(c.store, c.run_id).loss.values, la[:3])


def test_set_from_another_thread_reaches_the_optimizer_and_is_recorded():
    s = Session("tiny", "kfac", steps=30, eval_every=50, checkpoint_every=None)
    reached, sent = threading.Event(), threading.Event()

    def hold_at_5(m):  # (keeps the training thread at step 5 until the change was sent: no race in the test)
        if m["step"] == 5:
            reached.set()
            sent.wait(TIMEOUT)

    s.subscribe(hold_at_5)
    s.start()
    assert reached.wait(TIMEOUT)
    s.set(approx="tridiag", momentum=False, damping=30.0)   # from this (another) thread
    sent.set()
    s.join(TIMEOUT)
    assert s.status == "finished"
    ds = rows(s.store, s.run_id)
    events = s.store.events(s.run_id)
    control = [e for e in events if e["kind"] == "control"]
    assert len(control) == 1
    k = control[0]["step"]
    assert control[0]["approx"] == "tridiag" and control[0]["momentum"] is False and control[0]["damping"] == 30.0
    configure = [e for e in events if e["kind"] == "configure"]
    assert configure and configure[0]["step"] == k        # the optimizer's own event, mirrored
    assert k == 6                                           # the next step boundary
    approx = ds.approx.values
    steps = ds.step.values
    assert set(approx[steps < k]) == {"blockdiag"} and set(approx[steps >= k]) == {"tridiag"}
    assert np.all(ds.momentum.values[steps < k] == 1.0) and np.all(ds.momentum.values[steps >= k] == 0.0)
    assert np.all(ds.mu.values[steps >= k] == 0.0)
    # λ at step k was set to 30 before the step (adapted afterwards at most by one ω₁ factor)
    assert ds.damping.values[steps == k][0] == pytest.approx(30.0, rel=0.3)


def test_invalid_set_raises_and_training_continues():
    s = Session("tiny", "kfac", steps=40, checkpoint_every=None)
    s.start()
    wait_for(lambda: s.step >= 2, what="2 steps")
    with pytest.raises(ValueError, match="damping"):
        s.set(damping=-1)
    with pytest.raises(ValueError, match="live settings"):
        s.set(stats_fraction=0.5)
    with pytest.raises(ValueError, match="approx"):
        s.set(approx="full")
    with pytest.raises(ValueError, match="batch_size"):
        s.set(batch_size=10**6)
    assert s.join(TIMEOUT) and s.status == "finished" and s.step == 40
    assert rows(s.store, s.run_id).step.size == 40
    assert not [e for e in s.store.events(s.run_id) if e["kind"] in ("control", "configure")]
    sgd = Session("tiny", "sgd", checkpoint_every=None)
    with pytest.raises(ValueError, match="lr"):
        sgd.set(lr=-0.1)
    with pytest.raises(ValueError, match=r"unknown setting.*the session's own: \['batch_size', 'eval_every'\]"):
        sgd.set(damping=3.0)


@pytest.mark.parametrize("optimizer", ["kfac", "sgd", "adam"])
def test_set_checks_through_the_optimizers_public_validate(optimizer):
    """``Session.set`` checks with ``optimizer.validate`` in the caller's thread: a wrong type is a
    TypeError naming the setting, queued session controls count, nothing reaches the optimizer."""
    s = Session("tiny", optimizer, checkpoint_every=None)
    calls = []
    validate = s.optimizer.validate
    s.optimizer.validate = lambda **kw: calls.append(kw) or validate(**kw)
    with pytest.raises(TypeError, match=r"lr must be a number, got str '0.1'"):
        s.set(lr="0.1")
    s.set(lr=0.5)
    s.set(weight_decay=0.0)
    assert calls[-1] == {"lr": 0.5, "weight_decay": 0.0}  # checked together with the queued control
    assert s.optimizer.pending() == {}  # queued in the session until the step boundary


def test_session_controls_batch_size_and_eval_every():
    s = Session("tiny", "sgd", eval_every=100, checkpoint_every=None)
    s.run(steps=2)
    s.set(batch_size=50, eval_every=2)
    s.run(steps=4)
    ds = rows(s.store, s.run_id)
    assert ds.batch_size.values.tolist() == [250, 250, 50, 50, 50, 50]
    assert np.isfinite(ds.error.values).tolist() == [True, True, False, True, False, True]
    ev = [e for e in s.store.events(s.run_id) if e["kind"] == "control"]
    assert ev == [{"step": 3, "kind": "control", "batch_size": 50, "eval_every": 2}]


def test_batch_schedule_grows():
    s = Session("tiny", "kfac", batch_schedule=True, batch_size=100, checkpoint_every=None)
    s.run(steps=4)
    m = rows(s.store, s.run_id).batch_size.values
    assert m[0] == 100 and np.all(np.diff(m) >= 0) and m[-1] > 100


def test_pause_resume_stop():
    s = Session("tiny", "kfac", checkpoint_every=None)
    s.start()  # no budget: until stop()
    wait_for(lambda: s.step >= 3, what="3 steps")
    s.pause()
    wait_for(lambda: s.status == "paused", what="paused")
    k, wall = s.step, s.wall_time
    time.sleep(0.2)
    assert s.step == k and s.wall_time == wall           # paused: no steps, no wall time
    s.unpause()
    wait_for(lambda: s.step >= k + 2, what="steps after resume")
    assert s.status == "running"
    s.stop()
    assert s.status == "stopped" and not s.running
    last = s.step
    ds = rows(s.store, s.run_id)
    assert ds.step.values.tolist() == list(range(1, last + 1))
    assert np.isfinite(ds.error.values[-1])               # evaluated at the last step
    assert s.store.events(s.run_id)[-1]["kind"] == "stopped"
    # checkpoints on stop (none in between: checkpoint_every=None disables them entirely)
    assert s.store.checkpoints(s.run_id) == []
    t = Session("tiny", "kfac", checkpoint_every=0)
    t.start()
    wait_for(lambda: t.step >= 2, what="2 steps")
    t.stop()
    assert t.store.checkpoints(t.run_id) == [t.step]


class Exploding(nn.Module):
    """A tiny autoencoder that raises on its ``fail_at``-th forward pass."""

    def __init__(self, fail_at):
        super().__init__()
        self.net = get_problem("tiny").make_model(0)
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("boom: injected failure")
        return self.net(x)


def exploding_problem(fail_at):
    base = get_problem("tiny")
    return Problem("exploding", lambda seed: Exploding(fail_at), base.loss, base.X, base.X,
                   batch_sizes=dict(base.batch_sizes), options={"sgd": {"lr": 0.01}})


def test_failing_step_in_thread_is_recorded_not_silent():
    s = Session(exploding_problem(fail_at=8), "sgd", steps=50, eval_every=1000)
    s.start()
    assert s.join(TIMEOUT)
    assert s.status == "failed" and isinstance(s.error, RuntimeError) and "boom" in str(s.error)
    assert "RuntimeError" in s.traceback
    events = s.store.events(s.run_id)           # committed: flushed on failure
    failed = [e for e in events if e["kind"] == "failed"]
    assert len(failed) == 1 and "boom" in failed[0]["message"] and failed[0]["step"] == s.step + 1
    assert s.store.load_run(s.run_id).step.values.tolist() == list(range(1, s.step + 1))
    assert s.updates.queue[-1]["status"] == "failed"
    with pytest.raises(RuntimeError, match="Session.restore"):
        s.start()
    with pytest.raises(RuntimeError, match="Session.restore"):
        s.set(lr=0.1)
    # in the caller's thread run() re-raises after recording
    r = Session(exploding_problem(fail_at=3), "sgd", eval_every=1000)
    with pytest.raises(RuntimeError, match="boom"):
        r.run(steps=10)
    assert r.status == "failed" and [e["kind"] for e in r.store.events(r.run_id)] == ["failed"]


def crash_at(session, step):
    """Make the optimizer raise when asked for step ``step`` (a simulated crash mid-run)."""
    real = session.optimizer.step

    def step_or_crash(x, y):
        if session.step + 1 >= step:
            raise RuntimeError("simulated crash")
        return real(x, y)

    session.optimizer.step = step_or_crash


def control_at(session, step, **changes):
    session.subscribe(lambda m: session.set(**changes) if m["step"] == step - 1 else None)


@pytest.mark.parametrize("optimizer", ["kfac", "sgd", "kfac-ekfac"])
def test_crash_then_resume_continues_bit_for_bit(tmp_path, optimizer):
    path = str(tmp_path / "lab.zarr")
    store = Store(path)
    opts = dict(checkpoint_every=10, eval_every=5, polyak=0.99)
    change = {"approx": "tridiag"} if optimizer == "kfac" else {"lr": 0.02}
    if optimizer == "kfac-ekfac":  # the checkpoint holds EKFAC's basis and scales; a live switch back to it
        optimizer, change = "kfac", {"approx": "blockdiag"}
        opts["optimizer_options"] = {"approx": "ekfac"}
    ref = Session("tiny", optimizer, store, **opts)
    control_at(ref, 14, **change)
    ref.run(steps=30)

    crashed = Session("tiny", optimizer, store, **opts)
    control_at(crashed, 14, **change)              # a control between the checkpoint and the crash
    crash_at(crashed, 17)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.run(steps=30)
    assert crashed.status == "failed" and store.checkpoints(crashed.run_id) == [10]
    assert store.load_run(crashed.run_id).step.values.max() == 16

    # a new process would open the store again: do the same
    again = Store(path)
    resumed = Session.restore(again, crashed.run_id, steps=30)
    assert resumed.run_id == crashed.run_id and resumed.step == 10 and resumed.status == "idle"
    resumed.run()
    assert resumed.step == 30
    assert same(params(resumed.model), params(ref.model))      # bit for bit
    a, b = rows(again, crashed.run_id), rows(store, ref.run_id)
    assert a.step.values.tolist() == list(range(1, 31))        # contiguous, no duplicates
    for var in ("loss", "error", "error_avg", "error_best", "batch_size"):
        np.testing.assert_array_equal(a[var].values, b[var].values)
    kinds = [(e["step"], e["kind"]) for e in again.events(crashed.run_id)]
    assert (17, "failed") in kinds and (10, "resumed") in kinds and (30, "finished") in kinds
    assert sum(k == "control" for _, k in kinds) == 1          # the re-applied control is not logged twice


def test_resume_without_checkpoint_restarts_from_the_seed_and_custom_problem_needs_problem():
    s = Session("tiny", "adam", checkpoint_every=None, steps=8)
    s.run(steps=5)
    r = Session.restore(s.store, s.run_id)
    assert r.step == 0 and r.budget_steps == 8
    r.run()
    ds = rows(s.store, s.run_id)
    assert ds.step.values.tolist() == list(range(1, 9))
    with pytest.raises(ValueError, match="cannot override"):
        Session.restore(s.store, s.run_id, optimizer="sgd")
    e = Session(exploding_problem(fail_at=10**9), "sgd", checkpoint_every=0)
    e.run(steps=2)
    with pytest.raises(ValueError, match="custom problem 'exploding'"):
        Session.restore(e.store, e.run_id)
    back = Session.restore(e.store, e.run_id, problem=exploding_problem(fail_at=10**9))
    assert back.step == 2


def test_new_run_from_here_branches_with_parent_recorded():
    parent = Session("tiny", "kfac", eval_every=5, checkpoint_every=None)
    parent.run(steps=6)
    child = parent.new_run_from_here(attrs={"note": "what if"})
    assert child.run_id != parent.run_id and child.step == 6 and child.status == "idle"
    parent.run(steps=4)
    child.run(steps=4)
    assert same(params(child.model), params(parent.model))     # the same state, the same future
    cds = rows(child.store, child.run_id)
    assert cds.step.values.tolist() == [7, 8, 9, 10]
    assert cds.attrs["parent_run"] == parent.run_id and cds.attrs["parent_step"] == 6 and cds.attrs["note"] == "what if"
    assert {"step": 6, "kind": "branched", "parent_run": parent.run_id, "parent_step": 6} in child.store.events(child.run_id)
    assert {"step": 6, "kind": "branch", "child_run": child.run_id} in parent.store.events(parent.run_id)
    # while running in a thread: taken between two steps
    parent.start(steps=50)
    wait_for(lambda: parent.step >= 12, what="12 steps")
    branch = parent.new_run_from_here()
    parent.stop()
    assert 12 <= branch.step <= parent.step


def test_update_queue_drops_the_oldest_and_listeners():
    s = Session("tiny", "sgd", queue_size=5, checkpoint_every=None)
    seen = []
    s.subscribe(seen.append)
    calls = []

    def bad(m):
        calls.append(m["step"])
        raise KeyError("ui bug")

    s.subscribe(bad)
    with pytest.warns(RuntimeWarning, match="listener"):
        s.run(steps=20)
    items = [s.updates.get_nowait() for _ in range(s.updates.qsize())]
    assert [m["step"] for m in items] == [17, 18, 19, 20, 20] and s.dropped_updates == 16
    assert all(m["run_id"] == s.run_id and "loss" in m for m in items[:-1])
    assert items[-1]["status"] == "finished" and "loss" not in items[-1]   # the end of the run
    assert [m["step"] for m in seen] == list(range(1, 21))
    assert calls == [1]                                       # removed after raising
    assert [e["kind"] for e in s.store.events(s.run_id)][:1] == ["listener_error"]
    assert s.status == "finished"


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown optimizer"):
        Session("tiny", "lbfgs")
    with pytest.raises(ValueError, match="unknown problem"):
        Session("imagenet", "kfac")
    with pytest.raises(ValueError, match="batch_size"):
        Session("tiny", "kfac", batch_size=10**6)
    with pytest.raises(ValueError, match="polyak"):
        Session("tiny", "kfac", polyak=1.5)
    with pytest.raises(ValueError, match="bad option"):
        Session("tiny", "sgd", optimizer_options={"damping": 3.0})
    with pytest.raises(ValueError, match="damping"):
        Session("tiny", "kfac", optimizer_options={"damping": -3.0})
    s = Session("tiny", "kfac", checkpoint_every=None, dtype="float64")
    assert next(s.model.parameters()).dtype == torch.float64 and s.problem.X.dtype == torch.float64
    s.run(steps=1)
    assert math.isfinite(s.last_metrics["loss"])
