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
# # 5 · Invariance: K-FAC follows the same path, whatever the parameterisation
#
# With negligible damping, no momentum and a fixed learning rate, block-diagonal K-FAC takes
# the same path through the space of *predictions* for a network and for any re-parameterised
# twin whose units are transformed affinely — tanh units replaced by logistic ones
# (`tanh(s) = 2σ(2s) − 1`), or the inputs transformed by `x ↦ Px + q` (**Corollary 2**). Plain
# gradient descent does not: its twin's predictions drift away. K-FAC is gradient descent on a
# network whose activities and back-propagated gradients are centred and whitened
# (**Corollary 3**). The invariance needs the bias to be the last column of each `[W | b]`
# (homogeneous coordinates) — a correct implementation passes this test.
#
# Paper: [Martens & Grosse 2015, arXiv:1503.05671](https://arxiv.org/abs/1503.05671), section 10. *Runs top to bottom in under a minute on a 2-core laptop at the default size; the `parameters` cell says what to change for the paper's scale.*

# %%
import os, tempfile, time
import numpy as np
import kfac_lab as kl
from kfac_lab import analysis, viz, widgets

# %% tags=["parameters"]
STEPS = 20    # iterations; full scale: 200
SEED = 0

# %%
inv = analysis.invariance_study(steps=STEPS, seed=SEED)
viz.invariance_figure(inv)

# %% [markdown]
# The relative distance `‖z_twin − z_base‖ / ‖z_base‖` between the twins' predictions after the
# last iteration: rounding level for K-FAC, growing for gradient descent.

# %%
final = inv["distance"].isel(step=-1).to_pandas()
print(final)
assert float(inv["distance"].sel(optimizer="kfac").max()) < 1e-6

# %% [markdown]
# Both optimizers did train the base network (its loss, before each iteration):

# %%
loss = inv[["loss"]].rename(optimizer="run")
viz.training_curves(loss, x="step", y="loss")

# %% [markdown]
# The block-tridiagonal inverse is invariant too:

# %%
inv_tri = analysis.invariance_study(steps=STEPS, seed=SEED, approx="tridiag")
print(inv_tri["distance"].isel(step=-1).to_pandas())

# %% [markdown]
# Previous: [04 · damping and momentum](04_damping_and_momentum.ipynb) ·
# the whole tour: [00 · lecture tour](00_lecture_tour.ipynb).
