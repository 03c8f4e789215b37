"""KFACPreconditioner's defaults against plain SGD on README's network (docs/preconditioner.md).

    python benchmarks/bench_preconditioner.py                                   # print the tables
    python benchmarks/bench_preconditioner.py --out benchmarks/results/preconditioner

A 784-50-10 tanh classifier on the 5,000 bundled MNIST digits, cross-entropy, torch SGD at
lr ∈ {1, 0.1, 0.01}, mini-batches of 100 drawn with replacement; each contender starts from the
same initial weights and sees the same batches (per seed). Reported per lr, over the seeds:
the loss on all 5,000 digits after 50 and 200 steps (median, and the worst seed), and the largest
mini-batch loss seen (a blow-up shows here), as a multiple of the initial loss.

The second table is the sweep behind the defaults: gamma γ × kl_clip κ at batch sizes 32,
100 and 500, 100 steps, the worst case over lr ∈ {1, 0.1, 0.01} and the seeds.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time
import warnings

import torch

import kfac_lab as kl

try:
    from .common import machine, write_results
except ImportError:
    from common import machine, write_results

LRS = (1.0, 0.1, 0.01)
CONTENDERS = {
    "SGD": None,
    "K-FAC, defaults (γ = 0.03, κ = 1e-3)": {},
    "K-FAC, defaults + adaptive λ": {"adaptive_damping": True},
    "K-FAC, γ = 0.03, no clipping": {"kl_clip": None},
    "K-FAC, the old defaults (γ = 1e-3, no clipping)": {"gamma": 1e-3, "kl_clip": None},
}


def network(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(784, 50), torch.nn.Tanh(), torch.nn.Linear(50, 10))


def train(X, Y, lr: float, steps: int, settings: dict | None, seed: int, batch: int = 100,
          checkpoints=(50, 200)) -> dict:
    """One run; ``settings`` None is plain SGD, else the preconditioner's keyword arguments."""
    model = network(seed)
    criterion = torch.nn.CrossEntropyLoss()
    sgd = torch.optim.SGD(model.parameters(), lr=lr)
    pre = kl.KFACPreconditioner(model, loss="categorical", lr=sgd, **settings) if settings is not None else None
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        initial = criterion(model(X), Y).item()
    out, worst, t0 = {"initial": initial}, 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        i = torch.randint(0, len(X), (batch,), generator=gen)
        x, y = X[i], Y[i]
        sgd.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        if pre is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pre.step(closure=lambda: criterion(model(x), y))
        sgd.step()
        worst = max(worst, loss.item()) if loss.isfinite() else float("inf")
        if step in checkpoints:
            with torch.no_grad():
                out[step] = criterion(model(X), Y).item()
    out["max_batch_loss"] = worst
    out["seconds_per_step"] = (time.perf_counter() - t0) / steps
    return out


def fmt(v: float) -> str:
    return "∞" if v == float("inf") or v != v else f"{v:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--sweep-seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write PREFIX.json and PREFIX.md (default: print only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    X, Y = kl.data.load_mnist()
    runs = {}
    for name, settings in CONTENDERS.items():
        for lr in LRS:
            runs[(name, lr)] = [train(X, Y, lr, 200, settings, seed) for seed in range(args.seeds)]
            print(f"{name} lr={lr}: done", flush=True)
    lines = ["# KFACPreconditioner on README's network (784-50-10 tanh, MNIST 5,000, batch 100)", "",
             f"`python benchmarks/bench_preconditioner.py` — {args.seeds} seeds; loss on all 5,000 digits "
             "(median, worst seed in brackets); initial loss "
             f"{statistics.median(r['initial'] for r in runs[('SGD', 1.0)]):.3f}", "",
             "| contender | lr | after 50 steps | after 200 steps | largest batch loss / initial | ms per step |",
             "|---|---:|---:|---:|---:|---:|"]
    for (name, lr), rs in runs.items():
        med = lambda k: statistics.median(r[k] for r in rs)
        worst = lambda k: max(r[k] for r in rs)
        ratio = max(r["max_batch_loss"] / r["initial"] for r in rs)
        lines.append(f"| {name} | {lr} | {fmt(med(50))} ({fmt(worst(50))}) | {fmt(med(200))} ({fmt(worst(200))}) | "
                     f"{fmt(ratio)} | {1000 * med('seconds_per_step'):.1f} |")
    sweep = []
    lines += ["", "## The sweep behind the defaults (100 steps; worst over lr ∈ {1, 0.1, 0.01} and "
              f"{args.sweep_seeds} seeds)", "",
              "| γ | κ | batch | largest batch loss / initial | loss after 100 steps (best–worst) |", "|---:|---:|---:|---:|---:|"]
    for gamma, kl_clip, batch in itertools.product((1e-3, 1e-2, 3e-2, 1e-1), (None, 1e-3, 1e-2), (32, 100, 500)):
        rs = [train(X, Y, lr, 100, {"gamma": gamma, "kl_clip": kl_clip}, seed, batch=batch, checkpoints=(100,))
              for lr in LRS for seed in range(args.sweep_seeds)]
        ratio = max(r["max_batch_loss"] / r["initial"] for r in rs)
        finals = [r[100] for r in rs]
        sweep.append({"gamma": gamma, "kl_clip": kl_clip, "batch": batch, "max_ratio": ratio,
                      "final": finals})
        lines.append(f"| {gamma:g} | {kl_clip if kl_clip is not None else 'off'} | {batch} | {fmt(ratio)} | "
                     f"{fmt(min(finals))}–{fmt(max(finals))} |")
        print(lines[-1], flush=True)
    markdown = "\n".join(lines) + "\n"
    payload = {"machine": machine(), "runs": [{"contender": n, "lr": lr, "runs": rs} for (n, lr), rs in runs.items()],
               "sweep": sweep}
    if args.out:
        write_results(args.out, payload, markdown)
    else:
        print(markdown)


if __name__ == "__main__":
    main()
