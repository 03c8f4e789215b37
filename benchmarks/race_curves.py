"""A race's curves, small: the training-error curves of a finished race as a compact CSV.

The notebooks show the long stored races (``benchmarks/results/race_*.md``) without their
stores, which stay on the machine that ran them. This reads the curves from the race's
plotly pages (``<prefix>_iterations.html``: error against iterations, ``<prefix>_seconds.html``:
against training seconds — the same evaluated points), or from its store, and writes
``contender, step, seconds, error`` rows, decimated to at most ``--points`` per contender
(log-spaced in iterations, first and last kept, plus the best point and the first point at or
below the race's target, so that the best error and "iterations/seconds to target" read the same
off the small file).

    python benchmarks/race_curves.py benchmarks/results/race_600s_all --out notebooks/data/race_600s_all.csv

Beside the CSV it writes the report's main fields (``<out>.json``: contenders, target, …).
"""
from __future__ import annotations

import argparse
import base64
import json
import re
from pathlib import Path

import numpy as np

_DTYPES = {"f8": "<f8", "f4": "<f4", "i1": "<i1", "i2": "<i2", "i4": "<i4", "i8": "<i8", "u1": "<u1", "u2": "<u2",
           "u4": "<u4", "u8": "<u8"}


def _array(v) -> np.ndarray:
    """A plotly JSON array: a list, or plotly's typed form ``{"dtype": "f8", "bdata": base64}``."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=_DTYPES[v["dtype"]]).astype(np.float64)
    return np.asarray(v, dtype=np.float64)


def traces_from_html(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """``{name: {"step", "x", "y"}}`` of the line traces in a page written by ``fig.write_html``."""
    text = Path(path).read_text(encoding="utf-8")
    m = re.search(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*(\[.*?\])\s*,\s*\{", text, re.S)
    if m is None:
        raise ValueError(f"{path}: no Plotly.newPlot(...) call found — is it a page written by plotly's write_html?")
    out = {}
    for tr in json.loads(m.group(1)):
        if tr.get("mode") != "lines" or "customdata" not in tr:
            continue  # event markers and the like
        out[tr["name"]] = {"step": _array(tr["customdata"]).astype(np.int64), "x": _array(tr["x"]), "y": _array(tr["y"])}
    if not out:
        raise ValueError(f"{path}: no curve traces (lines with steps as customdata)")
    return out


def decimate(steps: np.ndarray, points: int, keep: tuple = ()) -> np.ndarray:
    """Indices of at most ``points`` (+ ``keep``) entries of increasing ``steps``, log-spaced in step."""
    n = steps.size
    if n <= points:
        return np.arange(n)
    targets = np.geomspace(max(steps[0], 1), steps[-1], points)
    idx = np.unique(np.concatenate([np.searchsorted(steps, targets).clip(0, n - 1), [0, n - 1],
                                    np.asarray(keep, dtype=np.int64)]))
    return idx


def compact(prefix: str | Path, points: int = 120, target: float | None = None) -> list[tuple[str, int, float, float]]:
    """Rows ``(contender, step, seconds, error)`` from ``<prefix>_iterations.html`` and ``_seconds.html``."""
    prefix = Path(prefix)
    it = traces_from_html(f"{prefix}_iterations.html")
    sec = traces_from_html(f"{prefix}_seconds.html")
    rows = []
    for name, a in it.items():
        if name not in sec:
            raise ValueError(f"{prefix}: contender {name!r} is in the iterations page but not in the seconds page")
        b = sec[name]
        if not np.array_equal(a["step"], b["step"]) or not np.allclose(a["y"], b["y"], rtol=0, atol=0):
            raise ValueError(f"{prefix}: the two pages disagree on {name!r}'s points")
        steps, err, secs = a["step"], a["y"], b["x"]
        keep = [int(np.argmin(err))]  # the best error survives decimation
        if target is not None and np.any(err <= target):
            keep.append(int(np.flatnonzero(err <= target)[0]))
        for i in decimate(steps, points, tuple(keep)):
            rows.append((name, int(steps[i]), float(secs[i]), float(err[i])))
    return rows


def write_csv(rows, path: str | Path, source: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# training error (min of iterate and Polyak average) of the race {source}; decimated\n")
        f.write("contender,step,seconds,error\n")
        for name, step, s, e in rows:
            f.write(f"\"{name}\",{step},{s:.4f},{e:.9g}\n")
    return path


#: What the notebooks read of a race's report (``<out>.json`` beside the CSV: the notebooks travel without
#: benchmarks/, e.g. when the tests run a copy of notebooks/).
REPORT_KEYS = ("problem", "description", "seconds_per_run", "target", "target_definition", "best_baseline", "contenders",
               "machine", "command")


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    small = {k: report[k] for k in REPORT_KEYS if k in report}
    path.write_text(json.dumps(small, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", help="the race's results prefix, e.g. benchmarks/results/race_600s_all")
    p.add_argument("--out", required=True, help="the CSV to write")
    p.add_argument("--points", type=int, default=120, help="at most this many points per contender (plus the target's)")
    a = p.parse_args(argv)
    res = Path(f"{a.prefix}.json")
    report = json.loads(res.read_text()) if res.exists() else None
    out = write_csv(compact(a.prefix, a.points, report["target"] if report else None), a.out, Path(a.prefix).name)
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB)")
    if report is not None:
        small = write_report(report, Path(a.out).with_suffix(".json"))
        print(f"wrote {small} ({small.stat().st_size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
