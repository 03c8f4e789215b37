"""DistributedKFAC: 2-process gloo runs (spawned here) against the single-process KFAC on the
same global batch, failure handling, and the one-process case (the pieces: tests/distributed/).

The 2-process scenarios run once per module (one spawn, ~5 s on a loaded 2-core machine) and
each test compares one scenario with a reference computed in this process.
"""
import os
import tempfile
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kfac_lab.curvature import make_inverse
from kfac_lab.errors import DecompositionError
from kfac_lab.optim import KFAC
from kfac_lab.optim.distributed import DistributedError, DistributedKFAC, init_distributed, shard

DT = torch.float64
STEPS = 10
WORLD = 2


class Wrapped(nn.Module):
    """Not an nn.Sequential: exercises the torch.func engine."""

    def __init__(self, seq):
        super().__init__()
        self.body = seq

    def forward(self, x):
        return self.body(x)


def make_model(sizes=(6, 8, 8, 3), seed=0, wrapped=False):
    g = torch.Generator().manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b).to(DT)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=DT) / a**0.5)
            lin.bias.copy_(0.1 * torch.randn(b, generator=g, dtype=DT))
        mods.append(lin)
        if i < len(sizes) - 2:
            mods.append(nn.Tanh())
    seq = nn.Sequential(*mods)
    return Wrapped(seq) if wrapped else seq


SCENARIOS = {
    # name: (optimizer kwargs, options)
    "blockdiag": (dict(approx="blockdiag"), {}),
    "tridiag": (dict(approx="tridiag"), {}),
    "lazy_uneven": (dict(approx="tridiag", factor_sync="lazy"), {"batch": 37}),
    "switch": (dict(approx="blockdiag", bucket_mb=0.0005), {"switch_at": 5}),
    "ddp": (dict(approx="blockdiag"), {"ddp": True}),
    "func_bernoulli": (dict(approx="tridiag"), {"wrapped": True, "loss": "bernoulli"}),
    "tikhonov": (dict(approx="blockdiag", damping_type="tikhonov"), {}),
    "ddp_uneven": (dict(approx="tridiag"), {"ddp": True, "batch": 37}),
    # checkpoint after step 5 (lazy: per-rank partial sums are reduced), restore into a new optimizer
    "resume": (dict(approx="tridiag", factor_sync="lazy"), {"resume_at": 5}),
    # a NaN in rank 1's shard at step 4: every rank rejects the step, as the single process does
    "nan_reject": (dict(approx="blockdiag"), {"nan_at": 4}),
    # damping="auto": the probe's reductions give every rank the single process's λ₀ (resumed right after it)
    "auto": (dict(approx="tridiag", damping="auto"), {"resume_at": 1}),
}
DIST_ONLY = ("factor_sync", "bucket_mb", "sampling")
# runs with no single-process twin: each rank draws its own targets (statistically equivalent, not bitwise)
LOCAL = {"local": (dict(approx="tridiag", sampling="local"), {"resume_at": 5})}


def batch(step, m, loss):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(m, 6, dtype=DT, generator=g)
    if loss == "bernoulli":
        y = torch.rand(m, 3, dtype=DT, generator=g)
    else:
        y = torch.randint(0, 3, (m,), generator=g)
    return x, y


