"""Checkpoint retention, deletion and resuming past damaged checkpoints."""

import os
import shutil

import pytest
import torch

from kfac_lab.store import NotFoundError, Store, StoreError, StoreWarning
from kfac_lab.store.checkpoints import retained


def state(v):
    return {"w": torch.full((256,), float(v))}


def damage(store, run, step):
    chunk = os.path.join(store.path, "checkpoints", run, f"step_{step:08d}", "state", "c", "0")
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(chunk, "wb").write(bytes(data))


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "lab.zarr")
    s.new_run({}, run_id="r")
    yield s
    s.close()


def brute_force_retained(steps, keep, every, newest):
    """Independent statement of the rule: newest `keep` by rank, multiples of `every`, the new one."""
    out = set()
    for s in steps:
        rank = sum(1 for t in steps if t > s)  # how many are newer
        if keep is None or rank < keep or s == newest or (every and s % every == 0):
            out.add(s)
    return out


@pytest.mark.parametrize("keep,every", [(None, None), (1, None), (3, None), (2, 10), (5, 4)])
def test_retained_rule(keep, every):
    steps = list(range(0, 61, 3))
    for newest in (steps[-1], 30):
        assert retained(steps, keep, every, newest) == brute_force_retained(steps, keep, every, newest)


def test_store_applies_retention_on_write(store):
    for step in range(1, 13):
        store.save_checkpoint("r", step, state(step), {}, keep_checkpoints=3, keep_every=5)
    assert store.checkpoints("r") == [5, 10, 11, 12]
    on_disk = sorted(os.listdir(os.path.join(store.path, "checkpoints", "r")))
    assert on_disk == ["step_00000005", "step_00000010", "step_00000011", "step_00000012", "zarr.json"]
    for step in store.checkpoints("r"):  # the kept ones are intact
        assert torch.equal(store.load_checkpoint("r", step)["model"]["w"], state(step)["w"])
    # the Store's default: 3 newest; re-writing an old step never deletes the one just written
    store.save_checkpoint("r", 2, state(2), {})
    assert store.checkpoints("r") == [2, 10, 11, 12]
    info = store.checkpoint_info("r")
    assert [c["step"] for c in info] == [2, 10, 11, 12] and all(c["nbytes"] > 1024 for c in info)
    with pytest.raises(ValueError, match="keep_checkpoints must be an int >= 1 or None"):
        store.save_checkpoint("r", 13, state(13), {}, keep_checkpoints=0)
    with pytest.raises(ValueError, match="keep_every"):
        Store(store.path, keep_every=-2)
    assert store.checkpoints("r") == [2, 10, 11, 12]  # a refused call changes nothing


def test_keep_all_and_delete(store):
    for step in range(5):
        store.save_checkpoint("r", step, state(step), {}, keep_checkpoints=None)
    assert store.checkpoints("r") == [0, 1, 2, 3, 4]
    store.delete_checkpoint("r", 2)
    assert store.checkpoints("r") == [0, 1, 3, 4]
    assert not os.path.exists(os.path.join(store.path, "checkpoints", "r", "step_00000002"))
    with pytest.raises(NotFoundError, match=r"no checkpoint at step 2 .*available steps: \[0, 1, 3, 4\]"):
        store.delete_checkpoint("r", 2)
    store.log("r", 0, loss=1.0)
    store.flush()
    for step in (0, 1, 3, 4):
        store.delete_checkpoint("r", step)
    assert store.checkpoints("r") == []
    assert store.load_run("r").loss.values.tolist() == [1.0]  # the run itself untouched


def test_retention_removes_debris_of_a_killed_checkpoint_write(store):
    store.save_checkpoint("r", 1, state(1), {})
    debris = os.path.join(store.path, "checkpoints", "r", "step_00000007")
    shutil.copytree(os.path.join(store.path, "checkpoints", "r", "step_00000001"), debris)
    store._backend.update_attrs("checkpoints/r/step_00000007", {}, drop=["kfac_lab_committed"])
    assert store.checkpoints("r") == [1]  # never listed
    store.save_checkpoint("r", 2, state(2), {})
    assert not os.path.exists(debris)


def test_newest_intact_checkpoint(store):
    for step in (10, 20, 30):
        store.save_checkpoint("r", step, state(step), {})
    damage(store, "r", 30)
    with pytest.warns(StoreWarning, match=r"skipping damaged checkpoint at step 30: .*damaged"):
        out = store.load_intact_checkpoint("r")
    assert out["step"] == 20 and torch.equal(out["model"]["w"], state(20)["w"])
    assert [s for s, _ in out["skipped"]] == [30]
    assert store.checkpoints("r") == [10, 20, 30]  # nothing deleted behind the user's back
    assert store.load_intact_checkpoint("r", step=10)["step"] == 10
    damage(store, "r", 20)
    damage(store, "r", 10)
    with pytest.warns(StoreWarning), pytest.raises(StoreError, match=r"every checkpoint .* damaged \(steps \[30, 20, 10\]\)"):
        store.load_intact_checkpoint("r")


def test_session_resume_skips_a_damaged_checkpoint_and_from_step(tmp_path):
    from kfac_lab.train import Session

    path = str(tmp_path / "lab.zarr")
    s = Session("tiny", "kfac", path, checkpoint_every=5, eval_every=5, keep_checkpoints=2, keep_every=10)
    s.run(25)
    s.store.close()
    store = Store(path)
    assert store.checkpoints(s.run_id) == [10, 20, 25]
    damage(store, s.run_id, 25)
    with pytest.warns(StoreWarning, match="skipping damaged checkpoint at step 25"):
        r = Session.restore(store, s.run_id, steps=30)
    assert r.step == 20
    ev = [e for e in store.events(s.run_id) if e["kind"] == "resumed"][-1]
    assert ev["from_checkpoint"] == 20 and ev["skipped_checkpoints"][0]["step"] == 25
    r.run()
    # step 25 re-done: its damaged checkpoint replaced by an intact one; retention: 2 newest + every 10th
    assert store.checkpoints(s.run_id) == [10, 20, 25, 30]
    assert store.load_checkpoint(s.run_id, 25)["step"] == 25
    assert store.load_run(s.run_id).step.values.tolist() == list(range(1, 31))
    r10 = Session.restore(store, s.run_id, from_step=10, steps=12)
    assert r10.step == 10
    with pytest.raises(NotFoundError, match="no checkpoint at step 11"):
        Session.restore(store, s.run_id, from_step=11)
    r10.stop()
    b = Session.branch(store, s.run_id, from_step=25, steps=28)  # a new run from that checkpoint
    assert b.run_id != s.run_id and b.step == 25 and b.keep_checkpoints == 2
    b.run()
    assert store.load_run(b.run_id).step.values.tolist() == [26, 27, 28]
    assert store.load_run(b.run_id).attrs["parent_run"] == s.run_id
    assert [e["kind"] for e in store.events(b.run_id)][0] == "branched"
    store.close()
