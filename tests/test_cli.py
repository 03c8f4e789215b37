"""The kfac-lab command: train -> runs -> resume on the tiny problem, errors, a killed process
resumed, study, bench (smoke), lab (dry run)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kfac_lab.cli import main
from kfac_lab.store import Store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cli(cli_isolated):
    """Every test here runs the command line (tests/conftest.py's ``cli_isolated``)."""
    yield


def train(store, *extra):
    return main(["train", "--store", store, "--no-progress", "--threads", "1", *extra])


def test_train_runs_resume(tmp_path, capsys):
    store = str(tmp_path / "lab.zarr")
    assert train(store, "--problem", "tiny", "--steps", "30", "--print-every", "10", "--checkpoint-every", "10") == 0
    out = capsys.readouterr().out
    run_id = out.strip().splitlines()[-1].split("run_id: ")[1]
    assert "step     10  loss" in out and "step     30" in out and "training error" in out
    assert main(["runs", "--store", store]) == 0
    table = capsys.readouterr().out
    assert run_id in table and "tiny" in table and "kfac" in table
    assert train(store, "--resume", run_id, "--steps", "45") == 0
    out = capsys.readouterr().out
    assert f"resuming run {run_id}" in out and "from step 30" in out and "step 45" in out
    ds = Store(store).load_run(run_id)
    assert ds.step.values.tolist() == list(range(1, 46))
    # an SGD run with its own options
    assert train(store, "--problem", "tiny", "--optimizer", "sgd", "--lr", "0.02", "--mu-max", "0.995",
                 "--steps", "5", "--print-every", "0") == 0
    s = Store(store)
    rid = capsys.readouterr().out.strip().splitlines()[-1].split("run_id: ")[1]
    attrs = s.load_run(rid).attrs
    assert attrs["optimizer"] == "sgd" and attrs["lr"] == 0.02 and attrs["mu_max"] == 0.995
    assert train(store, "--problem", "tiny", "--approx", "tridiag", "--no-momentum", "--damping", "10",
                 "--option", "T3=10", "--seconds", "0.05", "--print-every", "0") == 0
    rid = capsys.readouterr().out.strip().splitlines()[-1].split("run_id: ")[1]
    attrs = Store(store).load_run(rid).attrs
    assert attrs["approx"] == "tridiag" and attrs["momentum"] is False and attrs["T3"] == 10



def test_train_damping_auto(tmp_path, capsys):
    """--damping auto: λ₀ from the probe, recorded as an event of the run; a bad value names 'auto'."""
    store = str(tmp_path / "lab.zarr")
    assert train(store, "--problem", "tiny", "--damping", "auto", "--steps", "3", "--print-every", "0") == 0
    rid = capsys.readouterr().out.strip().splitlines()[-1].split("run_id: ")[1]
    s = Store(store)
    assert s.load_run(rid).attrs["damping"] == "auto"
    probe = [e for e in s.events(rid) if e["kind"] == "initial_damping"]
    assert len(probe) == 1 and probe[0]["step"] == 1 and probe[0]["damping"] > 0
    assert float(s.load_run(rid)["damping"].values[0]) == probe[0]["damping"]
    with pytest.raises(SystemExit):
        train(store, "--problem", "tiny", "--damping", "often", "--steps", "1")
    assert "or 'auto'" in capsys.readouterr().err


def test_errors_are_one_line_with_status_2(tmp_path, capsys):
    store = str(tmp_path / "lab.zarr")
    assert main(["runs", "--store", str(tmp_path / "missing.zarr")]) == 2
    err = capsys.readouterr().err
    assert "kfac-lab runs: error:" in err and "missing.zarr" in err and "Traceback" not in err
    assert train(store, "--problem", "tiny") == 2
    assert "--steps N or --seconds S" in capsys.readouterr().err
    assert train(store, "--problem", "tiny", "--optimizer", "sgd", "--damping", "3", "--steps", "1") == 2
    assert "K-FAC only" in capsys.readouterr().err
    assert train(store, "--resume", "nope-run", "--steps", "3") == 2
    assert "nope-run" in capsys.readouterr().err
    assert train(store, "--resume", "x", "--lr", "0.1", "--steps", "3") == 2
    assert "drop --lr" in capsys.readouterr().err
    assert train(store, "--problem", "faces", "--steps", "1") == 2
    assert "--faces" in capsys.readouterr().err
    assert train(store, "--problem", "tiny", "--batch-size", "100000", "--steps", "1") == 2
    assert "--batch-size 100000 exceeds" in capsys.readouterr().err
    for bad in (["train", "--store", store, "--problem", "imagenet"], ["train", "--store", store, "--steps", "-3"],
                ["train", "--store", store, "--lr", "abc"], ["nonsense"], []):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["runs"])  # --store is required (no $KFAC_LAB_STORE)
    assert "--store" in capsys.readouterr().err


