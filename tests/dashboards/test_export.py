"""PNG export of plotly figures through the local headless chromium (README pictures)."""
import struct

import plotly.graph_objects as go
import pytest

from kfac_lab.viz import export


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_figure_png_draws_the_figure_at_the_requested_size(chromium_path, tmp_path):
    fig = go.Figure(go.Scatter(x=[0, 1, 2], y=[3, 1, 2], name="curve"))
    out = export.figure_png(fig, tmp_path / "sub" / "fig.png", width=640, height=360)
    assert out.exists() and png_size(out) == (640, 360)
    assert out.stat().st_size > 5_000  # drawn, not a blank page
    assert fig.layout.width is None  # the caller's figure is not modified


def test_figure_png_without_a_browser_says_how_to_install_one(monkeypatch, tmp_path):
    monkeypatch.setattr(export, "find_chromium", lambda: None)
    with pytest.raises(RuntimeError, match="install_browser.sh"):
        export.figure_png(go.Figure(), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_figure_png_works_inside_a_running_asyncio_loop(chromium_path, tmp_path):
    # as in a notebook cell (or a pytest worker where pytest-playwright already runs)
    import asyncio

    draw = lambda: export.figure_png(go.Figure(go.Bar(y=[1, 2])), tmp_path / "loop.png", width=320, height=200)

    async def main():
        return draw()
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop here yet: start one
        out = asyncio.run(main())
    else:  # a loop already runs in this thread (pytest-playwright's, in a worker that ran browser tests)
        out = draw()
    assert png_size(out) == (320, 200)
