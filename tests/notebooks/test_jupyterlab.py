"""The widgets in a real JupyterLab (``make notebooks``'s server, headless) driven by Debian's
chromium, with the internet cut off: the training lab's curve grows, keeps growing after the
approximation is toggled, and the kernel agrees; the Fisher explorer and a plain figure draw
their heatmaps; the page asks nothing of another host and logs no error.

Skipped where no chromium is found (the reason says how to install it) — except under
``CI=true``, where they must run. Screenshots go to ``$KFAC_LAB_SCREENSHOTS`` or a temp dir.
"""
from __future__ import annotations

import shutil

import jupytext
import nbformat
import pytest

from dashboards.conftest import poll as _poll, require_playwright

from .conftest import ROOT, lab_command

NOTEBOOKS = ROOT / "notebooks"

require_playwright()  # the `browser` fixture comes from pytest-playwright

pytestmark = [
    pytest.mark.slow,
    pytest.mark.jupyterlab,
    pytest.mark.filterwarnings("ignore:Session-scoped fixtures defined as instance methods"),
]

#: The notebook the tests open (cells run one by one, in order, by the tests).
NOTEBOOK = '''\
# %%
from kfac_lab import analysis, viz, widgets

# %%
lab = widgets.TrainingLabWidget("tiny", optimizers=("kfac",), steps=20000, eval_every=10, refresh=1.0)
lab

# %%
print("approx:", lab.session.optimizer.config.approx, lab.events)

# %%
model, x = analysis.figure1_setup(n=100, kfac_steps=1)
fisher = analysis.fisher_study(model, "categorical", x, layers=[2, 3], inverses=False)
explorer = widgets.FisherExplorerWidget({"figure 1": fisher})
explorer

# %%
viz.fisher_heatmaps(fisher)

# %%
live = widgets.FisherExplorerWidget.figure1(cases=100, kfac_steps=1, layers=[3], cumulants=False, light=True,
                                           max_size=1000)
live
'''
IMPORTS, LAB, APPROX, EXPLORER, FIGURE, LIVE = range(6)
KERNEL_IDLE = ("() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
               " const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;"
               " return !!k && k.status === 'idle'; }")
#: The last iteration on the error curve (its length is no measure: long runs are decimated).
LAST_STEP = ("el => { const d = (el.data || []).filter(t => t.name !== 'events' && t.x && t.x.length);"
             " return d.length ? d[0].x[d[0].x.length - 1] : 0 }")
EVENT_TEXT = "el => (el.data || []).filter(t => t.name === 'events').map(t => t.text.join(' | ')).join(' | ')"
#: What plotly.js made of the figure (``_fullData``: arrays decoded, whatever the transfer encoding).
HEATMAPS = ("el => ({types: (el._fullData || []).map(t => t.type),"
            " rows: (el._fullData || []).map(t => (t.z || []).length),"
            " drawn: el.querySelectorAll('.heatmaplayer image').length})")


def poll(fn, timeout=90.0, every=0.3, what="condition"):
    """The dashboards' ``poll`` with JupyterLab's longer patience (kernel start, widget render)."""
    return _poll(fn, timeout=timeout, every=every, what=what)


@pytest.fixture(scope="module")
def notebook(jupyterlab, lab_page):
    """widgets.ipynb opened in JupyterLab, its kernel started and idle; the page."""
    nb = jupytext.reads(NOTEBOOK, fmt="py:percent")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    jupytext.write(nb, jupyterlab.root / "widgets.ipynb")
    lab_page.goto(jupyterlab.url("lab/tree/widgets.ipynb"))
    lab_page.wait_for_function(KERNEL_IDLE, timeout=120_000)
    poll(lambda: lab_page.locator(".jp-Notebook .jp-Cell").count() == len(nb.cells), what="the cells")
    yield lab_page
    # stop the training thread before the server goes (the kernel is shut down with it)
    run_code = "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel" \
               ".requestExecute({code: 'lab.close()'}).done"
    try:
        lab_page.evaluate(run_code)
    except Exception:  # noqa: BLE001 - the server's shutdown ends the kernel anyway
        pass


