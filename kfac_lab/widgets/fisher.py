"""``FisherExplorerWidget``: the Fisher studies (figures 1, 2, 5, 6; eqns 3–4) behind widget selectors.

A view: every figure is a view of :mod:`kfac_lab.lab.fisher`'s catalogue (the one the Panel
explorer shows) of a study Dataset (from ``kfac_lab.analysis`` or a
:class:`~kfac_lab.store.Store`); this module only picks which one, on which study, with which
colour range, and shows it as a plotly ``FigureWidget``.
"""
from __future__ import annotations

import html
import os
from collections.abc import Mapping
from typing import Any

from .. import checks
from ..lab.fisher import COLORSCALE_OPTIONS, DEFAULT, FISHER_VIEWS, available_views, build_view, clip_options, views
from ..lab.notebook import figure_output

__all__ = ["FisherExplorerWidget", "FISHER_VIEWS"]


class FisherExplorerWidget:
    """Figures 1, 2, 5, 6 and the cumulant maps of eqns 3–4 with selectors for the view, the study
    and the colour scale.

    ``study_or_store``: an ``xarray.Dataset`` (one study, e.g. ``kfac_lab.analysis.fisher_study``),
    a mapping ``name → Dataset``, a :class:`~kfac_lab.store.Store`, or a store path (opened
    read-only). Studies in a store are loaded when first selected.

    ``max_size``: the largest heatmap side drawn (block-averaged above it, the title says so; default
    viz's 512) — smaller keeps a saved notebook light.

    Attributes for code and tests: ``controls`` (``view``, ``study``, ``clip``, ``colorscale``
    widgets), ``figure`` (the current ``go.FigureWidget``), ``message`` (an HTML label saying
    why a view is unavailable), ``study`` (the selected Dataset), ``widget`` (the whole box; the
    explorer displays as it). ``show(view=, study=, clip=, colorscale=)`` sets the selectors from
    code; ``refresh()`` re-reads the store's list of studies. ``light=True`` shows each figure as
    plotly JSON in an ``Output`` widget (``figure`` is then a ``go.Figure``) instead of a
    ``FigureWidget``, whose saved widget state carries all of plotly.js (5 MB) — for notebooks that
    are shared executed; ``max_size`` caps the heatmaps' cells per side (block-averaged above it;
    None: viz's default). :meth:`figure1` adds sliders for N,
    the training stage, γ and the layers of the paper's figure-1 network (``network``: those controls).
    """

    def __init__(self, study_or_store: Any, view: str | None = None, study: str | None = None,
                 height: int = 430, width: int | None = None, light: bool = False, max_size: int | None = None):
        import ipywidgets as w
        import xarray as xr

        self._height = int(height)
        self._light = bool(light)
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 8):
            raise ValueError(f"max_size={max_size!r}: give the largest heatmap side in cells, an integer >= 8 "
                             "(e.g. 128; None: viz's 512)")
        self._max_size = max_size
        self._width = width
        self._cache: dict[str, Any] = {}
        self._store = None
        self._owns_store = False
        if isinstance(study_or_store, xr.Dataset):
            name = str(study_or_store.attrs.get("name") or study_or_store.attrs.get("study") or "study")
            self._cache[name] = study_or_store
        elif isinstance(study_or_store, Mapping):
            for k, v in study_or_store.items():
                if not isinstance(v, xr.Dataset):
                    raise TypeError(f"FisherExplorerWidget: study {k!r} is a {type(v).__name__}, not an xarray.Dataset")
                self._cache[str(k)] = v
        elif isinstance(study_or_store, (str, os.PathLike)):
            from ..store import Store

            self._store = Store(study_or_store, mode="r")
            self._owns_store = True
        elif hasattr(study_or_store, "studies") and hasattr(study_or_store, "load_study"):
            self._store = study_or_store
        else:
            raise TypeError("FisherExplorerWidget needs an xarray.Dataset, a mapping name → Dataset, a Store or a store "
                            f"path; got {type(study_or_store).__name__}")

        names = self._names()
        if not names:
            raise ValueError("FisherExplorerWidget: no study to show (the store has none yet: compute one with "
                             "kfac_lab.analysis.fisher_study and store.save_study(name, ds))")
        self.message = w.HTML(value="")
        self.controls = {
            "view": w.Dropdown(description="view", options=[], layout=w.Layout(width="440px")),
            "study": w.Dropdown(description="study", options=names, value=study if study in names else names[0],
                                layout=w.Layout(width="300px")),
            "clip": w.Dropdown(description="colour range", options=clip_options(), value=DEFAULT,
                               style={"description_width": "initial"}, layout=w.Layout(width="260px")),
            # index 0 ("default", value None); `value=None` would mean *no selection* (a blank box)
            "colorscale": w.Dropdown(description="colour scale", options=COLORSCALE_OPTIONS, index=0,
                                     style={"description_width": "initial"}, layout=w.Layout(width="220px")),
        }
        self._box = w.Box(layout=w.Layout(width="100%"))
        self.figure = None
        self.network = None   # the figure-1 controls (figure1()), or None
        self._busy = False
        self.widget = w.VBox([
            w.HBox([self.controls["view"], self.controls["study"]]),
            w.HBox([self.controls["clip"], self.controls["colorscale"], self.message]),
            self._box,
        ])
        self._update_view_options(preferred=view)
        for c in self.controls.values():
            c.observe(self._on_change, names="value")
        self._render()

    # ------------------------------------------------------------------ data
    def _names(self) -> list[str]:
        names = list(self._cache)
        if self._store is not None:
            names = list(dict.fromkeys(list(self._store.studies()) + names))
        return names

    def _load(self, name: str):
        if name not in self._cache:
            self._cache[name] = self._store.load_study(name)
        return self._cache[name]

    @property
    def study(self):
        """The selected study (``xarray.Dataset``)."""
        return self._load(self.controls["study"].value)

    def available_views(self, ds=None) -> list[str]:
        """View keys the study (default: the selected one) has the variables for."""
        return available_views(self.study if ds is None else ds)

    # ------------------------------------------------------------------ widgets
    def _update_view_options(self, preferred: str | None = None) -> None:
        ctl = self.controls["view"]
        keys = self.available_views()
        current = preferred if preferred is not None else ctl.value
        if preferred is not None and preferred not in FISHER_VIEWS:
            raise ValueError(f"view={preferred!r}: choose one of {list(FISHER_VIEWS)}")
        self._busy = True
        try:
            ctl.options = [(FISHER_VIEWS[k], k) for k in keys]
            if keys:
                ctl.value = current if current in keys else keys[0]
        finally:
            self._busy = False

    def _on_change(self, change) -> None:
        if self._busy:
            return
        if change["owner"] is self.controls["study"]:
            self._update_view_options()
        self._render()

    def _build(self):
        key = self.controls["view"].value
        ds = self.study
        if key is None:
            raise ValueError(f"study {self.controls['study'].value!r} has none of the variables these views need "
                             f"(a fisher_study or cumulant_study Dataset); it has {sorted(ds.data_vars)[:12]}")
        fig = build_view(ds, key, clip=self.controls["clip"].value, colorscale=self.controls["colorscale"].value,
                         max_size=self._max_size if views()[key].matrix else None)
        fig.update_layout(height=self._height)
        if self._width:
            fig.update_layout(width=self._width)
        return fig

    def _render(self) -> None:
        import ipywidgets as w
        import plotly.graph_objects as go

        try:
            fig = self._build()
        except (ValueError, KeyError) as exc:
            self.message.value = f"<span style='color:#b00'>{html.escape(str(exc))}</span>"
            return
        self.message.value = ""
        if self._light:  # the figure as plotly JSON in an Output widget: no plotly.js in the saved widget state
            self.figure = fig
            out = w.Output(layout=w.Layout(width="100%"))
            out.outputs = figure_output(fig)
            for old in self._box.children:
                old.close()
            self._box.children = (out,)
            return
        # A new FigureWidget per view: subplot axes and colour axes differ between views, and a
        # relayout in the browser would not remove the old ones.
        self.figure = go.FigureWidget(fig)
        self._box.children = (self.figure,)

    # ------------------------------------------------------------------ API
    def show(self, view: str | None = None, study: str | None = None, clip: float | None | str = "keep",
             colorscale: str | None = "keep"):
        """Set selectors from code and return the figure shown. ``clip``: ``"default"`` (viz's),
        ``None`` (max |value|) or a quantile such as 0.99; ``colorscale``: a plotly name or
        ``None`` (viz's)."""
        self._busy = True
        try:
            if study is not None:
                if study not in self.controls["study"].options:
                    raise ValueError(f"study={study!r}: choose one of {list(self.controls['study'].options)}")
                self.controls["study"].value = study
            if clip != "keep":
                self.controls["clip"].value = clip
            if colorscale != "keep":
                self.controls["colorscale"].value = colorscale
        finally:
            self._busy = False
        self._update_view_options(preferred=view)
        if view is not None and self.controls["view"].value != view:
            raise ValueError(f"view={view!r} is not available for study {self.controls['study'].value!r}; "
                             f"it supports {self.available_views()}")
        self._render()
        return self.figure

    @classmethod
    def figure1(cls, view: str | None = None, height: int = 430, width: int | None = None, light: bool = False,
                max_size: int | None = None, **settings) -> "FisherExplorerWidget":
        """The explorer on the paper's figure-1 network with sliders for N, the training stage and
        γ and a toggle per layer (:class:`~kfac_lab.widgets.fisher_controls.Figure1Controls`):
        every change recomputes the studies and redraws the view. ``settings``: ``cases``,
        ``kfac_steps``, ``gamma``, ``layers`` (0-based; default the hidden layers ``[1, 2, 3]``),
        ``cumulants``, ``seed``."""
        from .fisher_controls import Figure1Controls

        controls = Figure1Controls(**settings)
        if not controls.apply():
            raise ValueError(f"FisherExplorerWidget.figure1: {html.unescape(controls.message.value)}")
        explorer = cls(_figure1_studies(controls.result.fisher, controls.result.cumulant), view=view, height=height,
                       width=width, light=light, max_size=max_size)
        controls.on_result = lambda fisher, cumulant: explorer.set_studies(_figure1_studies(fisher, cumulant))
        explorer.network = controls
        explorer.widget.children = (controls.widget, *explorer.widget.children)
        return explorer

    def set_studies(self, studies: Mapping[str, Any]) -> None:
        """Replace the studies shown (same names keep their selection and view) and redraw."""
        self._cache = dict(studies)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the list of studies (a store written by another process or a dashboard)."""
        names = self._names()
        ctl = self.controls["study"]
        current = ctl.value
        self._busy = True
        try:
            ctl.options = names
            ctl.value = current if current in names else names[0]
        finally:
            self._busy = False
        self._update_view_options()
        self._render()

    def close(self) -> None:
        """Close the widgets (and the store, when the explorer opened it from a path)."""
        if self.network is not None:
            self.network.close()
        self.widget.close()
        for c in self._box.children:   # the FigureWidget, or the Output of a light explorer
            c.close()
        for c in self.controls.values():
            c.close()
        self.message.close()
        if self._owns_store and self._store is not None:
            self._store.close()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return (f"FisherExplorerWidget(study={self.controls['study'].value!r}, view={self.controls['view'].value!r}, "
                f"{len(self.controls['study'].options)} studies)")


def _figure1_studies(fisher, cumulant) -> dict[str, Any]:
    """The explorer's study list of one figure-1 computation."""
    out = {}
    if fisher is not None:
        out["Fisher (figures 1, 2, 5, 6)"] = fisher
    if cumulant is not None:
        out["cumulants (eqns 3–4)"] = cumulant
    return out


__getattr__ = checks.module_getattr(__name__, deprecated={"FisherExplorer": "FisherExplorerWidget"}, home="kfac_lab.widgets")
