#!/usr/bin/env python
"""Generate ``notebooks/*.ipynb`` from the cell lists below, so the notebooks stay consistent
(same set-up cell, same parameters convention, same paper links, no outputs).

    python scripts/make_notebooks.py           # (re)write notebooks/*.ipynb
    python scripts/make_notebooks.py --check   # exit 1 if a notebook differs from this script

Edit the notebooks HERE, not in Jupyter (or copy your Jupyter edits back here), then run it.

Conventions every notebook follows:
* a markdown cell saying what the figures show and linking the paper's section
  (arXiv:1503.05671 numbering, as in ``shared/paper/ALGORITHM.md``);
* one code cell tagged ``parameters`` holding the size knobs, with the default (≤ 1 minute on
  a 2-core laptop) and the full-scale value in a comment; ``tests/notebooks`` injects smaller
  values in a cell right after it (as papermill does);
* kernel ``python3``; outputs stripped (``scripts/strip_notebooks.py``).
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "notebooks"
ARXIV = "https://arxiv.org/abs/1503.05671"
PAPER = f"[Martens & Grosse 2015, arXiv:1503.05671]({ARXIV})"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def md(text: str) -> dict:
    return {"cell_type": "markdown", "source": textwrap.dedent(text).strip("\n")}


def code(text: str, tags: tuple[str, ...] = ()) -> dict:
    return {"cell_type": "code", "source": textwrap.dedent(text).strip("\n"), "tags": list(tags)}


def params(text: str) -> dict:
    return code(text, tags=("parameters",))


SETUP = code("""
    import os, tempfile, time
    import numpy as np
    import kfac_lab as kl
    from kfac_lab import analysis, viz, widgets
