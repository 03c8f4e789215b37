"""Distributed K-FAC: inverse time per rank at world sizes 1 and 2, and bytes communicated per step.

    .venv/bin/python benchmarks/bench_distributed.py            # MNIST autoencoder, global batch 1000

Runs ``benchmarks/distributed_train.py`` under ``torchrun`` (gloo on the CPU, or NCCL with
``--backend nccl``) for each configuration, every rank with the same number of threads
(``--threads``, default 1, so that a rank's time measures its share of the work), and reads
each rank's per-step log:

- *inverse compute per rank*: seconds a rank spends on its own inverse tasks per recomputation
  (median over the recomputations at steps 2–3; step 1 is a warm-up), and the flop share LPT gave
  it; the broadcast of the results is reported apart. World size 2 should take about half.
- *bytes per step*: payload handed to the collectives, per category, on a regular step and on an
  inverse-recomputation step, and amortised over the paper's T3 = 20. World size 1 sends nothing.

Configurations: block-diagonal and block-tridiagonal, ``factor_sync`` eager and lazy. Results go
to ``runs/benchmarks/distributed.json`` and ``.md`` (``--out benchmarks/results/distributed``: the tracked table). The machine may be noisy: the world-size-1
and -2 runs alternate, ``--repeats`` times, and medians are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "distributed_train.py"
MIB = 2**20


def run(world: int, approx: str, sync: str, args, tmp: Path, tag: str) -> list[dict]:
    out = tmp / f"{tag}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(SCRIPT),
           "--steps", str(args.steps), "--batch", str(args.batch), "--approx", approx, "--factor-sync", sync,
           "--T3", "20", "--threads", str(args.threads), "--json", str(out), "--json-all", "--quiet",
           "--dtype", args.dtype, "--backend", args.backend]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    logs = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]
    print(f"  {tag}: {time.perf_counter() - t0:.1f} s", flush=True)
    return logs


def summarise(logs: list[dict]) -> dict:
    world = len(logs)
    steps = logs[0]["steps"]
    refresh = [s for s in steps if s["refreshed"] and s["step"] > 1]
    regular = [s for s in steps if not s["refreshed"]]
    per_rank = []
    for log in logs:
        rs = [s for s in log["steps"] if s["refreshed"] and s["step"] > 1]
        per_rank.append({
            "inverse_compute_s": statistics.median(s["inverse_share"]["compute_s"] for s in rs),
            "inverse_compute_cpu_s": statistics.median(s["inverse_share"]["compute_cpu_s"] for s in rs),
            "inverse_broadcast_s": statistics.median(s["inverse_share"]["comm_s"] for s in rs),
            "tasks": rs[0]["inverse_share"]["tasks"], "total_tasks": rs[0]["inverse_share"]["total_tasks"],
            "flop_share": rs[0]["inverse_share"]["flops"] / rs[0]["inverse_share"]["total_flops"],
            "step_s": statistics.median(s["time_s"] for s in log["steps"] if s["step"] > 1),
        })

    def bytes_of(ss):
        cats = sorted({k for s in ss for k in s["bytes"]})
        return {k: statistics.median(s["bytes"].get(k, 0) for s in ss) for k in cats}

    reg, ref = bytes_of(regular), bytes_of(refresh)
    sent = lambda b: sum(v for k, v in b.items() if k != "gradients (DDP)")
    return {"world_size": world, "per_rank": per_rank,
            "inverse_compute_s_max": max(p["inverse_compute_s"] for p in per_rank),
            "inverse_compute_cpu_s_max": max(p["inverse_compute_cpu_s"] for p in per_rank),
            "bytes_regular": reg, "bytes_refresh": ref,
            "bytes_per_step_regular": sent(reg), "bytes_per_step_refresh": sent(ref),
            "bytes_per_step_amortised_T3_20": (sent(ref) + 19 * sent(reg)) / 20,
            "losses": [s["loss"] for s in steps]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="steps per run (inverses at steps 1–3, regular after)")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="threads per rank")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", default="gloo")
    p.add_argument("--approx", nargs="+", default=["blockdiag", "tridiag"])
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "distributed"),
                   help="results prefix (default runs/benchmarks/distributed, ignored by git; "
                        "--out benchmarks/results/distributed rewrites the tracked table)")
    args = p.parse_args(argv)
    if args.steps < 4:
        p.error("--steps must be >= 4 (inverse steps 1–3, then regular steps)")

    results = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for approx in args.approx:
            runs: dict = {1: [], 2: []}
            for rep in range(args.repeats):
                for world in (1, 2):
                    runs[world].append(summarise(run(world, approx, "eager", args, tmp, f"{approx}-ws{world}-eager-{rep}")))
            lazy = summarise(run(2, approx, "lazy", args, tmp, f"{approx}-ws2-lazy"))
            for world in (1, 2):
                rs = runs[world]
                best = dict(rs[0])
                best["per_rank"] = [
                    {**pr, "inverse_compute_s": statistics.median(r["per_rank"][i]["inverse_compute_s"] for r in rs),
                     "inverse_compute_cpu_s": statistics.median(r["per_rank"][i]["inverse_compute_cpu_s"] for r in rs),
                     "step_s": statistics.median(r["per_rank"][i]["step_s"] for r in rs)}
                    for i, pr in enumerate(rs[0]["per_rank"])]
                best["inverse_compute_s_max"] = max(pr["inverse_compute_s"] for pr in best["per_rank"])
                best["inverse_compute_cpu_s_max"] = max(pr["inverse_compute_cpu_s"] for pr in best["per_rank"])
                results.append({"approx": approx, "factor_sync": "eager", **best})
            results.append({"approx": approx, "factor_sync": "lazy", **lazy})

    machine = {"torch": torch.__version__, "python": platform.python_version(), "cores": os.cpu_count(),
               "threads_per_rank": args.threads, "backend": args.backend, "load_avg": os.getloadavg()}
    payload = {"benchmark": "distributed K-FAC, MNIST autoencoder", "batch": args.batch, "dtype": args.dtype,
               "steps": args.steps, "repeats": args.repeats, "machine": machine, "results": results}
    lines = [
        "# Distributed K-FAC: inverse work per rank and bytes per step",
        "",
        f"MNIST autoencoder (2.84M parameters), global batch {args.batch}, {args.dtype}, {args.backend}, "
        f"{args.threads} thread(s) per rank, torch {torch.__version__}, {os.cpu_count()} cores "
        f"(load average at the end {os.getloadavg()[0]:.1f}). Medians of {args.repeats} alternating runs.",
        "Inverse compute = wall seconds (and process CPU seconds, robust to other load on the machine) a rank",
        "spends on its own share of one inverse recomputation (LPT on flops);",
        "broadcast = distributing the results. Bytes = payload handed to the collectives per step (ring all-reduce",
        "moves ≈ 2(W−1)/W of it per rank); regular step vs inverse step, amortised over T3 = 20.",
        "",
        "| approx | factor sync | W | inverse wall per rank (s) | max / W=1 | inverse CPU per rank (s) | max / W=1 "
        "| flop share | broadcast (s) | MiB regular step | MiB inverse step | MiB/step amortised |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["approx"]: r["inverse_compute_s_max"] for r in results if r["world_size"] == 1}
    base_cpu = {r["approx"]: r["inverse_compute_cpu_s_max"] for r in results if r["world_size"] == 1}
    for r in results:
        pr = r["per_rank"]
        times = " / ".join(f"{p['inverse_compute_s']:.3f}" for p in pr)
        cpu = " / ".join(f"{p['inverse_compute_cpu_s']:.3f}" for p in pr)
        shares = " / ".join(f"{p['flop_share']:.2f}" for p in pr)
        lines.append(
            f"| {r['approx']} | {r['factor_sync']} | {r['world_size']} | {times} | "
            f"{r['inverse_compute_s_max'] / base[r['approx']]:.2f} | {cpu} | "
            f"{r['inverse_compute_cpu_s_max'] / base_cpu[r['approx']]:.2f} | {shares} | "
            f"{statistics.median(p['inverse_broadcast_s'] for p in pr):.3f} | {r['bytes_per_step_regular'] / MIB:.2f} | "
            f"{r['bytes_per_step_refresh'] / MIB:.2f} | {r['bytes_per_step_amortised_T3_20'] / MIB:.2f} |")
    lines += ["", "Payload by category (KiB), W = 2 (\"gradients\" sent here; a DDP model's go through DDP instead):", "",
              "| approx | factor sync | step | " + " | ".join(["gradients", "factors", "inverses", "scalars", "sizes", "status"]) + " |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["world_size"] != 2:
            continue
        for kind in ("regular", "refresh"):
            b = r[f"bytes_{kind}"]
            cells = [f"{b.get(k, 0) / 1024:.1f}" for k in ("gradients", "factors", "inverses", "scalars", "sizes", "status")]
            lines.append(f"| {r['approx']} | {r['factor_sync']} | {kind} | " + " | ".join(cells) + " |")
    lines += ["", "Loss per step agrees across world sizes (same global batches):", ""]
    for r in results:
        lines.append(f"- {r['approx']} W={r['world_size']} {r['factor_sync']}: "
                     + ", ".join(f"{v:.3f}" for v in r["losses"]))
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
