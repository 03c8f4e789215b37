"""``/checkpoints/<run_id>/step_<NNNNNNNN>``: model + optimizer state, weights-only.

Each checkpoint is a group holding one ``uint8`` array ``state`` (dim ``state_bytes``)
with the bytes of ``torch.save({"model", "optimizer", "extra", "step", "run_id"})``,
and attrs ``step``, ``nbytes``, ``sha256``, ``format``, ``torch_version``, ``created``.
It is written then committed (see :mod:`.commit`), checked against its SHA-256 on
load, and unpickled only by ``torch.load(..., weights_only=True)``: tensors and plain
data (dict/list/tuple/str/int/float/bool/None, torch.Size/dtype/device) — never
arbitrary objects.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import numpy as np

from zarr.codecs import Crc32cCodec

from . import commit
from .backend import Backend, join, sync, translate_errors
from .errors import NotFoundError, StoreError, StoreWarning
from .names import validate_name

__all__ = [
    "GROUP", "save_checkpoint", "write_checkpoint_bytes", "load_checkpoint", "list_checkpoints",
    "load_intact", "delete_checkpoint", "apply_retention", "check_retention", "checkpoint_info",
]

GROUP = "checkpoints"
CHUNK_BYTES = 16 * 2**20
_STEP_RE = re.compile(r"step_(\d+)")


def _leaves() -> tuple[type, ...]:
    import torch  # imported lazily: reading curves does not need torch

    return (str, int, float, bool, complex, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


def run_path(run_id: str) -> str:
    return join(GROUP, run_id)


def chunk_length(nbytes: int) -> int:
    """Chunk length for ``nbytes`` of state: at most ``CHUNK_BYTES``, and equal chunks, since
    zarr stores the last chunk of a regular grid at full length (a 91 MB state in 16 MiB
    chunks would take 101 MB on disk; in six equal chunks it takes 91 MB)."""
    n_chunks = max(1, -(-nbytes // CHUNK_BYTES))
    return max(1, -(-nbytes // n_chunks))


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _check_state(obj: Any, where: str) -> None:
    """Raise TypeError naming the first object ``torch.load(weights_only=True)`` refuses."""
    if isinstance(obj, _leaves()):
        return
    if isinstance(obj, (dict, OrderedDict)):
        for k, v in obj.items():
            _check_state(k, f"{where} key {k!r}")
            _check_state(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_state(v, f"{where}[{i}]")
        return
    hint = " (convert with torch.from_numpy)" if isinstance(obj, (np.ndarray, np.generic)) else ""
    raise TypeError(
        f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__qualname__}{hint}; "
        "checkpoints hold only tensors and plain data (dict, list, tuple, str, int, float, "
        "bool, None) so they load with torch.load(weights_only=True)"
    )


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
    return int(step)


def save_checkpoint(
    backend: Backend, run_id: str, step: int, model_state: Mapping, optimizer_state: Mapping,
    extra: Mapping | None = None,
) -> None:
    """Serialize and commit a checkpoint (replacing one at the same step, crash-safely)."""
    validate_name(run_id, "run_id")
    step = _check_step(step)
    payload = {
        "model": model_state, "optimizer": optimizer_state,
        "extra": {} if extra is None else extra, "step": step, "run_id": run_id,
    }
    for key in ("model", "optimizer", "extra"):
        if not isinstance(payload[key], Mapping):
            raise TypeError(f"checkpoint {key} state must be a dict, got {type(payload[key]).__name__}")
        _check_state(payload[key], key)
    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    write_checkpoint_bytes(backend, run_id, step, buf.getvalue())


def write_checkpoint_bytes(backend: Backend, run_id: str, step: int, data: bytes) -> None:
    """Store already-serialized checkpoint bytes (the low-level half of save)."""
    import torch

    backend.check_writable()
    arr = np.frombuffer(data, dtype=np.uint8)
    attrs = {
        "step": step, "nbytes": int(arr.size), "sha256": hashlib.sha256(data).hexdigest(),
        "format": "torch.save", "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    def write(path: str) -> None:
        async def go() -> None:
            await backend.anew_group(path, attrs)
            z = await backend.acreate_array(
                join(path, "state"), shape=arr.shape, chunks=(chunk_length(arr.size),),
                dtype="uint8", fill_value=0, dimension_names=["state_bytes"],
                compressors=[Crc32cCodec()],  # names the damaged chunk; SHA-256 covers the whole
            )
            if arr.size:
                await z.setitem(slice(None), arr)

        sync(go())

    parent = join(GROUP, run_id)
    backend.ensure_group(GROUP)
    backend.ensure_group(parent)
    commit.replace(backend, parent, step_name(step), write)


def list_checkpoints(backend: Backend, run_id: str) -> list[int]:
    """Steps of the committed checkpoints of ``run_id``, ascending."""
    validate_name(run_id, "run_id")

    def damaged(name: str, exc: Exception) -> None:
        warnings.warn(f"skipping damaged checkpoint {run_id}/{name}: {exc}", StoreWarning, stacklevel=4)

    names = commit.committed_names(backend, join(GROUP, run_id), damaged)
    return sorted(int(m.group(1)) for n in names if (m := _STEP_RE.fullmatch(n)))


def load_checkpoint(
    backend: Backend, run_id: str, step: int | None = None, map_location: Any = None
) -> dict[str, Any]:
    """Load checkpoint ``step`` (default: the latest) of ``run_id``.

    Returns ``{"model": ..., "optimizer": ..., "extra": ..., "step": int, "run_id": str}``.
    Raises NotFoundError if there is none, StoreError if its bytes are damaged or it
    holds anything ``torch.load(weights_only=True)`` refuses.
    """
    available = list_checkpoints(backend, run_id)
    if step is None:
        if not available:
            raise NotFoundError(f"run {run_id!r} has no checkpoints in store {backend.path!r}")
        step = available[-1]
    step = _check_step(step)
    what = f"checkpoint {run_id}/{step_name(step)}"

    def read_bytes(path: str) -> tuple[bytes, dict]:
        with translate_errors(backend, what):
            attrs = backend.group_attrs(path) or {}
            z = sync(backend.aopen_array(join(path, "state")))
            data = np.asarray(sync(z.getitem(slice(None))), dtype=np.uint8).tobytes()
        return data, attrs

    try:
        data, attrs = commit.read_consistent(backend, join(GROUP, run_id), step_name(step), what, read_bytes)
    except KeyError:
        raise NotFoundError(
            f"no checkpoint at step {step} of run {run_id!r} in store {backend.path!r}; "
            f"available steps: {available}"
        ) from None
    if hashlib.sha256(data).hexdigest() != attrs.get("sha256"):
        raise StoreError(
            f"{what} in store {backend.path!r} is damaged (SHA-256 mismatch); load another "
            f"step (available: {available})"
        )
    import torch

    try:
        out = torch.load(io.BytesIO(data), weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as exc:
        raise StoreError(
            f"refused to load {what} from store {backend.path!r}: it holds objects other than "
            "tensors and plain data, and kfac_lab loads checkpoints only with "
            f"torch.load(weights_only=True), never arbitrary pickle ({str(exc).splitlines()[0]})"
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise StoreError(f"cannot load {what} from store {backend.path!r}: {exc}") from exc
    if not isinstance(out, dict) or not {"model", "optimizer"} <= set(out):
        raise StoreError(f"{what} in store {backend.path!r} was not written by kfac_lab")
    return out


# --------------------------------------------------------------------------- damage, retention
def load_intact(
    backend: Backend, run_id: str, step: int | None = None, map_location: Any = None
) -> dict[str, Any]:
    """The newest checkpoint of ``run_id`` (at or before ``step``) that loads intact.

    Each damaged one tried first is skipped with a StoreWarning naming its step and why;
    the result carries them as ``"skipped": [(step, reason), ...]``.
    """
    available = list_checkpoints(backend, run_id)
    if step is not None:
        step = _check_step(step)
        if step not in available:
            raise NotFoundError(
                f"no checkpoint at step {step} of run {run_id!r} in store {backend.path!r}; "
                f"available steps: {available}"
            )
        candidates = [s for s in available if s <= step]
    else:
        candidates = list(available)
    if not candidates:
        raise NotFoundError(f"run {run_id!r} has no checkpoints in store {backend.path!r}")
    skipped: list[tuple[int, str]] = []
    for s in reversed(candidates):
        try:
            out = load_checkpoint(backend, run_id, s, map_location)
        except NotFoundError:
            continue  # deleted meanwhile by its writer's retention: not damage
        except StoreError as exc:
            skipped.append((s, str(exc)))
            warnings.warn(
                f"run {run_id!r}: skipping damaged checkpoint at step {s}: {exc}", StoreWarning,
                stacklevel=4,
            )
            continue
        out["skipped"] = skipped
        return out
    if not skipped:  # all deleted while we looked
        raise NotFoundError(f"run {run_id!r} has no checkpoints in store {backend.path!r}")
    raise StoreError(
        f"every checkpoint of run {run_id!r} in store {backend.path!r} is damaged (steps "
        f"{[s for s, _ in skipped]}); the run's rows are intact: branch a new run from scratch "
        "or restore the checkpoints from a backup"
    )


def checkpoint_info(backend: Backend, run_id: str) -> list[dict[str, Any]]:
    """``[{"step", "nbytes", "created"}]`` of the committed checkpoints, ascending."""
    out = []
    for step in list_checkpoints(backend, run_id):
        found = commit.resolve(backend, run_path(run_id), step_name(step))
        attrs = (backend.group_attrs(found[0]) if found else None) or {}
        out.append({"step": step, "nbytes": int(attrs.get("nbytes", 0) or 0), "created": attrs.get("created")})
    return out


def delete_checkpoint(backend: Backend, run_id: str, step: int) -> None:
    """Uncommit, then delete checkpoint ``step`` (and any staging copy) of ``run_id``."""
    validate_name(run_id, "run_id")
    step = _check_step(step)
    backend.check_writable()
    parent, name = run_path(run_id), step_name(step)
    if commit.resolve(backend, parent, name) is None:
        raise NotFoundError(
            f"no checkpoint at step {step} of run {run_id!r} in store {backend.path!r}; "
            f"available steps: {list_checkpoints(backend, run_id)}"
        )
    _remove(backend, parent, name)


def _remove(backend: Backend, parent: str, name: str) -> None:
    for path in (join(parent, name), join(parent, commit.STAGING + name)):
        if backend.group_attrs(path) is not None:
            backend.update_attrs(path, {}, drop=[commit.COMMITTED])  # readers stop here
        backend.delete_dir(path)


def check_retention(keep: Any, every: Any) -> tuple[int | None, int | None]:
    """Validate ``keep_checkpoints`` (int >= 1 or None) and ``keep_every`` (int >= 1 or None)."""
    for name, v in (("keep_checkpoints", keep), ("keep_every", every)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"{name} must be an int >= 1 or None (keep all), got {v!r}")
    return (None if keep is None else int(keep)), (None if every is None else int(every))


def retained(steps: list[int], keep: int | None, every: int | None, newest: int) -> set[int]:
    """Steps retention keeps: the ``keep`` newest, every multiple of ``every``, and ``newest``."""
    if keep is None:
        return set(steps)
    ordered = sorted(steps)
    kept = set(ordered[-keep:]) | {newest}
    if every:
        kept |= {s for s in ordered if s % every == 0}
    return kept


def apply_retention(
    backend: Backend, run_id: str, newest: int, keep: int | None, every: int | None
) -> list[int]:
    """Delete the checkpoints of ``run_id`` retention does not keep (and uncommitted
    leftovers of killed writes); returns the deleted steps. The caller holds the run."""
    if keep is None:
        return []
    parent = run_path(run_id)
    steps = list_checkpoints(backend, run_id)
    kept = retained(steps, keep, every, newest)
    gone = [s for s in steps if s not in kept]
    for s in gone:
        _remove(backend, parent, step_name(s))
    committed = set(steps)
    for child in backend.list_dir(parent):  # debris of a checkpoint write that was killed
        m = _STEP_RE.fullmatch(child)
        if m and int(m.group(1)) not in committed and int(m.group(1)) != newest:
            if commit.resolve(backend, parent, child) is None:
                backend.delete_dir(join(parent, child))
    return gone
