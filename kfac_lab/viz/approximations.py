"""The exact Fisher and its approximations side by side: F, K-FAC / KFC-expand F̃, KFC-reduce F̃ and
EKFAC on one colour scale, with their relative Frobenius errors (pure: Dataset → plotly Figure).

The Dataset is a Fisher study (``kfac_lab.analysis.fisher_study`` or ``approximation_study``)
holding ``exact`` and any of ``kron``, ``kron_reduce``, ``ekfac``. Hovering a cell names both
weights; on a convolution layer that is the layer, output channel, input channel and kernel row /
column (``"L1 W[o3, c1, kh2, kw0]"``; ``b[o]`` the bias).
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from .fisher import CLIP, _require, matrix_panels
from .heatmaps import DIVERGING, MAX_SIZE

__all__ = ["approximation_heatmaps", "APPROXIMATION_TITLES", "relative_error"]

#: Panel titles, in display order; the ``kron`` title names KFC-expand when the study also has reduce.
APPROXIMATION_TITLES = {"exact": "exact Fisher F", "kron": "K-FAC F̃", "kron_reduce": "KFC-reduce F̃",
                        "ekfac": "EKFAC"}
_COLOURS = {"kron": "#4C78A8", "kron_reduce": "#F58518", "ekfac": "#54A24B"}


def relative_error(ds: xr.Dataset, name: str) -> float:
    """‖F − X‖_F / ‖F‖_F of the study's variable ``name`` against ``exact``."""
    F = np.asarray(ds["exact"].values, dtype=np.float64)
    return float(np.linalg.norm(F - np.asarray(ds[name].values, dtype=np.float64)) / np.linalg.norm(F))


def approximation_heatmaps(ds: xr.Dataset, max_size: int = MAX_SIZE, clip: float | None = CLIP) -> go.Figure:
    """F and every approximation the study holds (``kron``, ``kron_reduce``, ``ekfac``) on one shared
    diverging scale, and a bar chart of ``‖F − X‖_F / ‖F‖_F``. Matrices larger than
    ``max_size`` a side are block-averaged for display (the title says so)."""
    _require(ds, ["exact", "kron"], "approximation_heatmaps")
    names = ["exact"] + [n for n in ("kron", "kron_reduce", "ekfac") if n in ds.data_vars]
    titles = [APPROXIMATION_TITLES[n] for n in names]
    if "kron_reduce" in names:
        titles[names.index("kron")] = "KFC-expand F̃"
    fig = matrix_panels(ds, names, [0] * len(names), [DIVERGING], "Exact Fisher vs its approximations",
                        max_size, clip, extra_cols=1, titles=titles, extra_titles=["‖F − X‖_F / ‖F‖_F"])
    approx = names[1:]
    errs = [relative_error(ds, n) for n in approx]
    labels = [titles[names.index(n)] for n in approx]
    fig.add_trace(go.Bar(x=labels, y=errs, name="relative error", text=[f"{e:.3g}" for e in errs],
                         textposition="outside", marker_color=[_COLOURS[n] for n in approx],
                         hovertemplate="%{x}: %{y:.4g}<extra>‖F − X‖_F / ‖F‖_F</extra>"),
                  row=1, col=len(names) + 1)
    fig.update_yaxes(title_text="‖F − X‖_F / ‖F‖_F", rangemode="tozero", row=1, col=len(names) + 1)
    return fig
