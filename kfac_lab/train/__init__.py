"""Training: problems, the :class:`Session` (one optimizer on one problem, in a thread, with
live controls, logging and checkpoints) and :func:`race` (several optimizers side by side).

    >>> import kfac_lab as kl
    >>> s = kl.Session("tiny", "kfac", store="runs/lab.zarr")   # doctest: +SKIP
    >>> s.start(steps=500); s.set(approx="tridiag"); s.join()
"""
from .problems import OPTIMIZERS, PROBLEMS, Problem, canonical_optimizer, get_problem, problem_names
from .race import race
from .session import SESSION_CONTROLS, STATUSES, Session, make_optimizer, open_store

__all__ = ["Problem", "PROBLEMS", "OPTIMIZERS", "get_problem", "problem_names", "canonical_optimizer",
           "Session", "STATUSES", "SESSION_CONTROLS", "make_optimizer", "open_store", "race"]
