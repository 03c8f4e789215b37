"""race(): several optimizers on one problem, interleaved fairly, one store."""
import numpy as np
import pytest
import torch

from kfac_lab.store import Store
from kfac_lab.train import race


def test_race_by_steps_round_robin(tmp_path):
    store = Store(str(tmp_path / "lab.zarr"))
    ids = race("tiny", [("kfac", {}), ("sgd", {"lr": 0.03}, "fast sgd"), "adam"], steps=6, store=store, seed=1,
               eval_every=3)
    assert len(ids) == 3 and len(set(ids)) == 3
    table = store.runs()
    assert set(table.loc[ids, "label"]) == {"kfac", "fast sgd", "adam"}
    assert table.loc[ids, "race"].nunique() == 1
    assert (table.loc[ids, "seed"] == 1).all() and (table.loc[ids, "last_step"] == 6).all()
    for rid in ids:
        assert store.events(rid)[-1]["kind"] == "finished"
        assert store.checkpoints(rid) == [6]            # the race's default: one checkpoint at the end


def test_race_by_seconds_shares_training_time():
    sessions = race("tiny", [("kfac", {"approx": "tridiag"}), ("sgd", {})], seconds=0.15, return_sessions=True,
                    checkpoint_every=None)
    walls = [s.wall_time for s in sessions]
    assert all(w >= 0.15 for w in walls)
    # each stops right after passing the budget: within one of its own steps
    for s in sessions:
        ds = s.store.load_run(s.run_id)
        last_step_time = float(np.diff(ds.wall_time.values)[-1])
        assert s.wall_time - 0.15 <= last_step_time + 1e-9
    assert sessions[1].step > sessions[0].step           # SGD steps are cheaper: more of them in the same time


def test_race_sequential_and_bad_arguments():
    ids = race("tiny", [("sgd", {}), ("adam", {}, "adam", {"eval_every": 2})], steps=3, schedule="sequential",
               checkpoint_every=None)
    assert len(ids) == 2
    with pytest.raises(ValueError, match="steps= and/or seconds="):
        race("tiny", ["sgd"])
    with pytest.raises(ValueError, match="schedule"):
        race("tiny", ["sgd"], steps=1, schedule="random")
    with pytest.raises(ValueError, match=r"optimizers\[0\]"):
        race("tiny", [("sgd", {}, "x", {}, "extra")], steps=1)
    with pytest.raises(ValueError, match="at least one"):
        race("tiny", [], steps=1)


def test_race_progress_bar_counts_training_seconds(capsys):
    """``progress``: a tqdm bar on stderr from the first step — in training seconds of all contenders
    with a seconds budget (it ends full), in steps with a steps budget."""
    race("tiny", [("sgd", {}), ("adam", {})], seconds=0.1, progress="tuning sgd", checkpoint_every=None)
    err = capsys.readouterr().err
    assert "tuning sgd" in err and "0.2/0.2 training s" in err
    race("tiny", [("sgd", {}), ("adam", {})], steps=3, progress=True, checkpoint_every=None)
    err = capsys.readouterr().err
    assert "race on tiny" in err and "6/6" in err
