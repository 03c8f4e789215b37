"""Cost of one K-FAC iteration against one SGD step on the MNIST autoencoder (issues 2 and 3).

Measures, as ratios to an SGD step on the same model and batch, in one run with the
contenders interleaved — every K-FAC step follows an SGD step, and a round's ratio is that of
their sums (these machines drift within seconds: medians over rounds; the table's check
row, K-FAC's own forward+backward against the SGD step, should read ≈ 1):
- the whole K-FAC iteration (block-diagonal and block-tridiagonal; momentum, adaptive λ and γ;
  T3 = T2 = 20 amortised: each round is 20 consecutive steps, so one refresh with the γ grid),
  and the share of each phase (from ``StepInfo.timings``), each next to its GEMM-flop floor
  (``kfac_lab.analysis.iteration_flops``: the ratio if every matrix product ran as fast as SGD's);
  the defaults (adjacent factors only under tridiag, the γ grid through Cholesky solves) and, in the
  same rounds, the earlier ones (``cross_factors=True, gamma_grid="full"``: issue 17's "before");
- the measured floor: the default iteration's operations, each timed alone after an SGD step and
  summed (``measured_floor``) — the floor LAPACK's real speed and the elementwise work put under
  the GEMM-flop one;
- the factor statistics alone (sampled backward on τ₁ = 1/8 of the batch reusing the
  forward's activations, plus the factor GEMMs and the capture overhead);
- inverting all factors (Cholesky vs eigh, float32 vs float64) and applying the preconditioner.

    python benchmarks/bench_kfac_step.py --batches 1000 5000 --rounds 5
"""
from __future__ import annotations

import argparse
import copy

import torch

from kfac_lab.analysis import iteration_flops
from kfac_lab.curvature import Capture, get_loss
from kfac_lab.curvature import decompositions as dec
from kfac_lab.curvature.grid import CholeskyCandidates
from kfac_lab.curvature.products import dot, gram_from_jvps
from kfac_lab.curvature.inverses import BlockDiagonalInverse
from kfac_lab.models import autoencoder
from kfac_lab.optim import KFAC

try:
    from .common import machine, median, timed, write_results
except ImportError:  # run as a script
    from common import machine, median, timed, write_results


def sgd_runner(model, loss, x, lr=1e-3):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)

    def step():
        opt.zero_grad(set_to_none=True)
        loss.nll(model(x), x).backward()
        opt.step()

    return step


def stats_runner(opt: KFAC, x):
    """Forward with capture + sampled backward on 1/8 + the fused factor updates (as the optimizer
    runs them: one GEMM per factor pair of ``opt.factors``), minus a plain forward."""
    n1 = max(1, round(x.shape[0] * opt.config.stats_fraction))

    def with_stats():
        with torch.no_grad():
            with Capture(opt.layers, inputs=True, grads=False, rows=n1) as cap:
                z = opt.model(x)
            z1 = z[:n1]
            dz = opt.loss.grad_output(z1, opt.loss.sample(z1, opt.generator))
            g = opt.plan.backward(cap.a, dz)
            opt.factors.update_from_cases(cap.a, g)

    def plain():
        with torch.no_grad():
            opt.model(x)

    return with_stats, plain


