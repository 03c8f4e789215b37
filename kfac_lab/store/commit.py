"""Write-then-commit protocol for whole entries (studies, checkpoints).

An entry ``<parent>/<name>`` is a zarr group; it counts only once its attribute
``kfac_lab_committed`` (a fresh random token) is set, which is written last. A
replacement is first written completely to ``<parent>/.new-<name>`` and committed
there, then the original is uncommitted, rewritten and recommitted, and the
staging copy removed. At every instant one committed, complete copy exists:

=========================  ===========================  ===================
crash after ...            ``<name>``                   ``.new-<name>``
=========================  ===========================  ===================
writing ``.new-`` starts    old, committed               partial, ignored
``.new-`` committed         old, committed               new, committed
``<name>`` uncommitted      partial, ignored             new, committed
``<name>`` recommitted      new, committed               new (deleted next)
=========================  ===========================  ===================

Readers resolve ``<name>`` first, then ``.new-<name>``, and re-check the token
after reading, so they never return a half-written entry. This needs no rename,
so it works on any zarr store (local disk, object stores, ``memory://``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TypeVar

from .backend import Backend, join
from .errors import StoreError

__all__ = ["COMMITTED", "STAGING", "resolve", "committed_names", "replace", "read_consistent"]

COMMITTED = "kfac_lab_committed"
STAGING = ".new-"
T = TypeVar("T")


def token(backend: Backend, path: str) -> str | None:
    """The commit token of the group at ``path`` (None: absent or not committed)."""
    attrs = backend.group_attrs(path)
    if attrs is None:
        return None
    tok = attrs.get(COMMITTED)
    return tok if isinstance(tok, str) and tok else None


def resolve(backend: Backend, parent: str, name: str) -> tuple[str, str] | None:
    """``(path, token)`` of the readable copy of ``parent/name``, or None if none."""
    for candidate in (name, STAGING + name):
        path = join(parent, candidate)
        tok = token(backend, path)
        if tok is not None:
            return path, tok
    return None


def committed_names(
    backend: Backend, parent: str, on_damaged: Callable[[str, StoreError], None]
) -> list[str]:
    """Sorted names of the committed entries under ``parent``.

    Entries whose metadata is damaged are reported to ``on_damaged(name, error)``
    and left out, so one bad entry does not hide the others.
    """
    names = set()
    for child in backend.list_dir(parent):
        if child == "zarr.json" or child.endswith(".partial"):
            continue
        names.add(child[len(STAGING):] if child.startswith(STAGING) else child)
    out = []
    for name in sorted(names):
        if name.startswith("."):
            continue
        try:
            if resolve(backend, parent, name) is not None:
                out.append(name)
        except StoreError as exc:
            on_damaged(name, exc)
    return out


def mark_committed(backend: Backend, path: str) -> str:
    tok = uuid.uuid4().hex
    backend.update_attrs(path, {COMMITTED: tok})
    return tok


def replace(backend: Backend, parent: str, name: str, write: Callable[[str], None]) -> None:
    """Write entry ``parent/name`` with ``write(path)`` (which fully writes a group at
    ``path``, replacing anything there) so that a crash at any point leaves one
    complete committed copy (the old one or the new one) readable."""
    backend.check_writable()
    main, staged = join(parent, name), join(parent, STAGING + name)
    if token(backend, main) is None:
        write(main)
        mark_committed(backend, main)
    else:
        backend.delete_dir(staged)
        write(staged)
        mark_committed(backend, staged)
        backend.update_attrs(main, {}, drop=[COMMITTED])
        write(main)
        mark_committed(backend, main)
    backend.delete_dir(staged)


def read_consistent(
    backend: Backend, parent: str, name: str, what: str, read: Callable[[str], T], tries: int = 5
) -> T:
    """Read the committed copy of ``parent/name`` with ``read(path)``; retry if a
    writer replaced it meanwhile (its token changed). Raises KeyError if absent."""
    for _ in range(tries):
        found = resolve(backend, parent, name)
        if found is None:
            raise KeyError(name)
        path, tok = found
        try:
            value = read(path)
        except StoreError:
            if token(backend, path) == tok:
                raise
            continue  # replaced under our feet: try again
        if token(backend, path) == tok:
            return value
    raise StoreError(
        f"{what} in store {backend.path!r} kept changing while being read ({tries} tries); "
        "try again when its writer is done"
    )
