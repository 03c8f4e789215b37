"""The lab's two Panel dashboards, as importable, testable objects.

- :mod:`~kfac_lab.dashboards.training_lab` — train on a preset problem with K-FAC / SGD-Nesterov /
  Adam, steer λ, the approximation, momentum while it runs, race two optimizers, compare runs;
- :mod:`~kfac_lab.dashboards.fisher_explorer` — the paper's figures 1, 2, 5–6 and eqns 3–4 on the
  figure-1 network or a run's checkpoint.

Serve both (127.0.0.1:5006, websocket origins restricted, no CDN)::

    panel serve dashboards/training_lab.py dashboards/fisher_explorer.py \\
        --address 127.0.0.1 --port 5006 --allow-websocket-origin 127.0.0.1:5006 --warm

or from Python, ``kfac_lab.dashboards.serve()``. The store is ``$KFAC_LAB_STORE`` or
``runs/lab.zarr``. The files in ``dashboards/`` only call ``create_app().servable()``.

The apps' objects, one name each: :class:`TrainingLabApp` / :class:`TrainingLabPage` and
:class:`FisherExplorerApp` / :class:`FisherExplorerPage` (the Jupyter widgets are
:class:`kfac_lab.widgets.TrainingLabWidget` and :class:`~kfac_lab.widgets.FisherExplorerWidget`).
"""
import importlib
import warnings

from .common import (APPS, DEFAULT_ADDRESS, DEFAULT_PORT, DEFAULT_STORE, ENV_STORE, open_store, panel_serve_args,
                     serve, store_path)

__all__ = ["APPS", "DEFAULT_ADDRESS", "DEFAULT_PORT", "DEFAULT_STORE", "ENV_STORE", "open_store",
           "panel_serve_args", "serve", "store_path", "TrainingLabApp", "TrainingLabPage", "FisherExplorerApp",
           "FisherExplorerPage"]

_LAZY = {"TrainingLabApp": ".training_app", "TrainingLabPage": ".training_lab",
         "FisherExplorerApp": ".fisher_app", "FisherExplorerPage": ".fisher_explorer"}
#: Old names, kept for one release (a DeprecationWarning names the new one).
_DEPRECATED = {"TrainingLab": "TrainingLabApp", "FisherExplorer": "FisherExplorerApp"}


def __getattr__(name):
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(f"kfac_lab.dashboards.{name} is deprecated (removed in the next release): use "
                      f"kfac_lab.dashboards.{new}", DeprecationWarning, stacklevel=2)
        name = new
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