def run(batch: int, rounds: int, steps: int, device: str, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    base = autoencoder("mnist", dtype=dtype, device=device)
    loss = get_loss("bernoulli")
    x = torch.rand(batch, 784, dtype=dtype, device=device)
    sgd_model = copy.deepcopy(base)
    sgd = sgd_runner(sgd_model, loss, x)
    before = {"cross_factors": True, "gamma_grid": "full"}  # the defaults until issue 17
    variants = {"blockdiag": {"approx": "blockdiag"}, "tridiag": {"approx": "tridiag"},
                "blockdiag_before": {"approx": "blockdiag", **before}, "tridiag_before": {"approx": "tridiag", **before}}
    kfacs = {name: KFAC(copy.deepcopy(base), "bernoulli", damping=150.0, **kw) for name, kw in variants.items()}
    for opt in kfacs.values():  # the first 3 steps always refresh the inverses: warm up past them
        for _ in range(3):
            opt.step(x, x)
    for _ in range(2):
        sgd()
    res = {"batch": batch, "sgd": [], **{name: [] for name in kfacs}, "stats": [], "stats_diag": [], "plain_forward": [],
           "phases": {a: {} for a in kfacs}, "host_syncs_per_step": {}}
    with_stats, plain = stats_runner(kfacs["blockdiag_before"], x)  # diagonal + adjacent pairs
    with_stats_diag, _ = stats_runner(kfacs["blockdiag"], x)
    ratios = {name: [] for name in kfacs}
    sgd_for = {name: [] for name in kfacs}  # the SGD blocks paired with each variant
    for r in range(rounds):
        for name, opt in kfacs.items():
            # each K-FAC step is paired with an SGD step run just before it, and a round's ratio is
            # that of their sums: a shared machine's speed drifts within seconds, and interleaving
            # the steps cancels what a ratio of two separate blocks would keep
            syncs0 = opt.host_syncs
            per, per_sgd = [], []
            for _ in range(steps):
                per_sgd.append(timed(sgd, device))
                info = [None]
                per.append(timed(lambda: info.__setitem__(0, opt.step(x, x)), device))
                for ph, t in info[0].timings.items():
                    res["phases"][name].setdefault(ph, []).append(t)
            res["sgd"].append(sum(per_sgd) / steps)
            res[name].append(sum(per) / steps)
            ratios[name].append(res[name][-1] / res["sgd"][-1])
            sgd_for[name].append(res["sgd"][-1])
            res["host_syncs_per_step"][name] = (opt.host_syncs - syncs0) / steps
        res["plain_forward"].append(median([timed(plain, device) for _ in range(5)]))
        res["stats"].append(median([timed(with_stats, device) for _ in range(5)]))
        res["stats_diag"].append(median([timed(with_stats_diag, device) for _ in range(5)]))
    sgd_t = median(res["sgd"])
    out = {"batch": batch, "sgd_step_s": sgd_t,
           **{f"kfac_{name}_ratio": median(ratios[name]) for name in kfacs},
           "round_ratios": ratios,
           "stats_ratio": (median(res["stats"]) - median(res["plain_forward"])) / sgd_t,
           "stats_diag_only_ratio": (median(res["stats_diag"]) - median(res["plain_forward"])) / sgd_t,
           "phase_ratios": {a: {ph: sum(v) / len(v) / median(sgd_for[a]) for ph, v in phases.items()}
                            for a, phases in res["phases"].items()},
           "host_syncs_per_step": res["host_syncs_per_step"],
           # GEMM flops alone (kfac_lab.analysis.cost): the ratio if every product ran at SGD's speed
           "flop_floor": flop_floor(base, batch)}
    # inversions of all factors and one preconditioner application
    opt = kfacs["blockdiag"]
    A, G = opt.factors.diag()
    inv_times = {}
    for dt in (torch.float32, torch.float64):
        mats = [t.to(dt) for t in A + G]
        eye = [torch.eye(t.shape[0], dtype=dt, device=t.device) for t in mats]
        inv_times[f"cholesky_{str(dt)[6:]}"] = median([timed(lambda: [dec.cholesky_inverse(m + e) for m, e in zip(mats, eye)], device) for _ in range(3)]) / sgd_t
        inv_times[f"eigh_{str(dt)[6:]}"] = median([timed(lambda: [dec.eigh(m + e) for m, e in zip(mats, eye)], device) for _ in range(3)]) / sgd_t
    out["inversion_ratios"] = inv_times
    out["measured_floor"] = measured_floor(opt, x, sgd, device, with_stats_diag, plain)
    inv = BlockDiagonalInverse(A, G, 1.0)
    V = [l.weight_matrix().detach() for l in opt.layers]
    inv_e = BlockDiagonalInverse(A, G, 1.0, damping_type="tikhonov")
    cand = CholeskyCandidates(A, G, [1.0])
    out["apply_ratios"] = {
        "explicit_inverses": median([timed(lambda: inv.apply(V), device) for _ in range(5)]) / sgd_t,
        "cholesky_solves (γ-grid candidate)": median([timed(lambda: cand[0].apply(V), device) for _ in range(5)]) / sgd_t,
        "eigenbasis": median([timed(lambda: inv_e.apply(V), device) for _ in range(5)]) / sgd_t,
    }
    return out


def measured_floor(opt: KFAC, x, sgd, device, with_stats, plain) -> dict:
    """The default block-diagonal iteration's operations, each timed alone on this machine (ratios to
    an SGD step, amortised as in the iteration; each repetition of an operation follows an SGD
    step, as the iteration's steps do), and their sum: what one iteration would cost if nothing but
    these operations ran — no Python between them, no caches shared with other work.

    - ``gradient``: the forward and backward (as SGD's, without its parameter update), ∇h's
      ``[W|b]`` blocks with ηθ (less the copy of autograd's gradients it is timed on), and ‖θ‖²;
    - ``statistics``: the factor statistics (``with_stats``: capture, sampled backward on τ₁m rows,
      factor updates) minus a plain forward (``plain``);
    - ``inverses``: the LAPACK calls of a refresh, once per T3: the γ grid's three Cholesky sets
      and the winner's ``potri``;
    - ``precondition``: the explicit inverse applied on T3 − 1 steps of T3, the three candidates'
      triangular solves on the refresh step;
    - ``quadratic_model``: the forward-mode products of Δ and δ₀ (four directions on the refresh
      step), the loss's Fisher product and Gram, and the inner products;
    - ``damping``: the update added to the parameters, and a plain forward (the λ test) every T1 steps."""
    cfg = opt.config
    A, G = opt.factors.diag()
    T3, T1 = cfg.T3, cfg.T1
    gam = [opt.gamma * cfg.omega2, opt.gamma, opt.gamma / cfg.omega2]
    cand = CholeskyCandidates(A, G, gam)

    def lapack():
        c = CholeskyCandidates(A, G, gam)
        return [torch.cholesky_inverse(L) for L in c[1].L_A + c[1].L_G]

    n2 = max(1, round(x.shape[0] * cfg.fisher_fraction))
    z, acts, _, grads = opt._forward_backward(x, x, n2)  # the iteration's own forward and backward
    z2 = z.detach()[:n2].reshape(n2, -1)
    theta = [p.detach() for p in opt.params]
    fresh = lambda: [g.clone() for g in grads]  # noqa: E731 (_as_blocks writes into its arguments)
    grad = opt._as_blocks(fresh(), theta, cfg.weight_decay)
    d, prev = [g.clone() for g in grad], [g.clone() for g in grad]
    a2 = [a[:n2] for a in acts]
    derivs = opt.plan.derivatives(acts)
    Jd = opt.plan.jvp(a2, [d, prev], derivs)
    inv = opt.curvature.inverse
    zero = [torch.zeros_like(g) for g in grad]

    def alone(f, n=7):
        pairs = [(timed(sgd, device), timed(f, device)) for _ in range(n)]
        return sum(t for _, t in pairs) / sum(t for t, _ in pairs)

    jvp2, jvp4 = alone(lambda: opt.plan.jvp(a2, [d, prev], derivs)), alone(lambda: opt.plan.jvp(a2, [d, d, d, prev], derivs))
    forward = alone(plain)
    phases = {
        "gradient": alone(lambda: torch.autograd.grad(opt.loss.nll(opt.model(x), x), opt.params))
        + alone(lambda: (dot(theta, theta), opt._as_blocks(fresh(), theta, cfg.weight_decay))) - alone(fresh),
        "statistics": alone(with_stats) - forward,
        "inverses": alone(lapack, 3) / T3,
        "precondition": ((T3 - 1) * alone(lambda: inv.apply(grad)) + alone(lambda: [c.apply(grad) for c in cand], 3)) / T3,
        "quadratic_model": ((T3 - 1) * jvp2 + jvp4) / T3 + alone(lambda: gram_from_jvps(opt.loss, z2, Jd))
        + alone(lambda: [dot(d, d), dot(d, prev), dot(prev, prev), dot(grad, d), dot(grad, prev)]),
        "damping": forward / T1 + alone(lambda: opt._apply_update(zero)),
    }
    return {"phases": phases, "floor": sum(phases.values())}


def flop_floor(model, batch: int) -> dict:
    """GEMM-flop floors (``kfac_lab.analysis.iteration_flops``): per phase of the default block-diagonal
    iteration, and the whole iteration now and before issue 17 (adjacent factors, full γ grid)."""
    default = iteration_flops(model, batch)
    before = iteration_flops(model, batch, cross_factors=True, gamma_grid="full")
    return {"blockdiag": default["ratios"], "blockdiag_ratio": default["ratio"],
            "blockdiag_before": before["ratios"], "blockdiag_before_ratio": before["ratio"]}


def markdown(results: list[dict], info: dict) -> str:
    lines = ["# K-FAC iteration cost on the MNIST autoencoder (ratios to one SGD step)", "",
             f"Machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}" + (f", GPU {info['gpu']}" if "gpu" in info else ""), ""]
    head = "| measure | " + " | ".join(f"batch {r['batch']}" for r in results) + " |"
    lines += [head, "|---|" + "---|" * len(results)]

    def row(name, get):
        lines.append(f"| {name} | " + " | ".join(get(r) for r in results) + " |")

    row("SGD step (s)", lambda r: f"{r['sgd_step_s']:.4f}")
    # the same forward + backward inside K-FAC: far from 1 means the machine's speed drifted
    row("check: K-FAC's `gradient` phase / SGD step (≈ 1 when the timing is sound)",
        lambda r: f"{r['phase_ratios']['blockdiag']['gradient']:.3f}")
    row("**K-FAC iteration, block-diagonal** (T3=20 amortised)", lambda r: f"**{r['kfac_blockdiag_ratio']:.2f}×**")
    row("**K-FAC iteration, block-tridiagonal**", lambda r: f"**{r['kfac_tridiag_ratio']:.2f}×**")
    row("the same before issue 17 (`cross_factors=True, gamma_grid=\"full\"`), block-diagonal / tridiagonal",
        lambda r: f"{r['kfac_blockdiag_before_ratio']:.2f}× / {r['kfac_tridiag_before_ratio']:.2f}×")
    row("GEMM-flop floor, block-diagonal (now / before issue 17)",
        lambda r: f"{r['flop_floor']['blockdiag_ratio']:.2f}× / {r['flop_floor']['blockdiag_before_ratio']:.2f}×")
    row("measured / floor, block-diagonal", lambda r: f"{r['kfac_blockdiag_ratio'] / r['flop_floor']['blockdiag_ratio']:.3f}")
    row("**measured floor, block-diagonal**: its operations each timed alone, summed (per phase below)",
        lambda r: f"**{r['measured_floor']['floor']:.2f}×**")
    row("measured / measured floor, block-diagonal", lambda r: f"{r['kfac_blockdiag_ratio'] / r['measured_floor']['floor']:.3f}")
    row("**factor statistics, diagonal pairs** (block-diagonal: the default; 1/8 subset, reusing the forward)",
        lambda r: f"**{r['stats_diag_only_ratio']:.2f}×**")
    row("factor statistics, diagonal + adjacent pairs (tridiagonal, or `cross_factors=True`)", lambda r: f"{r['stats_ratio']:.2f}×")
    for ph in results[0]["phase_ratios"]["blockdiag"]:
        row(f"phase `{ph}` (block-diagonal; its GEMM-flop floor; measured / floor)",
            lambda r, ph=ph: _vs_floor(r['phase_ratios']['blockdiag'].get(ph, 0), r['flop_floor']['blockdiag'].get(ph, 0)))
    for ph in results[0]["measured_floor"]["phases"]:
        row(f"phase `{ph}` (block-diagonal; its operations timed alone; measured / that)",
            lambda r, ph=ph: _vs_floor(r['phase_ratios']['blockdiag'].get(ph, 0), r['measured_floor']['phases'][ph]))
    for ph in results[0]["phase_ratios"]["blockdiag_before"]:
        row(f"phase `{ph}` (block-diagonal before issue 17; its floor then)",
            lambda r, ph=ph: _vs_floor(r['phase_ratios']['blockdiag_before'].get(ph, 0),
                                       r['flop_floor']['blockdiag_before'].get(ph, 0)))
    for name in ("tridiag", "tridiag_before"):
        for ph in results[0]["phase_ratios"][name]:
            row(f"phase `{ph}` ({'tridiagonal' if name == 'tridiag' else 'tridiagonal before issue 17'})",
                lambda r, ph=ph, name=name: f"{r['phase_ratios'][name].get(ph, 0):.3f}×")
    for k in results[0]["inversion_ratios"]:
        row(f"invert all factors: {k} (before ÷T3)", lambda r, k=k: f"{r['inversion_ratios'][k]:.2f}×")
    for k in results[0]["apply_ratios"]:
        row(f"apply preconditioner: {k}", lambda r, k=k: f"{r['apply_ratios'][k]:.2f}×")
    row("host syncs per step (block-diag / tridiag)", lambda r: f"{r['host_syncs_per_step']['blockdiag']:.2f} / {r['host_syncs_per_step']['tridiag']:.2f}")
    return "\n".join(lines) + "\n"


def _vs_floor(measured: float, floor: float) -> str:
    return f"{measured:.3f}× ({floor:.3f}×; {measured / floor:.2f})" if floor else f"{measured:.3f}×"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1000, 5000])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="steps per round (T3=20: one refresh per round)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--out", default="runs/benchmarks/kfac_step",
                   help="results prefix (default runs/benchmarks/kfac_step, ignored by git; "
                        "--out benchmarks/results/kfac_step rewrites the tracked table)")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    info = machine()
    results = [run(b, a.rounds, a.steps, a.device, dtype) for b in a.batches]
    write_results(a.out, {"machine": info, "args": vars(a), "results": results}, markdown(results, info))


if __name__ == "__main__":
    main()
