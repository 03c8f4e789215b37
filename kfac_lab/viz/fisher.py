"""Figures of the Fisher studies (pure: ``xarray.Dataset`` → ``plotly.graph_objects.Figure``).

- :func:`fisher_heatmaps` — figure 1: F, F̃ and F − F̃ side by side;
- :func:`inverse_heatmaps`, :func:`block_average_map` — figure 2: F̃, F̃⁻¹ and the mean |entry|
  per block of F̃⁻¹;
- :func:`inverse_quality` — figures 5–6: F̃⁻¹ vs F̆⁻¹ vs F̂⁻¹ and their relative errors;
- :func:`cumulant_maps`, :func:`cumulant_totals` — eqns 3–4.

Datasets come from ``kfac_lab.analysis.fisher_study`` / ``cumulant_study`` (or a store). Every
matrix is shown on the same display axes (:func:`~kfac_lab.viz.heatmaps.matrix_axes`),
block-averaged to at most ``max_size`` cells a side when larger (said in the title).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from .heatmaps import (DIVERGING, DIVERGING_ALT, MAX_SIZE, SEQUENTIAL, axis_refs, block_lines, heatmap_trace,
                       matrix_axes, style_matrix_axes, symmetric_range)

__all__ = ["fisher_heatmaps", "inverse_heatmaps", "block_average_map", "inverse_quality", "cumulant_maps",
           "cumulant_totals", "matrix_panels"]

#: Default colour limit: this quantile of |value| (Fisher matrices are heavy-tailed: at the maximum a
#: few diagonal entries take the whole scale and the block structure disappears). ``clip=None``
#: uses the maximum. Only the colour range changes, never the data.
CLIP = 0.995

TITLES = {
    "exact": "exact Fisher F",
    "kron": "Kronecker-factored F̃",
    "difference": "difference F − F̃",
    "kron_inverse": "F̃⁻¹",
    "blockdiag_inverse": "block-diagonal F̆⁻¹",
    "tridiag_inverse": "block-tridiagonal F̂⁻¹",
    "error": "error E[ā₁ā₂g₁g₂] − E[ā₁ā₂]E[g₁g₂]",
    "kappa4": "κ(ā₁,ā₂,g₁,g₂)",
    "kappa3_a": "E[ā₁] κ(ā₂,g₁,g₂)",
    "kappa3_b": "E[ā₂] κ(ā₁,g₁,g₂)",
    "bound": "bound (eqn 4)",
    "residual": "residual",
}


def _require(ds: xr.Dataset, names: Sequence[str], what: str) -> None:
    missing = [n for n in names if n not in ds.data_vars]
    if missing:
        hint = (" (the study was computed with inverses=False: recompute it with gamma > 0 or inner layers)"
                if any(n.endswith("inverse") or "rel_error" in n or n == "block_mean_abs" for n in missing) else "")
        raise ValueError(f"{what} needs the variables {missing}, which the dataset lacks{hint}; "
                         f"it has {sorted(ds.data_vars)}")


def _subtitle(ds: xr.Dataset) -> str:
    a = ds.attrs
    parts = [str(a[k]) for k in ("model",) if k in a]
    if "num_cases" in a:
        parts.append(f"{a['num_cases']} cases")
    if "mode" in a:
        n = a.get("samples")
        mode = a["mode"] + (f", {n} sample{'s' if n != 1 else ''}" if a.get("mode") == "sampled" and n else "")
        parts.append(mode)
    gamma = a.get("gamma", a.get("damping"))  # "damping": studies saved before γ was named gamma
    if gamma:
        parts.append(f"γ = {gamma:g}")
    return " · ".join(parts)


#: Short colour-bar names of the variables without a ``symbol`` attribute.
SYMBOLS = {"error": "error", "kappa4": "κ₄", "kappa3_a": "E[ā₁]κ₃", "kappa3_b": "E[ā₂]κ₃", "bound": "bound",
           "residual": "residual"}


def _symbol(ds: xr.Dataset, name: str) -> str:
    return str(ds[name].attrs.get("symbol") or SYMBOLS.get(name, name))


def matrix_panels(ds: xr.Dataset, names: Sequence[str], groups: Sequence[int], colorscales: Sequence[str],
                  title: str, max_size: int = MAX_SIZE, clip: float | None = None,
                  symmetric: Sequence[bool] | None = None, extra_cols: int = 0,
                  titles: Sequence[str] | None = None, extra_titles: Sequence[str] = ()) -> go.Figure:
    """Heatmaps of ``names`` (dims ``(row, col)``) side by side. Panels with the same ``groups``
    number share one colour axis (``coloraxis``, ``coloraxis2``, …) whose range is the max |value|
    (or its ``clip`` quantile) over those panels, symmetric about 0 where ``symmetric``.
    ``extra_cols`` leaves empty xy columns on the right (for bar charts)."""
    axes = matrix_axes(ds, max_size)
    n = len(names)
    symmetric = list(symmetric) if symmetric is not None else [True] * len(set(groups))
    sub_titles = list(titles) if titles is not None else [TITLES.get(v, v) for v in names]
    extra = list(extra_titles) + [""] * (extra_cols - len(extra_titles))
    fig = make_subplots(rows=1, cols=n + extra_cols, subplot_titles=sub_titles + extra,
                        horizontal_spacing=0.06)
    zs = {v: axes.reduce(ds[v].values) for v in names}
    group_ids = sorted(set(groups))
    shapes = []
    for c, (v, gnum) in enumerate(zip(names, groups), start=1):
        ca = "coloraxis" if gnum == group_ids[0] else f"coloraxis{group_ids.index(gnum) + 1}"
        xr_, yr_ = axis_refs(fig, 1, c)
        fig.add_trace(heatmap_trace(zs[v], axes, v, coloraxis=ca, xaxis=xr_, yaxis=yr_), row=1, col=c)
        style_matrix_axes(fig, axes, col=c)
        shapes.extend(block_lines(axes, xref=xr_, yref=yr_))
    layout = {}
    step = 1.0 / max(1, len(group_ids))
    for k, gnum in enumerate(group_ids):
        members = [zs[v] for v, g in zip(names, groups) if g == gnum]
        key = "coloraxis" if k == 0 else f"coloraxis{k + 1}"
        rng = symmetric_range(*members, clip=clip)
        sym = symmetric[k] if k < len(symmetric) else True
        bar = dict(len=step * 0.9, y=1 - step * (k + 0.5), yanchor="middle", thickness=12,
                   title=dict(text=", ".join(_symbol(ds, v) for v, g in zip(names, groups) if g == gnum), side="right"))
        if sym:
            layout[key] = dict(colorscale=colorscales[k], cmin=-rng, cmax=rng, cmid=0.0, colorbar=bar)
        else:
            lo = float(np.nanmin([np.nanmin(m) for m in members]))
            layout[key] = dict(colorscale=colorscales[k], cmin=min(lo, 0.0), cmax=rng, colorbar=bar)
    sub = _subtitle(ds)
    if clip is not None:
        sub += f" · colours saturate beyond the {100 * clip:g}th percentile of |value|"
    fig.update_layout(shapes=shapes, title=dict(text=title + axes.note() + f"<br><sup>{sub}</sup>"), **layout)
    fig.update_layout(meta={"downsampled": axes.downsampled, "display_shape": list(axes.shape),
                            "shape": list(axes.size)})
    return fig


def fisher_heatmaps(ds: xr.Dataset, max_size: int = MAX_SIZE, clip: float | None = CLIP) -> go.Figure:
    """Figure 1: the exact Fisher F, K-FAC's F̃ and their difference, side by side.

    F and F̃ share one diverging colour scale (same range, so they compare directly); the
    difference has its own diverging scale. Dashed lines delineate the layer blocks; hovering
    names both weights (``label`` coords). ``clip``: colour limits at that quantile of |value|
    (default 0.995; ``None``: the maximum) — the data are unchanged."""
    _require(ds, ["exact", "kron", "difference"], "fisher_heatmaps")
    return matrix_panels(ds, ["exact", "kron", "difference"], [0, 0, 1], [DIVERGING, DIVERGING_ALT],
                         "Exact Fisher vs Kronecker-factored approximation (figure 1)", max_size, clip)


def inverse_heatmaps(ds: xr.Dataset, max_size: int = MAX_SIZE, clip: float | None = CLIP) -> go.Figure:
    """Figure 2 (left, middle): F̃ and its inverse F̃⁻¹, each with its own diverging scale."""
    _require(ds, ["kron", "kron_inverse"], "inverse_heatmaps")
    return matrix_panels(ds, ["kron", "kron_inverse"], [0, 1], [DIVERGING, DIVERGING], "F̃ and its inverse (figure 2)",
                         max_size, clip)


def _block_labels(ds: xr.Dataset) -> list[str]:
    if "block_label" in ds.coords:
        return [str(v) for v in ds.coords["block_label"].values]
    return [f"L{int(v) + 1}" for v in ds["block_row"].values]


def block_average_map(ds: xr.Dataset, var: str = "block_mean_abs") -> go.Figure:
    """Figure 2 (right): the ``(block_row, block_col)`` matrix of mean |entry| of each block of
    F̃⁻¹, annotated with its values (``var`` picks another block map, e.g. ``block_error``)."""
    _require(ds, [var], "block_average_map")
    z = np.asarray(ds[var].values, dtype=np.float64)
    labels = _block_labels(ds)
    label = "mean |entry|" if var == "block_mean_abs" else "relative error" if "rel_error" in var else var
    text = [[f"{v:.3g}" for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=labels, text=text, texttemplate="%{text}", colorscale=SEQUENTIAL, name=var,
        hovertemplate="block (%{y}, %{x})<br>" + label + ": %{z:.4g}<extra></extra>",
        colorbar=dict(thickness=12, title=dict(side="right", text=label))))
    fig.update_yaxes(autorange="reversed", type="category", title_text="row block (layer)")
    fig.update_xaxes(type="category", scaleanchor="y", constrain="domain", title_text="column block (layer)")
    what = ("mean |entry| of each block of F̃⁻¹ (figure 2, right)" if var == "block_mean_abs"
            else ds[var].attrs.get("long_name", var))
    fig.update_layout(title=dict(text=f"{what}<br><sup>{_subtitle(ds)}</sup>"))
    return fig


def inverse_quality(ds: xr.Dataset, max_size: int = MAX_SIZE, clip: float | None = CLIP) -> go.Figure:
    """Figures 5–6: F̃⁻¹ (exact inverse of the Khatri–Rao matrix), the block-diagonal F̆⁻¹ and the
    block-tridiagonal F̂⁻¹ on one shared diverging scale, and a bar chart of the relative errors
    ``‖X − F̃⁻¹‖_F / ‖F̃⁻¹‖_F``."""
    names = ["kron_inverse", "blockdiag_inverse", "tridiag_inverse"]
    _require(ds, names + ["blockdiag_rel_error", "tridiag_rel_error"], "inverse_quality")
    fig = matrix_panels(ds, names, [0, 0, 0], [DIVERGING], "Quality of the approximate inverses (figures 5–6)",
                        max_size, clip, extra_cols=1, extra_titles=["relative error"])
    errs = [float(ds["blockdiag_rel_error"]), float(ds["tridiag_rel_error"])]
    fig.add_trace(go.Bar(x=["block-diagonal F̆⁻¹", "block-tridiagonal F̂⁻¹"], y=errs, name="relative error",
                         text=[f"{e:.3g}" for e in errs], textposition="outside", marker_color=["#4C78A8", "#F58518"],
                         hovertemplate="%{x}: %{y:.4g}<extra>‖X − F̃⁻¹‖_F / ‖F̃⁻¹‖_F</extra>"), row=1, col=4)
    fig.update_yaxes(title_text="‖X − F̃⁻¹‖_F / ‖F̃⁻¹‖_F", rangemode="tozero", row=1, col=4)
    return fig


def cumulant_maps(ds: xr.Dataset, max_size: int = MAX_SIZE, clip: float | None = CLIP,
                  include_residual: bool = False) -> go.Figure:
    """Eqns 3–4 per weight pair: the Kronecker error, κ₄, the two κ₃ terms (one shared diverging
    scale) and the bound (its own non-negative scale); ``include_residual`` adds the sample
    residual on the error's scale."""
    names = ["error", "kappa4", "kappa3_a", "kappa3_b"] + (["residual"] if include_residual else []) + ["bound"]
    _require(ds, names, "cumulant_maps")
    groups = [0] * (len(names) - 1) + [1]
    return matrix_panels(ds, names, groups, [DIVERGING_ALT, SEQUENTIAL], "Kronecker error and its cumulants (eqns 3–4)",
                         max_size, clip, symmetric=[True, False])


