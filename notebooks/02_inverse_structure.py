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
# # 2 · The structure of F̃⁻¹: block-diagonal vs block-tridiagonal
#
# K-FAC never inverts F̃ itself: it approximates the **inverse** as block-diagonal (F̆⁻¹, one
# small Kronecker product per layer) or block-tridiagonal (F̂⁻¹, a chain of layers, as in a
# Gaussian graphical model). That is a good idea only if F̃⁻¹ is itself close to such a
# structure — which is what **figure 2** shows on the figure-1 network: F̃, its inverse, and the
# mean |entry| of each block of the inverse. **Figures 5–6** then compare the exact F̃⁻¹ with the
# two approximations and report their relative errors.
#
# Paper: [Martens & Grosse 2015, arXiv:1503.05671](https://arxiv.org/abs/1503.05671), M&G 2015 §4.1–§4.4; how the lab implements it: [docs/algorithm.md](../docs/algorithm.md).
# *Runs top to bottom in under a minute on a 2-core laptop at the default size; the `parameters` cell says what to change for the paper's scale.*

# %%
import os, tempfile, time
import numpy as np
import kfac_lab as kl
from kfac_lab import analysis, viz, widgets

# %% tags=["parameters"]
N = 1000               # cases; full scale: 10000 (the bundled MNIST subset has 5000)
KFAC_STEPS = 5         # full-batch K-FAC iterations before the study; the paper: 7
LAYERS = [1, 2, 3, 4]  # the middle 4 layers (0-based)
GAMMA = 1e-3           # γ: the softmax layer's G is singular, so F̃⁻¹ needs a little damping
                       # (LAYERS = [1, 2, 3] and GAMMA = 0.0 give the undamped inverse)
STORE = None           # a path such as "../runs/lab.zarr" saves the study where the dashboards look
SEED = 0

# %%
model, x = analysis.figure1_setup(n=N, seed=SEED, kfac_steps=KFAC_STEPS)
study = analysis.fisher_study(model, "categorical", x, layers=LAYERS, gamma=GAMMA, seed=SEED)
print(f"{study.sizes['row']} parameters, {study.attrs['num_cases']} cases, γ = {GAMMA:g}")

# %% [markdown]
# ## Figure 2: F̃ and its inverse
#
# F̃ is dense; its inverse is not — most of its mass sits in the diagonal blocks and in the
# blocks next to them.

# %%
viz.inverse_heatmaps(study)

# %% [markdown]
# The mean |entry| of each block of F̃⁻¹ (figure 2, right): the diagonal dominates, the first
# off-diagonal comes next, and blocks two or more layers apart are much smaller — the reason a
# block-tridiagonal inverse can be accurate.

# %%
viz.block_average_map(study)

# %% [markdown]
# ## Figures 5–6: how good are the approximate inverses?
#
# F̃⁻¹, the block-diagonal F̆⁻¹ and the block-tridiagonal F̂⁻¹ on one colour scale, and the
# relative errors `‖X − F̃⁻¹‖ / ‖F̃⁻¹‖`: the tridiagonal one is the more accurate.

# %%
print(f"block-diagonal: {float(study['blockdiag_rel_error']):.4f}   "
      f"block-tridiagonal: {float(study['tridiag_rel_error']):.4f}")
viz.inverse_quality(study)

# %% [markdown]
# Where the block-diagonal approximation errs, per block (normalised by the whole matrix):

# %%
viz.block_average_map(study, var="blockdiag_block_rel_error")

# %% [markdown]
# ## Explore (from a store)
#
# Studies saved in a store are what the dashboards' Fisher explorer reads as well.
# Previous: [01 · F vs F̃](01_kronecker_factored_fisher.ipynb) ·
# next: [04 · damping and momentum](04_damping_and_momentum.ipynb).

# %%
store = kl.Store(STORE or os.path.join(tempfile.mkdtemp(), "lab.zarr"))
store.save_study("figure1-inverse", study, overwrite=True)
widgets.FisherExplorerWidget(store, view="inverse_quality")
