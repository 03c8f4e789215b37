"""``damping="auto"`` across problems: the λ₀ the probe picks, what it costs, and the training
error after a short budget against the paper's λ₀ = 150 (and a problem's own default λ₀ where
it has one, e.g. the figure-1 classifier's 1.0).

For each problem, the K-FAC contenders race interleaved (``kfac_lab.train.race``: the next step
goes to the contender with the least training time, so the machine's load hits them alike) for
``--seconds`` of training each, with the paper's session settings (growing batch, Polyak
averaging ξ = 0.99, error on a fixed subset of 1,000 training cases: min of iterate and
average). The probe's ρ per candidate λ is reported too, so a reader sees why λ₀ fell where it did.

    python benchmarks/initial_damping.py                       # mnist, curves, figure1, mnist-small, tiny; 45 s each
    python benchmarks/initial_damping.py --problems tiny --seconds 2 --out /tmp/id   # seconds
    python benchmarks/initial_damping.py --out benchmarks/results/initial_damping   # the tracked table

Writes ``runs/benchmarks/initial_damping.{md,json}`` by default (ignored by git).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    from .common import machine, write_results
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine, write_results

from kfac_lab.train import get_problem, race

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = ["mnist", "curves", "figure1", "mnist-small", "tiny"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", default=PROBLEMS)
    p.add_argument("--seconds", type=float, default=45.0, help="training seconds of each contender")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "initial_damping"))
    return p.parse_args(argv)


def best_error(store, run_id: str) -> tuple[float, int]:
    ds = store.load_run(run_id)
    err = ds["error_best"].values.astype(float)
    err = err[np.isfinite(err)]
    return (float(err.min()) if err.size else math.inf), int(ds.step.values.max())


def one_problem(name: str, seconds: float, seed: int) -> dict:
    problem = get_problem(name)
    own = problem.default_options("kfac").get("damping")
    entries = [("kfac", {"damping": "auto"}, "auto λ₀"), ("kfac", {"damping": 150.0}, "λ₀ = 150 (paper)")]
    if own is not None and own != 150.0:
        entries.append(("kfac", {"damping": float(own)}, f"λ₀ = {own:g} (the problem's default)"))
    sessions = race(problem, [(n, {**o, "cross_factors": False}, label, {"batch_schedule": True, "eval_every": 2})
                              for n, o, label in entries], seconds=seconds, store=None, seed=seed, polyak=0.99,
                    checkpoint_every=None, return_sessions=True)
    rows = []
    for s, (_, opts, label) in zip(sessions, entries):
        err, steps = best_error(s.store, s.run_id)
        rows.append({"label": label, "damping": opts["damping"], "best_error": err, "steps": steps,
                     "final_damping": float(s.optimizer.damping)})
    rec = sessions[0].optimizer.initial_damping
    probe_s = float(sessions[0].store.load_run(sessions[0].run_id)["time_initial_damping"].values[0])
    return {"problem": name, "description": problem.describe(), "kind": problem.kind, "lambda0": rec["damping"],
            "probe_seconds": probe_s, "candidates": rec["candidates"], "contenders": rows}


def markdown(res: dict) -> str:
    m = res["machine"]
    L = ["# `damping=\"auto\"`: the probed λ₀ across problems\n",
         f"K-FAC block-diagonal, {res['seconds']:g} s of training per contender (interleaved), growing batch, Polyak "
         f"averaging; error = the paper's metric on 1,000 fixed training cases (min of iterate and average). Machine: "
         f"{m.get('cpu', '?')}, {m.get('cores')} cores, {res['threads']} thread(s); load average at start "
         f"{res['load_start']}, at end {res['load_end']}.\n",
         "| problem | λ₀ (auto) | probe s | error, auto λ₀ | error, λ₀ = 150 | other λ₀ | λ at the end (auto / 150) | "
         "ρ at λ = 1e4 … 1e-3 |",
         "|---|---:|---:|---:|---:|---|---|---|"]
    for r in res["problems"]:
        c = {x["label"]: x for x in r["contenders"]}
        auto, paper = c["auto λ₀"], c["λ₀ = 150 (paper)"]
        other = "; ".join(f"{x['label']}: {x['best_error']:.4g}" for x in r["contenders"][2:]) or "—"
        rhos = " ".join(f"{x['rho']:.2f}" for x in r["candidates"])
        L.append(f"| {r['problem']} | {r['lambda0']:g} | {r['probe_seconds']:.2f} | {auto['best_error']:.4g} "
                 f"({auto['steps']} steps) | {paper['best_error']:.4g} ({paper['steps']} steps) | {other} | "
                 f"{auto['final_damping']:.3g} / {paper['final_damping']:.3g} | {rhos} |")
    L.append("\nThe rule (kfac_lab/optim/initial_damping.py): walking down λ = 1e4, 1e3, …, 1e-3, λ₀ is the last λ "
             "before the first with ρ < 3/4 on the first batch.\n")
    L.append("Reproduce: `" + res["command"] + "`\n")
    return "\n".join(L)


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start, t0 = _load(), time.time()
    results = []
    for name in args.problems:
        print(f"{name}: racing auto λ₀ against λ₀ = 150 for {args.seconds:g} s each", flush=True)
        results.append(one_problem(name, args.seconds, args.seed))
    res = {"seconds": args.seconds, "threads": torch.get_num_threads(), "machine": machine(), "load_start": load_start,
           "load_end": _load(), "total_seconds": time.time() - t0, "problems": results,
           "command": "python benchmarks/initial_damping.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_results(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
