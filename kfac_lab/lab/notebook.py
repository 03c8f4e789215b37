"""What the lecture notebooks need from the kernel: light figures and numbers a test can read.

- :func:`light_figures` — plotly figures as their JSON only (``plotly_mimetype``): JupyterLab draws
  them with the extension that ships with plotly, and the saved notebook holds no copy of
  plotly.js (the default ``notebook`` renderer embeds 4 MB of it, plus an HTML copy per figure).
- :func:`interactive_figure` — ``ipywidgets.interact`` for a plotly figure, drawn by setting an
  ``Output`` widget's ``outputs`` rather than by capturing the function's display: headless
  execution (nbclient, papermill) of ``interact`` with a displayed figure hangs now and then
  (jupyter/nbclient#312, jupyter/nbconvert#2029 — seen here as a ten-minute stall of notebook 04
  in the test suite), and this path sends no captured display messages at all.
- :func:`record` — show a line of text for the reader and, beside it, the numbers the text quotes
  under the mimetype :data:`MIME` (JupyterLab has no renderer for it and shows the text; nbformat
  keeps both). :func:`recorded` reads them back from an executed notebook, so a test can check
  every claim a notebook's prose makes against the numbers its run printed.
"""
from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MIME", "figure_output", "interactive_figure", "light_figures", "record", "recorded"]

#: The mimetype of the recorded numbers.
MIME = "application/vnd.kfac-lab.numbers+json"


def light_figures() -> None:
    """Render plotly figures as ``application/vnd.plotly.v1+json`` only, from now on in this kernel."""
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype"


def figure_output(fig) -> tuple[dict]:
    """``fig`` (a plotly figure) as an ``ipywidgets.Output``'s ``outputs``: its JSON only
    (``application/vnd.plotly.v1+json``), set as widget state — no display is captured and no
    copy of plotly.js is stored."""
    import plotly.io as pio

    return ({"output_type": "display_data", "metadata": {},
             "data": pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict())},)


def interactive_figure(make_figure, **controls):
    """``make_figure(**values)`` (a plotly figure) redrawn whenever one of ``controls`` (ipywidgets,
    by keyword) changes value; returns the widget box — the controls, then the figure. The figure
    goes in as its JSON (``application/vnd.plotly.v1+json``, drawn by the extension that ships with
    plotly, as under :func:`light_figures`). An exception in ``make_figure`` is shown in its
    place, and the controls stay usable."""
    import html

    import ipywidgets as w

    if not controls:
        raise ValueError("interactive_figure: give the controls by keyword, e.g. lam=ipywidgets.FloatSlider(...)")
    bad = [k for k, c in controls.items() if not hasattr(c, "observe") or not hasattr(c, "value")]
    if bad:
        raise TypeError(f"interactive_figure: {bad} must be ipywidgets controls (with .value), e.g. ipywidgets.IntSlider()")
    out = w.Output(layout=w.Layout(width="100%"))

    def draw(_change=None) -> None:
        try:
            out.outputs = figure_output(make_figure(**{k: c.value for k, c in controls.items()}))
        except Exception as exc:  # noqa: BLE001 - shown where the figure would be
            text = f"{type(exc).__name__}: {exc}"
            out.outputs = ({"output_type": "display_data", "metadata": {},
                            "data": {"text/html": f"<pre style='color:#b00'>{html.escape(text)}</pre>",
                                     "text/plain": text}},)

    for c in controls.values():
        c.observe(draw, names="value")
    draw()
    return w.VBox([w.HBox(list(controls.values())), out])


def _plain(value: Any) -> Any:
    """A JSON value: tensors, numpy scalars and arrays become numbers and lists; non-finite floats strings."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    raise TypeError(f"record: {type(value).__name__} is not a number, string, list or dict")


def record(text: str, **numbers: Any) -> None:
    """Display ``text`` (what the reader sees) with ``numbers`` attached for tests (:func:`recorded`)."""
    from IPython.display import display

    display({"text/plain": text, MIME: _plain(numbers)}, raw=True)


def recorded(nb) -> dict[str, Any]:
    """Every number :func:`record` attached in an executed notebook (an ``nbformat`` node, a dict
    or a path), later records overriding earlier ones of the same name."""
    if not hasattr(nb, "get") or "cells" not in nb:
        with open(nb, encoding="utf-8") as f:
            nb = json.load(f)
    out: dict[str, Any] = {}
    for cell in nb["cells"]:
        for o in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            data = o.get("data", {})
            if MIME in data:
                value = data[MIME]
                out.update(json.loads(value) if isinstance(value, str) else value)
    return out
