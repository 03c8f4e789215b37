"""The training labs on a CNN problem: the block-tridiagonal toggle is disabled, with the reason."""
import pytest

from kfac_lab.lab.controls import LiveControls, problem_tridiag_refusal
from kfac_lab.store import Store


def test_cnn_problems_refuse_tridiag_and_mlps_do_not():
    assert problem_tridiag_refusal("tiny") is None
    reason = problem_tridiag_refusal("mnist-cnn")
    assert "'1', '3'" in reason and "weight sharing" in reason and "blockdiag" in reason
    live = LiveControls(tridiag_unavailable=reason)
    with pytest.raises(ValueError, match="no cross-layer model"):
        live.change("approx", "tridiag")
    assert live.approx == "blockdiag"


def test_panel_page_and_widget_disable_the_toggle(tmp_path):
    from kfac_lab.dashboards.training_app import TrainingLabApp
    from kfac_lab.dashboards.training_lab import TrainingLabPage
    from kfac_lab.widgets import TrainingLabWidget

    store = Store(tmp_path / "lab.zarr", flush_interval=0.5)
    app = TrainingLabApp(store=store, problem="fig1-cnn", steps=0)
    page = TrainingLabPage(app)
    widget = TrainingLabWidget("fig1-cnn", optimizers=("kfac",), store=store, drainer=False, checkpoint_every=None)
    try:
        assert page.approx.disabled and "weight sharing" in page.approx.description
        assert page.approx_note.visible and "unavailable" in page.approx_note.object
        assert not app.set_control("approx", "tridiag") and "no cross-layer model" in app.messages["approx"]
        assert app.settings.approx == "blockdiag"
        page.problem.value = "tiny"                      # an MLP: the toggle comes back
        assert not page.approx.disabled and not page.approx_note.visible
        assert app.set_control("approx", "tridiag")
        page.problem.value = "mnist-cnn"                 # back to a CNN: falls back to block-diagonal
        assert page.approx.disabled and app.settings.approx == "blockdiag" and page.approx.value == "blockdiag"
        c = widget.controls
        assert c["approx"].disabled and "weight sharing" in c["approx"].tooltips[1]
        assert "unavailable" in c["approx_note"].value
    finally:
        app.close(wait=True, timeout=30)
        widget.close()
