"""Train the MNIST autoencoder with data-parallel K-FAC (``DistributedKFAC``) under ``torchrun``.

    torchrun --nproc_per_node=2 benchmarks/distributed_train.py --steps 20 --batch 1000

Each step draws a global batch of ``--batch`` digits (the same on every rank, from a shared
seed), and rank ``r`` trains on rows ``r, r+W, …`` of it (``kfac_lab.optim.distributed.shard``):
the run is then the single-process K-FAC run on the same global batches. Backend: NCCL (one GPU
per rank) when CUDA is available, else gloo on the CPU; ``--backend`` overrides. Rank 0 prints
the loss per step (the global mean Bernoulli NLL) and, with ``--json``, writes a per-step log
including the bytes communicated and this rank's inverse time (``--json-all``: one file per rank).
Without ``torchrun`` it runs as one process (world size 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kfac_lab.data import load_mnist  # noqa: E402
from kfac_lab.models import autoencoder  # noqa: E402
from kfac_lab.distributed import DistributedError, DistributedKFAC, init_distributed, shard  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=1000, help="global batch size (all ranks together)")
    p.add_argument("--approx", choices=("blockdiag", "tridiag"), default="blockdiag")
    p.add_argument("--factor-sync", choices=("eager", "lazy"), default="eager")
    p.add_argument("--ddp", action="store_true", help="wrap the model in DistributedDataParallel")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    p.add_argument("--timeout", type=float, default=60.0, help="collective timeout in seconds")
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--T3", type=int, default=20)
    p.add_argument("--T2", type=int, default=None, help="default: the larger of 20 and T3")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / local ranks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write rank 0's per-step log here")
    p.add_argument("--json-all", action="store_true", help="each rank writes <json>.rank<r>.json")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = args.threads or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)
    if launched:
        rank, world, device = init_distributed(None if args.backend == "auto" else args.backend, timeout=args.timeout)
    else:
        rank, world, device = 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)

    X, _ = load_mnist(dtype=dtype)
    X = X.to(device)
    model = autoencoder("mnist", dtype=dtype, seed=args.seed, device=device)
    if args.ddp and world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    T2 = args.T2 or max(20, args.T3)
    opt = DistributedKFAC(model, model.kfac_loss if not args.ddp or world == 1 else model.module.kfac_loss,
                          approx=args.approx, factor_sync=args.factor_sync, bucket_mb=args.bucket_mb,
                          T3=args.T3, T2=T2, seed=args.seed)
    backend = torch.distributed.get_backend() if launched else "none"
    if rank == 0 and not args.quiet:
        print(f"# world size {world}, backend {backend}, device {device}, {threads} threads/rank, global batch "
              f"{args.batch}, {args.approx}, factor sync {args.factor_sync}, DDP {args.ddp and world > 1}", flush=True)
    gen = torch.Generator().manual_seed(args.seed + 1)
    log = []
    t_start = time.perf_counter()
    try:
        for step in range(1, args.steps + 1):
            idx = torch.randperm(X.shape[0], generator=gen)[: args.batch].to(device)
            x = shard(X[idx], rank, world)
            before = dict(opt.comm.stats.bytes)
            inv_before = opt.inverse_time["compute_s"]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            info = opt.step(x, x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            sent = {k: v - before.get(k, 0) for k, v in opt.comm.stats.bytes.items() if v - before.get(k, 0)}
            rec = {"step": step, "loss": info.loss, "damping": info.damping, "gamma": info.gamma, "alpha": info.alpha,
                   "mu": info.mu, "rho": info.rho, "rejected": info.rejected, "refreshed": info.inverses_refreshed,
                   "time_s": dt, "bytes": sent, "inverse_compute_s": opt.inverse_time["compute_s"] - inv_before,
                   "inverse_share": dict(opt.inverse_stats) if info.inverses_refreshed else None,
                   "host_syncs": opt.host_syncs}
            log.append(rec)
            if rank == 0 and not args.quiet:
                print(f"step {step:4d}  loss {info.loss:10.4f}  λ {info.damping:9.4g}  γ {info.gamma:8.4g}  "
                      f"α {info.alpha:8.4g}  μ {info.mu:7.4f}  {dt * 1e3:8.1f} ms  "
                      f"{sum(sent.values()) / 2**20:7.2f} MiB sent{'  (inverses)' if info.inverses_refreshed else ''}",
                      flush=True)
    except DistributedError as exc:
        print(f"rank {rank}: {exc}", file=sys.stderr, flush=True)
        return 1
    total = time.perf_counter() - t_start
    if args.json and (rank == 0 or args.json_all):
        path = Path(args.json if rank == 0 and not args.json_all else f"{args.json}.rank{rank}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"world_size": world, "rank": rank, "backend": backend, "device": str(device),
                                    "threads": threads, "batch": args.batch, "approx": args.approx,
                                    "factor_sync": args.factor_sync, "ddp": bool(args.ddp and world > 1),
                                    "dtype": args.dtype, "T3": args.T3, "total_s": total,
                                    "inverse_time": opt.inverse_time, "steps": log}, indent=1, default=float))
    if launched:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