def cell(page, i):
    return page.locator(".jp-Notebook .jp-Cell").nth(i)


def run(page, i) -> None:
    """Run cell ``i`` as a user does: click into it, Shift+Enter."""
    c = cell(page, i)
    c.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    poll(lambda: c.locator(".jp-InputPrompt").inner_text().strip() not in ("[ ]:", ""), what=f"cell {i} to start")


def finished(page, i, timeout=120.0) -> None:
    """Wait until cell ``i`` has an execution count (``[n]:``, not ``[*]:``); fail on a traceback."""
    c = cell(page, i)
    poll(lambda: c.locator(".jp-InputPrompt").inner_text().strip()[1:-2].isdigit(), timeout=timeout,
         what=f"cell {i} to finish")
    assert c.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr'] .ansi-red-fg").count() == 0, \
        c.locator(".jp-OutputArea").inner_text()


def three_heatmaps(fig) -> dict:
    """The figure's traces are three heatmaps, drawn (an image each); else AssertionError saying what is there."""
    h = fig.evaluate(HEATMAPS)
    assert h["types"] == ["heatmap"] * 3 and min(h["rows"]) > 0 and h["drawn"] >= 3, h
    return h


def test_server_is_local_with_a_token(jupyterlab):
    """Bound to 127.0.0.1 only, and the API refuses a request without the token."""
    import urllib.error
    import urllib.request

    cmd = lab_command(jupyterlab.port, jupyterlab.token, jupyterlab.root)
    assert "--ServerApp.ip=127.0.0.1" in cmd
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{jupyterlab.base}/api/contents", timeout=10)
    assert err.value.code == 403
    assert jupyterlab.api("status")["kernels"] >= 0


def test_jupyterlab_saves_a_notebook_as_a_pair(jupyterlab):
    """In a folder with notebooks/jupytext.toml, saving a notebook from JupyterLab writes its
    percent-format .py too (jupytext's contents manager) — how edits reach the .py files."""
    folder = jupyterlab.root / "paired"
    folder.mkdir()
    shutil.copy(NOTEBOOKS / "jupytext.toml", folder / "jupytext.toml")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# A title"),
                nbformat.v4.new_code_cell("STEPS = 3", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("print(STEPS)")]
    jupyterlab.api("contents/paired/x.ipynb", "PUT", {"type": "notebook", "format": "json", "content": nb})
    py = folder / "x.py"
    assert py.exists(), sorted(p.name for p in folder.iterdir())
    text = py.read_text()
    assert "# %% tags=[\"parameters\"]\nSTEPS = 3" in text and "# %% [markdown]\n# # A title" in text
    assert "jupytext_version:" not in text, "no version stamp in the .py"


