"""Names and attribute encoding."""

import math

import numpy as np
import pytest

from kfac_lab.store import Store, decode_attrs, encode_attrs
from kfac_lab.store.names import new_run_id, validate_name


@pytest.mark.parametrize("name", ["fig1", "mnist-ae_2.v3", "A", "0", "x" * 128])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".hidden", "a/b", "a\\b", "..", "__zarr", "with space", "ü", "x" * 129, 3, None]
)
def test_invalid_names_say_what_is_allowed(name):
    with pytest.raises(ValueError, match="allowed|must be a str"):
        validate_name(name, "study name")


def test_run_ids_sort_by_time():
    from datetime import datetime, timezone

    a = new_run_id(datetime(2026, 11, 29, 6, 15, 30, tzinfo=timezone.utc))
    b = new_run_id(datetime(2026, 11, 29, 6, 15, 31, tzinfo=timezone.utc))
    assert a.startswith("20261129-061530-") and len(a) == len("20261129-061530-ab12")
    assert a < b
    validate_name(a)


ATTRS = {
    "s": "text",
    "i": 3,
    "f": 1.5,
    "b": True,
    "n": None,
    "d": {"damping": 150.0, "T": [1, 2, 3], "nested": {"ok": False}},
    "l": [1, "a", None],
    "tricky": "json:not really json",
    "nan": float("nan"),
    "np": np.float32(2.5),
    "npi": np.int64(7),
    "arr": np.arange(3),
}


def test_attrs_encode_to_plain_types_and_round_trip():
    enc = encode_attrs(ATTRS)
    assert all(type(v) in (str, int, float) for v in enc.values())
    dec = decode_attrs(enc)
    assert dec["d"] == ATTRS["d"] and dec["b"] is True and dec["n"] is None
    assert dec["l"] == [1, "a", None] and dec["tricky"] == "json:not really json"
    assert math.isnan(dec["nan"]) and dec["np"] == 2.5 and dec["npi"] == 7
    assert dec["arr"] == [0, 1, 2] and dec["s"] == "text" and dec["i"] == 3


def test_attrs_reject_unknown_objects_clearly():
    with pytest.raises(TypeError, match="'obj' has type object.*allowed"):
        encode_attrs({"obj": object()})


def test_attrs_round_trip_through_store(tmp_path):
    import xarray as xr

    attrs = {k: v for k, v in ATTRS.items() if k not in ("nan", "arr")}
    with Store(tmp_path / "s.zarr") as store:
        store.save_study("a", xr.Dataset({"x": ("i", [1.0])}, attrs=attrs))
        run = store.new_run(attrs)
        ds = store.load_study("a")
        table = store.runs()
    assert ds.attrs["d"] == attrs["d"] and ds.attrs["b"] is True and ds.attrs["n"] is None
    assert ds.attrs["tricky"] == "json:not really json"
    row = table.loc[run]
    assert row["d"] == attrs["d"] and bool(row["b"]) is True and row["l"] == [1, "a", None]
