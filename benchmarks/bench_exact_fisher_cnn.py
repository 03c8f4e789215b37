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

The floor, timed in the same process and repeats (interleaved with the contenders): work any such
computation must do, each phase alone —

- backward: the forward and the batched backward giving the per-case output gradients of all
  ``k`` = 10 output directions (``output_gradients(..., mode="exact")``, the statistics BackPACK
  needs too);
- JᵀJ: the shared × shared products ``F_SS += JᵀJ`` (``symmetric_addmm_``) of the Jacobian shapes
  our code actually multiplies (recorded during its run: ``(k·cases per chunk) × P_S``, for
  N = 200 one of 2,000 × 816);
- write: one write of a fresh ``P × P`` float32 matrix (P = 2,746).

The Linear blocks are left out, so the floor is a lower bound.

    python benchmarks/bench_exact_fisher_cnn.py --n 1000 --repeats 3 [--out benchmarks/results/exact_fisher_cnn]

The committed table: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_exact_fisher_cnn.py --threads 1 --n 200
--repeats 3 --out benchmarks/results/exact_fisher_cnn``.
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

from kfac_lab.curvature import exact_fisher, exact_shared  # noqa: E402
from kfac_lab.curvature.exact import _resolve_layers  # noqa: E402
from kfac_lab.curvature.factors import output_gradients  # noqa: E402
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


def record_jacobian_shapes(fn) -> list[tuple[int, int]]:
    """Run ``fn`` (ours) once, recording the shape of every ``J`` that
    :func:`~kfac_lab.curvature.exact_shared.fisher_from_jacobians` passes to ``symmetric_addmm_``."""
    shapes, inner = [], exact_shared.symmetric_addmm_

    def spy(out, x, beta, alpha, *rest, **kw):
        shapes.append(tuple(x.shape))
        return inner(out, x, beta, alpha, *rest, **kw)

    exact_shared.symmetric_addmm_ = spy
    try:
        fn()
    finally:
        exact_shared.symmetric_addmm_ = inner
    return shapes


def floor_phases(model, x, shapes: list[tuple[int, int]], P: int) -> dict:
    """The floor's phases (module doc), each a function to time."""
    layers = _resolve_layers(model, None, x)
    Js = [torch.randn(*s) for s in shapes]
    F = torch.zeros(shapes[0][1], shapes[0][1]) if shapes else None

    def jtj():
        for J in Js:
            exact_shared.symmetric_addmm_(F, J, 1.0, 1.0 / x.shape[0])
        return F

    return {"backward": lambda: output_gradients(model, layers, "categorical", x, mode="exact"),
            "JtJ": jtj,
            "write": lambda: torch.empty(P, P).fill_(1.0)}


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
    shapes = record_jacobian_shapes(contenders["ours"])
    if not shapes:
        raise SystemExit("ours multiplied no shared-layer Jacobian: the floor's JᵀJ has no shape")
    F_ours = contenders["ours"]()
    floor = floor_phases(model, x, shapes, int(F_ours.shape[0]))
    for fn in floor.values():  # warm, as the contenders are by the agreement check
        fn()
    agree = {name: rel_err(F_ours, fn()[perm][:, perm]) for name, fn in contenders.items() if name != "ours"}
    print("agreement (relative Frobenius):", agree)
    if max(agree.values()) > 1e-4:
        raise SystemExit("the contenders disagree: not timing")
    times = {k: [] for k in contenders}
    ftimes = {k: [] for k in floor}
    for r in range(a.repeats):
        for name, fn in list(contenders.items()) + list(floor.items()):  # interleaved, floor included
            dt, _ = timed(fn)
            (times if name in contenders else ftimes)[name].append(dt)
            print(f"repeat {r + 1}/{a.repeats}  {name:10s} {dt:8.3f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    fmed = {k: statistics.median(v) for k, v in ftimes.items()}
    bp_t = times["backpack"]
    ftotal = [sum(ts) for ts in zip(*ftimes.values())]
    floor_rows = {k: {"median_seconds": fmed[k], "over_backpack": fmed[k] / med["backpack"],
                      "median_paired_over_backpack": statistics.median(t / b for t, b in zip(ftimes[k], bp_t))}
                  for k in floor}
    floor_rows["total"] = {"median_seconds": statistics.median(ftotal),
                           "over_backpack": statistics.median(ftotal) / med["backpack"],
                           "median_paired_over_backpack": statistics.median(t / b for t, b in zip(ftotal, bp_t))}
    ours_bp = {"over_backpack": med["ours"] / med["backpack"],
               "median_paired_over_backpack": statistics.median(o / b for o, b in zip(times["ours"], bp_t))}
    print("floor / BackPACK:", {k: round(v["median_paired_over_backpack"], 3) for k, v in floor_rows.items()},
          " ours / BackPACK:", round(ours_bp["median_paired_over_backpack"], 3), flush=True)
    faster = min((k for k in med if k != "ours"), key=med.get)
    paired = [o / f for o, f in zip(times["ours"], times[faster])]
    result = {"n": a.n, "params": int(perm.numel()), "seconds": times, "median_seconds": med,
              "faster_other": faster, "ratio_to_faster": med["ours"] / med[faster],
              "median_paired_ratio": statistics.median(paired), "ratio_of_fastest": min(times["ours"]) / min(times[faster]),
              "goal_ratio": 0.1, "proposed_goal_ratio": 0.35, "ours_over_backpack": ours_bp,
              "floor": {"jacobian_shapes": [list(sh) for sh in shapes], "seconds": ftimes, "phases": floor_rows},
              "agreement_rel_frobenius": agree, "machine": machine(),
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
              + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()), "",
              "## Floor: work any exact Fisher of this CNN must do (same run, same repeats)", "",
              "| phase | median s | runs (s) | floor / BackPACK (medians) | floor / BackPACK (median paired) |",
              "|---|---|---|---|---|"]
    what = {"backward": "forward + batched backward, 10 directions' per-case output gradients",
            "JtJ": "F_SS += JᵀJ, J " + ", ".join(f"{r:,} × {c:,}" for r, c in shapes),
            "write": f"one write of the {result['params']:,}² float32 matrix"}
    for k, row in floor_rows.items():
        runs = ftimes[k] if k in ftimes else ftotal
        lines.append(f"| {what.get(k, '**total**')} | {row['median_seconds']:.4f} | "
                     f"{', '.join(f'{t:.4f}' for t in runs)} | {row['over_backpack']:.3f} | "
                     f"{row['median_paired_over_backpack']:.3f} |")
    lines.append(f"| ours (for comparison) | {med['ours']:.4f} | {', '.join(f'{t:.4f}' for t in times['ours'])} | "
                 f"{ours_bp['over_backpack']:.3f} | {ours_bp['median_paired_over_backpack']:.3f} |")
    lines += ["", f"Note: the goal ≤ 0.1× is below the measured floor (total floor / BackPACK "
              f"{floor_rows['total']['median_paired_over_backpack']:.3f}, median paired, before the Linear "
              f"blocks); ours / BackPACK {ours_bp['median_paired_over_backpack']:.3f}. Proposed goal: ≤ 0.35× "
              "the faster other (median paired ratio). The floor's phases are timed alone, interleaved with "
              "the contenders; the JᵀJ shapes are those our code multiplied in this run (recorded).", ""]
    write_results(a.out, result, "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
