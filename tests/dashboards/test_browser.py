"""Both dashboards in a real browser (Debian's chromium through Playwright).

Skipped where no chromium is found (the reason says how to install it) — except under
``CI=true``, where they must run. The README's screenshots (docs/screenshots/) come from here, but
only through ``make screenshots``; a plain test run saves them in a temporary directory.
"""
from __future__ import annotations

import re

import pytest

from .conftest import poll, require_playwright

require_playwright()  # the `page` fixture comes from pytest-playwright

pytestmark = [
    pytest.mark.slow,
    # pytest-base-url (a pytest-playwright dependency) defines a fixture pytest 9 deprecates
    pytest.mark.filterwarnings("ignore:Session-scoped fixtures defined as instance methods"),
]

RUN_ID = re.compile(r"run (\d{8}-\d{6}-[0-9a-f]{4})")


def pane_text(locator) -> str:
    """Text of a Panel pane (its content lives in the element's shadow root)."""
    return locator.first.evaluate(
        "el => Array.from((el.shadowRoot || el).children).filter(c => !['STYLE', 'LINK'].includes(c.tagName))"
        ".map(c => c.innerText || '').join(' ')")


def hover_text(page, fig) -> str:
    """Move the mouse over the first heatmap until plotly shows its hover label; the label's text."""
    spots = iter([(0.3, 0.7), (0.4, 0.6), (0.6, 0.4), (0.5, 0.5), (0.7, 0.3)] * 10)

    def attempt():
        fx, fy = next(spots)
        page.mouse.move(0, 0)
        box = fig.locator(".nsewdrag").first.bounding_box()
        page.mouse.move(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy, steps=3)
        label = fig.locator(".hovertext")
        return label.count() and label.first.text_content()

    return poll(attempt, timeout=30, every=0.3, what="the hover label")


CURVE_LEN = "el => { const d = (el.data || []).filter(t => t.name !== 'events'); return d.length ? d[0].x.length : 0 }"
EVENT_TEXT = "el => (el.data || []).filter(t => t.name === 'events').map(t => t.text.join(' | ')).join(' | ')"


def test_training_lab(page, served, watch_page, screenshot_dir):
    from kfac_lab.store import Store

    page.goto(served.url("training_lab"))
    fig = page.locator(".kfac-fig-step .js-plotly-plot")
    fig.wait_for(timeout=60_000)
    page.locator(".kfac-start button").click()
    n1 = poll(lambda: fig.evaluate(CURVE_LEN) >= 3 and fig.evaluate(CURVE_LEN), what="the curve to appear")
    n2 = poll(lambda: fig.evaluate(CURVE_LEN) > n1 and fig.evaluate(CURVE_LEN), what="the curve to grow")
    assert n2 > n1
    status = page.locator(".kfac-status")
    run_id = poll(lambda: RUN_ID.search(pane_text(status)), what="the run id").group(1)

    # bad input: a message next to the control, training goes on
    damping = page.locator(".kfac-field-damping input")
    damping.fill("abc")
    damping.press("Enter")
    message = page.locator(".kfac-field-damping.kfac-message")
    poll(lambda: "not a number" in pane_text(message), what="the damping message")
    damping.fill("-5")
    damping.press("Enter")
    poll(lambda: "must be > 0" in pane_text(message), what="the negative-damping message")

    # flip the approximation, momentum and λ while training runs
    page.get_by_role("button", name="block-tridiagonal").click()
    page.locator(".kfac-momentum input").click()
    damping.fill("30")
    damping.press("Enter")
    poll(lambda: pane_text(message).strip() == "", what="the message to clear")
    text = poll(lambda: (lambda t: all(s in t for s in ("approx=tridiag", "momentum=False", "damping=30.0")) and t)(
        fig.evaluate(EVENT_TEXT)), timeout=30, what="the event markers")
    assert "control" in text
    n3 = fig.evaluate(CURVE_LEN)
    poll(lambda: fig.evaluate(CURVE_LEN) > n3, what="training to go on after the controls")

    # ... and in the store, at the step where they took effect
    def stored():
        ev = [e for e in Store(served.store_path, mode="r").events(run_id) if e["kind"] == "control"]
        keys = {k for e in ev for k in e}
        return {"approx", "momentum", "damping"} <= keys and ev

    ev = poll(stored, timeout=30, what="the control events in the store")
    assert {e["approx"] for e in ev if "approx" in e} == {"tridiag"}
    assert {e["damping"] for e in ev if "damping" in e} == {30.0}
    assert {e["momentum"] for e in ev if "momentum" in e} == {False}

    # the trace figure (redrawn every few seconds) has caught up with the curves: a consistent picture
    last_x = "el => { const d = (el.data || []).filter(t => t.name !== 'events' && t.x && t.x.length); " \
             "return d.length ? d[0].x[d[0].x.length - 1] : 0 }"
    first_event = fig.evaluate("el => Math.min(...el.data.filter(t => t.name === 'events')[0].x)")
    target = poll(lambda: (lambda x: x >= 1.4 * first_event and x)(fig.evaluate(last_x)), timeout=60,
                  what="a stretch of training after the controls")
    traces = page.locator(".kfac-fig-traces .js-plotly-plot")
    poll(lambda: traces.evaluate(last_x) >= target, timeout=30, what="the trace figure to catch up")
    page.screenshot(path=str(screenshot_dir / "training_lab.png"))

    # stop; a reload lists the run among the stored ones
    page.locator(".kfac-stop button").click()
    poll(lambda: "stopped" in pane_text(status), what="the stop")
    page.reload()
    fig.wait_for(timeout=60_000)
    page.locator(".kfac-compare input").first.click()
    poll(lambda: page.get_by_text(run_id).first.is_visible(), what="the run in the list after a reload")

    assert watch_page.errors == []
    assert watch_page.external == [], "the page asked for something outside this server (a CDN?)"


def test_fisher_explorer(page, served, watch_page, screenshot_dir):
    page.goto(served.url("fisher_explorer"))
    page.locator(".kfac-compute button").wait_for(timeout=60_000)
    fig = page.locator(".kfac-fig-figure1 .js-plotly-plot")
    fig.wait_for(timeout=60_000)
    labels = poll(lambda: fig.evaluate("el => (el.data || []).length === 3 && el.data[0].y.slice(0, 3)"), timeout=120,
                  what="figure 1")
    assert all(str(v).startswith("L3 W[") for v in labels)
    assert fig.evaluate("el => el.data.map(t => t.type)") == ["heatmap"] * 3
    # hovering a cell names the two weights
    hover = hover_text(page, fig)
    assert re.search(r"row: L\d W\[", hover) and re.search(r"col: L\d W\[", hover), hover
    # figure 1 shows first; the status says "done in" once the cumulants follow
    poll(lambda: "done in" in pane_text(page.locator(".kfac-status")), timeout=120, what="status 'done in'")
    page.screenshot(path=str(screenshot_dir / "fisher_explorer.png"))

    # one layer block at full resolution: every cell is one pair of weights
    page.locator(".kfac-zoom select").select_option(label="block L3 × L4 (every weight)")
    poll(lambda: fig.evaluate("el => el.data[0].y.length === 420 && el.data[0].x.length === 420"), timeout=60,
         what="the zoomed block")
    hover = hover_text(page, fig)
    assert re.search(r"row: L3 W\[\d+,\d+\]", hover) and re.search(r"col: L4 W\[\d+,\d+\]", hover), hover
    assert "…" not in hover

    assert watch_page.errors == []
    assert watch_page.external == [], "the page asked for something outside this server (a CDN?)"
