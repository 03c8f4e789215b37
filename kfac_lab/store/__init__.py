"""The lab's persistent memory: studies, runs and checkpoints in one zarr DataTree.

>>> from kfac_lab.store import Store
>>> with Store("runs/lab.zarr") as store:            # doctest: +SKIP
...     run = store.new_run({"problem": "mnist", "optimizer": "kfac", "damping": 150.0})
...     store.log(run, 0, loss=1.23, approx="blockdiag")
...     store.curves()                               # Dataset over (run, step)

See :mod:`kfac_lab.store.core` for the on-disk layout.
"""

from .attrs import decode_attrs, encode_attrs
from .core import SCHEMA_VERSION, Store
from .errors import NotFoundError, StoreError, StoreExistsError, StoreWarning

__all__ = [
    "Store", "StoreError", "StoreExistsError", "NotFoundError", "StoreWarning",
    "SCHEMA_VERSION", "encode_attrs", "decode_attrs",
]
