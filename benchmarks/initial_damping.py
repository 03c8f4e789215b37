"""``damping="auto"`` across problems: the λ₀ and γ₀ the probe picks, what it costs, and the
training error after a short budget against the paper's λ₀ = 150, against the probe's λ₀ with
the paper's start γ = sqrt(λ₀ + η) (what the γ₀ choice adds), and against a problem's own
default λ₀ where it has one (e.g. the figure-1 classifier's 1.0).

For each problem, the K-FAC contenders race interleaved (``kfac_lab.train.race``: the next step
goes to the contender with the least training time, so the machine's load hits them alike) for
``--seconds`` of training each, with the paper's session settings (growing batch, Polyak
averaging ξ = 0.99, error on a fixed subset of 1,000 training cases: min of iterate and
average). The probe's ρ per candidate λ is reported too, so a reader sees why λ₀ fell where it did.

    python benchmarks/initial_damping.py                       # mnist, curves (20,000), figure1, mnist-cnn, mnist-small, tiny; 45 s each
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
PROBLEMS = ["mnist", "curves", "figure1", "mnist-cnn", "mnist-small", "tiny"]
#: sizes other than the problem's default: CURVES as the paper's (and the race's) 20,000 cases
SIZES = {"curves": 20000}
AUTO, PAPER_GAMMA, PAPER = "auto λ₀, γ₀", "probe's λ₀, γ₀ = sqrt(λ₀ + η) (the paper's start)", "λ₀ = 150 (paper)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", default=PROBLEMS)
    p.add_argument("--seconds", type=float, default=45.0, help="training seconds of each contender")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "initial_damping"))
    return p.parse_args(argv)


def curve(store, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(wall_time, value)`` at the evaluations of a run (``key``: ``error_best`` or ``nll``)."""
    ds = store.load_run(run_id)
    v = ds[key].values.astype(float)
    ok = np.isfinite(v)
    return ds.wall_time.values[ok].astype(float), v[ok]


def seconds_to(store, run_id: str, key: str, target: float) -> float | None:
    t, v = curve(store, run_id, key)
    hit = np.flatnonzero(v <= target)
    return float(t[hit[0]]) if hit.size else None


def probed_lambda0(problem, seed: int) -> float:
    """The λ₀ ``damping="auto"`` picks on this problem's first batch (one K-FAC step; the race's
    sessions see the same first batch)."""
    (s,) = race(problem, [("kfac", {"damping": "auto", "cross_factors": False}, "probe", {"batch_schedule": True})],
                steps=1, store=None, seed=seed, checkpoint_every=None, return_sessions=True)
    return float(s.optimizer.initial_damping["damping"])


def one_problem(name: str, seconds: float, seed: int) -> dict:
    problem = get_problem(name, n=SIZES.get(name))
    own = problem.default_options("kfac").get("damping")
    lam0 = probed_lambda0(problem, seed)
    entries = [("kfac", {"damping": "auto"}, AUTO), ("kfac", {"damping": lam0}, PAPER_GAMMA),
               ("kfac", {"damping": 150.0}, PAPER)]
    if own is not None and own != 150.0:
        entries.append(("kfac", {"damping": float(own)}, f"λ₀ = {own:g} (the problem's default)"))
    sessions = race(problem, [(n, {**o, "cross_factors": False}, label, {"batch_schedule": True, "eval_every": 2})
                              for n, o, label in entries], seconds=seconds, store=None, seed=seed, polyak=0.99,
                    checkpoint_every=None, return_sessions=True)
    rows = []
    # the classifiers' training error reaches 0 within the budget: compare them by the NLL
    key = "nll" if problem.kind == "classifier" else "error_best"
    for s, (_, opts, label) in zip(sessions, entries):
        _, err = curve(s.store, s.run_id, "error_best")
        _, nll = curve(s.store, s.run_id, "nll")
        rows.append({"label": label, "damping": opts["damping"], "best_error": float(err.min()) if err.size else math.inf,
                     "best_nll": float(nll.min()) if nll.size else math.inf, "steps": int(s.step),
                     "final_damping": float(s.optimizer.damping), "status": s.status,
                     # steps whose λ the model bound raised (optim/trust.py: the model promised more than h)
                     "model_bounded": int(np.nansum(s.store.load_run(s.run_id)["model_bounded"].values))})
    # how much sooner auto gets where λ₀ = 150 got in the whole budget
    target = rows[2]["best_nll" if key == "nll" else "best_error"]
    t_auto, t_paper = (seconds_to(s.store, s.run_id, key, target) for s in (sessions[0], sessions[2]))
    rec = sessions[0].optimizer.initial_damping
    # the probes' cost: the first step's training seconds against the same first step from λ₀ = 150
    # (both build the inverse of that step; the λ probe's own phase is ``time_initial_damping``, the
    # γ₀ grid runs in the step's inverse / precondition / quadratic-model phases)
    first = [float(s.store.load_run(s.run_id).wall_time.values[0]) for s in (sessions[0], sessions[2])]
    probe_s = first[0] - first[1]
    lam_probe_s = float(sessions[0].store.load_run(sessions[0].run_id)["time_initial_damping"].values[0])
    eta = sessions[0].optimizer.config.weight_decay
    return {"problem": name, "description": problem.describe(), "kind": problem.kind, "lambda0": rec["damping"],
            "gamma0": rec.get("gamma"), "paper_gamma0": (rec["damping"] + eta) ** 0.5,
            "gamma_candidates": rec.get("gamma_candidates", []),
            "probe_seconds": probe_s, "lambda_probe_seconds": lam_probe_s, "first_step_seconds": first, "candidates": rec["candidates"], "contenders": rows, "metric": key,
            "paper_target": target, "auto_seconds_to_paper": t_auto, "paper_seconds": t_paper,
            "speedup_over_paper": (t_paper / t_auto) if (t_auto and t_paper) else None}


