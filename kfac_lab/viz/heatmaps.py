"""Matrix heatmaps with the layer blocks delineated, and display down-sampling.

Big matrices are block-averaged to at most ``max_size × max_size`` cells before they are drawn
(a Panel websocket carries ≤ ~10 MB reliably): :func:`downsample`. The exact
values stay in the Dataset; a figure whose matrices were reduced says so in its title. Bins never
straddle a layer boundary, so the dashed block lines stay exact.

Axes are categorical: each cell's category is its parameter's label (``"L2 W[3,17]"``) or, when
down-sampled, the range of labels it averages (``"L2 W[0,3] … L2 W[3,3]"``), so hovering names
both weights without shipping a per-cell text array.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
import xarray as xr

__all__ = ["MAX_SIZE", "bin_edges", "downsample", "MatrixAxes", "matrix_axes", "heatmap_trace",
           "block_lines", "symmetric_range", "DIVERGING", "DIVERGING_ALT", "SEQUENTIAL"]

MAX_SIZE = 512
DIVERGING = "RdBu_r"      # signed matrices (F, F̃, inverses): blue < 0 < red
DIVERGING_ALT = "PuOr_r"  # differences and errors, so they never read as the matrices themselves
SEQUENTIAL = "Viridis"    # non-negative maps (bounds, block averages)


def bin_edges(n: int, max_size: int = MAX_SIZE, boundaries: Sequence[int] | None = None) -> np.ndarray:
    """Edges ``0 = e_0 < e_1 < … < e_k = n`` of ``k ≤ max_size`` bins of equal width ``f`` (the
    smallest integer that fits), except that no bin straddles one of ``boundaries`` (each segment
    between boundaries is cut into ``ceil(len / f)`` bins, the last one possibly narrower).
    With ``n ≤ max_size`` every bin is one row: ``arange(n + 1)``."""
    n = int(n)
    if n < 0 or max_size < 1:
        raise ValueError(f"need n >= 0 and max_size >= 1, got n={n}, max_size={max_size}")
    cuts = sorted({int(b) for b in (boundaries or ()) if 0 < int(b) < n} | {0, n})
    segments = [(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    if len(segments) > max_size:
        segments = [(0, n)]  # too many blocks to respect: plain equal bins
    f = max(1, math.ceil(n / max_size))
    while True:
        count = sum(math.ceil((b - a) / f) for a, b in segments)
        if count <= max_size:
            break
        f += 1
    edges = [0]
    for a, b in segments:
        edges.extend(range(a + f, b, f))
        edges.append(b)
    return np.asarray(sorted(set(edges)), dtype=np.int64)


def downsample(matrix, max_size: int = MAX_SIZE, row_edges: np.ndarray | None = None,
               col_edges: np.ndarray | None = None) -> np.ndarray:
    """Block-average ``matrix`` (2-D) to at most ``max_size × max_size``: cell ``(a, b)`` is the mean
    of ``matrix[row_edges[a]:row_edges[a+1], col_edges[b]:col_edges[b+1]]`` (edges from
    :func:`bin_edges` by default). A matrix already small enough comes back unchanged (a copy).
    NaNs propagate into their cell's mean."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"downsample takes a 2-D matrix, got shape {m.shape}")
    re = bin_edges(m.shape[0], max_size) if row_edges is None else np.asarray(row_edges, dtype=np.int64)
    ce = bin_edges(m.shape[1], max_size) if col_edges is None else np.asarray(col_edges, dtype=np.int64)
    if len(re) - 1 == m.shape[0] and len(ce) - 1 == m.shape[1]:
        return m.copy()
    sums = np.add.reduceat(np.add.reduceat(m, re[:-1], axis=0), ce[:-1], axis=1)
    counts = np.diff(re)[:, None] * np.diff(ce)[None, :]
    return sums / counts


@dataclass
class MatrixAxes:
    """How a ``(row, col)`` matrix of a study is displayed: bin edges, category labels, block
    boundaries (in bin units) and block names."""

    row_edges: np.ndarray
    col_edges: np.ndarray
    row_labels: list[str]
    col_labels: list[str]
    row_bounds: list[int]   # bin index where each block after the first starts
    col_bounds: list[int]
    block_ticks_row: list[str]  # one category per block (its middle bin), for axis ticks
    block_ticks_col: list[str]
    block_names: list[str]
    size: tuple[int, int]   # original (rows, cols)

    @property
    def downsampled(self) -> bool:
        return len(self.row_edges) - 1 < self.size[0] or len(self.col_edges) - 1 < self.size[1]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.row_edges) - 1, len(self.col_edges) - 1

    def reduce(self, matrix) -> np.ndarray:
        return downsample(matrix, row_edges=self.row_edges, col_edges=self.col_edges)

    def note(self) -> str:
        """Title suffix saying whether (and how) the display was down-sampled."""
        if not self.downsampled:
            return ""
        (r, c), (R, C) = self.shape, self.size
        return f" — display block-averaged {R}×{C} → {r}×{c}"


def _labels(ds: xr.Dataset, dim: str, prefix: str) -> list[str]:
    name = f"{prefix}label"
    if name in ds.coords and ds.coords[name].dims == (dim,):
        return [str(v) for v in ds.coords[name].values]
    return [f"{dim} {v}" for v in ds[dim].values]


