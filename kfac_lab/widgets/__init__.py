"""The lab inside Jupyter: ipywidgets + plotly ``FigureWidget`` shells over ``train``, ``viz`` and ``store``.

- :class:`TrainingLab` — one or several training :class:`~kfac_lab.train.Session` s running in
  background threads, live controls (λ, adaptive λ, block-diagonal / block-tridiagonal, momentum,
  fixed or adaptive learning rate, start / pause / stop) and curves streaming against iterations
  and seconds, with the λ, γ, α, μ, ρ traces and a marker wherever a control changed;
- :class:`FisherExplorer` — the Fisher studies of a store (figures 1, 2, 5, 6 and the cumulant
  decomposition of eqns 3–4) behind view / study / colour-range selectors.

They mirror the Panel dashboards (``kfac_lab.dashboards``): the same sessions, the same store,
the same figures (every figure is built by :mod:`kfac_lab.viz`). Display one by leaving it as
the last expression of a cell; ``.close()`` stops whatever it started.

Importing this module needs ipywidgets and plotly (``FigureWidget`` also needs anywidget), not
Jupyter itself: the widgets can be built and driven headless (tests assert kernel-side values).
"""
from __future__ import annotations

import importlib

__all__ = ["TrainingLab", "FisherExplorer", "FISHER_VIEWS"]

_ATTRS = {"TrainingLab": ".training", "FisherExplorer": ".fisher", "FISHER_VIEWS": ".fisher"}


def __getattr__(name: str):
    if name in _ATTRS:
        return getattr(importlib.import_module(_ATTRS[name], __name__), name)
    raise AttributeError(f"module 'kfac_lab.widgets' has no attribute {name!r}")


def __dir__():
    return __all__
