"""The two training labs (the Panel page and the Jupyter widget) are views of one model: the same
control ranges and options, the same status text, the same decimated points of the same run."""
from __future__ import annotations

import html
import math
import time

import numpy as np
import pytest

from kfac_lab.dashboards import TrainingLabApp, TrainingLabPage
from kfac_lab.lab.controls import APPROX, DAMPING_MAX, DAMPING_MIN, LR_MODES
from kfac_lab.store import Store
from kfac_lab.widgets import TrainingLabWidget


def wait_for(cond, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met")


@pytest.fixture
def views(tmp_path):
    store = Store(tmp_path / "lab.zarr", flush_interval=0.5)
    widget = TrainingLabWidget("tiny", optimizers=("kfac",), store=store, drainer=False, eval_every=5,
                               checkpoint_every=None)
    app = TrainingLabApp(store=store, problem="tiny", steps=0, eval_every=5)
    page = TrainingLabPage(app)
    yield widget, app, page
    app.close(wait=True, timeout=30)
    widget.close()


def test_same_control_ranges_and_options(views):
    widget, app, page = views
    values = list(page.damping_slider.options.values())
    assert (min(values), max(values)) == (DAMPING_MIN, DAMPING_MAX)
    c = widget.controls
    assert (10 ** c["damping"].min, 10 ** c["damping"].max) == pytest.approx((DAMPING_MIN, DAMPING_MAX))
    assert dict(c["approx"].options) == page.approx.options == APPROX
    assert dict(c["lr_mode"].options) == page.lr_mode.options == LR_MODES


def test_same_status_text(views):
    widget, app, page = views
    widget.start(steps=12)
    widget.wait(timeout=120)
    st = widget.monitor.status(widget.session, widget.store)
    assert st.text.startswith("finished · step 12 · ") and "λ " in st.text and "blockdiag, momentum on" in st.text
    assert html.escape(st.text) in widget.controls["status"].value
    assert app.start()
    sess = app.sessions[0]
    wait_for(lambda: sess.step >= 3)
    app.stop(wait=True)
    app.poll()
    page._update_status()
    st = app.monitor.status(sess, app.store)
    assert st.text.startswith("stopped · step ") and html.escape(st.text) in page.status.object
    assert html.escape(st.footnote) in page.status.object


def test_the_same_run_is_decimated_to_the_same_points(views, monkeypatch):
    import kfac_lab.lab.runs as runs

    monkeypatch.setattr(runs, "MAX_POINTS", 20)
    widget, app, page = views
    widget.start(steps=120)
    widget.wait(timeout=120)
    widget.store.flush()
    app.set_compare([widget.session.run_id])             # the same run, read back from the store
    page.refresh(force=True)
    assert len(widget.figure.data[0].x) < 120
    np.testing.assert_array_equal(page.fig_step.object.data[0].x, widget.figure.data[0].x)
    np.testing.assert_allclose(page.fig_step.object.data[0].y, widget.figure.data[0].y)
    lam = [t for t in page.fig_traces.object.data if t.meta and t.meta["variable"] == "damping"][0]
    wlam = [t for t in widget.figures["traces"].data if t.meta and t.meta["variable"] == "damping"][0]
    np.testing.assert_array_equal(lam.x, wlam.x)
    assert all(math.isfinite(v) for v in lam.y)
