"""One short GPU check: correctness on the device against CPU float64, and the costs that matter.

    python benchmarks/gpu_check.py                         # CUDA (≤ 5 minutes on one H200)
    python benchmarks/gpu_check.py --device cpu --quick    # tiny sizes, to test the script

Correctness (device, float32 — and float64 where cheap — against a CPU float64 reference):
- the exact Fisher (``kfac_lab.curvature.exact.exact_fisher``) of a small network and of the
  figure-1 network;
- the block-diagonal and block-tridiagonal inverses: ``apply`` on the device against a dense
  CPU float64 inverse (for the tridiagonal one also: the inverse of ``F̂⁻¹`` agrees with the
  damped ``F̃`` on the tridiagonal blocks, the defining property);
- one K-FAC step (block-diagonal and tridiagonal) from the same parameters on the same batch
  with the same sampled targets (drawn on the host): the update ``δ``.
Timing (the MNIST autoencoder, synthetic data of the right shape, batch 1,000 and 10,000):
- an SGD (Nesterov) step vs a K-FAC iteration (block-diagonal, momentum, adaptive λ and γ; T3 = 20
  amortised: rounds of 20 consecutive steps, one inverse refresh and one γ grid in each), and the
  host synchronisations per K-FAC step (``KFAC.host_syncs``; on CUDA also every synchronising
  operation counted with ``torch.cuda.set_sync_debug_mode``);
- inverting all 16 factors: Cholesky vs eigh, float32 vs float64;
- the exact-Fisher study of the figure-1 network (``exact_fisher`` on N cases; and
  ``kfac_lab.analysis.fisher_study`` on the middle 4 layers when it is available).
Writes ``<out>.md`` (one table) and ``<out>.json``; exits 1 if a correctness check fails.
Timings: ``torch.cuda.synchronize()`` around each timed region, ``time.perf_counter``; medians.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kfac_lab.curvature import find_layers, get_loss, make_inverse, output_gradients  # noqa: E402
from kfac_lab.curvature import decompositions as dec  # noqa: E402
from kfac_lab.curvature.factors import batch_factors, kron  # noqa: E402
from kfac_lab.curvature.losses import DelegatingLoss  # noqa: E402
from kfac_lab.models import autoencoder, figure1_network, mlp  # noqa: E402
from kfac_lab.optim import KFAC  # noqa: E402

try:
    from kfac_lab.curvature.exact import exact_fisher  # noqa: E402
except ImportError:  # pragma: no cover
    exact_fisher = None

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# helpers

def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to("cpu", F64), b.detach().to("cpu", F64)
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def rel_list(a, b) -> float:
    return rel(torch.cat([t.reshape(-1).to("cpu", F64) for t in a]), torch.cat([t.reshape(-1).to("cpu", F64) for t in b]))


class HostSampled(DelegatingLoss):
    """The same loss, with targets drawn on the host (CPU generator, float64 probabilities) and
    recorded on ``tape``: the first run records, later runs replay, so a device run and the CPU
    reference use exactly the same sampled targets."""

    def __init__(self, name: str, tape: list, seed: int = 0):
        super().__init__(name)
        self.gen = torch.Generator().manual_seed(seed)
        self.tape, self.calls = tape, 0

    def sample(self, z, generator=None):
        if self.calls == len(self.tape):
            self.tape.append(self.base.sample(z.detach().to("cpu", F64), self.gen))
        y = self.tape[self.calls]
        self.calls += 1
        return y.to(z.device, z.dtype)


class Report:
    def __init__(self, device, quick: bool):
        self.device, self.quick = device, quick
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()

    def check(self, name, setting, error, tol):
        ok = bool(math.isfinite(error) and error <= tol)
        self.rows.append({"kind": "check", "name": name, "setting": setting, "value": error, "tol": tol, "ok": ok})
        print(f"[{time.perf_counter() - self.t0:6.1f}s] check  {name} ({setting}): rel. error {error:.2e} "
              f"(tol {tol:.0e}) {'ok' if ok else 'FAIL'}", flush=True)

    def time(self, name, setting, seconds, extra: dict | None = None):
        row = {"kind": "timing", "name": name, "setting": setting, "value": seconds, **(extra or {})}
        self.rows.append(row)
        more = "  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in (extra or {}).items())
        print(f"[{time.perf_counter() - self.t0:6.1f}s] time   {name} ({setting}): {seconds * 1e3:.2f} ms{more}", flush=True)

    def error(self, section, exc):
        self.rows.append({"kind": "error", "name": section, "setting": "", "value": None,
                          "error": f"{type(exc).__name__}: {exc}", "ok": False})
        print(f"ERROR in {section}: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc()


# ---------------------------------------------------------------------------------------------
# correctness

def check_exact_fisher(rep: Report, sizes, n, what):
    if exact_fisher is None:
        rep.rows.append({"kind": "skip", "name": f"exact Fisher ({what})", "setting": "", "value": None,
                         "note": "kfac_lab.curvature.exact.exact_fisher not available"})
        return
    dev = rep.device
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, sizes[0], generator=gen, dtype=F64)
    ref_model = mlp(sizes, "tanh", dtype=F64, seed=0)
    ref = exact_fisher(ref_model, "categorical", x, mode="exact").dense
    for dt in (torch.float32, F64) if dev.type == "cuda" else (torch.float32,):
        model = copy.deepcopy(ref_model).to(dev, dt)
        got = exact_fisher(model, "categorical", x.to(dev, dt), mode="exact").dense
        rep.check(f"exact Fisher, {what}", f"{dev.type} {str(dt)[6:]} vs cpu float64, N={n}, P={ref.shape[0]}",
                  rel(got, ref), 1e-4 if dt == torch.float32 else 1e-10)


def small_factors(sizes, n, loss, dev, dt):
    """Factors (all adjacent pairs) of a small tanh network on random inputs, sampled targets."""
    model = mlp(sizes, "tanh", dtype=F64, seed=1)
    layers = find_layers(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, sizes[0], generator=gen, dtype=F64)
    a, g, _ = output_gradients(model, layers, loss, x, generator=torch.Generator().manual_seed(2))
    A, G = batch_factors(a, g, [(i, j) for i in range(len(layers)) for j in range(i, min(i + 2, len(layers)))])
    L = len(layers)
    diag = ([A[(i, i)] for i in range(L)], [G[(i, i)] for i in range(L)])
    off = ([A[(i, i + 1)] for i in range(L - 1)], [G[(i, i + 1)] for i in range(L - 1)])
    return layers, diag, off


def check_inverses(rep: Report, sizes, n, gamma=0.3):
    dev = rep.device
    layers, (A, G), (Ao, Go) = small_factors(sizes, n, "categorical", dev, F64)
    gen = torch.Generator().manual_seed(3)
    V = [torch.randn(l.d_out, l.in_dim, generator=gen, dtype=F64) for l in layers]
    v = torch.cat([t.t().reshape(-1) for t in V])  # vec, column-stacked: the paper's ordering
    to = lambda ts, dt: [t.to(dev, dt) for t in ts]

    # block-diagonal: dense F̆ from the damped factors (no library inverse code), solved in float64
    ref_inv = make_inverse("blockdiag", A, G, gamma=gamma)
    blocks = [kron(a + p * gamma * torch.eye(a.shape[0], dtype=F64), g + gamma / p * torch.eye(g.shape[0], dtype=F64))
              for a, g, p in zip(A, G, ref_inv.pi)]
    u_ref = torch.linalg.solve(torch.block_diag(*blocks), v)
    for dt in (torch.float32, F64):
        inv = make_inverse("blockdiag", to(A, dt), to(G, dt), gamma=gamma)
        u = torch.cat([t.t().reshape(-1) for t in inv.apply(to(V, dt))])
        rep.check("block-diagonal inverse: apply vs dense solve", f"{dev.type} {str(dt)[6:]} vs cpu float64",
                  rel(u, u_ref), 1e-4 if dt == torch.float32 else 1e-10)

    # block-tridiagonal: dense F̂⁻¹ (independent construction) on the CPU in float64
    tri = make_inverse("tridiag", A, G, Ao, Go, gamma=gamma)
    dense = tri.dense()
    u_ref = dense @ v
    for dt in (torch.float32, F64):
        inv = make_inverse("tridiag", to(A, dt), to(G, dt), to(Ao, dt), to(Go, dt), gamma=gamma)
        u = torch.cat([t.t().reshape(-1) for t in inv.apply(to(V, dt))])
        rep.check("block-tridiagonal inverse: apply vs dense F̂⁻¹", f"{dev.type} {str(dt)[6:]} vs cpu float64",
                  rel(u, u_ref), 1e-3 if dt == torch.float32 else 1e-9)
    # the defining property: F̂ = (F̂⁻¹)⁻¹ equals the damped F̃ on the tridiagonal blocks
    Fhat = torch.linalg.inv(dense)
    sz = [l.num_params for l in layers]
    off = [sum(sz[:i]) for i in range(len(sz))]
    errs = []
    for i in range(len(layers)):
        ad, gd = tri.damped(i)
        s = slice(off[i], off[i] + sz[i])
        errs.append(rel(Fhat[s, s], kron(ad, gd)))
        if i + 1 < len(layers):
            s2 = slice(off[i + 1], off[i + 1] + sz[i + 1])
            errs.append(rel(Fhat[s, s2], kron(Ao[i], Go[i])))
    rep.check("block-tridiagonal: (F̂⁻¹)⁻¹ = damped F̃ on tridiagonal blocks", "cpu float64", max(errs), 1e-8)


def check_kfac_step(rep: Report, model_fn, x, loss_name):
    dev = rep.device
    for approx in ("blockdiag", "tridiag"):
        ref_model = model_fn().to("cpu", F64)
        start = [p.detach().clone() for p in ref_model.parameters()]
        tape: list = []
        ref = KFAC(ref_model, HostSampled(loss_name, tape), approx=approx)
        ref.step(x.to("cpu", F64), x.to("cpu", F64))
        ref_delta = [p.detach() - s for p, s in zip(ref_model.parameters(), start)]
        for dt in (torch.float32, F64) if dev.type == "cuda" else (torch.float32,):
            model = copy.deepcopy(model_fn()).to(dev, dt)
            opt = KFAC(model, HostSampled(loss_name, tape), approx=approx)
            xd = x.to(dev, dt)
            opt.step(xd, xd)
            delta = [p.detach().to("cpu", F64) - s for p, s in zip(model.parameters(), start)]
            rep.check(f"one K-FAC step ({approx}): update δ", f"{dev.type} {str(dt)[6:]} vs cpu float64, batch {x.shape[0]}",
                      rel_list(delta, ref_delta), 2e-3 if dt == torch.float32 else 1e-8)


# ---------------------------------------------------------------------------------------------
# timing

def count_syncs(fn, device) -> int | None:
    """Synchronising CUDA operations in ``fn`` (``torch.cuda.set_sync_debug_mode('warn')``)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def time_sgd_vs_kfac(rep: Report, model_fn, batch: int, rounds: int, steps: int = 20):
    dev = rep.device
    gen = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, model_fn().layer_sizes[0], generator=gen).to(dev)
    loss = get_loss("bernoulli")
    base = model_fn().to(dev)
    sgd_model = copy.deepcopy(base)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)

    def sgd_step():
        sgd.zero_grad(set_to_none=True)
        loss.nll(sgd_model(x), x).backward()
        sgd.step()

    opt = KFAC(copy.deepcopy(base), "bernoulli", approx="blockdiag")  # momentum, adaptive λ and γ, T3 = 20
    for _ in range(3):  # k ≤ 3 always refresh the inverses: warm up past them
        opt.step(x, x)
    for _ in range(3):
        sgd_step()
    sgd_t, kfac_t, syncs, refresh_t = [], [], [], []
    for _ in range(rounds):
        sgd_t.append(timed(lambda: [sgd_step() for _ in range(steps)], dev) / steps)
        s0 = opt.host_syncs
        kfac_t.append(timed(lambda: [opt.step(x, x) for _ in range(steps)], dev) / steps)
        syncs.append((opt.host_syncs - s0) / steps)
    # synchronising operations measured over one more round (not timed: the debug mode costs)
    measured = count_syncs(lambda: [opt.step(x, x) for _ in range(steps)], dev)
    s, k = statistics.median(sgd_t), statistics.median(kfac_t)
    rep.time("SGD (Nesterov) step", f"batch {batch}", s)
    rep.time("K-FAC iteration, block-diagonal, T3=20 amortised", f"batch {batch}", k,
             {"ratio_to_sgd": k / s, "host_syncs_per_step": statistics.median(syncs),
              "sync_ops_per_step_measured": None if measured is None else measured / steps})