def cumulant_totals(ds: xr.Dataset, paper: bool = True) -> go.Figure:
    """Totals over all weight pairs: Σ|error| against Σ bound (and Σ|κ₄|, Σ|κ₃ terms|, Σ|residual|),
    with the paper's figures (2894.4 vs 4134.6, its own network) as a second series when
    ``paper`` and the attrs carry them. The ratio error / bound is annotated."""
    keys = [("total_error", "error"), ("total_bound", "bound"), ("total_kappa4", "|κ₄|"),
            ("total_kappa3_a", "|E[ā₁]κ₃|"), ("total_kappa3_b", "|E[ā₂]κ₃|"), ("total_residual", "|residual|")]
    _require(ds, ["total_error", "total_bound"], "cumulant_totals")
    present = [(k, lab) for k, lab in keys if k in ds.data_vars]
    vals = [float(ds[k]) for k, _ in present]
    fig = go.Figure(go.Bar(x=[lab for _, lab in present], y=vals, name="this study", text=[f"{v:.4g}" for v in vals],
                           textposition="outside", hovertemplate="Σ %{x}: %{y:.6g}<extra>this study</extra>"))
    if paper and "paper_total_error" in ds.attrs and "paper_total_bound" in ds.attrs:
        fig.add_trace(go.Bar(x=["error", "bound"], y=[float(ds.attrs["paper_total_error"]),
                                                       float(ds.attrs["paper_total_bound"])],
                             name="paper (its network)", marker_color="rgba(150,150,150,0.6)",
                             hovertemplate="Σ %{x}: %{y}<extra>Martens & Grosse 2015</extra>"))
    ratio = vals[0] / vals[1] if vals[1] else float("nan")
    fig.update_layout(barmode="group", yaxis_title="sum over all weight pairs",
                      title=dict(text=f"Total Kronecker error vs cumulant bound (error / bound = {ratio:.3f})"
                                      f"<br><sup>{_subtitle(ds)}</sup>"))
    return fig
