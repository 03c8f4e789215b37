"""Line figures: training curves with events, control traces, damping and invariance studies."""
from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from kfac_lab import viz
from kfac_lab.viz.curves import normalize_events


def runs_dataset() -> xr.Dataset:
    """Two runs over a union of steps, NaN where a run has no row (as Store.curves() returns)."""
    steps = np.arange(1, 11)
    loss = np.vstack([np.exp(-0.3 * steps), np.exp(-0.1 * steps)])
    loss[1, 7:] = np.nan                       # run b stopped after step 7
    wall = np.vstack([0.5 * steps, 0.2 * steps])
    wall[1, 7:] = np.nan
    damping = np.vstack([150 * 0.9 ** steps, np.full(10, 30.0)])
    ds = xr.Dataset(
        {"loss": (("run", "step"), loss), "wall_time": (("run", "step"), wall),
         "damping": (("run", "step"), damping), "gamma": (("run", "step"), np.sqrt(damping)),
         "alpha": (("run", "step"), np.ones((2, 10))), "mu": (("run", "step"), np.full((2, 10), 0.5)),
         "rho": (("run", "step"), np.full((2, 10), 0.8))},
        coords={"run": ("run", np.array(["a", "b"], dtype=object)), "step": steps})
    return ds


def scatter(fig, name):
    return [t for t in fig.data if t.name == name]


def test_training_curves_data_per_run():
    ds = runs_dataset()
    fig = viz.training_curves(ds)
    a, b = scatter(fig, "a")[0], scatter(fig, "b")[0]
    np.testing.assert_allclose(a.y, ds["loss"].values[0])
    np.testing.assert_allclose(b.y, ds["loss"].values[1, :7])      # NaN padding dropped
    np.testing.assert_array_equal(b.x, np.arange(1, 8))
    assert fig.layout.yaxis.type == "log"
    assert viz.training_curves(ds, log_y=False).layout.yaxis.type == "linear"
    fw = viz.training_curves(ds, x="wall_time")
    np.testing.assert_allclose(scatter(fw, "a")[0].x, ds["wall_time"].values[0])
    with pytest.raises(ValueError, match="wall_time"):
        viz.training_curves(ds.drop_vars("wall_time"), x="wall_time")
    two = viz.training_curves(ds, y=["loss", "damping"])
    assert {t.name for t in two.data} == {"a · loss", "a · damping", "b · loss", "b · damping"}


def test_training_curves_events():
    ds = runs_dataset()
    events = [{"step": 4, "kind": "configure", "damping": 30.0, "run": "a"},
              {"step": 6, "kind": "rejected", "reason": "non-finite loss", "run": "b"}]
    fig = viz.training_curves(ds, events=events)
    vlines = [s for s in fig.layout.shapes if s.type == "line"]
    assert sorted(s.x0 for s in vlines) == [4, 6]
    (ev,) = scatter(fig, "events")
    np.testing.assert_allclose(ev.x, [4, 6])
    np.testing.assert_allclose(ev.y, [ds["loss"].values[0, 3], ds["loss"].values[1, 5]])  # on the curve
    assert "configure" in ev.text[0] and "damping=30.0" in ev.text[0] and "non-finite" in ev.text[1]
    # against seconds, the marker sits at the run's wall time of that step
    fw = viz.training_curves(ds, x="wall_time", events=events)
    np.testing.assert_allclose(scatter(fw, "events")[0].x, [ds["wall_time"].values[0, 3], ds["wall_time"].values[1, 5]])
    with pytest.raises(ValueError, match="step"):
        viz.training_curves(ds, events=[{"kind": "x"}])


def test_events_stored_in_a_run_dataset():
    one = runs_dataset().isel(run=0).drop_vars("run")
    one = one.assign(event_step=("event", np.array([3, 8])),
                     event_kind=("event", np.array(["configure", "configure"], dtype=object)),
                     event_details=("event", np.array([json.dumps({"approx": "tridiag"}), "{}"], dtype=object)))
    evs = normalize_events(one, None)
    assert evs == [{"step": 3, "kind": "configure", "approx": "tridiag"}, {"step": 8, "kind": "configure"}]
    fig = viz.training_curves(one)
    assert sorted(s.x0 for s in fig.layout.shapes) == [3, 8]
    assert fig.data[0].name == "run"


def test_traces_small_multiples():
    ds = runs_dataset()
    fig = viz.traces(ds, events=[{"step": 5, "kind": "configure"}])
    names = [a.text for a in fig.layout.annotations if a.text in ("λ (damping)", "γ", "α", "μ", "ρ")]
    assert names == ["λ (damping)", "γ", "α", "μ", "ρ"]
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log" and fig.layout.yaxis3.type == "linear"
    a_damping = [t for t in fig.data if t.name == "a" and t.yaxis == "y"][0]
    np.testing.assert_allclose(a_damping.y, ds["damping"].values[0])
    assert sum(t.showlegend is not False for t in fig.data) == 2     # one legend entry per run
    assert len([s for s in fig.layout.shapes if s.type == "line"]) == 5  # the event on every row
    only = viz.traces(ds[["loss", "alpha"]])
    assert len(only.data) == 2
    with pytest.raises(ValueError, match="none of"):
        viz.traces(ds[["loss"]])


