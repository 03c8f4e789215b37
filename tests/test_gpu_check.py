"""benchmarks/gpu_check.py runs on the CPU with tiny sizes and writes its table and JSON."""
import os


def test_gpu_check_quick_on_cpu(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_check"
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=180, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["rows"]
    checks = [r for r in rows if r["kind"] == "check"]
    assert len(checks) >= 8 and all(r["ok"] for r in checks)
    assert not [r for r in rows if r["kind"] == "error"]
    kfac = [r for r in rows if r["kind"] == "timing" and r["name"].startswith("K-FAC iteration")]
    assert len(kfac) == 2 and all(r["value"] > 0 and r["ratio_to_sgd"] > 0 for r in kfac)
    assert all(r["host_syncs_per_step"] >= 2 for r in kfac)  # the checks and the products, at least
    names = {r["name"] for r in rows}
    assert any("exact Fisher" in n for n in names) and any("eigh" in n for n in names)
    assert any("cholesky" in n for n in names)
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# GPU check") and "| kind | what |" in md and "host syncs/step" in md
