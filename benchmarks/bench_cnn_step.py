"""Cost of one K-FAC iteration against one SGD step on the lab's CNN (``mnist-cnn``, issue 15).

The CNN: conv 1→8 5×5 stride 2 + ReLU, conv 8→16 3×3 stride 2 + ReLU, Linear 400→10 on 28×28
digits; its convolutions are K-FAC layers (KFC: the patch matrix of the τ₁ = 1/8 statistics
subset only, one GEMM per factor). Paired as ``bench_kfac_step`` pairs: every block of K-FAC
steps is divided by the block of SGD steps run just before it (medians over rounds of adjacent
pairs; the check row — K-FAC's own forward+backward against the SGD step — should read ≈ 1).
Both weight-sharing approximations (``expand``, ``reduce``); T3 = T2 = 20 amortised (each round
is 20 consecutive steps: one refresh with the γ grid). Goals: iteration ≤ 2.5×, statistics ≤ 0.4×.

    python benchmarks/bench_cnn_step.py --batch 1000 --rounds 5
    python benchmarks/bench_cnn_step.py --threads 1 --rounds 3 --steps 10 --out benchmarks/results/cnn_step   # the tracked table
"""
from __future__ import annotations

import argparse
import copy

import torch

from kfac_lab.curvature import get_loss
from kfac_lab.models import mnist_cnn
from kfac_lab.optim import KFAC

try:
    from .common import machine, median, timed, write_results
except ImportError:  # run as a script
    from common import machine, median, timed, write_results

VARIANTS = {"expand": {"weight_sharing": "expand"}, "reduce": {"weight_sharing": "reduce"}}


def sgd_runner(model, x, y, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    loss = get_loss("categorical")

    def step():
        opt.zero_grad(set_to_none=True)
        loss.nll(model(x), y).backward()
        opt.step()

    return step


def run(batch: int, rounds: int, steps: int, device: str, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    base = mnist_cnn(seed=0, dtype=dtype).to(device)
    x = torch.rand(batch, 784, dtype=dtype, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    sgd = sgd_runner(copy.deepcopy(base), x, y)
    kfacs = {name: KFAC(copy.deepcopy(base), "categorical", damping=1.0, **kw) for name, kw in VARIANTS.items()}
    for opt in kfacs.values():  # the first 3 steps always refresh the inverses: warm up past them
        for _ in range(3):
            opt.step(x, y)
    for _ in range(2):
        sgd()
    sgd_for = {name: [] for name in kfacs}
    ratios = {name: [] for name in kfacs}
    phases = {name: {} for name in kfacs}
    for _ in range(rounds):
        for name, opt in kfacs.items():
            s = sum(timed(sgd, device) for _ in range(steps)) / steps
            per = []
            for _ in range(steps):
                info = [None]
                per.append(timed(lambda: info.__setitem__(0, opt.step(x, y)), device))
                for ph, t in info[0].timings.items():
                    phases[name].setdefault(ph, []).append(t / s)
            sgd_for[name].append(s)
            ratios[name].append(sum(per) / steps / s)
    return {"batch": batch, "sgd_step_s": median([t for v in sgd_for.values() for t in v]),
            "ratio": {n: median(r) for n, r in ratios.items()}, "round_ratios": ratios,
            "phase_ratios": {n: {ph: median(v) for ph, v in p.items()} for n, p in phases.items()}}


def markdown(results: list[dict], info: dict) -> str:
    lines = ["# K-FAC iteration cost on the MNIST CNN (`mnist-cnn`; ratios to one SGD step)", "",
             f"Machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}"
             + (f", GPU {info['gpu']}" if "gpu" in info else ""), "",
             "Goals (issue 15): iteration ≤ 2.5×, statistics ≤ 0.4×. Phases are medians over steps "
             "(the inverses phase is nonzero on refresh steps only: its median is the typical step's).", ""]
    head = "| measure | " + " | ".join(f"batch {r['batch']}" for r in results) + " |"
    lines += [head, "|---|" + "---|" * len(results)]

    def row(name, get):
        lines.append(f"| {name} | " + " | ".join(get(r) for r in results) + " |")

    row("SGD step (s)", lambda r: f"{r['sgd_step_s']:.4f}")
    for v in VARIANTS:
        row(f"check: K-FAC's `gradient` phase / SGD step ({v}; ≈ 1 when the timing is sound)",
            lambda r, v=v: f"{r['phase_ratios'][v].get('gradient', 0):.2f}")
        row(f"**K-FAC iteration, weight_sharing={v!r}** (T3=20 amortised)", lambda r, v=v: f"**{r['ratio'][v]:.2f}×**")
        row(f"**statistics phase ({v})**", lambda r, v=v: f"**{r['phase_ratios'][v].get('statistics', 0):.3f}×**")
        for ph in results[0]["phase_ratios"][v]:
            if ph not in ("gradient", "statistics"):
                row(f"phase `{ph}` ({v})", lambda r, v=v, ph=ph: f"{r['phase_ratios'][v].get(ph, 0):.3f}×")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1000])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="steps per round (T3=20: one refresh per round)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--out", default="runs/benchmarks/cnn_step",
                   help="results prefix (default runs/benchmarks/cnn_step, ignored by git; "
                        "--out benchmarks/results/cnn_step rewrites the tracked table)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1: the reliable measure on a loaded machine; default torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    info = machine()
    results = [run(b, a.rounds, a.steps, a.device, getattr(torch, a.dtype)) for b in a.batch]
    write_results(a.out, {"machine": info, "args": vars(a), "results": results}, markdown(results, info))


if __name__ == "__main__":
    main()
