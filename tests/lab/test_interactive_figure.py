"""``interactive_figure``: interact for plotly figures without captured display output — the
figure's JSON is the Output widget's ``outputs``, redrawn on every change; errors are shown."""
import ipywidgets as w
import plotly.graph_objects as go
import pytest

from kfac_lab.lab.notebook import interactive_figure

PLOTLY = "application/vnd.plotly.v1+json"


def _figure(a=1, b=2.0):
    if a < 0:
        raise ValueError("a must be ≥ 0")
    return go.Figure(go.Scatter(x=[0, 1], y=[a, b]), layout=dict(title=dict(text=f"a={a} b={b}")))


def _shown(box):
    (out,) = [c for c in box.children if isinstance(c, w.Output)]
    (item,) = out.outputs
    return item["data"]


def test_draws_at_once_and_on_every_change():
    a, b = w.IntSlider(value=1, min=-3, max=3), w.FloatSlider(value=2.0)
    box = interactive_figure(_figure, a=a, b=b)
    assert list(box.children[0].children) == [a, b]
    data = _shown(box)[PLOTLY]
    assert data["data"][0]["y"] == [1, 2.0] and data["layout"]["title"]["text"] == "a=1 b=2.0"
    b.value = 5.0
    assert _shown(box)[PLOTLY]["data"][0]["y"] == [1, 5.0]
    a.value = 3
    assert _shown(box)[PLOTLY]["layout"]["title"]["text"] == "a=3 b=5.0"


def test_an_error_is_shown_and_the_next_change_recovers():
    a = w.IntSlider(value=1, min=-3, max=3)
    box = interactive_figure(_figure, a=a)
    a.value = -1
    shown = _shown(box)
    assert PLOTLY not in shown and "ValueError: a must be ≥ 0" in shown["text/plain"]
    a.value = 2
    assert _shown(box)[PLOTLY]["data"][0]["y"] == [2, 2.0]


def test_bad_arguments_say_what_to_pass():
    with pytest.raises(ValueError, match="by keyword"):
        interactive_figure(_figure)
    with pytest.raises(TypeError, match="ipywidgets controls"):
        interactive_figure(_figure, a=3)
