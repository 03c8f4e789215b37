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

from .. import checks

__all__ = ["TrainingLabWidget", "FisherExplorerWidget", "FISHER_VIEWS"]

_ATTRS = {"TrainingLabWidget": ".training", "FisherExplorerWidget": ".fisher", "FISHER_VIEWS": ".fisher"}
#: Old names, kept for one release (a DeprecationWarning names the new one).
_DEPRECATED = {"TrainingLab": "TrainingLabWidget", "FisherExplorer": "FisherExplorerWidget"}


__getattr__ = checks.module_getattr(__name__, _ATTRS, _DEPRECATED)


def __dir__():
    return __all__
