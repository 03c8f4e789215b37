"""One meaning per name: ``Session.restore`` continues a stored run, ``session.unpause()`` ends a
pause; the old ``resume`` spellings still work for one release, each with a DeprecationWarning
naming the new one, and the new names warn about nothing."""
import time
import warnings

import pytest
import torch

from kfac_lab.train import Session

TIMEOUT = 60.0


def wait_for(cond, what):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > TIMEOUT:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def paused_session():
    s = Session("tiny", "sgd", checkpoint_every=None, eval_every=1000)
    s.start()
    wait_for(lambda: s.step >= 2, "2 steps")
    s.pause()
    wait_for(lambda: s.status == "paused", "paused")
    return s


def test_unpause_continues_without_a_warning():
    s = paused_session()
    k = s.step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.unpause()
    wait_for(lambda: s.step >= k + 2, "steps after unpause")
    s.stop()
    assert s.status == "stopped"


def test_the_instance_alias_unpauses_and_warns():
    s = paused_session()
    k = s.step
    with pytest.warns(DeprecationWarning, match=r"session\.resume\(\) is deprecated; use session\.unpause\(\)"):
        s.resume()
    wait_for(lambda: s.step >= k + 2, "steps after the deprecated resume()")
    s.stop()
    assert s.status == "stopped"


def stopped_run():
    s = Session("tiny", "sgd", checkpoint_every=2, steps=6, eval_every=1000)
    s.run(steps=4)
    return s


def test_restore_continues_the_stored_run_without_a_warning():
    s = stopped_run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = Session.restore(s.store, s.run_id)
    assert r.run_id == s.run_id and r.step == 4 and r.status == "idle"
    r.run()
    assert r.step == 6


def test_the_class_alias_restores_and_warns():
    s = stopped_run()
    with pytest.warns(DeprecationWarning, match=r"Session\.resume\(store, run_id, \.\.\.\) is deprecated; "
                                                r"use Session\.restore"):
        r = Session.resume(s.store, s.run_id, steps=5)
    assert isinstance(r, Session) and r.run_id == s.run_id and r.step == 4 and r.budget_steps == 5
    r.run()
    assert r.step == 5 and all(torch.isfinite(p).all() for p in r.model.parameters())
    assert Session.resume.__doc__ == Session.restore.__doc__  # help() shows what it does


def test_the_instance_alias_with_arguments_still_restores_and_warns():
    s = stopped_run()
    with pytest.warns(DeprecationWarning, match=r"use Session\.restore"):
        r = s.resume(s.store, s.run_id)
    assert r is not s and r.run_id == s.run_id and r.step == 4
    assert s.resume.__doc__ == Session.unpause.__doc__
