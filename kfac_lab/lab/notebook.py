"""What the lecture notebooks need from the kernel: light figures and numbers a test can read.

- :func:`light_figures` — plotly figures as their JSON only (``plotly_mimetype``): JupyterLab draws
  them with the extension that ships with plotly, and the saved notebook holds no copy of
  plotly.js (the default ``notebook`` renderer embeds 4 MB of it, plus an HTML copy per figure).
- :func:`record` — show a line of text for the reader and, beside it, the numbers the text quotes
  under the mimetype :data:`MIME` (JupyterLab has no renderer for it and shows the text; nbformat
  keeps both). :func:`recorded` reads them back from an executed notebook, so a test can check
  every claim a notebook's prose makes against the numbers its run printed.
"""
from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MIME", "light_figures", "record", "recorded"]

#: The mimetype of the recorded numbers.
MIME = "application/vnd.kfac-lab.numbers+json"


def light_figures() -> None:
    """Render plotly figures as ``application/vnd.plotly.v1+json`` only, from now on in this kernel."""
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype"


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
