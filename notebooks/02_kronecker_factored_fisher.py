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
# # 1 · The Kronecker-factored Fisher: F vs F̃, and its error in cumulants
#
# K-FAC replaces each block of the Fisher, `F_ij = E[ā_{i-1} ā_{j-1}ᵀ ⊗ g_i g_jᵀ]`, by the
# Kronecker product of two small expectations, `F̃_ij = Ā_{i-1,j-1} ⊗ G_ij` (eqn 1). Here both are
# computed exactly for the paper's example network — 256-20-20-20-20-10, tanh units, softmax
# output, 16×16 down-scaled MNIST, trained for a few K-FAC iterations — over its middle four
# layers (**figure 1**). Then the error of every entry is split into cumulants (**eqn 3**) and
# compared with the bound of **eqn 4**, summed over all weight pairs (the paper: 2894.4 vs 4134.6).
#
# Paper: [Martens & Grosse 2015, arXiv:1503.05671](https://arxiv.org/abs/1503.05671), M&G 2015 §3 and §3.1; how the lab implements it: [docs/algorithm.md](../docs/algorithm.md).
# *Runs top to bottom in under a minute on a 2-core laptop at the default size; the `parameters` cell says what to change for the paper's scale.*

# %%
import os, tempfile, time
import numpy as np
import kfac_lab as kl
from kfac_lab import analysis, viz, widgets

# %% tags=["parameters"]
N = 1000                 # cases the expectations run over; full scale: 10000 (the bundled MNIST subset has 5000)
KFAC_STEPS = 5           # full-batch K-FAC iterations before the study; the paper: 7
LAYERS = [1, 2, 3, 4]    # the "middle 4 layers" (0-based K-FAC layers of 256-20-20-20-20-10)
CUMULANT_MODE = "exact"  # "exact": every class weighted by its probability; "sampled": one target per case
SEED = 0

# %% [markdown]
# ## The network
#
# `figure1_setup` builds the network and trains it with full-batch K-FAC; its provenance
# (data, training error) travels into every study's attributes.

# %%
model, x = analysis.figure1_setup(n=N, seed=SEED, kfac_steps=KFAC_STEPS)
{k: v for k, v in model.kfac_provenance.items() if k != "train_loss_curve"}

# %% [markdown]
# ## Figure 1: F, F̃ and F − F̃
#
# F and F̃ share one diverging colour scale, so they compare directly; the difference has its
# own. Dashed lines delineate the layer blocks, and hovering names both weights of an entry.
# F̃ reproduces the coarse structure — which blocks, rows and columns are large — but entry by
# entry it is far from exact (the paper calls it "a major approximation"): the difference is of
# the same order as the entries in many places.

# %%
fisher = analysis.fisher_study(model, "categorical", x, layers=LAYERS, inverses=False, seed=SEED)
rel = float(np.linalg.norm(fisher["difference"]) / np.linalg.norm(fisher["exact"]))
print(f"{fisher.sizes['row']} parameters, {fisher.attrs['num_cases']} cases: ‖F − F̃‖ / ‖F‖ = {rel:.3f}")
viz.fisher_heatmaps(fisher)

# %% [markdown]
# Per layer pair, the relative error `‖F_ij − F̃_ij‖ / ‖F_ij‖` (layers numbered from 1 as in the paper):

# %%
import pandas as pd
layer, col_layer = fisher["layer"].values, fisher["col_layer"].values
F, D = fisher["exact"].values, fisher["difference"].values

def block(M, i, j):
    return M[np.ix_(layer == i, col_layer == j)]

names = [f"L{k + 1}" for k in LAYERS]
rel = [[np.linalg.norm(block(D, i, j)) / np.linalg.norm(block(F, i, j)) for j in LAYERS] for i in LAYERS]
pd.DataFrame(rel, index=names, columns=names).round(3)

# %% [markdown]
# ## Eqns 3–4: the error in cumulants, and its bound
#
# For one pair of weights the error is `E[ā₁ā₂g₁g₂] − E[ā₁ā₂]E[g₁g₂] = κ(ā₁,ā₂,g₁,g₂) +
# E[ā₁]κ(ā₂,g₁,g₂) + E[ā₂]κ(ā₁,g₁,g₂)` — exactly, because `E[g] = 0` under the model's own
# predictive distribution (with `CUMULANT_MODE = "exact"` the residual is rounding). The bound
# `|κ₄| + |E[ā₁]||κ₃| + |E[ā₂]||κ₃|` is small when these variables are close to jointly
# Gaussian (higher cumulants vanish).

# %%
cum = analysis.cumulant_study(model, "categorical", x, layers=LAYERS, mode=CUMULANT_MODE, seed=SEED)
viz.cumulant_maps(cum)

# %% [markdown]
# Summed over all weight pairs, the error is of the same order as the bound — the bound is
# informative, as the paper found for its network (grey bars: the paper's totals, for the
# ratio; the digits depend on the training stage, the data and N).

# %%
total_error, total_bound = float(cum["total_error"]), float(cum["total_bound"])
print(f"Σ|error| = {total_error:.1f}, Σ bound = {total_bound:.1f}, ratio {total_error / total_bound:.2f} "
      f"(paper: 2894.4 / 4134.6 = {2894.4 / 4134.6:.2f})")
if CUMULANT_MODE == "exact":   # eqn 3 holds exactly: the triangle inequality gives the bound
    assert total_error <= total_bound * (1 + 1e-9)
viz.cumulant_totals(cum)

# %% [markdown]
# ## Explore
#
# The same views behind selectors (the dashboard's Fisher explorer shows them too, on a
# network you pick: `make lab`). Next: [02 · the structure of F̃⁻¹](02_inverse_structure.ipynb).

# %%
widgets.FisherExplorerWidget({"fisher (figure 1)": fisher, "cumulants (eqns 3-4)": cum})
