"""The labs' model: what the Panel pages (:mod:`kfac_lab.dashboards`) and the Jupyter widgets
(:mod:`kfac_lab.widgets`) show, written once and free of any widget toolkit.

- :mod:`~kfac_lab.lab.runs` — a run's rows (:class:`RunBuffer`), the events drawn as markers,
  the decimation to about 1,500 points and the ``(run, step)`` Dataset of the figures;
- :mod:`~kfac_lab.lab.monitor` — :class:`RunMonitor`: the hand-over from the training threads,
  controls sent but not yet applied, the λ a slider follows, steps/s and each run's status;
- :mod:`~kfac_lab.lab.controls` — the live controls' ranges and state (:class:`LiveControls`)
  and the checks of typed values;
- :mod:`~kfac_lab.lab.figures` — the three training figures and :class:`FigureStream`, which
  keeps them current;
- :mod:`~kfac_lab.lab.fisher` — the Fisher explorers' catalogue of views.
"""
from .controls import DAMPING_GRID, DAMPING_MAX, DAMPING_MIN, LIVE_CONTROLS, LiveControls, nearest_damping
from .figures import FigureStream
from .monitor import RunMonitor, RunStatus
from .runs import MARKER_KINDS, MAX_POINTS, RunBuffer, keep_indices, runs_dataset

__all__ = ["RunBuffer", "RunMonitor", "RunStatus", "LiveControls", "FigureStream", "MARKER_KINDS", "MAX_POINTS",
           "keep_indices", "runs_dataset", "DAMPING_GRID", "DAMPING_MIN", "DAMPING_MAX", "LIVE_CONTROLS",
           "nearest_damping"]