def time_inversions(rep: Report, model_fn, batch: int, repeats: int):
    dev = rep.device
    x = torch.rand(batch, model_fn().layer_sizes[0], generator=torch.Generator().manual_seed(7)).to(dev)
    opt = KFAC(model_fn().to(dev), "bernoulli")
    for _ in range(2):
        opt.step(x, x)
    A, G = opt.factors.diag()
    dims = sorted({t.shape[0] for t in A + G}, reverse=True)
    for dt in (torch.float32, F64):
        mats = [t.to(dt) for t in A + G]
        eye = [torch.eye(t.shape[0], dtype=dt, device=dev) for t in mats]
        for method, fn in (("cholesky inverse", lambda: [dec.cholesky_inverse(m + e) for m, e in zip(mats, eye)]),
                           ("eigh", lambda: [dec.eigh(m + e) for m, e in zip(mats, eye)])):
            fn()  # warm-up (library loading)
            t = statistics.median(timed(fn, dev) for _ in range(repeats))
            rep.time(f"invert all {len(mats)} factors: {method}", f"{str(dt)[6:]}, dims ≤ {dims[0]}", t)


def time_fisher_study(rep: Report, n: int, repeats: int, sizes=None):
    dev = rep.device
    if exact_fisher is None:
        return
    model = (figure1_network(dtype=torch.float32) if sizes is None else mlp(sizes, "tanh", seed=0)).to(dev)
    x = torch.rand(n, model.layer_sizes[0] if hasattr(model, "layer_sizes") else 256,
                   generator=torch.Generator().manual_seed(5)).to(dev)
    exact_fisher(model, "categorical", x[: min(n, 256)])  # warm-up
    t = statistics.median(timed(lambda: exact_fisher(model, "categorical", x), dev) for _ in range(repeats))
    P = sum(l.num_params for l in find_layers(model))
    rep.time("exact Fisher, figure-1 network" if sizes is None else "exact Fisher, small network",
             f"float32, N={n}, P={P}", t)
    try:
        from kfac_lab.analysis import fisher_study
    except Exception as exc:  # noqa: BLE001 — optional, someone else's module
        rep.rows.append({"kind": "skip", "name": "fisher_study", "setting": "", "value": None, "note": repr(exc)})
        return
    layers = [1, 2, 3, 4] if sizes is None else None
    n_study = min(n, 5000)
    t = timed(lambda: fisher_study(model, "categorical", x[:n_study], layers=layers, gamma=1e-3, dtype=F64), dev)
    rep.time("fisher_study (F, F̃, inverses, errors; float64)",
             f"N={n_study}, layers {layers or 'all'}", t)


