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
# # 2 · The Kronecker-factored Fisher: F vs F̃, and its error in cumulants
#
# Notebook 01 showed that one layer pair's block of the Fisher is
# `F_{i,j} = E[ā_{i−1}ā_{j−1}ᵀ ⊗ g_i g_jᵀ]`. K-FAC replaces that expectation of a Kronecker product by
# the Kronecker product of two small expectations (**eqn 1**),
#
# $$F_{i,j} \approx \tilde F_{i,j} = \mathbb E[\bar a_{i-1}\bar a_{j-1}^\top] \otimes \mathbb E[g_i g_j^\top]
#   = \bar A_{i-1,j-1} \otimes G_{i,j}.$$
#
# Here both are computed exactly for the paper's example network — 256-20-20-20-20-10, tanh units,
# softmax output, 16×16 down-scaled MNIST, trained for a few K-FAC iterations (**figure 1**). Then the
# error of every entry is split into cumulants (**eqn 3**) and compared with the bound of **eqn 4**,
# summed over all weight pairs (the paper: 2894.4 vs 4134.6 for its four layers).
#
# The default studies the three hidden 20→20 layers L2–L4. The paper's figure shows the "middle 4
# layers", which include the softmax layer L5: set `LAYERS = [1, 2, 3, 4]` to add it (notebook 03 shows
# why its factor `G` is singular, and what that does to `F̃⁻¹`).
#
# Citations: [M&G 2015, arXiv:1503.05671](https://arxiv.org/abs/1503.05671), arXiv section, figure and
# equation numbers (§3 and §3.1 here; the glossary is in notebook 01); how the lab implements it:
# [docs/algorithm.md](../docs/algorithm.md). *Runs top to bottom in about a minute on a laptop CPU; the
# `parameters` cell says what to change for the paper's scale.*

# %%
import numpy as np
import pandas as pd

from kfac_lab import analysis, viz, widgets
from kfac_lab.lab.notebook import light_figures, record

light_figures()   # figures as plotly JSON only: the saved notebook stays small

# %% tags=["parameters"]
N = 1000                 # cases the expectations run over; full scale: 5000 (the bundled MNIST subset)
KFAC_STEPS = 5           # full-batch K-FAC iterations before the study; the paper: 7
LAYERS = [1, 2, 3]       # the hidden layers L2–L4 (0-based); the paper's "middle 4": [1, 2, 3, 4]
CUMULANT_MODE = "exact"  # "exact": every class weighted by its probability; "sampled": one target per case
RESOLUTION = 180         # heatmap cells per side (block-averaged above it): small saved notebooks
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
# own. Dashed lines delineate the layer blocks; hovering names both weights of an entry (`W[r, c]`:
# output unit `r`, input unit `c`; `b[r]`: the weight on the homogeneous coordinate, the bias).
# F̃ reproduces the coarse structure — which blocks, rows and columns are large — but entry by
# entry it is far from exact (the paper calls it "a major approximation"): the difference is of
# the same order as the entries in many places.

# %%
fisher = analysis.fisher_study(model, "categorical", x, layers=LAYERS, inverses=False, seed=SEED)
rel = float(np.linalg.norm(fisher["difference"]) / np.linalg.norm(fisher["exact"]))
print(f"{fisher.sizes['row']} parameters, {fisher.attrs['num_cases']} cases: ‖F − F̃‖ / ‖F‖ = {rel:.3f}")
record(f"‖F − F̃‖ / ‖F‖ = {rel:.3f}", kron_rel_error=rel)
viz.fisher_heatmaps(fisher, max_size=RESOLUTION)

# %% [markdown]
# Per layer pair, the relative error `‖F_ij − F̃_ij‖ / ‖F_ij‖` (layers numbered from 1 as in the paper):

# %%
layer, col_layer = fisher["layer"].values, fisher["col_layer"].values
F, D = fisher["exact"].values, fisher["difference"].values

def block(M, i, j):
    return M[np.ix_(layer == i, col_layer == j)]

names = [f"L{k + 1}" for k in LAYERS]
rel = [[np.linalg.norm(block(D, i, j)) / np.linalg.norm(block(F, i, j)) for j in LAYERS] for i in LAYERS]
record(pd.DataFrame(rel, index=names, columns=names).round(3).to_string(), block_rel_errors=rel)

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
viz.cumulant_maps(cum, max_size=RESOLUTION)

# %% [markdown]
# Summed over all weight pairs, the error is of the same order as the bound — the bound is
# informative, as the paper found for its network (grey bars: the paper's totals over its four
# layers, for the ratio; the digits depend on the layers, the training stage, the data and N).
# With `CUMULANT_MODE = "exact"` eqn 3 holds exactly, so the bound can only be larger than the error
# (the triangle inequality).

# %%
total_error, total_bound = float(cum["total_error"]), float(cum["total_bound"])
record(f"Σ|error| = {total_error:.1f}, Σ bound = {total_bound:.1f}, ratio {total_error / total_bound:.2f} "
       f"(paper: 2894.4 / 4134.6 = {2894.4 / 4134.6:.2f})", total_error=total_error, total_bound=total_bound)
