"""The Session's checkpoint on its own, against a real store: what is written (rows flushed first,
retention), what a load restores (parameters, optimizer, data position, step, Polyak average),
refusals that change nothing, and ``clone_state``."""
import pytest
import torch

from kfac_lab.store import Store
from kfac_lab.train import Session
from kfac_lab.train.checkpointing import FORMAT, clone_state, load_session_state, save_checkpoint, session_state


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_writer_flushes_rows_first_and_applies_retention(tmp_path):
    s = Session("tiny", "sgd", Store(str(tmp_path / "s.zarr")), checkpoint_every=None, keep_checkpoints=2,
                eval_every=1000)
    for k in range(1, 4):
        for _ in range(2):
            s.train_step()
        assert save_checkpoint(s) == 2 * k
        committed = Store(str(tmp_path / "s.zarr")).load_run(s.run_id)  # another reader: what is on disk
        assert int(committed.step.values.max()) == 2 * k                # the rows reach the checkpoint
    assert s.store.checkpoints(s.run_id) == [4, 6]                      # only the newest two are kept
    ck = s.store.load_checkpoint(s.run_id, 6)
    entries = ck["extra"]["session"]
    assert entries["format"] == FORMAT and entries["step"] == 6 and entries["order"] == s._order.state()
    assert all(torch.equal(ck["model"][k], v) for k, v in s.model.state_dict().items())


@pytest.mark.parametrize("optimizer", ["kfac", "adam"])
def test_loader_restores_everything_the_next_steps_depend_on(optimizer):
    a = Session("tiny", optimizer, checkpoint_every=None, polyak=0.9, batch_size=7, eval_every=1000)
    for _ in range(5):
        a.train_step()
    st = clone_state(session_state(a))
    b = Session("tiny", optimizer, checkpoint_every=None, polyak=0.9, batch_size=3, eval_every=50)
    load_session_state(b, st)
    assert (b.step, b.wall_time, b.batch_size, b.eval_every) == (5, a.wall_time, 7, 1000)
    assert b._order.state() == a._order.state()
    assert all(torch.equal(x, y) for x, y in zip(b._avg.average, a._avg.average))
    for _ in range(3):  # the same next steps, bit for bit
        a.train_step(), b.train_step()
    assert all(torch.equal(x, y) for x, y in zip(params(a.model), params(b.model)))


def test_a_checkpoint_of_another_problem_or_a_damaged_one_changes_nothing():
    src = Session("tiny", "sgd", checkpoint_every=None)
    src.train_step()
    target = Session("figure1", "sgd", checkpoint_every=None)
    before = params(target.model)
    with pytest.raises(ValueError, match="another model or problem"):
        load_session_state(target, session_state(src))
    bad = clone_state(session_state(src))
    bad["extra"]["session"]["order"]["pos"] = 10**9
    same_problem = Session("tiny", "sgd", checkpoint_every=None, seed=1)
    kept = params(same_problem.model)
    with pytest.raises(ValueError, match="data position"):
        load_session_state(same_problem, bad)
    with pytest.raises(ValueError, match="not a kfac_lab Session checkpoint"):
        load_session_state(same_problem, {"model": {}, "optimizer": {}, "extra": {}})
    assert all(torch.equal(x, y) for x, y in zip(params(target.model), before))
    assert all(torch.equal(x, y) for x, y in zip(params(same_problem.model), kept))
    assert same_problem.step == 0 and same_problem._order.state() == {"epoch": 0, "pos": 0}


def test_clone_state_is_independent_and_keeps_module_metadata():
    model = torch.nn.Linear(3, 2)
    sd = model.state_dict()
    st = {"model": sd, "list": [torch.ones(2)], "tuple": (torch.zeros(1), 4), "n": {"x": [1, 2]}}
    c = clone_state(st)
    c["model"]["weight"].add_(1.0)
    c["list"][0].add_(1.0)
    c["n"]["x"].append(3)
    assert not torch.equal(c["model"]["weight"], sd["weight"]) and torch.equal(st["list"][0], torch.ones(2))
    assert st["n"]["x"] == [1, 2] and isinstance(c["tuple"], tuple) and c["tuple"][1] == 4
    assert c["model"]._metadata == sd._metadata
