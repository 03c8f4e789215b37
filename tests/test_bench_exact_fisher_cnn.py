"""benchmarks/bench_exact_fisher_cnn.py runs with tiny sizes, writes only under --out, and reports
the floor's phases (backward, JᵀJ of the recorded Jacobian shapes, the P×P write) next to ours."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("backpack")


def test_bench_exact_fisher_cnn_floor_rows(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "efc"
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_exact_fisher_cnn.py"), "--threads", "1",
                           "--n", "12", "--repeats", "1", "--no-curvlinops", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    floor = data["floor"]
    assert floor["jacobian_shapes"] == [[12 * 10, 816]]  # k·N rows × the conv layers' 816 parameters
    phases = floor["phases"]
    assert set(phases) == {"backward", "JtJ", "write", "total"}
    for row in phases.values():
        assert row["median_seconds"] > 0 and row["over_backpack"] > 0 and row["median_paired_over_backpack"] > 0
    assert phases["total"]["median_seconds"] >= max(phases[k]["median_seconds"] for k in ("backward", "JtJ", "write"))
    assert data["ours_over_backpack"]["median_paired_over_backpack"] > 0 and data["proposed_goal_ratio"] == 0.35
    md = out.with_suffix(".md").read_text()
    assert "floor / BackPACK" in md and "**total**" in md and "Proposed goal: ≤ 0.35×" in md