# ---------------------------------------------------------------------------------------------

def markdown(rep: Report, meta: dict) -> str:
    lines = [f"# GPU check — {meta['device_name']}", "",
             f"torch {meta['torch']}, device `{meta['device']}`{' (quick sizes)' if meta['quick'] else ''}, "
             f"{meta['elapsed_s']:.0f} s in all. Checks: relative error against CPU float64. Timings: medians, "
             "synchronised; K-FAC amortised over rounds of 20 steps (T3 = 20).", "",
             "| kind | what | setting | result | reference / tolerance | status |", "|---|---|---|---|---|---|"]
    for r in rep.rows:
        if r["kind"] == "check":
            lines.append(f"| check | {r['name']} | {r['setting']} | {r['value']:.2e} | ≤ {r['tol']:.0e} | "
                         f"{'ok' if r['ok'] else '**FAIL**'} |")
        elif r["kind"] == "timing":
            extra = []
            if "ratio_to_sgd" in r:
                extra.append(f"{r['ratio_to_sgd']:.2f}× SGD")
            if "host_syncs_per_step" in r:
                extra.append(f"host syncs/step: {r['host_syncs_per_step']:.2f} (counter)"
                             + ("" if r.get("sync_ops_per_step_measured") is None
                                else f", {r['sync_ops_per_step_measured']:.2f} (measured)"))
            lines.append(f"| time | {r['name']} | {r['setting']} | {r['value'] * 1e3:.2f} ms | {'; '.join(extra)} | |")
        elif r["kind"] == "skip":
            lines.append(f"| skip | {r['name']} | | | {r.get('note', '')} | skipped |")
        else:
            lines.append(f"| error | {r['name']} | | | {r.get('error', '')} | **ERROR** |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (to test the script on a CPU)")
    p.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "gpu_check"))
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("CUDA is not available here: use --device cpu --quick")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 checks mean float32
        torch.backends.cudnn.allow_tf32 = False
    rep = Report(dev, args.quick)
    q = args.quick
    if q:
        ae = lambda: mlp([64, 32, 16, 8, 16, 32, 64], "logistic", seed=0, init="sparse")
        batches, rounds, fig_n = [64, 256], 1, 256
        fisher_sizes, fig_sizes = [8, 6, 5, 3], [32, 10, 10, 10, 10]
    else:
        ae = lambda: autoencoder("mnist")
        batches, rounds, fig_n = [1000, 10000], 3, 10000
        fisher_sizes, fig_sizes = [16, 12, 10, 8, 10], None

    sections = [
        ("exact Fisher (small network)", lambda: check_exact_fisher(rep, fisher_sizes, 64 if q else 512, "small network")),
        ("exact Fisher (figure-1 network)", lambda: check_exact_fisher(rep, fig_sizes or [256, 20, 20, 20, 20, 10],
                                                                      64 if q else 1000, "figure-1 network")),
        ("inverses", lambda: check_inverses(rep, [6, 5, 4, 3] if q else [12, 10, 8, 6, 4], 200)),
        ("K-FAC step", lambda: check_kfac_step(rep, ae, torch.rand(32 if q else 1000, 64 if q else 784,
                                                                   generator=torch.Generator().manual_seed(11)),
                                               "bernoulli")),
        *[(f"SGD vs K-FAC at {b}", lambda b=b: time_sgd_vs_kfac(rep, ae, b, rounds)) for b in batches],
        ("factor inversions", lambda: time_inversions(rep, ae, batches[0], 2 if q else 3)),
        ("exact-Fisher study", lambda: time_fisher_study(rep, fig_n, 2 if q else 3, fig_sizes)),
    ]
    for name, fn in sections:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 — report and go on with the other sections
            rep.error(name, exc)
    meta = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "quick": q, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "elapsed_s": time.perf_counter() - rep.t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rep.rows}, indent=2, default=float) + "\n")
    md = markdown(rep, meta)
    out.with_suffix(".md").write_text(md)
    print(md)
    failed = [r for r in rep.rows if r["kind"] in ("check", "error") and not r["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
