"""Attribute encoding that both zarr and netCDF accept.

On disk every attribute value is a ``str``, ``int`` or ``float``. Anything else
that JSON can hold (``dict``, ``list``, ``tuple``, ``bool``, ``None``, numpy
scalars/arrays) is stored as the string ``"json:" + json.dumps(value)`` and decoded
back on read, so users get their dicts back. A ``str`` that itself starts with
``"json:"`` is JSON-encoded too, so it round-trips unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["JSON_PREFIX", "encode_value", "decode_value", "encode_attrs", "decode_attrs"]

JSON_PREFIX = "json:"


def _plain(value: Any, where: str) -> Any:
    """Convert ``value`` into JSON-able python data (numpy -> python), or raise TypeError."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        return _plain(value.item(), where)
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"attribute {where}: dict key {k!r} must be a str")
            out[str(k)] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"attribute {where} has type {type(value).__name__}; allowed: str, int, float, "
        "bool, None, and lists/dicts of them (convert other objects with str() first)"
    )


def encode_value(value: Any, key: str = "?") -> str | int | float:
    """Encode one attribute value as ``str``/``int``/``float`` (JSON with prefix otherwise)."""
    value = _plain(value, repr(key))
    if isinstance(value, str):
        return JSON_PREFIX + json.dumps(value) if value.startswith(JSON_PREFIX) else value
    if isinstance(value, int) and not isinstance(value, bool):
        if -(2**63) <= value < 2**63:
            return value
        return JSON_PREFIX + json.dumps(value)
    if isinstance(value, float) and math.isfinite(value):
        return value
    # bool, None, dict, list, non-finite float (JSON has no NaN in strict readers)
    return JSON_PREFIX + json.dumps(value, allow_nan=True)


def decode_value(value: Any) -> Any:
    """Inverse of :func:`encode_value` (values without the prefix pass through)."""
    if isinstance(value, str) and value.startswith(JSON_PREFIX):
        try:
            return json.loads(value[len(JSON_PREFIX):])
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def encode_attrs(attrs: Mapping[str, Any] | None) -> dict[str, str | int | float]:
    """Encode a mapping of attributes; keys must be non-empty ``str``."""
    out: dict[str, str | int | float] = {}
    for key, value in (attrs or {}).items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"attribute names must be non-empty str, got {key!r}")
        out[key] = encode_value(value, key)
    return out


def decode_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Decode a mapping of attributes written by :func:`encode_attrs`."""
    return {key: decode_value(value) for key, value in attrs.items()}
