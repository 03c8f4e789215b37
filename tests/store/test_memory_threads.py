"""``memory://`` stores under threads: writers flushing and readers listing at once, on one URL.

Such a store was fsspec's process-wide MemoryFileSystem behind zarr's thread pool, and a flush
racing a listing raised "dictionary changed size during iteration" now and then in the suite;
it is zarr's own MemoryStore now (kfac_lab/store/backend.py), whose key operations all run on
zarr's one event-loop thread."""
import threading
import uuid

import pytest
from zarr.storage import MemoryStore

from kfac_lab.store import Store
from kfac_lab.store.errors import StoreError


def _url():
    return f"memory://kfac-lab-test-{uuid.uuid4().hex}/lab.zarr"


def test_a_memory_url_is_zarrs_memory_store_shared_by_every_store_on_it():
    url = _url()
    a = Store(url)
    assert isinstance(a._backend.zstore, MemoryStore)
    rid = a.new_run({"who": "a"})
    a.log(rid, 1, loss=1.0)
    a.flush()
    b = Store(url + "/", mode="r")          # the same store, however the URL ends
    assert list(b.runs().index) == [rid] and float(b.load_run(rid).loss.values[0]) == 1.0
    with pytest.raises(StoreError, match="no store at"):
        Store(_url(), mode="r")


def test_writers_and_readers_on_threads_lose_nothing():
    url = _url()
    store = Store(url)
    errors, steps, writers = [], 60, 4
    done = threading.Event()

    def write(w):
        try:
            rid = store.new_run({"writer": w}, run_id=f"w{w}")
            for k in range(1, steps + 1):
                store.log(rid, k, loss=float(k * w))
                if k % 5 == 0:
                    store.flush(rid)
            store.flush(rid)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    def read():
        reader = Store(url, mode="r")
        try:
            while not done.is_set():
                reader.runs()
                for rid in list(reader.runs().index):
                    reader.load_run(rid)
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    readers = [threading.Thread(target=read) for _ in range(2)]
    threads = [threading.Thread(target=write, args=(w,)) for w in range(1, writers + 1)]
    for t in readers + threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    for t in readers:
        t.join(120)
    assert not errors
    final = Store(url, mode="r")
    assert sorted(final.runs().index) == [f"w{w}" for w in range(1, writers + 1)]
    for w in range(1, writers + 1):
        ds = final.load_run(f"w{w}")
        assert list(ds.step.values) == list(range(1, steps + 1))
        assert list(ds.loss.values) == [float(k * w) for k in range(1, steps + 1)]