viz.cumulant_totals(cum)

# %% [markdown]
# ## Which entries are exact?
#
# Where one of the two weights is a bias, its `ā` coordinate is the constant 1. For two biases,
# `E[1·1·g₁g₂] = E[1·1]·E[g₁g₂]`: the Kronecker approximation is **exact** on the bias–bias entries
# (exercise 2), whatever the network. Check:

# %%
bias = fisher["is_bias"].values
bias_bias = float(np.abs(D[np.ix_(bias, bias)]).max())
record(f"max |F − F̃| over bias–bias entries: {bias_bias:.1e} (largest |F| entry: {np.abs(F).max():.3g})",
       bias_bias_error=bias_bias, largest_entry=float(np.abs(F).max()))

# %% [markdown]
# ## Exercises
#
# **1.** Prove eqn 3: for `ā₁, ā₂` (activities) and `g₁, g₂` (unit gradients) with `E[g₁] = E[g₂] = 0`,
# `E[ā₁ā₂g₁g₂] − E[ā₁ā₂]E[g₁g₂] = κ(ā₁,ā₂,g₁,g₂) + E[ā₁]κ(ā₂,g₁,g₂) + E[ā₂]κ(ā₁,g₁,g₂)`.
#
# <details><summary>Worked answer</summary>
#
# Expand the fourth moment into cumulants (sum over all partitions of `{ā₁, ā₂, g₁, g₂}` of the product of
# the cumulants of the blocks). Every partition with a singleton `{g₁}` or `{g₂}` vanishes, since
# `κ(g) = E[g] = 0`. What is left: `κ(ā₁,ā₂,g₁,g₂)`; `κ(ā₁)κ(ā₂,g₁,g₂) + κ(ā₂)κ(ā₁,g₁,g₂)`;
# `κ(ā₁,ā₂)κ(g₁,g₂) + κ(ā₁)κ(ā₂)κ(g₁,g₂)`; `κ(ā₁,g₁)κ(ā₂,g₂) + κ(ā₁,g₂)κ(ā₂,g₁)`. The third group is
# `E[ā₁ā₂]E[g₁g₂]` (because `κ(g₁,g₂) = E[g₁g₂]` when the means are zero). The fourth vanishes too:
# `κ(ā, g) = E[ā g] = E_x[ā E_y[g]] = 0`, since `ā` does not depend on the target and `g` has mean zero
# under the model's distribution for every input. Subtracting `E[ā₁ā₂]E[g₁g₂]` leaves eqn 3, and with
# `κ(ā) = E[ā]` the triangle inequality gives eqn 4.
# </details>
#
# **2.** Show that `F̃` is exact on the bias–bias entries. Is it exact on the entries of one bias and one
# weight?
#
# <details><summary>Worked answer</summary>
#
# Bias–bias: `ā₁ = ā₂ = 1`, so `E[ā₁ā₂g₁g₂] = E[g₁g₂] = E[ā₁ā₂]E[g₁g₂]` (checked above). Bias–weight: the
# error is `E[ā₂g₁g₂] − E[ā₂]E[g₁g₂] = Cov(ā₂, g₁g₂)`, zero only if the activity is uncorrelated with the
# product of the gradients — in eqn 3 only the `κ(ā₂, g₁, g₂)` term survives (`κ₄` with a constant is 0).
# </details>
#
# **3.** Run the notebook with `KFAC_STEPS = 0` (the untrained network) and then `KFAC_STEPS = 20`. Predict
# first: does `‖F − F̃‖ / ‖F‖` grow or shrink as the network trains?
#
# <details><summary>Worked answer</summary>
#
# There is no theorem here — this is an experiment (N = 1000, seed 0: 0.003 untrained, 0.63 after 5
# iterations, 0.71 after 20). Untrained, the network's predictions hardly depend on its input, so the
# unit gradients `g` are nearly independent of the activities `ā` — exactly the assumption of eqn 2 —
# and `F̃` is almost exact. As the network learns, its predictions, and so `g = p − e_y`, become tied
# to the input that produced `ā`; `g` becomes small and heavy-tailed (mostly near zero, occasionally
# large); the higher cumulants grow relative to the entries, and so does the error.
# </details>

# %% [markdown]
# ## Explore
#
# The same views behind selectors (the dashboard's Fisher explorer shows them too, on a network you
# pick: `make lab`; notebook 03's explorer adds sliders for N, the training stage, γ and the layers).
# Previous: [01 · the natural gradient](01_natural_gradient.ipynb) ·
# next: [03 · the structure of F̃⁻¹](03_inverse_structure.ipynb).

# %%
widgets.FisherExplorerWidget({"Fisher (figure 1)": fisher, "cumulants (eqns 3–4)": cum}, light=True,
                             max_size=RESOLUTION)
