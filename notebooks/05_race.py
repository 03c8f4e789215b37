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
# # 3 · The race: K-FAC vs SGD-Nesterov vs Adam on the MNIST autoencoder
#
# The paper's main experiment (**figure 4**: error against seconds; **figure 9**: against
# iterations) trains deep autoencoders and reports the **training** reconstruction error: over
# long runs K-FAC makes far more progress *per iteration* than the baseline, and more *per
# second* as well, because its iteration costs only a few SGD steps. Here the three optimizers race on
# the same machine, interleaved so that the load hits them alike, each getting the same number
# of training seconds. The default problem is `"mnist-small"` (784-200-30-200-784), the MNIST
# experiment at lecture speed; `"mnist"` is the paper's 784-1000-500-250-30 network.
#
# Paper: [Martens & Grosse 2015, arXiv:1503.05671](https://arxiv.org/abs/1503.05671), M&G 2015 §13 and appendix M; how the lab implements it: [docs/algorithm.md](../docs/algorithm.md).
# *Runs top to bottom in under a minute on a 2-core laptop at the default size; the `parameters` cell says what to change for the paper's scale.*

# %%
import os, tempfile, time
import numpy as np
import kfac_lab as kl
from kfac_lab import analysis, viz, widgets

# %% tags=["parameters"]
PROBLEM = "mnist-small"   # "mnist" is the paper's autoencoder, "curves" its CURVES problem
SECONDS = 10.0            # training seconds per optimizer; full scale: 1800 with PROBLEM = "mnist"
LIVE_STEPS = 30           # steps of the live demo below (press start for more)
STORE = None              # a path such as "../runs/lab.zarr" keeps the runs for the dashboards

# %%
from kfac_lab.train import race, open_store
store = open_store(STORE)            # None: an in-memory store
contenders = [("kfac", {}, "K-FAC"), ("sgd", {}, "SGD-Nesterov"), ("adam", {}, "Adam")]
run_ids = race(PROBLEM, contenders, seconds=SECONDS, store=store)
curves = store.curves(run_ids, ["error", "loss", "wall_time"])
curves = curves.assign_coords(run=[label for _, _, label in contenders])
curves

# %% [markdown]
# ## Per iteration (figure 9) and per second (figure 4)
#
# The training reconstruction error (squared error summed over pixels, mean over cases) on a
# fixed subset of the training set, evaluated every few iterations. What to look for: K-FAC's
# first iterations are its most expensive (inverses are recomputed at each of the first three)
# and its first few dozen make no more progress than SGD's, so in a race of a few seconds it can
# still trail; after a few dozen iterations it pulls ahead per iteration, and then per second.
# Where the curves cross depends on this machine and its load — raise `SECONDS` to see more
# of the race (on an idle 2-core laptop, K-FAC led after about 10–15 s on `"mnist-small"`).

# %%
viz.training_curves(curves, x="step", y="error")

# %%
viz.training_curves(curves, x="wall_time", y="error")

# %%
import pandas as pd
pd.DataFrame({
    "iterations": [int(curves["loss"][i].dropna("step")["step"].max()) for i in range(len(run_ids))],
    "seconds": curves["wall_time"].max("step").values.round(1),
    "final error": [float(curves["error"][i].dropna("step")[-1]) for i in range(len(run_ids))],
}, index=curves["run"].values)

# %% [markdown]
# ## Live: the training lab in the notebook
#
# The same sessions and store as the dashboard's training lab. Press **start**; move **λ**
# (slider or typed); switch to the **block-tridiagonal** inverse, turn **momentum** off, fix the
# step size — each change takes effect at the next iteration and leaves a marker on the curves.
# The error against iterations and seconds and the λ, γ, α, μ, ρ traces stream while it trains.

# %%
lab = widgets.TrainingLabWidget(PROBLEM, optimizers=("kfac", "sgd"), store=store, steps=LIVE_STEPS)
lab

# %% [markdown]
# The buttons and controls call the same methods you can call from code — here a run of
# `LIVE_STEPS` iterations with a switch to the block-tridiagonal inverse half-way:

# %%
lab.start(steps=LIVE_STEPS // 2); lab.wait()
lab.controls["approx"].value = "tridiag"      # what clicking "block-tridiagonal" does
lab.start(steps=LIVE_STEPS - LIVE_STEPS // 2); lab.wait()
print(lab.session.optimizer.config.approx, lab.events)

# %% [markdown]
# `lab.close()` stops the runs and the redraw thread. Next:
# [04 · damping and momentum](04_damping_and_momentum.ipynb).