def markdown(res: dict) -> str:
    m = res["machine"]
    L = ["# `damping=\"auto\"`: the probed λ₀ and γ₀ across problems\n",
         f"K-FAC block-diagonal, {res['seconds']:g} s of training per contender (interleaved), growing batch, Polyak "
         f"averaging; error = the paper's metric on 1,000 fixed training cases (min of iterate and average). Machine: "
         f"{m.get('cpu', '?')}, {m.get('cores')} cores, {res['threads']} thread(s); load average at start "
         f"{res['load_start']}, at end {res['load_end']}.\n",
         "| problem | λ₀ (auto) | γ₀ (auto; the paper's start) | probe s (λ₀ part) | error (NLL), auto λ₀, γ₀ | error (NLL), probe's "
         "λ₀ with the paper's γ start | error (NLL), λ₀ = 150 | other λ₀ | auto reaches λ₀ = 150's best | λ at the end "
         "(auto / 150) | ρ at the probed λ | steps with λ raised by the model bound (auto / 150) |",
         "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|---|"]
    for r in res["problems"]:
        c = {x["label"]: x for x in r["contenders"]}
        auto, paper, start = c[AUTO], c[PAPER], c[PAPER_GAMMA]
        other = "; ".join(f"{x['label']}: {x['best_error']:.4g} ({x['best_nll']:.4g})" for x in r["contenders"][3:]) or "—"
        sp = r["speedup_over_paper"]
        soon = (f"{r['metric']} {r['paper_target']:.4g} at {r['auto_seconds_to_paper']:.1f} s vs {r['paper_seconds']:.1f} s "
                f"({sp:.2f}×)") if sp else "—"
        rhos = ", ".join(f"{x['damping']:g}: {x['rho']:.2f}" for x in r["candidates"])
        g0 = f"{r['gamma0']:.3g} ({r['paper_gamma0']:.3g})" if r.get("gamma0") else f"— ({r['paper_gamma0']:.3g})"
        L.append(f"| {r['problem']} | {r['lambda0']:g} | {g0} | {r['probe_seconds']:.2f} ({r['lambda_probe_seconds']:.2f}) | {auto['best_error']:.4g} "
                 f"({auto['best_nll']:.4g}), {auto['steps']} steps | {start['best_error']:.4g} ({start['best_nll']:.4g}), "
                 f"{start['steps']} steps | {paper['best_error']:.4g} ({paper['best_nll']:.4g}), "
                 f"{paper['steps']} steps | {other} | {soon} | "
                 f"{auto['final_damping']:.3g} / {paper['final_damping']:.3g} | {rhos} | {auto['model_bounded']} / {paper['model_bounded']} |")
    L.append("\nError: the paper's metric (best of iterate and average); NLL: the evaluation subset's mean loss, "
             "the measure compared for classifiers (their training error reaches 0). Seconds are training seconds, "
             "the probe's included. Probe s: the auto contender's first step less the λ₀ = 150 contender's (both build "
             "that step's inverse); in brackets the λ probe's own phase.\n")
    L.append("The rule (kfac_lab/optim/initial_damping.py): on the first batch, bisection over λ = 1e4, 1e3, …, 1e-3 "
             "for a λ with ρ ≥ 3/4 whose next smaller λ has ρ < 3/4 (at most 4 candidates); then γ₀ by the γ grid's "
             "criterion (the candidate whose update minimises the quadratic model at λ₀) over γ = s, s·10^-1/2, …, s·1e-4, s = sqrt(λ₀ + η). "
             "The middle contender starts from the probe's λ₀ without the probe (its λ₀ is found beforehand by one "
             "step on the same first batch), so it does not pay the probe's seconds.\n")
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
        print(f"{name}: racing auto λ₀, γ₀ against the paper's γ start and λ₀ = 150 for {args.seconds:g} s each", flush=True)
        results.append(one_problem(name, args.seconds, args.seed))
    res = {"seconds": args.seconds, "threads": torch.get_num_threads(), "machine": machine(), "load_start": load_start,
           "load_end": _load(), "total_seconds": time.time() - t0, "problems": results,
           "command": "python benchmarks/initial_damping.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_results(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
