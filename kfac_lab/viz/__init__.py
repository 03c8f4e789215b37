"""Pure figure builders: ``xarray.Dataset`` → ``plotly.graph_objects.Figure`` (no torch here).

The same functions serve notebooks, widgets and dashboards, so a figure looks the same
everywhere. Matrices larger than 512×512 are block-averaged for display (:func:`downsample`);
the exact values stay in the Dataset and the figure's title says when it happened.
"""
from .approximations import approximation_heatmaps
from .kfc import kfc_assumption_maps
from .curves import curve_points, damping_figure, invariance_figure, normalize_events, traces, training_curves
from .fisher import (block_average_map, cumulant_maps, cumulant_totals, fisher_heatmaps,
                     inverse_heatmaps, inverse_quality, matrix_panels)
from .heatmaps import MAX_SIZE, bin_edges, downsample, matrix_axes

__all__ = [
    "fisher_heatmaps", "inverse_heatmaps", "block_average_map", "inverse_quality", "cumulant_maps",
    "cumulant_totals", "matrix_panels", "damping_figure", "invariance_figure", "training_curves", "traces",
    "normalize_events", "curve_points", "downsample", "bin_edges", "matrix_axes", "MAX_SIZE",
    "approximation_heatmaps", "kfc_assumption_maps",
]
