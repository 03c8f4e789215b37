"""Exceptions and warnings raised by :mod:`kfac_lab.store`."""

from __future__ import annotations

__all__ = ["StoreError", "StoreExistsError", "StoreWarning"]


class StoreError(ValueError):
    """A store (or one entry in it) is missing, foreign, damaged or opened read-only.

    The message always names the path or entry and says what to do about it.
    """


class StoreExistsError(StoreError):
    """An entry (study, run, checkpoint) already exists and would be replaced."""


class StoreWarning(UserWarning):
    """Something in a store was skipped (e.g. a damaged run in a listing)."""