def test_killed_training_process_resumes(tmp_path):
    store = str(tmp_path / "lab.zarr")
    cmd = [sys.executable, "-m", "kfac_lab", "train", "--problem", "tiny", "--steps", "1000000", "--store", store,
           "--checkpoint-every", "15", "--no-progress", "--print-every", "0", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        first = proc.stdout.readline()
        assert first.startswith("run "), first + proc.stderr.read()
        run_id = first.split()[1].rstrip(":")
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if len(Store(store, mode="r").checkpoints(run_id)) >= 2:
                    break
            except Exception:  # noqa: BLE001 - the run may not be readable yet
                pass
            assert time.monotonic() - t0 < 90, "no checkpoints from the training process"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)     # a crash: no flush, no final checkpoint
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    s = Store(store)
    last = int(s.runs().loc[run_id, "last_step"])
    ckpt = s.checkpoints(run_id)[-1]
    assert ckpt <= last
    assert main(["train", "--store", store, "--resume", run_id, "--steps", str(last + 10), "--no-progress",
                 "--threads", "1", "--print-every", "0"]) == 0
    ds = Store(store).load_run(run_id)
    assert ds.step.values.tolist() == list(range(1, last + 11))
    assert np.isfinite(ds.loss.values).all()
    kinds = [e["kind"] for e in Store(store).events(run_id)]
    assert "resumed" in kinds and kinds[-1] == "finished"


