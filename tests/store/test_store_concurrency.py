"""Readers during writes (threads and processes) and writers killed with SIGKILL."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from kfac_lab.store import Store, StoreWarning

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")

WRITER = textwrap.dedent(
    """
    import sys
    from kfac_lab.store import Store

    path, run, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = Store(path, flush_every=3, flush_interval=None)
    if start == 0:
        store.new_run({"who": "writer", "cfg": {"flush_every": 3}}, run_id=run)
    step = start
    while True:
        store.log(run, step, loss=float(step), half=step / 2, tag=f"s{step}",
                  **{f"late{step // 40}": float(step)})
        if step % 7 == 0:
            store.event(run, step, "tick", n=step)
        if step == start + 6:
            print("ready", flush=True)
        step += 1
    """
)


def check_run(ds: xr.Dataset, max_lost_events: int = 0) -> int:
    """Assert a snapshot of a killed writer's run is intact; return its row count."""
    n = ds.sizes["step"]
    if n == 0:
        return 0
    steps = ds.step.values
    np.testing.assert_array_equal(steps, np.arange(n))  # contiguous, nothing half-written
    np.testing.assert_array_equal(ds.loss.values, steps.astype(float))
    np.testing.assert_array_equal(ds.half.values, steps / 2)
    assert ds.tag.values.tolist() == [f"s{s}" for s in steps]
    for name in ds.data_vars:
        if name.startswith("late"):
            k = int(name[4:])
            expect = np.where(steps // 40 == k, steps.astype(float), np.nan)
            np.testing.assert_array_equal(ds[name].values, expect)
    # events are recorded after their row, so a kill may commit row 7k but lose event 7k
    # (one per kill at most); the others are all there, in order, with their details
    ev = ds.event_step.values.tolist()
    assert ev == sorted(set(ev)) and all(e % 7 == 0 and e <= steps[-1] for e in ev)
    assert len(ev) >= steps[-1] // 7 + 1 - max_lost_events
    assert ds.event_details.values.tolist() == [f'{{"n": {e}}}' for e in ev]
    return n


def spawn(path, run, start):
    root = str(Path(__file__).resolve().parents[2])  # the repo, so kfac_lab imports
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), run, str(start)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    return proc


def wait_ready(proc):
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"writer failed to start: {line}{proc.stderr.read()}")


def test_sigkill_writers_lose_only_unflushed_rows(tmp_path):
    path = tmp_path / "lab.zarr"
    Store(path).close()
    rng = random.Random(0)
    runs = ["run-a", "run-b"]
    counts = {r: 0 for r in runs}
    for round_ in range(2):  # second round resumes the killed runs (tidies the debris)
        procs = [spawn(path, r, 0 if round_ == 0 else counts[r]) for r in runs]
        for p in procs:
            wait_ready(p)
        # a reader in this process polls while both writers append
        deadline = time.monotonic() + rng.uniform(0.6, 1.2)
        with Store(path, mode="r") as reader:
            seen = {r: 0 for r in runs}
            while time.monotonic() < deadline:
                for r in runs:
                    n = check_run(reader.load_run(r), max_lost_events=round_ + 1)  # +1: in flight
                    assert n >= seen[r]
                    seen[r] = n
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(timeout=10)
            assert p.returncode == -signal.SIGKILL
        with Store(path) as store:  # opens fine after the kill
            for r in runs:
                n = check_run(store.load_run(r), max_lost_events=round_ + 1)
                assert n > counts[r], "the writer made progress"
                counts[r] = n
            table = store.runs()
            assert table.loc["run-a", "steps"] == counts["run-a"]
            assert table.loc["run-a", "cfg"] == {"flush_every": 3}
    # plain xarray may trip on a killed writer's debris; repair() trims it
    with Store(path) as store, pytest.warns(StoreWarning, match="ended without releasing") as taken:
        store.repair()  # the killed writers' locks went with them: taken over, with a warning
    assert {str(w.message).split("'")[1] for w in taken} == set(runs)
    with Store(path) as store:
        for r in runs:
            assert check_run(store.load_run(r), max_lost_events=2) == counts[r]
    tree = xr.open_datatree(path, engine="zarr", consolidated=False)
    for r in runs:
        assert tree[f"runs/{r}"].ds.sizes["step"] == counts[r]


def test_reader_thread_while_writer_appends(tmp_path):
    path = tmp_path / "lab.zarr"
    writer = Store(path, flush_every=4, flush_interval=None)
    run = writer.new_run({"who": "thread"}, run_id="live")
    total = 120
    errors = []
    done = threading.Event()

    def write():
        try:
            for step in range(total):
                writer.log(run, step, loss=float(step), half=step / 2, tag=f"s{step}",
                           **{f"late{step // 40}": float(step)})
                if step % 7 == 0:
                    writer.event(run, step, "tick", n=step)
            writer.flush()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    snapshots = []

    def read():
        with Store(path, mode="r") as reader:
            while True:
                finished = done.is_set()  # one more full read after the writer is done
                if finished and len(snapshots) >= 3:
                    snapshots.append(check_run(reader.load_run(run)))
                    return
                try:
                    snapshots.append(check_run(reader.load_run(run), max_lost_events=1))
                    cv = reader.curves(metrics=["loss"])
                    np.testing.assert_array_equal(cv.loss.values[0], cv.step.values.astype(float))
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    writer.close()
    assert not errors, errors
    assert max(snapshots) == total and len(set(snapshots)) > 2
    assert check_run(Store(path, mode="r").load_run(run)) == total