def inner_model(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def run_scenario(name, rank=0, world=1, reference=True, fail_at=None):
    """10 steps of a scenario: the plain KFAC on the global batch (``reference``) or this rank's
    DistributedKFAC on its shard. Returns the parameters, the step scalars and the state."""
    kw, opt = {**SCENARIOS, **LOCAL}[name]
    loss = opt.get("loss", "categorical")
    model = make_model(wrapped=opt.get("wrapped", False))
    common = {**dict(damping=1.0, T1=5, T2=4, T3=4, seed=3), **{k: v for k, v in kw.items() if k not in DIST_ONLY}}
    if reference:
        o = KFAC(model, loss, **common)
    else:
        if opt.get("ddp"):
            model = nn.parallel.DistributedDataParallel(model)
        cls = DistributedKFAC
        if fail_at is not None:
            class Failing(DistributedKFAC):
                def _batch_statistics(self, *a):
                    if self.k + 1 == fail_at and self.rank == 1:
                        raise RuntimeError("injected failure on rank 1")
                    return super()._batch_statistics(*a)
            cls = Failing
        o = cls(model, loss, **common, **{k: v for k, v in kw.items() if k in DIST_ONLY})
    infos = []
    for step in range(1, STEPS + 1):
        if opt.get("switch_at") == step:
            o.configure(approx="tridiag")
        x, y = batch(step, opt.get("batch", 64), loss)
        if opt.get("nan_at") == step:
            x[1, 0] = float("nan")
        if not reference:
            x, y = shard(x, rank, world), shard(y, rank, world)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the rejected step's warning
            info = o.step(x, y)
        infos.append([info.loss, info.damping, info.gamma, info.alpha, info.mu, info.rho or 0.0, info.batch_size,
                      float(info.rejected)])
        if opt.get("resume_at") == step:
            state = o.state_dict()
            o = type(o)(inner_model(model), loss, **common) if reference else \
                type(o)(model, loss, **common, **{k: v for k, v in kw.items() if k in DIST_ONLY})
            o.load_state_dict(state)
    inner = inner_model(model)
    state = o.state_dict()
    return {"params": [p.detach().clone() for p in inner.parameters()], "infos": infos,
            "factors": state["factors"], "comm": getattr(o, "comm", None) and o.comm.stats.snapshot(),
            "inverse_stats": getattr(o, "inverse_stats", None)}


# ---------------------------------------------------------------------------------------------
# process plumbing

def _worker(rank, world, store, out_dir, job, timeout):
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        init_distributed("gloo", timeout=timeout, init_method=f"file://{store}", rank=rank, world_size=world)
        if job["kind"] == "scenarios":
            result = {name: run_scenario(name, rank, world, reference=False) for name in job["names"]}
        else:
            result = run_scenario("blockdiag", rank, world, reference=False, fail_at=3)
        out = {"ok": True, "result": result}
    except Exception as exc:  # noqa: BLE001 — reported to the test
        out = {"ok": False, "type": type(exc).__name__, "message": str(exc), "elapsed": time.perf_counter() - t0}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    if not out["ok"] and job["kind"] == "stall" and rank == 1:
        time.sleep(120)  # a rank that failed but does not exit: the other must time out, not hang
    if out["ok"]:
        dist.destroy_process_group()
    os._exit(0)


def spawn(job, timeout=30.0, wait=60.0, world=WORLD):
    """Start ``world`` gloo ranks on ``job``; return each rank's report (None: none written)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "store")
        procs = [ctx.Process(target=_worker, args=(r, world, store, d, job, timeout), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + wait
        files = [os.path.join(d, f"rank{r}.pt") for r in range(world)]
        need = files if job["kind"] == "scenarios" else files[:1] + files[1:]
        while time.monotonic() < deadline and not all(os.path.exists(f) for f in need):
            time.sleep(0.05)
        time.sleep(0.2)
        reports = []
        for f in files:
            try:
                reports.append(torch.load(f, weights_only=False))
            except (OSError, RuntimeError, EOFError):
                reports.append(None)
        for p in procs:
            p.join(timeout=1.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
    return reports


@pytest.fixture(scope="module")
def two_ranks():
    reports = spawn({"kind": "scenarios", "names": list(SCENARIOS) + list(LOCAL)}, wait=90.0)
    for r, rep in enumerate(reports):
        assert rep is not None, f"rank {r} wrote no report"
        assert rep["ok"], f"rank {r} failed: {rep.get('type')}: {rep.get('message')}"
    return [rep["result"] for rep in reports]


def rel_err(a, b):
    va = torch.cat([t.detach().reshape(-1) for t in a])
    vb = torch.cat([t.detach().reshape(-1) for t in b])
    return float((va - vb).norm() / vb.norm())


# ---------------------------------------------------------------------------------------------
# 2 processes == 1 process

@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_equal_single_process(two_ranks, name):
    ref = run_scenario(name)
    for rank in range(WORLD):
        got = two_ranks[rank][name]
        err = rel_err(got["params"], ref["params"])
        print(f"{name} rank {rank}: relative parameter error {err:.2e}")
        assert err <= 1e-5, (name, rank)
        # the same α, μ, λ, γ, ρ decisions and the global batch size, step by step
        assert torch.allclose(torch.tensor(got["infos"]), torch.tensor(ref["infos"]), rtol=1e-6, atol=1e-9,
                              equal_nan=True), name
    if name == "nan_reject":
        assert [i[-1] for i in ref["infos"]] == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    # every rank holds the same parameters, bit for bit
    for a, b in zip(two_ranks[0][name]["params"], two_ranks[1][name]["params"]):
        assert torch.equal(a, b), name


def test_auto_damping_gives_every_rank_the_same_lambda0(two_ranks):
    from kfac_lab.optim.initial_damping import GRID

    lam0 = run_scenario("auto")["infos"][0][1]  # λ after step 1 (T1 = 5: the LM rule has not run yet)
    assert lam0 in GRID
    assert [two_ranks[r]["auto"]["infos"][0][1] for r in range(WORLD)] == [lam0] * WORLD


def test_local_sampling_draws_per_rank_and_keeps_the_ranks_in_step(two_ranks):
    local = [two_ranks[r]["local"] for r in range(WORLD)]
    for a, b in zip(local[0]["params"], local[1]["params"]):
        assert torch.equal(a, b)                      # one step on every rank, resumed from a checkpoint too
    assert all(torch.isfinite(p).all() for p in local[0]["params"])
    # the targets are not the single-process draw: the factors differ from the global-sampling run's
    glob = two_ranks[0]["tridiag"]["factors"]["A"]
    assert any(not torch.allclose(local[0]["factors"]["A"][k], glob[k]) for k in glob)
    # but they estimate the same Fisher: the same order of magnitude on every factor
    for k in glob:
        ratio = float(local[0]["factors"]["A"][k].norm() / glob[k].norm())
        assert 0.5 < ratio < 2.0, (k, ratio)


def test_checkpoint_holds_the_global_factors(two_ranks):
    # lazy sync keeps per-rank partial sums; state_dict reduces them to the single-process factors
    ref = run_scenario("lazy_uneven")["factors"]
    for rank in range(WORLD):
        got = two_ranks[rank]["lazy_uneven"]["factors"]
        assert set(got["A"]) == set(ref["A"])
        for key in ref["A"]:
            assert torch.allclose(got["A"][key], ref["A"][key], rtol=1e-9, atol=1e-12), key
            assert torch.allclose(got["G"][key], ref["G"][key], rtol=1e-9, atol=1e-12), key


def test_communication_is_counted_and_inverses_are_shared(two_ranks):
    eager = two_ranks[0]["blockdiag"]["comm"]["bytes"]
    lazy = two_ranks[0]["lazy_uneven"]["comm"]["bytes"]
    assert eager["factors"] > 0 and eager["gradients"] > 0 and eager["scalars"] > 0 and eager["inverses"] > 0
    assert "gradients" not in two_ranks[0]["ddp"]["comm"]["bytes"]       # DDP reduced them, we did not
    assert two_ranks[0]["ddp"]["comm"]["bytes"]["gradients (DDP)"] > 0
    # the tiny bucket splits each collective into many calls
    assert two_ranks[0]["switch"]["comm"]["calls"]["factors"] > two_ranks[0]["blockdiag"]["comm"]["calls"]["factors"]
    shares = [two_ranks[r]["tridiag"]["inverse_stats"] for r in range(WORLD)]
    assert all(0 < s["tasks"] < s["total_tasks"] for s in shares)
    assert sum(s["tasks"] for s in shares) == shares[0]["total_tasks"]
    assert lazy["factors"] > 0


# ---------------------------------------------------------------------------------------------
# failures: a rank raising mid-step makes the other raise a clear error, not hang

def test_peer_failure_raises_on_the_other_rank():
    t0 = time.monotonic()
    r0, r1 = spawn({"kind": "fail"}, timeout=10.0, wait=40.0)
    assert r1 is not None and not r1["ok"] and "injected failure" in r1["message"]
    assert r0 is not None and not r0["ok"], "rank 0 did not report"
    assert r0["type"] == "DistributedError"
    assert "rank 0 of 2" in r0["message"] and "step 3" in r0["message"] and "timeout" in r0["message"]
    assert time.monotonic() - t0 < 40


def test_stalled_peer_times_out():
    r0, r1 = spawn({"kind": "stall"}, timeout=3.0, wait=40.0)
    assert r1 is not None and "injected failure" in r1["message"]
    assert r0 is not None and r0["type"] == "DistributedError", r0
    assert "step 3" in r0["message"]
    assert r0["elapsed"] < 30  # the 3 s timeout, plus start-up, not a hang


# ---------------------------------------------------------------------------------------------
# in this process (the pieces have their own tests: tests/distributed/)

@pytest.mark.parametrize("approx,damping_type", [("blockdiag", "factored"), ("tridiag", "factored"),
                                                 ("blockdiag", "tikhonov")])
def test_one_process_is_kfac(approx, damping_type):
    """Without a process group DistributedKFAC is KFAC, its inverses assembled from pieces."""
    kw = dict(approx=approx, damping_type=damping_type, damping=1.0, T1=2, T2=2, T3=2, seed=1)
    m1, m2 = make_model(), make_model()
    a, b = KFAC(m1, "categorical", **kw), DistributedKFAC(m2, "categorical", **kw)
    assert b.world_size == 1
    for step in range(1, 6):
        x, y = batch(step, 32, "categorical")
        ia, ib = a.step(x, y), b.step(x, y)
        assert ia.alpha == pytest.approx(ib.alpha, rel=1e-9) and ia.damping == ib.damping
    assert rel_err(list(m2.parameters()), list(m1.parameters())) < 1e-10
    V = [torch.randn(l.d_out, l.in_dim, dtype=DT) for l in a.layers]
    inp = a.curvature.inputs
    lib = make_inverse(approx, inp["A"], inp["G"], inp["A_off"], inp["G_off"], gamma=a.gamma, damping_type=damping_type)
    for u, w in zip(b.curvature.inverse.apply(V), lib.apply(V)):
        assert torch.allclose(u, w, rtol=1e-9, atol=1e-12)
    assert b.inverse_time["refreshes"] >= 3 and b.inverse_stats["tasks"] == b.inverse_stats["total_tasks"]


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="factor_sync"):
        DistributedKFAC(make_model(), "categorical", factor_sync="sometimes")
    with pytest.raises(ValueError, match="sampling"):
        DistributedKFAC(make_model(), "categorical", sampling="nowhere")
    with pytest.raises(ValueError, match="bucket_mb"):
        DistributedKFAC(make_model(), "categorical", bucket_mb=0)


def test_inverse_failure_is_raised():
    o = DistributedKFAC(make_model(), "categorical", damping=1.0)
    o.step(*batch(1, 32, "categorical"))
    o.curvature.inputs["A"][0] = torch.full_like(o.curvature.inputs["A"][0], float("nan"))
    with pytest.raises(DecompositionError):
        o.curvature.inverse_from_inputs(1.0, "factored")
    assert not issubclass(DistributedError, DecompositionError)
