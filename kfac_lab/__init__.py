"""kfac_lab — a laboratory for K-FAC (Martens & Grosse, 2015).

    import kfac_lab as kl
    model = kl.models.autoencoder("mnist")
    opt = kl.KFAC(model, loss="bernoulli")          # the paper's Algorithm 2
    info = opt.step(x, x)

Submodules load on first use (``kl.analysis``, ``kl.viz``, ``kl.store`` …) so that
``import kfac_lab`` stays fast and needs no UI libraries.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .errors import (DecompositionError, FisherTooLargeError, KFACError, MemoryLimitError,  # noqa: E402
                     NonFiniteError, UnsupportedLayerError)

_SUBMODULES = {"curvature", "optim", "models", "data", "analysis", "viz", "store", "train", "widgets", "cli"}
_ATTRS = {
    "KFAC": "optim", "KFACPreconditioner": "optim", "KFACConfig": "optim", "StepInfo": "optim",
    "SGDNesterov": "optim", "Adam": "optim", "PolyakAverage": "optim",
    "Store": "store", "Session": "train",
    "fisher_study": "analysis", "cumulant_study": "analysis",
    "exact_fisher": "curvature.exact",
}

__all__ = sorted(_SUBMODULES | set(_ATTRS) | {"KFACError", "NonFiniteError", "UnsupportedLayerError",
                                               "FisherTooLargeError", "MemoryLimitError", "DecompositionError",
                                               "__version__"})


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _ATTRS:
        return getattr(importlib.import_module(f".{_ATTRS[name]}", __name__), name)
    raise AttributeError(f"module 'kfac_lab' has no attribute {name!r}")


def __dir__():
    return __all__
