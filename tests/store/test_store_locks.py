"""One writer per run, with real processes: a second writer is refused at once, a killed
writer is taken over with a warning, readers never block."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from kfac_lab.store import Store, StoreError, StoreWarning

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock and SIGKILL are POSIX")
ROOT = str(Path(__file__).resolve().parents[2])

# Logs rows [start, start+n) to RUN, prints "ready" (after a flush) half way, then waits
# for a line on stdin before the second half; a refused writer prints "refused <s> <msg>".
WRITER = textwrap.dedent(
    """
    import sys, time
    from kfac_lab.store import Store, StoreError

    path, run, start, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = Store(path, flush_every=10, flush_interval=None)
    t0 = time.perf_counter()
    try:
        for step in range(start, start + n // 2):
            store.log(run, step, loss=float(step), tag=f"s{step}")
    except StoreError as exc:
        print("refused", time.perf_counter() - t0, exc, flush=True)
        sys.exit(3)
    store.flush()
    print("ready", flush=True)
    if sys.stdin.readline().strip() == "hang":
        time.sleep(600)
    for step in range(start + n // 2, start + n):
        store.log(run, step, loss=float(step), tag=f"s{step}")
    store.close()
    print("done", flush=True)
    """
)


def spawn(path, run, start=0, n=400):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), run, str(start), str(n)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def expect(proc, word):
    line = proc.stdout.readline()
    if not line.startswith(word):
        proc.kill()
        raise AssertionError(f"expected {word!r}, got {line!r}: {proc.stderr.read()}")
    return line


def finish(proc):
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()


def make_run(path, run="r"):
    with Store(path) as s:
        s.new_run({"who": "test"}, run_id=run)


def assert_rows(path, run, n):
    ds = Store(path, mode="r").load_run(run)
    np.testing.assert_array_equal(ds.step.values, np.arange(n))
    np.testing.assert_array_equal(ds.loss.values, np.arange(n, dtype=float))
    assert ds.tag.values.tolist() == [f"s{i}" for i in range(n)]


def test_second_writer_refused_at_once_first_keeps_every_row(tmp_path):
    path = tmp_path / "lab.zarr"
    make_run(path)
    a = spawn(path, "r")
    expect(a, "ready")
    b = spawn(path, "r")
    line = expect(b, "refused")
    finish(b)
    assert b.returncode == 3
    seconds = float(line.split()[1])
    assert seconds < 2.0, f"the second writer waited {seconds:.2f}s"  # refused, never queued
    assert f"is being written by pid {a.pid} on " in line and "since" in line
    assert "wait for it or branch a new run from its checkpoint" in line
    a.stdin.write("go\n")
    a.stdin.flush()
    expect(a, "done")
    finish(a)
    assert a.returncode == 0
    assert_rows(path, "r", 400)  # all 400 rows of the first writer, in order
    with Store(path, mode="r") as s:
        assert s.writer("r") is None  # released cleanly


def test_killed_writer_is_taken_over_with_a_warning(tmp_path):
    path = tmp_path / "lab.zarr"
    make_run(path)
    a = spawn(path, "r")
    expect(a, "ready")
    a.send_signal(signal.SIGKILL)
    finish(a)
    with Store(path, mode="r") as s:
        assert s.writer("r")["pid"] == a.pid  # the dead writer's record is still there
    with Store(path) as s:
        with pytest.warns(StoreWarning, match=rf"previous writer \(pid {a.pid} on .*ended without releasing"):
            s.log("r", 200, loss=200.0, tag="s200")
        assert s.writer("r")["pid"] == os.getpid()
    assert_rows(path, "r", 201)  # the 200 committed rows kept, the new one after them
    with Store(path, mode="r") as s:
        assert s.writer("r") is None


def test_readers_do_not_block_while_a_writer_holds(tmp_path):
    path = tmp_path / "lab.zarr"
    make_run(path)
    a = spawn(path, "r")
    try:
        expect(a, "ready")
        t0 = time.perf_counter()
        with Store(path, mode="r") as s:
            assert s.load_run("r").sizes["step"] == 200
            assert s.curves().loss.shape == (1, 200)
            assert s.runs().loc["r", "steps"] == 200
            assert s.writer("r")["pid"] == a.pid
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tree = xr.open_datatree(path, engine="zarr")
        assert tree["runs/r"].ds.sizes["step"] == 200
        assert time.perf_counter() - t0 < 5.0
        with Store(path) as s:  # a writable Store that does not write takes nothing
            with pytest.raises(StoreError, match=f"being written by pid {a.pid}"):
                s.repair("r")  # repair is a writer: refused, nothing touched
            with pytest.raises(StoreError, match=f"being written by pid {a.pid}"):
                s.claim("r")
        assert_rows(path, "r", 200)
    finally:
        a.stdin.write("go\n")
        a.stdin.flush()
        finish(a)
    assert_rows(path, "r", 400)


def test_two_store_objects_in_one_process(tmp_path):
    path = tmp_path / "lab.zarr"
    make_run(path)
    first, second = Store(path), Store(path)
    first.log("r", 0, loss=0.0)
    with pytest.raises(StoreError, match=f"being written by pid {os.getpid()}"):
        second.log("r", 1, loss=1.0)
    with pytest.raises(StoreError, match="being written"):
        second.save_checkpoint("r", 1, {}, {})
    first.release("r")  # flushes and lets go
    second.log("r", 1, loss=1.0)
    second.close()
    first.close()
    assert Store(path, mode="r").load_run("r").loss.values.tolist() == [0.0, 1.0]


def test_a_second_running_session_in_this_process_is_refused(tmp_path):
    from kfac_lab.train import Session

    path = tmp_path / "lab.zarr"
    s = Session("tiny", "kfac", str(path), checkpoint_every=5, eval_every=5)
    s.run(5)
    started = threading.Event()
    s.subscribe(lambda m: started.set())
    s.start(steps=100000)
    try:
        assert started.wait(30)
        with pytest.raises(StoreError, match=f"run '{s.run_id}' is being written by Session"):
            Session.restore(s.store, s.run_id)
    finally:
        s.stop()
    s2 = Session.restore(s.store, s.run_id, steps=3)  # once stopped, resuming is fine
    assert s2.run()["status"] == "finished"
    s.store.close()


def test_a_store_dropped_without_close_lets_go(tmp_path):
    import gc

    path = tmp_path / "lab.zarr"
    make_run(path)
    Store(path).log("r", 0, loss=0.0)  # never closed: its row is lost, its lock must not be kept
    gc.collect()
    with Store(path) as s:
        s.log("r", 0, loss=1.0)
    assert Store(path, mode="r").load_run("r").loss.values.tolist() == [1.0]