def test_study_and_lab_dry_run(tmp_path, capsys):
    store = str(tmp_path / "lab.zarr")
    assert main(["study", "--figure", "1", "--n", "100", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "study figure1 saved" in out and "rel_error" in out
    assert "figure1" in Store(store).studies()
    assert main(["lab", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["mode"] in ("serve-module", "serve-files", "study")
    if plan["mode"] != "study":
        assert plan["port"] == 5006


def test_bench_race_smoke(tmp_path, capsys):
    out = tmp_path / "race"
    assert main(["bench", "race", "--smoke", "--seconds-per-run", "0.1", "--tune-seconds", "0.05", "--out", str(out),
                 "--store", "memory", "--no-plots"]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert {c["optimizer"] for c in res["contenders"]} == {"kfac", "sgd", "adam"}
    assert res["target"] > 0 and "goal" in res["verdict"]
    assert res["by_budget"] and res["by_budget"][-1]["budget"] == 0.1
    md = out.with_suffix(".md").read_text()
    assert "| contender |" in md and "Tuning grids" in md and "baseline's budget" in md
    # both initial dampings race, labelled; the auto contenders' λ₀ and the goals per budget are reported
    labels = [c["label"] for c in res["contenders"]]
    for approx in ("blockdiag", "tridiag"):
        assert f"K-FAC {approx} (auto λ₀)" in labels and f"K-FAC {approx} (λ₀ = 150, paper)" in labels
    assert set(res["initial_damping"]) == {"K-FAC blockdiag (auto λ₀)", "K-FAC tridiag (auto λ₀)"}
    assert res["budgets"] == [0.1] and any("goal ≥ 3×" in g for g in res["goals"])
    assert any("with λ₀ = 150" in g for g in res["goals"]) and "Goals per budget" in md


def test_bench_race_overrides_grids_and_contenders(tmp_path):
    out = tmp_path / "race"
    assert main(["bench", "race", "--smoke", "--seconds-per-run", "0.1", "--tune-seconds", "0.05", "--out", str(out),
                 "--store", "memory", "--no-plots", "--sgd-lrs", "0.02", "--mu-maxes", "0.99", "--adam-lrs", "0.005",
                 "--kfac", "blockdiag", "--momentum-only"]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert [(r["optimizer"], r["lr"]) for r in res["tuning"]] == [("sgd", 0.02), ("adam", 0.005)]
    kfac = [c for c in res["contenders"] if c["optimizer"] == "kfac"]
    assert [(c["options"].get("approx"), c["options"]["damping"]) for c in kfac] == [("blockdiag", "auto"),
                                                                                     ("blockdiag", 150.0)]
    assert "--momentum-only" in res["command"]
    assert main(["bench", "race", "--smoke", "--seconds-per-run", "0.1", "--tune-seconds", "0.05", "--out", str(out),
                 "--store", "memory", "--no-plots", "--kfac", "blockdiag", "--momentum-only", "--lambda0", "paper",
                 "--budgets", "0.05", "--goal", "2"]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert [c["label"] for c in res["contenders"] if c["optimizer"] == "kfac"] == ["K-FAC blockdiag (λ₀ = 150, paper)"]
    assert 0.05 in [r["budget"] for r in res["by_budget"]] and all("goal ≥ 2×" in g for g in res["goals"])


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "kfac_lab", "--help"], capture_output=True, text=True, cwd=str(ROOT),
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 0 and "train" in r.stdout and "lab" in r.stdout


def test_race_speedup_by_budget():
    import importlib.util

    import numpy as np
    spec = importlib.util.spec_from_file_location("race_bench", ROOT / "benchmarks" / "race.py")
    race = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(race)
    t = np.arange(10.0, 101.0, 10.0)  # evaluations every 10 s up to 100 s
    mk = lambda err: {"wall_time": t, "step": np.arange(1, 11), "error": np.asarray(err, dtype=float)}
    kfac = mk([50, 30, 8, 4, 2, 1, 0.5, 0.4, 0.3, 0.2])  # slow start, then fast
    sgd = mk([20, 15, 12, 10, 8, 7, 6, 5, 4.5, 4])
    adam = mk([18, 16, 14, 13, 12, 11, 10, 9.5, 9, 8.5])
    rows = race.speedup_by_budget([kfac, sgd, adam], baselines=[1, 2], kfacs=[0], seconds=100, points=5)
    assert [r["budget"] for r in rows] == [20, 40, 60, 80, 100]
    first, last = rows[0], rows[-1]
    assert first["baseline"] == 1 and first["target"] == 15 and first["baseline_seconds"] == 20
    assert first["speedups"][0] == 20 / 30  # K-FAC reaches 15 only at 30 s: slower at a short budget
    assert last["target"] == 4 and last["baseline_seconds"] == 100 and last["speedups"][0] == 100 / 40
    never = race.speedup_by_budget([mk([99] * 10), sgd, adam], [1, 2], [0], 100, points=2)
    assert all(r["speedups"][0] is None for r in never)


def test_race_report_only_rebuilds_the_tables_from_the_store(tmp_path):
    out, store = tmp_path / "race", tmp_path / "race.zarr"
    args = ["bench", "race", "--smoke", "--seconds-per-run", "0.1", "--tune-seconds", "0.05", "--out", str(out),
            "--no-plots", "--kfac", "blockdiag", "--momentum-only"]
    assert main(args + ["--store", str(store)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    before = res.pop("by_budget")
    out.with_suffix(".json").write_text(json.dumps(res))  # as written by a race.py without that table
    out.with_suffix(".md").write_text("stale")
    assert main(["bench", "race", "--report-only", "--out", str(out)]) == 0  # the store path comes from the JSON
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["by_budget"] == before and again["contenders"] == res["contenders"]
    assert "baseline's budget" in out.with_suffix(".md").read_text()
    from kfac_lab.viz.export import find_chromium
    if find_chromium():  # the README picture: curves against seconds drawn by the local chromium
        assert main(["bench", "race", "--report-only", "--out", str(out), "--png", str(tmp_path / "race.png")]) == 0
        assert (tmp_path / "race.png").stat().st_size > 5_000
        assert "![training error against seconds](" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="does not exist"):
        main(["bench", "race", "--report-only", "--out", str(tmp_path / "nothing")])


def test_errors_speak_in_command_line_terms(tmp_path, capsys):
    """What the CLI prints for a user's mistake names flags and commands, not Python calls."""
    store = str(tmp_path / "s.zarr")
    assert main(["runs", "--store", store]) == 2
    err = capsys.readouterr().err
    assert "--store" in err and "kfac-lab train --store" in err and "mode=" not in err
    assert main(["train", "--store", store, "--problem", "tiny", "--option", "foo=1", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--option foo=" in err and "T3" in err and "__init__" not in err
    assert main(["train", "--store", store, "--problem", "faces", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--faces PATH" in err and "get_problem" not in err
    assert main(["train", "--store", store, "--resume", "nope", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "kfac-lab runs --store" in err and "new_run" not in err
    with pytest.raises(SystemExit):                    # checked by argparse, named by flag
        main(["train", "--store", store, "--problem", "tiny", "--polyak", "2", "--steps", "1"])
    assert "--polyak: expected a number in [0, 1)" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "--store", store, "--problem", "tiny", "--device", "cuda", "--steps", "1"]) == 2
        assert "--device cuda:" in capsys.readouterr().err


def test_help_has_no_stale_text(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "until they exist" not in out and "127.0.0.1:5006" in " ".join(out.split())