def test_training_lab_curve_grows_and_keeps_growing_after_a_toggle(notebook, screenshot_dir):
    page = notebook
    run(page, IMPORTS)  # each test runs it: under xdist, either may be the first in its worker
    finished(page, IMPORTS)
    run(page, LAB)
    out = cell(page, LAB).locator(".jp-OutputArea")
    start = out.locator("button[title='train (all runs)']")
    start.wait_for(timeout=120_000)
    fig = out.locator(".js-plotly-plot").first
    fig.wait_for(timeout=60_000)
    assert out.locator(".js-plotly-plot").count() == 3, "iterations, seconds and the λ/γ/α/μ/ρ traces"
    start.click()
    status = out.locator(".widget-html")
    poll(lambda: "running" in " ".join(status.all_inner_texts()), timeout=60,
         what="the status to say 'running' after the click on start")
    n1 = poll(lambda: (lambda n: n >= 3 and n)(fig.evaluate(LAST_STEP)), what="the curve to appear")
    n2 = poll(lambda: (lambda n: n > n1 and n)(fig.evaluate(LAST_STEP)), what="the curve to grow")

    toggle = out.locator(".widget-toggle-button", has_text="block-tridiagonal")
    toggle.click()
    poll(lambda: "mod-active" in (toggle.get_attribute("class") or ""), what="the toggle to show as pressed")

    def kernel_took_it():  # the widget's message and the cell's run race on a loaded machine: ask again
        run(page, APPROX)
        finished(page, APPROX)
        said = cell(page, APPROX).locator(".jp-OutputArea").inner_text()
        return "approx: tridiag" in said and said

    said = poll(kernel_took_it, timeout=60, every=1.0, what="the kernel to take the click (approx: tridiag)")
    assert "approx: tridiag" in said, said
    text = poll(lambda: "approx=tridiag" in fig.evaluate(EVENT_TEXT) and fig.evaluate(EVENT_TEXT),
                what="the marker of the toggle on the curve")
    assert "control" in text
    n3 = fig.evaluate(LAST_STEP)
    n4 = poll(lambda: (lambda n: n > n3 and n)(fig.evaluate(LAST_STEP)), what="training to go on after it")
    assert n1 < n2 <= n3 < n4

    cell(page, LAB).evaluate("el => el.scrollIntoView({block: 'start'})")  # controls and curves
    page.screenshot(path=str(screenshot_dir / "jupyterlab_training_lab.png"))
    out.locator("button[title^='stop']").click()
    assert page.watch.errors == []
    assert page.watch.external == [], "the page asked for something outside this machine (a CDN?)"


def test_fisher_explorer_and_a_plain_figure_draw_heatmaps(notebook, screenshot_dir):
    page = notebook
    run(page, IMPORTS)
    finished(page, IMPORTS)
    run(page, EXPLORER)
    finished(page, EXPLORER, timeout=180)
    fig = cell(page, EXPLORER).locator(".jp-OutputArea .js-plotly-plot").first
    fig.wait_for(timeout=60_000)
    poll(lambda: three_heatmaps(fig), what="the explorer's heatmaps")
    shown = cell(page, EXPLORER).locator(".widget-dropdown", has_text="colour scale").locator("select")
    assert shown.evaluate("el => el.selectedIndex >= 0 && el.options[el.selectedIndex].text") == "default"
    cell(page, EXPLORER).evaluate("el => el.scrollIntoView({block: 'start'})")
    page.screenshot(path=str(screenshot_dir / "jupyterlab_fisher_explorer.png"))

    run(page, FIGURE)  # a figure, not a widget: JupyterLab's plotly renderer (application/vnd.plotly.v1+json)
    finished(page, FIGURE)
    plain = cell(page, FIGURE).locator(".jp-OutputArea .js-plotly-plot").first
    plain.wait_for(timeout=60_000)
    poll(lambda: three_heatmaps(plain), what="the plain figure's heatmaps")
    assert page.watch.errors == []
    assert page.watch.external == [], "the page asked for something outside this machine (a CDN?)"


def test_fisher_explorer_sliders_recompute_in_the_browser(notebook):
    """The figure-1 explorer (light: plotly JSON in an Output widget) draws its heatmaps, and a layer
    toggled in the page recomputes the study and redraws them."""
    page = notebook
    run(page, IMPORTS)
    finished(page, IMPORTS)
    run(page, LIVE)
    finished(page, LIVE, timeout=180)
    out = cell(page, LIVE)
    fig = out.locator(".jp-OutputArea .js-plotly-plot").first
    fig.wait_for(timeout=60_000)
    assert poll(lambda: three_heatmaps(fig), what="the live explorer's heatmaps")["rows"] == [420] * 3
    assert "P = 420 parameters" in out.inner_text()
    out.locator("button", has_text="L3").click()                     # layer L3 joins L4
    poll(lambda: "P = 840 parameters" in out.inner_text(), timeout=180, what="the recomputed study")
    fig = out.locator(".jp-OutputArea .js-plotly-plot").first
    poll(lambda: three_heatmaps(fig)["rows"] == [840] * 3, what="the redrawn heatmaps of both layers")
    assert page.watch.errors == []
    assert page.watch.external == [], "the page asked for something outside this machine (a CDN?)"
