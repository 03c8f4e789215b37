"""lab.controls: the λ range and stops, the checks, the lr_mode rule, all-or-nothing changes."""
from __future__ import annotations

import math

import pytest

from kfac_lab.lab.controls import (DAMPING_GRID, DAMPING_MAX, DAMPING_MIN, LiveControls, nearest_damping,
                                   parse_float, parse_int, shown_damping)
from kfac_lab.optim import KFACConfig


def test_the_damping_range_holds_the_paper_start_and_whole_decades():
    assert DAMPING_GRID[0] == DAMPING_MIN == 1e-4 and DAMPING_GRID[-1] == DAMPING_MAX == 1e5
    assert DAMPING_GRID == sorted(set(DAMPING_GRID)) and 150.0 in DAMPING_GRID
    assert nearest_damping(140.0) == 150.0 and nearest_damping(0.0) == DAMPING_MIN
    assert nearest_damping(1e9) == DAMPING_MAX
    assert shown_damping(12.345678) == 12.35 and shown_damping(0.000123456) == 0.0001235  # both λ boxes
    for lam in (2e-4, 0.33, 42.0, 6e4):  # brute force on a log scale
        assert nearest_damping(lam) == min(DAMPING_GRID, key=lambda g: abs(math.log(g / lam)))


@pytest.mark.parametrize("value,text", [("abc", "not a number"), (-1, "must be > 0"), ("", "enter a number"),
                                        ("nan", "finite"), (True, "expected a number")])
def test_bad_damping_is_refused_with_the_reason_and_nothing_changes(value, text):
    c = LiveControls()
    sent = []
    with pytest.raises(ValueError, match="damping λ") as err:
        c.change("damping", value, send=sent.append)
    assert text in str(err.value) and c.damping == 150.0 and not sent


def test_changes_and_the_lr_mode_rule():
    c = LiveControls()
    assert c.change("approx", "block-tridiagonal") == {"approx": "tridiag"} and c.approx == "tridiag"
    assert c.change("lr", "0.05") == {} and c.lr == 0.05          # kept: α is adaptive
    assert c.change("lr_mode", "fixed") == {"lr": 0.05}
    assert c.change("lr", 0.2) == {"lr": 0.2}
    assert c.change("lr_mode", "adaptive") == {"lr": None}
    assert c.kfac_options() == {"damping": 150.0, "adapt_damping": True, "approx": "tridiag", "momentum": True,
                                "lr": None}
    with pytest.raises(ValueError, match="not a live control"):
        c.change("weight_decay", 1.0)
    with pytest.raises(ValueError, match="choose one of"):
        c.change("approx", "diagonal")


def test_a_refusal_by_the_optimizer_records_nothing():
    c = LiveControls()

    def refuse(changes):
        raise RuntimeError("the run failed")

    with pytest.raises(RuntimeError):
        c.change("momentum", False, send=refuse)
    assert c.momentum is True


def test_controls_of_a_config_and_typed_integers():
    cfg = KFACConfig(damping=3.0, approx="tridiag", momentum=False, lr=0.5, adapt_damping=False)
    c = LiveControls.of(cfg)
    assert (c.damping, c.approx, c.momentum, c.lr_mode, c.lr, c.adapt_damping) == (3.0, "tridiag", False, "fixed",
                                                                                 0.5, False)
    assert c.kfac_options()["lr"] == 0.5
    assert parse_int("1e3", "steps") == 1000
    with pytest.raises(ValueError, match="whole number"):
        parse_int("2.5", "steps")
    assert parse_float(" 7 ", "x", maximum=8) == 7.0


def test_controls_of_an_auto_damping_config_and_the_presets():
    from kfac_lab.lab.controls import KFAC_PRESETS
    from kfac_lab.optim import KFACConfig

    assert LiveControls.of(KFACConfig(damping="auto")).damping == 150.0   # λ is 150 until the probe
    assert [label for label, _ in KFAC_PRESETS.values()] == ["K-FAC (λ₀ = 150, paper)", "K-FAC (auto λ₀)"]
    assert KFAC_PRESETS["kfac-auto"][1] == {"damping": "auto"} and KFAC_PRESETS["kfac"][1] == {"damping": 150.0}
