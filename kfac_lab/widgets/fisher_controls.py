"""The figure-1 network's settings as widget controls: N, training stage, γ and layers.

The controls the Panel explorer has (:mod:`kfac_lab.dashboards.fisher_explorer`) for the paper's
figure-1 network, as ipywidgets sliders and toggles over the same logic
(:class:`~kfac_lab.dashboards.fisher_app.FisherExplorerApp`: its settings, its validation, its
per-process caches of networks and studies). Moving a control recomputes the studies (seconds at
the default size; a setting seen before comes from the cache) and hands them to a callback —
:meth:`kfac_lab.widgets.FisherExplorerWidget.figure1` wires them to the explorer's views.
"""
from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

__all__ = ["Figure1Controls", "CASES", "STAGES", "GAMMAS"]

#: The N slider: cases the expectations run over (the bundled MNIST subset has 5,000).
CASES = (100, 5000, 100)
#: The training-stage slider: full-batch K-FAC iterations before the study (the paper: 7).
STAGES = (0, 25, 1)
#: The γ slider's stops (0: no damping; F̃⁻¹ then needs the hidden layers only).
GAMMAS = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


class Figure1Controls:
    """Sliders for N, the training stage and γ, a toggle per layer, and a status line.

    ``on_result(fisher, cumulant)`` (settable later) receives the new studies after every change
    that computed (:attr:`result` holds the latest :class:`~kfac_lab.dashboards.fisher_app.Result`);
    a setting the app refuses (no layer, too many parameters) or a failed computation is shown in
    :attr:`message` and leaves the previous studies in place. ``settings`` are
    :class:`~kfac_lab.dashboards.fisher_app.FisherSettings` names (``cases``, ``kfac_steps``,
    ``gamma``, ``layers``, ``cumulants``, ``mode``, ``seed``).
    """

    def __init__(self, on_result: Callable[[Any, Any], None] | None = None, **settings):
        import ipywidgets as w

        from ..dashboards.fisher_app import FisherExplorerApp, network_layers
        from ..models import FIGURE1_SIZES

        settings.setdefault("layers", [1, 2, 3])
        settings.setdefault("gamma", 0.0)
        self.app = FisherExplorerApp(store=None, source="figure1", **settings)
        self.on_result = on_result
        s = self.app.settings
        gammas = sorted({*GAMMAS, float(s.gamma)})   # a γ between the stops becomes one more stop
        wide = {"description_width": "initial"}
        self.controls = {
            "cases": w.IntSlider(value=s.cases, min=CASES[0], max=CASES[1], step=CASES[2], description="cases N",
                                 continuous_update=False, style=wide, layout=w.Layout(width="340px")),
            "kfac_steps": w.IntSlider(value=s.kfac_steps, min=STAGES[0], max=STAGES[1], step=STAGES[2],
                                      description="stage (K-FAC iterations)", continuous_update=False, style=wide,
                                      layout=w.Layout(width="380px")),
            "gamma": w.SelectionSlider(options=[(f"{g:g}", g) for g in gammas], value=float(s.gamma),
                                       description="γ of the inverses", continuous_update=False, style=wide,
                                       layout=w.Layout(width="380px")),
        }
        self.layers = {i: w.ToggleButton(value=i in s.layers, description=f"L{i + 1}",
                                         tooltip=f"{label} ({p:,} parameters)", layout=w.Layout(width="64px"))
                       for i, label, p in network_layers(list(FIGURE1_SIZES))}
        self.message = w.HTML(value="")
        self.status = w.HTML(value="")
        self.widget = w.VBox([
            w.HBox([self.controls["cases"], self.controls["kfac_steps"], self.controls["gamma"]]),
            w.HBox([w.Label("layers"), *self.layers.values(), self.status]),
            self.message,
        ])
        for c in [*self.controls.values(), *self.layers.values()]:
            c.observe(self._on_change, names="value")
        self.result = None

    @property
    def settings(self):
        return self.app.settings

    def _on_change(self, change) -> None:
        self.apply()

    def apply(self) -> bool:
        """Copy the controls into the settings and recompute; ``True`` when new studies came out."""
        s = self.app.settings
        s.cases = int(self.controls["cases"].value)
        s.kfac_steps = int(self.controls["kfac_steps"].value)
        s.gamma = float(self.controls["gamma"].value)
        s.layers = sorted(i for i, b in self.layers.items() if b.value)
        errors = self.app.validate()
        if errors:
            self.message.value = "<br>".join(f"<span style='color:#b00'>{html.escape(v)}</span>"
                                             for v in errors.values())
            return False
        self.status.value = "<i>computing…</i>"
        try:
            res = self.app.compute()
        except Exception as exc:  # noqa: BLE001 - shown beside the controls; the old studies stay
            self.status.value = ""
            self.message.value = f"<span style='color:#b00'>{html.escape(f'{type(exc).__name__}: {exc}')}</span>"
            return False
        self.result = res
        notes = []
        if res.fisher is not None and "kron_inverse" not in res.fisher.data_vars:
            notes.append("F̃⁻¹ is not computed at γ = 0 with the output layer L5: under a softmax its G is singular "
                         "(its gradients sum to zero) — raise γ or leave L5 out")
        self.message.value = "<br>".join(html.escape(n) for n in notes)
        self.status.value = html.escape(f"{res.summary} ({res.seconds:.1f} s)")
        if self.on_result is not None:
            self.on_result(res.fisher, res.cumulant)
        return True

    def close(self) -> None:
        self.widget.close()
        for c in [*self.controls.values(), *self.layers.values(), self.message, self.status]:
            c.close()
        self.app.close()
