"""One writer per run: an OS advisory lock (``flock``) on the run's directory.

Opening a run for writing (``Store.log``/``event``/``save_checkpoint``/``delete_checkpoint``,
``Store.claim``, ``Session``, ``repair``) takes an exclusive ``fcntl.flock`` on the
directory ``<store>/runs/<run_id>`` without waiting. The holder is recorded in the run's
group attribute ``kfac_lab_writer`` (``{"host", "pid", "since"}``) so that a refused
writer — and ``kfac-lab runs`` — can say who writes. Readers never lock.

Why these choices:

* ``flock`` belongs to the open file description, so the kernel drops it the moment its
  process dies (SIGKILL included): a dead writer never needs manual clean-up. The next
  writer finds the stale ``kfac_lab_writer`` record, warns that it takes the run over,
  and overwrites it.
* The lock is on the run's own directory (which kfac_lab never deletes or renames), not
  on a lock file, so nothing foreign appears inside the zarr hierarchy (zarr and plain
  xarray warn about unknown files).

What holds where (see ``docs/reliability.md``):

* Local paths on POSIX: exclusive across processes and across Store objects within one
  process. On a network filesystem it is as good as that filesystem's ``flock``.
* fsspec URLs (``s3://``, ``memory://``...) and platforms without ``fcntl``: no
  cross-process lock exists. The writer record is still written and a second writer
  is refused while the recorded one is a live process on this host; a record from
  another host is taken over with a warning (it cannot be checked), so two hosts
  writing one run of a remote store is not prevented — keep that to one by hand.
"""

from __future__ import annotations

import errno
import os
import socket
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

try:  # POSIX only; elsewhere runs are not locked (documented)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from zarr.storage import LocalStore

from .backend import Backend, join
from .errors import StoreError, StoreWarning

__all__ = ["WRITER", "RunLock", "acquire", "holder", "describe", "lockable"]

WRITER = "kfac_lab_writer"
_HOST = socket.gethostname()


def lockable(backend: Backend) -> bool:
    """Whether runs of this store get a cross-process lock (local paths on POSIX)."""
    return fcntl is not None and isinstance(backend.zstore, LocalStore)


def describe(rec: Any) -> str:
    """``"pid 123 on HOST since 2026-…"`` for a writer record (or a vaguer text)."""
    if not isinstance(rec, dict):
        return "another process"
    return f"pid {rec.get('pid', '?')} on {rec.get('host', '?')} since {rec.get('since', '?')}"


def holder(backend: Backend, run_id: str) -> dict | None:
    """The recorded writer of ``run_id`` (None when no writer is recorded)."""
    attrs = backend.group_attrs(join("runs", run_id)) or {}
    rec = attrs.get(WRITER)
    return rec if isinstance(rec, dict) else None


def _alive_here(rec: dict) -> bool:
    """True when ``rec`` names a live process on this host (other hosts: unknown -> True)."""
    if rec.get("host") != _HOST:
        return True
    try:
        os.kill(int(rec.get("pid", -1)), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunLock:
    """A held writer lock of one run (release it with :meth:`release`)."""

    backend: Backend
    run_id: str
    fd: int | None
    record: dict

    def release(self) -> None:
        """Drop the writer record and the lock (idempotent; never raises on a vanished run)."""
        if self.fd is None and not self.record:
            return
        try:
            attrs = self.backend.group_attrs(join("runs", self.run_id)) or {}
            if attrs.get(WRITER) == self.record:
                self.backend.update_attrs(join("runs", self.run_id), {}, drop=[WRITER])
        except Exception as exc:  # noqa: BLE001 - the lock itself is released below anyway
            warnings.warn(
                f"run {self.run_id!r}: could not clear its writer record ({exc}); the next "
                "writer takes over with a warning", StoreWarning, stacklevel=3,
            )
        finally:
            if self.fd is not None:
                os.close(self.fd)  # closing the descriptor releases the flock
            self.fd, self.record = None, {}


def _refusal(backend: Backend, run_id: str) -> StoreError:
    rec = None
    for _ in range(50):  # the holder writes its record just after locking: give it a moment
        rec = holder(backend, run_id)
        if rec is not None:
            break
        time.sleep(0.01)
    return StoreError(
        f"run {run_id!r} in store {backend.path!r} is being written by {describe(rec)}; wait "
        "for it or branch a new run from its checkpoint "
        f"(kfac-lab train --branch {run_id}, or Session.branch(store, {run_id!r}))"
    )


def acquire(backend: Backend, run_id: str) -> RunLock:
    """Take the writer lock of ``run_id`` at once, or raise StoreError naming its holder.

    A record left by a writer that died is taken over with a StoreWarning. On stores
    without cross-process locks (:func:`lockable` False) this records the writer only.
    """
    path = join("runs", run_id)
    fd = None
    if lockable(backend):
        directory = os.path.join(str(backend.zstore.root), *path.split("/"))
        try:
            fd = os.open(directory, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"no run {run_id!r} in store {backend.path!r}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _refusal(backend, run_id) from None
            raise StoreError(
                f"cannot lock run {run_id!r} in store {backend.path!r} for writing ({exc}); "
                "the filesystem may not support flock"
            ) from exc
    try:
        old = holder(backend, run_id)
        if old is not None and fd is None and old.get("host") == _HOST and _alive_here(old):
            # no OS lock on this store: a live writer recorded on this host is all we can check
            raise _refusal(backend, run_id)
        if old is not None:
            warnings.warn(
                f"run {run_id!r}: its previous writer ({describe(old)}) ended without releasing "
                "the run (killed?); taking it over — rows it had not flushed are lost, "
                "everything committed is kept", StoreWarning, stacklevel=4,
            )
        rec = {"host": _HOST, "pid": os.getpid(),
               "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        backend.update_attrs(path, {WRITER: rec})
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return RunLock(backend, run_id, fd, rec)
