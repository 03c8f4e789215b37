"""kfac_lab.train.race_record and benchmarks/race_curves.py: a race's curves written small from its
plotly pages read back to the same points."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from kfac_lab import viz
from kfac_lab.train.race_record import final_table, race_summary, read_race

ROOT = Path(__file__).resolve().parents[2]


def race_curves_module():
    spec = importlib.util.spec_from_file_location("race_curves", ROOT / "benchmarks" / "race_curves.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_race(tmp_path: Path):
    steps = np.arange(1, 301)
    ds = xr.Dataset({"error": (("run", "step"), np.stack([100 / steps, 200 / np.sqrt(steps)])),
                     "wall_time": (("run", "step"), np.stack([0.5 * steps, 0.05 * steps]))},
                    coords={"run": ["K-FAC", "SGD"], "step": steps})
    for x, name in (("step", "iterations"), ("wall_time", "seconds")):
        viz.training_curves(ds, x=x, y="error", events=[]).write_html(str(tmp_path / f"r_{name}.html"),
                                                                       include_plotlyjs=False)
    report = {"target": float(ds["error"].sel(run="SGD").min()), "contenders": [
        {"label": "K-FAC", "steps": 300, "wall_total": 150.0, "best_error": 1 / 3, "iterations_to_target": None,
         "seconds_to_target": None, "speedup": None},
        {"label": "SGD", "steps": 300, "wall_total": 15.0, "best_error": float(200 / np.sqrt(300)),
         "iterations_to_target": 300, "seconds_to_target": 15.0, "speedup": 1.0}]}
    (tmp_path / "r.json").write_text(json.dumps(report))
    return ds, report


def test_compact_curves_round_trip(tmp_path):
    rc = race_curves_module()
    ds, report = fake_race(tmp_path)
    target = 2.0   # K-FAC's error first reaches 2 at step 50
    rows = rc.compact(tmp_path / "r", points=20, target=target)
    rc.write_csv(rows, tmp_path / "r.csv", "r")
    back, rep = read_race(tmp_path / "r.csv", tmp_path / "r.json")
    assert list(back["run"].values) == ["K-FAC", "SGD"] and rep == report
    for run in ("K-FAC", "SGD"):
        b = back.sel(run=run).dropna("step")
        assert 10 <= b.sizes["step"] <= 23                      # decimated (log-spaced: duplicates merge), ≤ points + 3
        assert int(b["step"][0]) == 1 and int(b["step"][-1]) == 300
        full = ds.sel(run=run, step=b["step"].values)
        np.testing.assert_allclose(b["error"].values, full["error"].values, rtol=1e-8)
        np.testing.assert_allclose(b["wall_time"].values, full["wall_time"].values, rtol=1e-6)
    k = back["error"].sel(run="K-FAC")
    assert int(k.where(k <= target, drop=True)["step"][0]) == 50
    assert float(back["error"].sel(run="K-FAC").min()) == pytest.approx(1 / 3)
    assert race_summary(rep).loc["SGD", "s / iteration"] == 0.05


def test_bad_inputs_name_the_problem(tmp_path):
    rc = race_curves_module()
    with pytest.raises(FileNotFoundError, match="race curves"):
        read_race(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("contender,step\nA,1\n")
    with pytest.raises(ValueError, match="columns"):
        read_race(tmp_path / "bad.csv")
    (tmp_path / "x_iterations.html").write_text("<html>no figure</html>")
    with pytest.raises(ValueError, match="Plotly.newPlot"):
        rc.traces_from_html(tmp_path / "x_iterations.html")


def test_final_table():
    ds = xr.Dataset({"error": (("run", "step"), [[5.0, np.nan, 3.0], [4.0, 2.0, np.nan]]),
                     "loss": (("run", "step"), [[1.0, 1.0, 1.0], [1.0, 1.0, np.nan]]),
                     "wall_time": (("run", "step"), [[0.1, 0.2, 0.3], [0.5, 1.0, np.nan]])},
                    coords={"run": ["a", "b"], "step": [1, 2, 3]})
    t = final_table(ds)
    assert t.loc["a"].tolist() == [3, 0.3, 3.0] and t.loc["b"].tolist() == [2, 1.0, 2.0]