def test_damping_figure():
    gamma = np.logspace(-2, 1, 4)
    ds = xr.Dataset({"reduction_tikhonov": ("gamma", [5.0, -0.5, -0.8, -0.1]),
                     "reduction_rescaled": ("gamma", [-0.2, -0.7, -0.9, -0.6]),
                     "reduction_momentum": ("gamma", [-0.5, -0.8, -0.95, -0.9]),
                     "reduction_ideal": ((), -1.0)}, coords={"gamma": gamma},
                    attrs={"damping": 0.5, "weight_decay": 1e-5})
    fig = viz.damping_figure(ds)
    lines_ = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines_) == 3
    np.testing.assert_allclose(lines_[0].x, gamma)
    np.testing.assert_allclose(lines_[1].y, ds["reduction_rescaled"].values / -1.0)
    stars = [t for t in fig.data if t.mode == "markers"]
    np.testing.assert_allclose([s.x[0] for s in stars], [gamma[2], gamma[2], gamma[2]])
    assert fig.layout.xaxis.type == "log"
    raw = viz.damping_figure(ds, relative=False)
    np.testing.assert_allclose([t for t in raw.data if t.mode == "lines+markers"][0].y, ds["reduction_tikhonov"].values)


def test_invariance_figure():
    steps = np.arange(4)
    d = np.array([[[0, 1e-15, 2e-15, 3e-15], [0, 1e-16, 1e-15, 1e-14]],
                  [[0, 1e-3, 1e-2, 1e-1], [0, 1e-2, 1e-1, 1.0]]])
    ds = xr.Dataset({"distance": (("optimizer", "variant", "step"), d)},
                    coords={"optimizer": ["kfac", "sgd"], "variant": ["logistic", "affine"], "step": steps})
    fig = viz.invariance_figure(ds)
    assert fig.layout.yaxis.type == "log"
    assert len(fig.data) == 4
    sgd_affine = [t for t in fig.data if t.name == "SGD · affine twin"][0]
    np.testing.assert_allclose(sgd_affine.y, d[1, 1])


def test_figures_of_real_studies():
    import torch

    from kfac_lab.analysis import damping_study, invariance_study
    from kfac_lab.models import mlp

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inv = invariance_study(steps=3)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 4, dtype=torch.float64, generator=g)
        y = torch.randint(0, 3, (40,), generator=g)
        dmp = damping_study(mlp([4, 5, 3], "tanh", dtype=torch.float64), "categorical", x, y, damping=0.1, kfac_steps=2)
    finally:
        torch.set_num_threads(before)
    fi = viz.invariance_figure(inv)
    kl = [t for t in fi.data if t.name == "K-FAC · logistic twin"][0]
    np.testing.assert_allclose(kl.y, inv["distance"].sel(optimizer="kfac", variant="logistic").values)
    fd = viz.damping_figure(dmp)
    mom = [t for t in fd.data if t.name == "+ momentum (α, μ)"][0]
    np.testing.assert_allclose(mom.y, dmp["fraction_momentum"].values)


def test_damping_figure_says_what_falls_below_the_axis():
    """No silent clipping: points below the floor sit on it as ▼, carry their value, and a note says
    how many and the lowest; a study over several λ must be narrowed to one."""
    import xarray as xr

    g = np.array([1e-3, 1e-2, 1e-1, 1.0])
    ds = xr.Dataset({"reduction_tikhonov": ("gamma", [4.3e6, 10.0, -0.5, -0.2]),
                     "reduction_rescaled": ("gamma", [-0.1, -0.3, -0.6, -0.4]),
                     "reduction_momentum": ("gamma", [-0.2, -0.4, -0.7, -0.5]),
                     "reduction_ideal": ((), -1.0)}, coords={"gamma": g, "damping": 0.3},
                    attrs={"weight_decay": 1e-5})
    fig = viz.damping_figure(ds)
    tik = fig.data[0]
    assert list(tik.y[:2]) == [-0.25, -0.25] and list(tik.customdata[:2]) == [-4.3e6, -10.0]
    assert list(tik.marker.symbol[:2]) == ["triangle-down"] * 2 and tik.marker.symbol[2] == "circle"
    note = " ".join(a.text for a in fig.layout.annotations)
    assert "tikhonov: 2 below -0.25" in note and "-4.3e+06" in note
    assert "λ = 0.3" in fig.layout.title.text
    both = xr.concat([ds, ds], dim="damping")
    with pytest.raises(ValueError, match="pick one"):
        viz.damping_figure(both)