def _layer_bounds(ds: xr.Dataset, dim: str, prefix: str) -> tuple[list[int], list[str]]:
    """Row positions where the layer changes, and the layers' names (``L<k+1>``)."""
    name = f"{prefix}layer"
    if name not in ds.coords or ds.coords[name].dims != (dim,):
        return [], []
    layer = np.asarray(ds.coords[name].values)
    change = [int(i) for i in np.flatnonzero(layer[1:] != layer[:-1]) + 1]
    starts = [0] + change
    return change, [f"L{int(layer[s]) + 1}" for s in starts]


def _bin_labels(labels: list[str], edges: np.ndarray) -> list[str]:
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        out.append(labels[a] if b - a == 1 else f"{labels[a]} … {labels[b - 1]}")
    return out


def matrix_axes(ds: xr.Dataset, max_size: int = MAX_SIZE, row_dim: str = "row", col_dim: str = "col") -> MatrixAxes:
    """The display axes of a study's ``(row, col)`` matrices (shared by all its matrices)."""
    R, C = ds.sizes[row_dim], ds.sizes[col_dim]
    rb, names = _layer_bounds(ds, row_dim, "")
    cb, _ = _layer_bounds(ds, col_dim, "col_")
    re = bin_edges(R, max_size, rb)
    ce = bin_edges(C, max_size, cb)
    rl = _bin_labels(_labels(ds, row_dim, ""), re)
    cl = _bin_labels(_labels(ds, col_dim, "col_"), ce)
    r_bins = [int(np.searchsorted(re, b)) for b in rb]
    c_bins = [int(np.searchsorted(ce, b)) for b in cb]

    def ticks(bounds, labels, nbins):
        starts = [0] + bounds
        stops = bounds + [nbins]
        return [labels[(a + b - 1) // 2] for a, b in zip(starts, stops)] if labels else []

    return MatrixAxes(re, ce, rl, cl, r_bins, c_bins, ticks(r_bins, rl, len(rl)), ticks(c_bins, cl, len(cl)),
                      names, (R, C))


def symmetric_range(*arrays, clip: float | None = None) -> float:
    """``max |value|`` over the arrays (or its ``clip`` quantile, e.g. 0.99, for heavy tails);
    1.0 when everything is zero or NaN."""
    vals = np.concatenate([np.abs(np.asarray(a, dtype=np.float64)).ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 1.0
    v = float(np.quantile(vals, clip)) if clip is not None else float(vals.max())
    return v if v > 0 else (float(vals.max()) or 1.0)


def heatmap_trace(z: np.ndarray, axes: MatrixAxes, name: str, coloraxis: str = "coloraxis",
                  xaxis: str = "x", yaxis: str = "y") -> go.Heatmap:
    """One matrix as a heatmap on categorical axes (hover: both weights and the value). ``z`` is
    sent as float32 (7 significant digits: plenty for display, half the bytes on a websocket)."""
    return go.Heatmap(
        z=np.asarray(z, dtype=np.float32), x=axes.col_labels, y=axes.row_labels, name=name, coloraxis=coloraxis, xaxis=xaxis, yaxis=yaxis,
        hovertemplate="row: %{y}<br>col: %{x}<br>" + name + ": %{z:.4g}<extra></extra>",
    )


def block_lines(axes: MatrixAxes, xref: str = "x", yref: str = "y") -> list[dict]:
    """Dashed lines between the layer blocks (shape dicts, in category-index units)."""
    nr, nc = axes.shape
    line = dict(color="rgba(40,40,40,0.8)", width=1, dash="dash")
    shapes = []
    for b in axes.col_bounds:
        shapes.append(dict(type="line", xref=xref, yref=yref, x0=b - 0.5, x1=b - 0.5, y0=-0.5, y1=nr - 0.5,
                           line=line, name="block boundary"))
    for b in axes.row_bounds:
        shapes.append(dict(type="line", xref=xref, yref=yref, y0=b - 0.5, y1=b - 0.5, x0=-0.5, x1=nc - 0.5,
                           line=line, name="block boundary"))
    return shapes


def style_matrix_axes(fig: go.Figure, axes: MatrixAxes, col: int, row: int = 1) -> None:
    """Matrix orientation (row 0 at the top), square cells, block names as ticks."""
    fig.update_yaxes(autorange="reversed", type="category", tickmode="array", tickvals=axes.block_ticks_row,
                     ticktext=axes.block_names, showgrid=False, title_text="row: parameter, by layer", row=row, col=col)
    fig.update_xaxes(type="category", tickmode="array", tickvals=axes.block_ticks_col, ticktext=axes.block_names,
                     showgrid=False, constrain="domain", title_text="column: parameter, by layer", row=row, col=col)


def axis_refs(fig: go.Figure, row: int, col: int) -> tuple[str, str]:
    """``("x2", "y2")``-style references of a subplot, for shapes."""
    sub = fig.get_subplot(row, col)
    return sub.xaxis.plotly_name.replace("axis", ""), sub.yaxis.plotly_name.replace("axis", "")
