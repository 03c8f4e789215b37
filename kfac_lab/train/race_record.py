"""A race, read back small: the curves a finished race shipped as CSV, and its tables.

The long races of ``benchmarks/race.py`` keep their runs in a store on the machine that ran
them; what travels with the repository is the report (``race_*.json``) and the curves,
decimated to a small CSV (``contender, step, seconds, error``; ``benchmarks/race_curves.py``
writes it). :func:`read_race` turns the pair back into what the lab's figures take — a
Dataset over ``(run, step)`` with ``error`` and ``wall_time``; :func:`race_summary` is the
report's table (M&G 2015 §13: iterations and seconds to the baseline's best error);
:func:`final_table` the same few numbers for a race run live (``Store.curves``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

__all__ = ["read_race", "race_summary", "final_table"]

COLUMNS = ("contender", "step", "seconds", "error")


def read_race(csv: str | Path, report: str | Path | None = None) -> tuple[xr.Dataset, dict]:
    """``(curves, report)``: the curves of ``csv`` as a Dataset over ``(run, step)`` (``error``,
    ``wall_time``; NaN where a run has no point) and the race's report read from ``report`` (its
    JSON: gives the contenders' order and :func:`race_summary`'s numbers; default the ``.json``
    beside ``csv`` where there is one, else ``{}``)."""
    csv = Path(csv)
    if not csv.exists():
        raise FileNotFoundError(f"{csv}: no such race curves file (benchmarks/race_curves.py writes them)")
    df = pd.read_csv(csv, comment="#")
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{csv}: columns {missing} are missing; a race curves file has {list(COLUMNS)}")
    rep: dict = {}
    if report is None and csv.with_suffix(".json").exists():
        report = csv.with_suffix(".json")
    if report is not None:
        rep = json.loads(Path(report).read_text(encoding="utf-8"))
    labels = [c["label"] for c in rep.get("contenders", [])] or list(dict.fromkeys(df["contender"]))
    unknown = sorted(set(df["contender"]) - set(labels))
    if unknown:
        raise ValueError(f"{csv}: contenders {unknown} are not in the report {report}")
    runs = []
    for label in labels:
        d = df[df["contender"] == label].sort_values("step")
        runs.append(xr.Dataset({"error": ("step", d["error"].to_numpy(np.float64)),
                                "wall_time": ("step", d["seconds"].to_numpy(np.float64))},
                               coords={"step": d["step"].to_numpy(np.int64)}))
    ds = xr.concat(runs, dim="run", join="outer").assign_coords(run=np.asarray(labels, dtype=object))
    ds["error"].attrs["long_name"] = "training error (min of iterate and Polyak average)"
    ds["wall_time"].attrs["long_name"] = "training seconds"
    ds.attrs["source"] = str(csv.name)
    return ds, rep


def race_summary(report: dict) -> pd.DataFrame:
    """One row per contender of a race report: iterations, seconds, seconds per iteration, best
    error, iterations and seconds to the target (the best baseline's best error) and the speed-up."""
    rows = []
    for c in report["contenders"]:
        def r(v, n):
            return None if v is None else round(float(v), n)
        rows.append({"contender": c["label"], "iterations": int(c["steps"]), "seconds": r(c["wall_total"], 1),
                     "s / iteration": r(c["wall_total"] / max(c["steps"], 1), 3), "best error": r(c["best_error"], 4),
                     "iterations to target": c["iterations_to_target"], "seconds to target": r(c["seconds_to_target"], 1),
                     "speed-up (s)": r(c["speedup"], 2)})
    return pd.DataFrame(rows).set_index("contender")


def final_table(curves: xr.Dataset) -> pd.DataFrame:
    """Per run of ``Store.curves(ids, ["error", "loss", "wall_time"])`` (labelled ``run``): the
    iterations done, the training seconds and the last evaluated error."""
    rows = {}
    for run in curves["run"].values:
        err = curves["error"].sel(run=run).dropna("step")
        done = curves["loss"].sel(run=run).dropna("step") if "loss" in curves else err
        rows[str(run)] = {"iterations": int(done["step"].max()) if done.size else 0,
                          "seconds": round(float(curves["wall_time"].sel(run=run).max()), 1),
                          "final error": round(float(err[-1]), 3) if err.size else float("nan")}
    return pd.DataFrame(rows).T.astype({"iterations": int})
