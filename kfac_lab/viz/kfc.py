"""KFC's assumptions on one convolution layer, drawn (pure: the Dataset of
``kfac_lab.analysis.kfc_assumptions`` → plotly Figure): the correlation of ``g`` between output
locations (spatially uncorrelated derivatives), and ``E‖g_t‖²``, ``E‖ā_t‖²`` over the output grid
(spatial homogeneity)."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from .heatmaps import DIVERGING, SEQUENTIAL

__all__ = ["kfc_assumption_maps"]


def kfc_assumption_maps(ds: xr.Dataset, layer: int | None = None) -> go.Figure:
    """Three panels for convolution ``layer`` (its index in the network; default the first one):
    the location × location correlation of ``g`` (0 off the diagonal under KFC), and the maps of
    ``E‖g_t‖²`` and ``E‖ā_t‖²`` on the output grid (flat under spatial homogeneity). The title
    quotes the summaries: mean |off-diagonal correlation| and the coefficients of variation."""
    convs = [int(v) for v in np.atleast_1d(_json_list(ds.attrs.get("conv_layers", "[]")))]
    if layer is None:
        if not convs:
            raise ValueError("kfc_assumption_maps needs a kfac_lab.analysis.kfc_assumptions Dataset (it lists no "
                             "convolution layer)")
        layer = convs[0]
    k = int(layer)
    if f"g_corr_{k}" not in ds.data_vars:
        raise ValueError(f"kfc_assumption_maps: layer {k} is not a measured convolution; this study has {convs}")
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.15, subplot_titles=[
        "corr(g_t, g_t′) between locations", "E‖g_t‖² on the output grid", "E‖ā_t‖² on the output grid"])
    C = np.asarray(ds[f"g_corr_{k}"].values, dtype=np.float32)
    fig.add_trace(go.Heatmap(z=C, coloraxis="coloraxis", name="corr",
                             hovertemplate="t = %{y}, t′ = %{x}<br>corr %{z:.3f}<extra></extra>"), row=1, col=1)
    for col, var, axis in ((2, f"g_power_{k}", "coloraxis2"), (3, f"a_power_{k}", "coloraxis3")):
        fig.add_trace(go.Heatmap(z=np.asarray(ds[var].values, dtype=np.float32), coloraxis=axis, name=var,
                                 hovertemplate="row %{y}, column %{x}<br>%{z:.4g}<extra></extra>"), row=1, col=col)
    for col in (1, 2, 3):
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{'' if col == 1 else col}", row=1, col=col,
                         title_text="location t" if col == 1 else "output row")
        fig.update_xaxes(constrain="domain", row=1, col=col, title_text="location t′" if col == 1 else "output column")
    bar = lambda x, title: dict(x=x, len=0.8, thickness=10, title=dict(text=title, side="right"))  # noqa: E731
    fig.update_layout(
        coloraxis=dict(colorscale=DIVERGING, cmin=-1, cmax=1, cmid=0, colorbar=bar(0.25, "correlation")),
        coloraxis2=dict(colorscale=SEQUENTIAL, colorbar=bar(0.625, "E‖g_t‖²")),
        coloraxis3=dict(colorscale=SEQUENTIAL, colorbar=bar(1.0, "E‖ā_t‖²")),
        title=dict(text=(f"KFC's assumptions on layer L{k + 1}: mean |corr| off the diagonal "
                         f"{float(ds[f'g_offdiag_corr_{k}']):.3f}, spread of E‖g_t‖² {float(ds[f'g_power_cv_{k}']):.2f}, "
                         f"of E‖ā_t‖² {float(ds[f'a_power_cv_{k}']):.2f} (std/mean; 0 under KFC)"
                         f"<br><sup>{ds.attrs.get('model', '')} · {ds.attrs.get('num_cases', '?')} cases · "
                         f"{ds.attrs.get('mode', '')}</sup>")))
    return fig


def _json_list(text):
    import json

    try:
        return json.loads(text) if isinstance(text, str) else list(text)
    except ValueError:
        return []
