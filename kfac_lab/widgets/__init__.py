"""The lab inside Jupyter: ipywidgets + plotly ``FigureWidget`` views over ``train``, ``lab``, ``viz`` and ``store``.

- :class:`TrainingLabWidget` — one or several training :class:`~kfac_lab.train.Session` s running
  in background threads, live controls (λ, adaptive λ, block-diagonal / block-tridiagonal,
  momentum, fixed or adaptive learning rate, start / pause / stop) and curves streaming against
  iterations and seconds, with the λ, γ, α, μ, ρ traces and a marker wherever a control changed;
- :class:`FisherExplorerWidget` — the Fisher studies of a store (figures 1, 2, 5, 6 and the
  cumulant decomposition of eqns 3–4) behind view / study / colour-range selectors.

They are views of the same model as the Panel dashboards (:mod:`kfac_lab.lab`; the Panel apps
are :class:`kfac_lab.dashboards.TrainingLabApp` and :class:`~kfac_lab.dashboards.FisherExplorerApp`):
the same sessions, store, run buffers, control ranges, status text and figures (every figure is
built by :mod:`kfac_lab.viz`). Display one by leaving it as the last expression of a cell;
``.close()`` stops whatever it started.

Importing this module needs ipywidgets and plotly (``FigureWidget`` also needs anywidget), not
Jupyter itself: the widgets can be built and driven headless (tests assert kernel-side values).
"""
from __future__ import annotations

import importlib
import warnings

__all__ = ["TrainingLabWidget", "FisherExplorerWidget", "FISHER_VIEWS"]

_ATTRS = {"TrainingLabWidget": ".training", "FisherExplorerWidget": ".fisher", "FISHER_VIEWS": ".fisher"}
#: Old names, kept for one release (a DeprecationWarning names the new one).
_DEPRECATED = {"TrainingLab": "TrainingLabWidget", "FisherExplorer": "FisherExplorerWidget"}


def __getattr__(name: str):
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(f"kfac_lab.widgets.{name} is deprecated (removed in the next release): use "
                      f"kfac_lab.widgets.{new}", DeprecationWarning, stacklevel=2)
        name = new
    if name in _ATTRS:
        return getattr(importlib.import_module(_ATTRS[name], __name__), name)
    raise AttributeError(f"module 'kfac_lab.widgets' has no attribute {name!r}")


def __dir__():
    return __all__
