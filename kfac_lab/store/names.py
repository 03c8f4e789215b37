"""Names of studies, runs and metrics: validation and run-id generation."""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone

__all__ = ["ALLOWED", "validate_name", "new_run_id"]

_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
MAX_LEN = 128
ALLOWED = (
    "letters, digits, '_', '-' and '.'; not starting with '.' or '__'; "
    f"at most {MAX_LEN} characters"
)


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a valid store name, else raise ``ValueError``.

    A valid name is a non-empty ``str`` of letters, digits, ``_``, ``-`` and ``.``
    that does not start with ``.`` (hidden/staging entries do) or ``__`` (reserved
    by zarr), so it is safe as a zarr group/array name and as a file name.
    """
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a str, got {type(name).__name__} {name!r}")
    if not name:
        raise ValueError(f"{what} must not be empty; allowed: {ALLOWED}")
    if len(name) > MAX_LEN or not _NAME_RE.fullmatch(name) or name.startswith((".", "__")):
        bad = sorted({c for c in name if not re.fullmatch(r"[A-Za-z0-9_.\-]", c)})
        hint = f" (bad characters: {''.join(bad)!r})" if bad else ""
        raise ValueError(f"invalid {what} {name!r}{hint}; allowed: {ALLOWED}")
    return name


def new_run_id(now: datetime | None = None) -> str:
    """A fresh run id ``YYYYmmdd-HHMMSS-xxxx``: UTC time, then 4 hex digits whose first
    two encode the fraction of the second (1/256 s steps) and last two are random.

    Ids therefore sort by creation time (to ~4 ms); the store creates run groups
    exclusively, so two processes drawing the same id cannot both get it.
    """
    now = now or datetime.now(timezone.utc)
    frac = min(255, now.microsecond * 256 // 1_000_000)
    return now.strftime("%Y%m%d-%H%M%S") + f"-{frac:02x}{secrets.randbelow(256):02x}"
