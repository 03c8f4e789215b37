"""store.align: the one (run, step) alignment, against a brute-force dict lookup, and
Store.curves built on it."""
from __future__ import annotations

import numpy as np

from kfac_lab.store import Store
from kfac_lab.store.align import align_runs


def test_align_runs_against_brute_force():
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(4):
        steps = np.sort(rng.choice(np.arange(1, 60), size=rng.integers(0, 25), replace=False))
        runs.append((steps, {"x": rng.normal(size=len(steps)), "tag": np.array([f"s{k}" for k in steps], dtype=object)}))
    ds = align_runs(["a", "b", "c", "d"], runs, {"x": np.nan, "tag": "", "absent": np.nan})
    union = sorted({int(k) for s, _ in runs for k in s})
    assert list(ds["step"].values) == union and list(ds["run"].values) == ["a", "b", "c", "d"]
    for i, (steps, values) in enumerate(runs):
        at = dict(zip(steps.tolist(), values["x"]))
        for j, k in enumerate(union):
            got = ds["x"].values[i, j]
            assert (got == at[k]) if k in at else np.isnan(got)
            assert ds["tag"].values[i, j] == (f"s{k}" if k in at else "")
    assert np.isnan(ds["absent"].values).all()


def test_store_curves_is_the_same_alignment(tmp_path):
    with Store(tmp_path / "c.zarr") as st:
        a, b = st.new_run(), st.new_run()
        for k in (1, 2, 4):
            st.log(a, k, loss=float(k), note=f"a{k}")
        for k in (2, 3):
            st.log(b, k, loss=10.0 * k)
        st.flush()
        cur = st.curves([a, b])
        ref = align_runs([a, b], [([1, 2, 4], {"loss": [1.0, 2.0, 4.0], "note": ["a1", "a2", "a4"]}),
                                  ([2, 3], {"loss": [20.0, 30.0]})], {"loss": np.nan, "note": ""})
    np.testing.assert_array_equal(cur["loss"].values, ref["loss"].values)
    assert cur["note"].values.tolist() == ref["note"].values.tolist()
    assert cur["loss"].attrs["kind"] == "float" and cur["note"].attrs["kind"] == "str"
