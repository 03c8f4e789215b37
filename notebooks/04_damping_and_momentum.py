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
# # 4 · Why damping, re-scaling and momentum matter
#
# The K-FAC update `Δ = −F̆⁻¹∇h` is only as good as the quadratic model it minimises, so K-FAC
# damps it in three ways: **factored Tikhonov** damping γ of the approximate Fisher; a
# **re-scaling** `α*` of Δ by the *exact* Fisher's quadratic model; and **momentum**, `δ = αΔ + μδ₀`
# with both α and μ from that model. The first figure (the paper's **figure 7**) measures, for
# every γ, how much of the best possible decrease of the quadratic model each variant reaches:
# Tikhonov alone falls short even at its best γ. The second part trains with and without
# momentum and re-scaling — without momentum K-FAC "wasn't significantly faster" than the
# baseline, the paper says.
#
# Paper: [Martens & Grosse 2015, arXiv:1503.05671](https://arxiv.org/abs/1503.05671), M&G 2015 §6 and §7; how the lab implements it: [docs/algorithm.md](../docs/algorithm.md).
# *Runs top to bottom in under a minute on a 2-core laptop at the default size; the `parameters` cell says what to change for the paper's scale.*

# %%
import os, tempfile, time
import numpy as np
import kfac_lab as kl
from kfac_lab import analysis, viz, widgets

# %% tags=["parameters"]
N = 1000          # cases for the damping study (exact Fisher of the 64-16-4-16-64 autoencoder)
KFAC_STEPS = 5    # K-FAC iterations before the damping study
PROBLEM = "tiny"  # training problem for the comparison; full scale: "mnist" (with STEPS = 1000)
STEPS = 60        # iterations per run in the comparison
LIVE_STEPS = 40   # iterations of the live demo

# %% [markdown]
# ## Figure 7: Tikhonov damping alone is not enough
#
# At the parameters after a few K-FAC iterations, for each γ: the fraction of the optimal
# decrease `−½∇hᵀC⁻¹∇h` of the quadratic model achieved by the Tikhonov-damped update (α = 1),
# by the same update re-scaled by the exact-F model (α*), and with momentum (α, μ). Stars mark
# each variant's best γ.

# %%
from kfac_lab.train import get_problem, race, open_store
tiny = get_problem("tiny")
model = tiny.make_model(seed=0)
damping = analysis.damping_study(model, tiny.loss, tiny.X[:N], tiny.Y[:N], kfac_steps=KFAC_STEPS)
for k in ("tikhonov", "rescaled", "momentum"):
    best = float(damping[f"best_{k}"]) / float(damping["reduction_ideal"])
    gamma = float(damping[f"best_gamma_{k}"])
    print(f"{k:>9}: best fraction of the optimal decrease {best:6.3f} at γ = {gamma:.3g}")
viz.damping_figure(damping)

# %% [markdown]
# ## Training with and without momentum and re-scaling
#
# Four runs on the same problem and data order: K-FAC as in the paper; without momentum (α
# from the model, μ = 0); without re-scaling or momentum (fixed α = 1: the plain damped
# natural-gradient step); and SGD-Nesterov.

# %%
store = open_store(None)
variants = [("kfac", {}, "K-FAC"), ("kfac", {"momentum": False}, "no momentum"),
            ("kfac", {"momentum": False, "lr": 1.0}, "no re-scaling, no momentum (α = 1)"),
            ("sgd", {}, "SGD-Nesterov")]
run_ids = race(PROBLEM, variants, steps=STEPS, store=store)
curves = store.curves(run_ids, ["error", "wall_time", "damping", "gamma", "alpha", "mu", "rho"])
curves = curves.assign_coords(run=[label for _, _, label in variants])
viz.training_curves(curves, x="step", y="error")

# %% [markdown]
# What K-FAC's controls did meanwhile: λ adapted by Levenberg–Marquardt, γ by its grid search,
# α and μ from the quadratic model, ρ the reduction ratio (SGD's μ is its momentum schedule).

# %%
viz.traces(curves)

# %% [markdown]
# ## Live toggles
#
# Turn momentum off and on, change λ or freeze its adaptation while K-FAC trains; each change
# leaves a marker. Below, the same from code: momentum off for the second half.

# %%
lab = widgets.TrainingLabWidget(PROBLEM, optimizers=("kfac",), store=store, steps=LIVE_STEPS)
lab

# %%
lab.start(steps=LIVE_STEPS // 2); lab.wait()
lab.controls["momentum"].value = False       # what unticking "momentum" does
lab.controls["damping_text"].value = -1.0    # a bad value: a message, nothing changes
print(lab.controls["message"].value)
lab.start(steps=LIVE_STEPS - LIVE_STEPS // 2); lab.wait()
print("momentum:", lab.session.optimizer.config.momentum, "| events:", lab.events)

# %% [markdown]
# Previous: [03 · the race](03_autoencoders_race.ipynb) · next: [05 · invariance](05_invariance.ipynb).
