"""Exceptions and warnings raised by :mod:`kfac_lab.store`."""

from __future__ import annotations

__all__ = ["StoreError", "StoreExistsError", "NotFoundError", "StoreWarning"]


class StoreError(ValueError):
    """A store (or one entry in it) is missing, foreign, damaged or opened read-only.

    The message always names the path or entry and says what to do about it.
    """


class StoreExistsError(StoreError):
    """An entry (study, run, checkpoint) already exists and would be replaced."""


class StoreWarning(UserWarning):
    """Something in a store was skipped (e.g. a damaged run in a listing)."""


class NotFoundError(StoreError, KeyError):
    """No such study, run or checkpoint (a ``KeyError`` too)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""
