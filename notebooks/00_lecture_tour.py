# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # K-FAC in 45 minutes — a lecture tour
#
# A path through [Martens & Grosse 2015, arXiv:1503.05671](https://arxiv.org/abs/1503.05671) with the lab's live figures. Each stop is a few short cells; the
# numbered notebooks go deeper. Pick a preset in the `parameters` cell: `"lecture"` (each
# section runs in seconds), `"quick"` (smaller still) or `"full"` (the paper's scale: minutes
# to hours).
#
# | time | section | paper | notebook |
# |---|---|---|---|
# | 0–5 min | natural gradient, the Fisher, why it is too big | §2–3 | — |
# | 5–15 min | Kronecker factors: F vs F̃, the cumulant bound | §3, §3.1, fig. 1, eqns 3–4 | [02](02_kronecker_factored_fisher.ipynb) |
# | 15–22 min | the structure of F̃⁻¹: block-diagonal vs block-tridiagonal | §4, figs. 2, 5, 6 | [03](03_inverse_structure.ipynb) |
# | 22–32 min | the race on the MNIST autoencoder, live | §13, figs. 4, 9 | [03](03_autoencoders_race.ipynb) |
# | 32–40 min | damping, re-scaling, momentum | §6–7, fig. 7 | [04](04_damping_and_momentum.ipynb) |
# | 40–45 min | invariance; wrap-up | §10 | [05](05_invariance.ipynb) |

# %%
import os, tempfile, time
import numpy as np
import kfac_lab as kl
from kfac_lab import analysis, viz, widgets

# %% tags=["parameters"]
PRESET = "lecture"   # "quick" | "lecture" | "full" (the paper's scale: long)

# %%
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

# %% [markdown]
# ## 0–5 min · The natural gradient and the Fisher
#
# The natural gradient preconditions `∇h` by the inverse Fisher `F = E[Dθ Dθᵀ]` (targets drawn
# from the model). For the MNIST autoencoder θ has 2.8 million entries: F would have 8·10¹²,
# far too many to store, let alone invert. K-FAC approximates `F⁻¹` with small per-layer
# matrices instead.
#
# ## 5–15 min · F ≈ F̃ = [Ā ⊗ G] (figure 1) and the cumulant bound (eqns 3–4)

# %%
model, x = analysis.figure1_setup(n=P["n"], kfac_steps=P["kfac_steps"])
study = analysis.fisher_study(model, "categorical", x, layers=P["layers"], gamma=1e-3)
viz.fisher_heatmaps(study)

# %%
cum = analysis.cumulant_study(model, "categorical", x, layers=P["layers"], mode="exact")
viz.cumulant_totals(cum)

# %% [markdown]
# ## 15–22 min · F̃⁻¹ is nearly block-tridiagonal (figures 2, 5, 6)

# %%
viz.block_average_map(study)

# %%
viz.inverse_quality(study)

# %% [markdown]
# ## 22–32 min · The race (figures 4, 9), then live
#
# Equal training seconds each, interleaved on this machine. K-FAC starts slowly (inverses at
# each of its first three iterations) and pulls ahead after a few dozen iterations.

# %%
from kfac_lab.train import race, open_store, get_problem
store = open_store(None)
contenders = [("kfac", {}, "K-FAC"), ("sgd", {}, "SGD-Nesterov"), ("adam", {}, "Adam")]
run_ids = race(P["problem"], contenders, seconds=P["race_seconds"], store=store)
curves = store.curves(run_ids, ["error", "wall_time"]).assign_coords(run=[c[2] for c in contenders])
viz.training_curves(curves, x="wall_time", y="error")

# %%
lab = widgets.TrainingLabWidget(P["problem"], optimizers=("kfac", "sgd"), store=store, steps=P["live_steps"])
lab

# %%
lab.start(); lab.wait()     # or press start; then try λ, block-tridiagonal, momentum off
lab.session.summary()

# %% [markdown]
# ## 32–40 min · Damping: Tikhonov alone is not enough (figure 7)

# %%
tiny, n = get_problem("tiny"), P["damping_n"]
damping = analysis.damping_study(tiny.make_model(seed=0), tiny.loss, tiny.X[:n], tiny.Y[:n])
viz.damping_figure(damping)

# %% [markdown]
# ## 40–45 min · Invariance (Corollaries 2–3) and wrap-up
#
# K-FAC's predictions are the same for a tanh network and its logistic twin, or for affinely
# transformed inputs; gradient descent's are not.

# %%
viz.invariance_figure(analysis.invariance_study(steps=P["inv_steps"]))

# %% [markdown]
# **Take-aways.** (1) F̃ keeps the Fisher's coarse structure at the cost of a few small
# matrices per layer; (2) its inverse is close to block-tridiagonal, so inverting per layer
# (or per chain) is accurate; (3) the approximation only pays off with the exact-F re-scaling
# and momentum, and adaptive damping; (4) then, in the paper's long runs, K-FAC beats a
# well-tuned SGD by orders of magnitude per iteration and clearly per second; (5) it is
# invariant to affine re-parameterisations. The dashboards (`make lab`) show all of this on
# the same store.

# %%
lab.close()
