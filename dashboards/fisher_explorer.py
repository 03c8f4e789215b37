"""K-FAC Fisher explorer — `panel serve dashboards/training_lab.py dashboards/fisher_explorer.py`.

All logic lives in :mod:`kfac_lab.dashboards.fisher_explorer` (importable, unit-tested); this
file only builds the page for each browser session. Store: ``$KFAC_LAB_STORE`` or ``runs/lab.zarr``.
"""
from kfac_lab.dashboards.fisher_explorer import create_app

create_app().servable(title="K-FAC Fisher explorer")
