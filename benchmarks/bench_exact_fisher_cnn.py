"""Exact Fisher of the figure-1 CNN (``fig1-cnn``): kfac_lab against BackPACK and curvlinops, in one run.

The CNN of :func:`kfac_lab.models.figure1_cnn` (conv 1→6 5×5/2 + tanh, conv 6→12 3×3/2 + tanh,
Linear 192→10; 2,746 parameters) on N 16×16 down-scaled digits, categorical loss, exact mode
(for a softmax the GGN is the Fisher), float32. Contenders run interleaved and repeated; the
report gives medians and the ratios ours / each. Issue 15's goal: ≤ 0.1× the faster one.

- ours: :func:`kfac_lab.curvature.exact_fisher` (per-case Jacobians with the sum over
  locations first, ``F += JᵀJ/N`` on the lower blocks: :mod:`kfac_lab.curvature.exact_shared`);
- BackPACK: ``SqrtGGNExact`` per chunk of cases (``F = Σ VᵀV``; the model without its
  ``nn.Unflatten``, which BackPACK does not extend, on ``(N, 1, 16, 16)`` images);
- curvlinops: ``GGNLinearOperator`` applied to the columns of the identity.

    python benchmarks/bench_exact_fisher_cnn.py --n 1000 --repeats 3 [--out benchmarks/results/exact_fisher_cnn]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kfac_lab.curvature import exact_fisher  # noqa: E402
from kfac_lab.models import figure1_cnn  # noqa: E402

try:
    from .bench_exact_fisher import backpack_fisher, backpack_model, curvlinops_fisher, paper_permutation, rel_err, timed
    from .common import machine, write_results
except ImportError:  # run as a script
    from bench_exact_fisher import backpack_fisher, backpack_model, curvlinops_fisher, paper_permutation, rel_err, timed
    from common import machine, write_results


def load(n: int, seed: int = 0):
    from kfac_lab.train import get_problem

    p = get_problem("fig1-cnn", seed=seed)
    reps = -(-n // p.n)
    return p.X.repeat(reps, 1)[:n].contiguous(), p.Y.repeat(reps)[:n]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="number of cases")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-curvlinops", action="store_true", help="leave curvlinops out (its dense GGN is slow)")
    ap.add_argument("--out", default="runs/benchmarks/exact_fisher_cnn",
                    help="results prefix (default runs/benchmarks/exact_fisher_cnn, ignored by git)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1: the reliable measure on a loaded machine; default torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    model = figure1_cnn(seed=0)
    x, y = load(a.n)
    images = x.reshape(-1, 1, 16, 16)
    body = copy.deepcopy(model[1:])                 # without the Unflatten (BackPACK, curvlinops)
    perm = paper_permutation(model)
    bp = backpack_model(body)

    contenders = {
        "ours": lambda: exact_fisher(model, "categorical", x).dense,
        "backpack": lambda: backpack_fisher(bp, images, y, 1000),
    }
    if not a.no_curvlinops:
        contenders["curvlinops"] = lambda: curvlinops_fisher(body, images, y)
    F_ours = contenders["ours"]()
    agree = {name: rel_err(F_ours, fn()[perm][:, perm]) for name, fn in contenders.items() if name != "ours"}
    print("agreement (relative Frobenius):", agree)
    if max(agree.values()) > 1e-4:
        raise SystemExit("the contenders disagree: not timing")
    times = {k: [] for k in contenders}
    for r in range(a.repeats):
        for name, fn in contenders.items():  # interleaved
            dt, _ = timed(fn)
            times[name].append(dt)
            print(f"repeat {r + 1}/{a.repeats}  {name:10s} {dt:8.3f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    faster = min((k for k in med if k != "ours"), key=med.get)
    paired = [o / f for o, f in zip(times["ours"], times[faster])]
    result = {"n": a.n, "params": int(perm.numel()), "seconds": times, "median_seconds": med,
              "faster_other": faster, "ratio_to_faster": med["ours"] / med[faster],
              "median_paired_ratio": statistics.median(paired), "ratio_of_fastest": min(times["ours"]) / min(times[faster]),
              "goal_ratio": 0.1, "agreement_rel_frobenius": agree, "machine": machine(),
              "load_average_at_end": list(__import__("os").getloadavg())}
    info = result["machine"]
    lines = ["# Exact Fisher of the figure-1 CNN (fig1-cnn): kfac_lab vs BackPACK and curvlinops", "",
             f"2,746 parameters, N = {a.n}, exact mode, float32. Machine: {info['cpu']}, {info['threads']} threads, "
             f"torch {info['torch']}; load average at the end {', '.join(f'{v:.1f}' for v in result['load_average_at_end'])}.",
             f"Medians of {a.repeats} interleaved repeats. Command: `python benchmarks/bench_exact_fisher_cnn.py "
             + " ".join(argv if argv is not None else sys.argv[1:]) + "`", "",
             "| contender | median s | runs (s) | ours / it |", "|---|---|---|---|"]
    for name in contenders:
        lines.append(f"| {name} | {med[name]:.3f} | {', '.join(f'{t:.2f}' for t in times[name])} | "
                     f"{med['ours'] / med[name]:.3f} |")
    lines += ["", f"Ours / the faster other ({faster}): ratio of medians {result['ratio_to_faster']:.3f}, median "
              f"paired ratio {result['median_paired_ratio']:.3f}, fastest / fastest {result['ratio_of_fastest']:.3f} "
              "(goal ≤ 0.1).", "", "Agreement with ours (relative Frobenius): "
              + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()), ""]
    write_results(a.out, result, "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
