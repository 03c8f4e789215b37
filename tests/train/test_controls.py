"""ControlQueue on its own: order, validation against every pending change, nothing queued when
refused, replay of stored control events, and submissions from real threads."""
import threading

import pytest

from kfac_lab.train.controls import ControlQueue


def test_changes_come_out_in_order_once():
    q = ControlQueue()
    q.submit({"batch_size": 8}, {})
    q.submit({}, {"lr": 0.1})
    q.submit({"eval_every": 3}, {"lr": 0.2, "momentum": False})
    assert len(q) == 3
    assert q.take(5) == ([], [{"batch_size": 8}, {"lr": 0.1}, {"eval_every": 3, "lr": 0.2, "momentum": False}])
    assert q.take(6) == ([], []) and len(q) == 0


def test_validation_sees_every_pending_optimizer_setting_and_a_refusal_queues_nothing():
    seen = []

    def validate(merged, new):
        seen.append((dict(merged), dict(new)))
        if merged.get("approx") == "tridiag" and merged.get("momentum") is False:
            raise ValueError("not together")
        return {k: (float(v) if k == "lr" else v) for k, v in new.items()}

    q = ControlQueue()
    q.submit({"batch_size": 4}, {"lr": 1, "approx": "tridiag"}, validate)
    q.submit({}, {"lr": 2}, validate)
    assert seen[-1] == ({"lr": 2, "approx": "tridiag"}, {"lr": 2})  # the later over the earlier
    with pytest.raises(ValueError, match="not together"):
        q.submit({"eval_every": 2}, {"momentum": False}, validate)
    q.submit({"eval_every": 2}, {}, validate)  # session settings alone: no optimizer validation
    assert len(seen) == 3
    assert q.pending_optimizer_settings() == {"lr": 2.0, "approx": "tridiag"}
    assert q.take(1)[1] == [{"batch_size": 4, "lr": 1.0, "approx": "tridiag"}, {"lr": 2.0}, {"eval_every": 2}]


def test_stored_control_events_are_replayed_at_their_steps_only():
    events = [{"step": 3, "kind": "control", "lr": 0.1}, {"step": 5, "kind": "rejected", "reason": "x"},
              {"step": 7, "kind": "control", "lr": 0.2}, {"step": 7, "kind": "control", "batch_size": 4},
              {"step": 12, "kind": "control", "lr": 0.3}]
    q = ControlQueue()
    q.replay_events(events, after=3, upto=10)  # re-done steps 4..10: step 3 was before the checkpoint
    q.submit({}, {"lr": 0.5})
    assert q.take(4) == ([], [{"lr": 0.5}])
    assert q.take(7) == ([{"lr": 0.2}, {"batch_size": 4}], [])
    assert q.take(7) == ([], []) and q.take(12) == ([], []) and q.take(3) == ([], [])


def test_submissions_from_many_threads_all_arrive_once():
    q = ControlQueue()
    n_threads, per_thread = 8, 200
    barrier = threading.Barrier(n_threads)

    def work(t):
        barrier.wait()
        for i in range(per_thread):
            q.submit({}, {"lr": (t, i)}, lambda merged, new: dict(new))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    taken = []
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        taken += q.take(1)[1]
    for th in threads:
        th.join()
    taken += q.take(1)[1]
    got = [c["lr"] for c in taken]
    assert sorted(got) == sorted((t, i) for t in range(n_threads) for i in range(per_thread))
    for t in range(n_threads):  # each thread's changes in its own order
        assert [i for (tt, i) in got if tt == t] == list(range(per_thread))