""")

RUNTIME_NOTE = ("*Runs top to bottom in under a minute on a 2-core laptop at the default size; the "
                "`parameters` cell says what to change for the paper's scale.*")

# ----------------------------------------------------------------------------------------------
NB01 = [
    md(f"""
    # 1 · The Kronecker-factored Fisher: F vs F̃, and its error in cumulants

    K-FAC replaces each block of the Fisher, `F_ij = E[ā_{{i-1}} ā_{{j-1}}ᵀ ⊗ g_i g_jᵀ]`, by the
    Kronecker product of two small expectations, `F̃_ij = Ā_{{i-1,j-1}} ⊗ G_ij` (eqn 1). Here both are
    computed exactly for the paper's example network — 256-20-20-20-20-10, tanh units, softmax
    output, 16×16 down-scaled MNIST, trained for a few K-FAC iterations — over its middle four
    layers (**figure 1**). Then the error of every entry is split into cumulants (**eqn 3**) and
    compared with the bound of **eqn 4**, summed over all weight pairs (the paper: 2894.4 vs 4134.6).

    Paper: {PAPER}, section 3 and section 3.1 (sections 2 and 2.1 of the ICML copy in
    `shared/paper/`). {RUNTIME_NOTE}
    """),
    SETUP,
    params("""
    N = 1000                 # cases the expectations run over; full scale: 10000 (the bundled MNIST subset has 5000)
    KFAC_STEPS = 5           # full-batch K-FAC iterations before the study; the paper: 7
    LAYERS = [1, 2, 3, 4]    # the "middle 4 layers" (0-based K-FAC layers of 256-20-20-20-20-10)
    CUMULANT_MODE = "exact"  # "exact": every class weighted by its probability; "sampled": one target per case
    SEED = 0
    """),
    md("""
    ## The network

    `figure1_setup` builds the network and trains it with full-batch K-FAC; its provenance
    (data, training error) travels into every study's attributes.
    """),
    code("""
    model, x = analysis.figure1_setup(n=N, seed=SEED, kfac_steps=KFAC_STEPS)
    {k: v for k, v in model.kfac_provenance.items() if k != "train_loss_curve"}
    """),
    md("""
    ## Figure 1: F, F̃ and F − F̃

    F and F̃ share one diverging colour scale, so they compare directly; the difference has its
    own. Dashed lines delineate the layer blocks, and hovering names both weights of an entry.
    F̃ reproduces the coarse structure — which blocks, rows and columns are large — but entry by
    entry it is far from exact (the paper calls it "a major approximation"): the difference is of
    the same order as the entries in many places.
    """),
    code("""
    fisher = analysis.fisher_study(model, "categorical", x, layers=LAYERS, inverses=False, seed=SEED)
    rel = float(np.linalg.norm(fisher["difference"]) / np.linalg.norm(fisher["exact"]))
    print(f"{fisher.sizes['row']} parameters, {fisher.attrs['num_cases']} cases: ‖F − F̃‖ / ‖F‖ = {rel:.3f}")
    viz.fisher_heatmaps(fisher)
    """),
    md("""
    Per layer pair, the relative error `‖F_ij − F̃_ij‖ / ‖F_ij‖` (layers numbered from 1 as in the paper):
    """),
    code("""
    import pandas as pd
    layer, col_layer = fisher["layer"].values, fisher["col_layer"].values
    F, D = fisher["exact"].values, fisher["difference"].values

    def block(M, i, j):
        return M[np.ix_(layer == i, col_layer == j)]

    names = [f"L{k + 1}" for k in LAYERS]
    rel = [[np.linalg.norm(block(D, i, j)) / np.linalg.norm(block(F, i, j)) for j in LAYERS] for i in LAYERS]
    pd.DataFrame(rel, index=names, columns=names).round(3)
    """),
    md("""
    ## Eqns 3–4: the error in cumulants, and its bound

    For one pair of weights the error is `E[ā₁ā₂g₁g₂] − E[ā₁ā₂]E[g₁g₂] = κ(ā₁,ā₂,g₁,g₂) +
    E[ā₁]κ(ā₂,g₁,g₂) + E[ā₂]κ(ā₁,g₁,g₂)` — exactly, because `E[g] = 0` under the model's own
    predictive distribution (with `CUMULANT_MODE = "exact"` the residual is rounding). The bound
    `|κ₄| + |E[ā₁]||κ₃| + |E[ā₂]||κ₃|` is small when these variables are close to jointly
    Gaussian (higher cumulants vanish).
    """),
    code("""
    cum = analysis.cumulant_study(model, "categorical", x, layers=LAYERS, mode=CUMULANT_MODE, seed=SEED)
    viz.cumulant_maps(cum)
    """),
    md("""
    Summed over all weight pairs, the error is of the same order as the bound — the bound is
    informative, as the paper found for its network (grey bars: the paper's totals, for the
    ratio; the digits depend on the training stage, the data and N).
    """),
    code("""
    total_error, total_bound = float(cum["total_error"]), float(cum["total_bound"])
    print(f"Σ|error| = {total_error:.1f}, Σ bound = {total_bound:.1f}, ratio {total_error / total_bound:.2f} "
          f"(paper: 2894.4 / 4134.6 = {2894.4 / 4134.6:.2f})")
    if CUMULANT_MODE == "exact":   # eqn 3 holds exactly: the triangle inequality gives the bound
        assert total_error <= total_bound * (1 + 1e-9)
    viz.cumulant_totals(cum)
    """),
    md("""
    ## Explore

    The same views behind selectors (the dashboard's Fisher explorer shows them too, on a
    network you pick: `make lab`). Next: [02 · the structure of F̃⁻¹](02_inverse_structure.ipynb).
    """),
    code("""
    widgets.FisherExplorer({"fisher (figure 1)": fisher, "cumulants (eqns 3-4)": cum})
    """),
]

# ----------------------------------------------------------------------------------------------
NB02 = [
    md(f"""
    # 2 · The structure of F̃⁻¹: block-diagonal vs block-tridiagonal

    K-FAC never inverts F̃ itself: it approximates the **inverse** as block-diagonal (F̆⁻¹, one
    small Kronecker product per layer) or block-tridiagonal (F̂⁻¹, a chain of layers, as in a
    Gaussian graphical model). That is a good idea only if F̃⁻¹ is itself close to such a
    structure — which is what **figure 2** shows on the figure-1 network: F̃, its inverse, and the
    mean |entry| of each block of the inverse. **Figures 5–6** then compare the exact F̃⁻¹ with the
    two approximations and report their relative errors.

    Paper: {PAPER}, sections 4.1–4.4 (section 3 of the ICML copy in `shared/paper/`).
    {RUNTIME_NOTE}
    """),
    SETUP,
    params("""
    N = 1000               # cases; full scale: 10000 (the bundled MNIST subset has 5000)
    KFAC_STEPS = 5         # full-batch K-FAC iterations before the study; the paper: 7
    LAYERS = [1, 2, 3, 4]  # the middle 4 layers (0-based)
    DAMPING = 1e-3         # γ: the softmax layer's G is singular, so F̃⁻¹ needs a little damping
                           # (LAYERS = [1, 2, 3] and DAMPING = 0.0 give the undamped inverse)
    STORE = None           # a path such as "../runs/lab.zarr" saves the study where the dashboards look
    SEED = 0
    """),
    code("""
    model, x = analysis.figure1_setup(n=N, seed=SEED, kfac_steps=KFAC_STEPS)
    study = analysis.fisher_study(model, "categorical", x, layers=LAYERS, damping=DAMPING, seed=SEED)
    print(f"{study.sizes['row']} parameters, {study.attrs['num_cases']} cases, γ = {DAMPING:g}")
    """),
    md("""
    ## Figure 2: F̃ and its inverse

    F̃ is dense; its inverse is not — most of its mass sits in the diagonal blocks and in the
    blocks next to them.
    """),
    code("""
    viz.inverse_heatmaps(study)
    """),
    md("""
    The mean |entry| of each block of F̃⁻¹ (figure 2, right): the diagonal dominates, the first
    off-diagonal comes next, and blocks two or more layers apart are much smaller — the reason a
    block-tridiagonal inverse can be accurate.
    """),
    code("""
    viz.block_average_map(study)
    """),
    md("""
    ## Figures 5–6: how good are the approximate inverses?

    F̃⁻¹, the block-diagonal F̆⁻¹ and the block-tridiagonal F̂⁻¹ on one colour scale, and the
    relative errors `‖X − F̃⁻¹‖ / ‖F̃⁻¹‖`: the tridiagonal one is the more accurate.
    """),
    code("""
    print(f"block-diagonal: {float(study['blockdiag_rel_error']):.4f}   "
          f"block-tridiagonal: {float(study['tridiag_rel_error']):.4f}")
    viz.inverse_quality(study)
    """),
    md("""
    Where the block-diagonal approximation errs, per block (normalised by the whole matrix):
    """),
    code("""
    viz.block_average_map(study, var="blockdiag_block_rel_error")
    """),
    md("""
    ## Explore (from a store)

    Studies saved in a store are what the dashboards' Fisher explorer reads as well.
    Previous: [01 · F vs F̃](01_kronecker_factored_fisher.ipynb) ·
    next: [03 · the race](03_autoencoders_race.ipynb).
    """),
    code("""
    store = kl.Store(STORE or os.path.join(tempfile.mkdtemp(), "lab.zarr"))
    store.save_study("figure1-inverse", study, overwrite=True)
    widgets.FisherExplorer(store, view="inverse_quality")
    """),
]

# ----------------------------------------------------------------------------------------------
NB03 = [
    md(f"""
    # 3 · The race: K-FAC vs SGD-Nesterov vs Adam on the MNIST autoencoder

    The paper's main experiment (**figure 4**: error against seconds; **figure 9**: against
    iterations) trains deep autoencoders and reports the **training** reconstruction error: over
    long runs K-FAC makes far more progress *per iteration* than the baseline, and more *per
    second* as well, because its iteration costs only a few SGD steps. Here the three optimizers race on
    the same machine, interleaved so that the load hits them alike, each getting the same number
    of training seconds. The default problem is `"mnist-small"` (784-200-30-200-784), the MNIST
    experiment at lecture speed; `"mnist"` is the paper's 784-1000-500-250-30 network.

    Paper: {PAPER}, section 13 and appendix M (section 7 of the ICML copy in `shared/paper/`).
    {RUNTIME_NOTE}
    """),
    SETUP,
    params("""
    PROBLEM = "mnist-small"   # "mnist" is the paper's autoencoder, "curves" its CURVES problem
    SECONDS = 10.0            # training seconds per optimizer; full scale: 1800 with PROBLEM = "mnist"
    LIVE_STEPS = 30           # steps of the live demo below (press start for more)
    STORE = None              # a path such as "../runs/lab.zarr" keeps the runs for the dashboards
    """),
    code("""
    from kfac_lab.train import race, open_store
    store = open_store(STORE)            # None: an in-memory store
    contenders = [("kfac", {}, "K-FAC"), ("sgd", {}, "SGD-Nesterov"), ("adam", {}, "Adam")]
    run_ids = race(PROBLEM, contenders, seconds=SECONDS, store=store)
    curves = store.curves(run_ids, ["error", "loss", "wall_time"])
    curves = curves.assign_coords(run=[label for _, _, label in contenders])
    curves
    """),
    md("""
    ## Per iteration (figure 9) and per second (figure 4)

    The training reconstruction error (squared error summed over pixels, mean over cases) on a
    fixed subset of the training set, evaluated every few iterations. What to look for: K-FAC's
    first iterations are its most expensive (inverses are recomputed at each of the first three)
    and its first few dozen make no more progress than SGD's, so in a race of a few seconds it can
    still trail; after a few dozen iterations it pulls ahead per iteration, and then per second.
    Where the curves cross depends on this machine and its load — raise `SECONDS` to see more
    of the race (on an idle 2-core laptop, K-FAC led after about 10–15 s on `"mnist-small"`).
    """),
    code("""
    viz.training_curves(curves, x="step", y="error")
    """),
    code("""
    viz.training_curves(curves, x="wall_time", y="error")
    """),
    code("""
    import pandas as pd
    pd.DataFrame({
        "iterations": [int(curves["loss"][i].dropna("step")["step"].max()) for i in range(len(run_ids))],
        "seconds": curves["wall_time"].max("step").values.round(1),
        "final error": [float(curves["error"][i].dropna("step")[-1]) for i in range(len(run_ids))],
    }, index=curves["run"].values)
    """),
    md("""
    ## Live: the training lab in the notebook

    The same sessions and store as the dashboard's training lab. Press **start**; move **λ**
    (slider or typed); switch to the **block-tridiagonal** inverse, turn **momentum** off, fix the
    step size — each change takes effect at the next iteration and leaves a marker on the curves.
    The error against iterations and seconds and the λ, γ, α, μ, ρ traces stream while it trains.
    """),
    code("""
    lab = widgets.TrainingLab(PROBLEM, optimizers=("kfac", "sgd"), store=store, steps=LIVE_STEPS)
    lab
    """),
    md("""
    The buttons and controls call the same methods you can call from code — here a run of
    `LIVE_STEPS` iterations with a switch to the block-tridiagonal inverse half-way:
    """),
    code("""
    lab.start(steps=LIVE_STEPS // 2); lab.wait()
    lab.controls["approx"].value = "tridiag"      # what clicking "block-tridiagonal" does
    lab.start(steps=LIVE_STEPS - LIVE_STEPS // 2); lab.wait()
    print(lab.session.optimizer.config.approx, lab.events)
    """),
    md("""
    `lab.close()` stops the runs and the redraw thread. Next:
    [04 · damping and momentum](04_damping_and_momentum.ipynb).
    """),
]

# ----------------------------------------------------------------------------------------------
NB04 = [
    md(f"""
    # 4 · Why damping, re-scaling and momentum matter

    The K-FAC update `Δ = −F̆⁻¹∇h` is only as good as the quadratic model it minimises, so K-FAC
    damps it in three ways: **factored Tikhonov** damping γ of the approximate Fisher; a
    **re-scaling** `α*` of Δ by the *exact* Fisher's quadratic model; and **momentum**, `δ = αΔ + μδ₀`
    with both α and μ from that model. The first figure (the paper's **figure 7**) measures, for
    every γ, how much of the best possible decrease of the quadratic model each variant reaches:
    Tikhonov alone falls short even at its best γ. The second part trains with and without
    momentum and re-scaling — without momentum K-FAC "wasn't significantly faster" than the
    baseline, the paper says.

    Paper: {PAPER}, sections 6 and 7 (figure 7 is in appendix E.4 of the ICML copy in
    `shared/paper/`). {RUNTIME_NOTE}
    """),
    SETUP,
    params("""
    N = 1000          # cases for the damping study (exact Fisher of the 64-16-4-16-64 autoencoder)
    KFAC_STEPS = 5    # K-FAC iterations before the damping study
    PROBLEM = "tiny"  # training problem for the comparison; full scale: "mnist" (with STEPS = 1000)
    STEPS = 60        # iterations per run in the comparison
    LIVE_STEPS = 40   # iterations of the live demo
    """),
    md("""
    ## Figure 7: Tikhonov damping alone is not enough

    At the parameters after a few K-FAC iterations, for each γ: the fraction of the optimal
    decrease `−½∇hᵀC⁻¹∇h` of the quadratic model achieved by the Tikhonov-damped update (α = 1),
    by the same update re-scaled by the exact-F model (α*), and with momentum (α, μ). Stars mark
    each variant's best γ.
    """),
    code("""
    from kfac_lab.train import get_problem, race, open_store
    tiny = get_problem("tiny")
    model = tiny.make_model(seed=0)
    damping = analysis.damping_study(model, tiny.loss, tiny.X[:N], tiny.Y[:N], kfac_steps=KFAC_STEPS)
    for k in ("tikhonov", "rescaled", "momentum"):
        best = float(damping[f"best_{k}"]) / float(damping["reduction_ideal"])
        gamma = float(damping[f"best_gamma_{k}"])
        print(f"{k:>9}: best fraction of the optimal decrease {best:6.3f} at γ = {gamma:.3g}")
    viz.damping_figure(damping)
    """),
    md("""
    ## Training with and without momentum and re-scaling

    Four runs on the same problem and data order: K-FAC as in the paper; without momentum (α
    from the model, μ = 0); without re-scaling or momentum (fixed α = 1: the plain damped
    natural-gradient step); and SGD-Nesterov.
    """),
    code("""
    store = open_store(None)
    variants = [("kfac", {}, "K-FAC"), ("kfac", {"momentum": False}, "no momentum"),
                ("kfac", {"momentum": False, "lr": 1.0}, "no re-scaling, no momentum (α = 1)"),
                ("sgd", {}, "SGD-Nesterov")]
    run_ids = race(PROBLEM, variants, steps=STEPS, store=store)
    curves = store.curves(run_ids, ["error", "wall_time", "damping", "gamma", "alpha", "mu", "rho"])
    curves = curves.assign_coords(run=[label for _, _, label in variants])
    viz.training_curves(curves, x="step", y="error")
    """),
    md("""
    What K-FAC's controls did meanwhile: λ adapted by Levenberg–Marquardt, γ by its grid search,
    α and μ from the quadratic model, ρ the reduction ratio (SGD's μ is its momentum schedule).
    """),
    code("""
    viz.traces(curves)
    """),
    md("""
    ## Live toggles

    Turn momentum off and on, change λ or freeze its adaptation while K-FAC trains; each change
    leaves a marker. Below, the same from code: momentum off for the second half.
    """),
    code("""
    lab = widgets.TrainingLab(PROBLEM, optimizers=("kfac",), store=store, steps=LIVE_STEPS)
    lab
    """),
    code("""
    lab.start(steps=LIVE_STEPS // 2); lab.wait()
    lab.controls["momentum"].value = False       # what unticking "momentum" does
    lab.controls["damping_text"].value = -1.0    # a bad value: a message, nothing changes
    print(lab.controls["message"].value)
    lab.start(steps=LIVE_STEPS - LIVE_STEPS // 2); lab.wait()
    print("momentum:", lab.session.optimizer.config.momentum, "| events:", lab.events)
    """),
    md("""
    Previous: [03 · the race](03_autoencoders_race.ipynb) · next: [05 · invariance](05_invariance.ipynb).
    """),
]

# ----------------------------------------------------------------------------------------------
NB05 = [
    md(f"""
    # 5 · Invariance: K-FAC follows the same path, whatever the parameterisation

    With negligible damping, no momentum and a fixed learning rate, block-diagonal K-FAC takes
    the same path through the space of *predictions* for a network and for any re-parameterised
    twin whose units are transformed affinely — tanh units replaced by logistic ones
    (`tanh(s) = 2σ(2s) − 1`), or the inputs transformed by `x ↦ Px + q` (**Corollary 2**). Plain
    gradient descent does not: its twin's predictions drift away. K-FAC is gradient descent on a
    network whose activities and back-propagated gradients are centred and whitened
    (**Corollary 3**). The invariance needs the bias to be the last column of each `[W | b]`
    (homogeneous coordinates) — a correct implementation passes this test.

    Paper: {PAPER}, section 10. {RUNTIME_NOTE}
    """),
    SETUP,
    params("""
    STEPS = 20    # iterations; full scale: 200
    SEED = 0
    """),
    code("""
    inv = analysis.invariance_study(steps=STEPS, seed=SEED)
    viz.invariance_figure(inv)
    """),
    md("""
    The relative distance `‖z_twin − z_base‖ / ‖z_base‖` between the twins' predictions after the
    last iteration: rounding level for K-FAC, growing for gradient descent.
    """),
    code("""
    final = inv["distance"].isel(step=-1).to_pandas()
    print(final)
    assert float(inv["distance"].sel(optimizer="kfac").max()) < 1e-6
    """),
    md("""
    Both optimizers did train the base network (its loss, before each iteration):
    """),
    code("""
    loss = inv[["loss"]].rename(optimizer="run")
    viz.training_curves(loss, x="step", y="loss")
    """),
    md("""
    The block-tridiagonal inverse is invariant too:
    """),
    code("""
    inv_tri = analysis.invariance_study(steps=STEPS, seed=SEED, approx="tridiag")
    print(inv_tri["distance"].isel(step=-1).to_pandas())
    """),
    md("""
    Previous: [04 · damping and momentum](04_damping_and_momentum.ipynb) ·
    the whole tour: [00 · lecture tour](00_lecture_tour.ipynb).
    """),
]

# ----------------------------------------------------------------------------------------------
NB00 = [
    md(f"""
    # K-FAC in 45 minutes — a lecture tour

    A path through {PAPER} with the lab's live figures. Each stop is a few short cells; the
    numbered notebooks go deeper. Pick a preset in the `parameters` cell: `"lecture"` (each
    section runs in seconds), `"quick"` (smaller still) or `"full"` (the paper's scale: minutes
    to hours).

    | time | section | paper | notebook |
    |---|---|---|---|
    | 0–5 min | natural gradient, the Fisher, why it is too big | §2–3 | — |
    | 5–15 min | Kronecker factors: F vs F̃, the cumulant bound | §3, §3.1, fig. 1, eqns 3–4 | [01](01_kronecker_factored_fisher.ipynb) |
    | 15–22 min | the structure of F̃⁻¹: block-diagonal vs block-tridiagonal | §4, figs. 2, 5, 6 | [02](02_inverse_structure.ipynb) |
    | 22–32 min | the race on the MNIST autoencoder, live | §13, figs. 4, 9 | [03](03_autoencoders_race.ipynb) |
    | 32–40 min | damping, re-scaling, momentum | §6–7, fig. 7 | [04](04_damping_and_momentum.ipynb) |
    | 40–45 min | invariance; wrap-up | §10 | [05](05_invariance.ipynb) |
    """),
    SETUP,
    params("""
    PRESET = "lecture"   # "quick" | "lecture" | "full" (the paper's scale: long)
    """),
    code("""
    PRESETS = {   # n: cases of the Fisher studies; race_seconds: training seconds per optimizer
        "quick":   dict(n=300, kfac_steps=3, layers=[2, 3], race_seconds=1.0, problem="tiny",
                        live_steps=20, damping_n=300, inv_steps=8),
        "lecture": dict(n=600, kfac_steps=5, layers=[1, 2, 3, 4], race_seconds=8.0, problem="mnist-small",
                        live_steps=30, damping_n=500, inv_steps=12),
        "full":    dict(n=10000, kfac_steps=7, layers=[1, 2, 3, 4], race_seconds=1800.0, problem="mnist",
                        live_steps=500, damping_n=5000, inv_steps=200),
    }
    P = PRESETS[PRESET]
    P
    """),
    md("""
    ## 0–5 min · The natural gradient and the Fisher

    The natural gradient preconditions `∇h` by the inverse Fisher `F = E[Dθ Dθᵀ]` (targets drawn
    from the model). For the MNIST autoencoder θ has 2.8 million entries: F would have 8·10¹²,
    far too many to store, let alone invert. K-FAC approximates `F⁻¹` with small per-layer
    matrices instead.

    ## 5–15 min · F ≈ F̃ = [Ā ⊗ G] (figure 1) and the cumulant bound (eqns 3–4)
    """),
    code("""
    model, x = analysis.figure1_setup(n=P["n"], kfac_steps=P["kfac_steps"])
    study = analysis.fisher_study(model, "categorical", x, layers=P["layers"], damping=1e-3)
    viz.fisher_heatmaps(study)
    """),
    code("""
    cum = analysis.cumulant_study(model, "categorical", x, layers=P["layers"], mode="exact")
    viz.cumulant_totals(cum)
    """),
    md("""
    ## 15–22 min · F̃⁻¹ is nearly block-tridiagonal (figures 2, 5, 6)
    """),
    code("""
    viz.block_average_map(study)
    """),
    code("""
    viz.inverse_quality(study)
    """),
    md("""
    ## 22–32 min · The race (figures 4, 9), then live

    Equal training seconds each, interleaved on this machine. K-FAC starts slowly (inverses at
    each of its first three iterations) and pulls ahead after a few dozen iterations.
    """),
    code("""
    from kfac_lab.train import race, open_store, get_problem
    store = open_store(None)
    contenders = [("kfac", {}, "K-FAC"), ("sgd", {}, "SGD-Nesterov"), ("adam", {}, "Adam")]
    run_ids = race(P["problem"], contenders, seconds=P["race_seconds"], store=store)
    curves = store.curves(run_ids, ["error", "wall_time"]).assign_coords(run=[c[2] for c in contenders])
    viz.training_curves(curves, x="wall_time", y="error")
    """),
    code("""
    lab = widgets.TrainingLab(P["problem"], optimizers=("kfac", "sgd"), store=store, steps=P["live_steps"])
    lab
    """),
    code("""
    lab.start(); lab.wait()     # or press start; then try λ, block-tridiagonal, momentum off
    lab.session.summary()
    """),
    md("""
    ## 32–40 min · Damping: Tikhonov alone is not enough (figure 7)
    """),
    code("""
    tiny, n = get_problem("tiny"), P["damping_n"]
    damping = analysis.damping_study(tiny.make_model(seed=0), tiny.loss, tiny.X[:n], tiny.Y[:n])
    viz.damping_figure(damping)
    """),
    md("""
    ## 40–45 min · Invariance (Corollaries 2–3) and wrap-up

    K-FAC's predictions are the same for a tanh network and its logistic twin, or for affinely
    transformed inputs; gradient descent's are not.
    """),
    code("""
    viz.invariance_figure(analysis.invariance_study(steps=P["inv_steps"]))
    """),
    md("""
    **Take-aways.** (1) F̃ keeps the Fisher's coarse structure at the cost of a few small
    matrices per layer; (2) its inverse is close to block-tridiagonal, so inverting per layer
    (or per chain) is accurate; (3) the approximation only pays off with the exact-F re-scaling
    and momentum, and adaptive damping; (4) then, in the paper's long runs, K-FAC beats a
    well-tuned SGD by orders of magnitude per iteration and clearly per second; (5) it is
    invariant to affine re-parameterisations. The dashboards (`make lab`) show all of this on
    the same store.
    """),
    code("""
    lab.close()
    """),
]

NOTEBOOKS = {
    "00_lecture_tour.ipynb": NB00,
    "01_kronecker_factored_fisher.ipynb": NB01,
    "02_inverse_structure.ipynb": NB02,
    "03_autoencoders_race.ipynb": NB03,
    "04_damping_and_momentum.ipynb": NB04,
    "05_invariance.ipynb": NB05,
}


def build(cells: list[dict]):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    for i, c in enumerate(cells):
        if c["cell_type"] == "markdown":
            cell = nbformat.v4.new_markdown_cell(c["source"])
        else:
            cell = nbformat.v4.new_code_cell(c["source"])
            if c["tags"]:
                cell.metadata["tags"] = list(c["tags"])
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating does not churn the diff
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(cells: list[dict]) -> str:
    import nbformat

    return nbformat.writes(build(cells)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook differs")
    args = parser.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = OUT / name
        text = render(cells)
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if old == text:
            continue
        if args.check:
            stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"notebooks differ from scripts/make_notebooks.py: {stale} — run `python scripts/make_notebooks.py`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
