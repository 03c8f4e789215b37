"""Plotly figures to PNG without kaleido or a network: the figure, with plotly.js inlined, is drawn
by a local headless chromium (Debian's, driven by Playwright — the same browser as the dashboard
tests; ``bash scripts/install_browser.sh`` installs it). Used for README pictures such as the race."""
from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import plotly.graph_objects as go

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
#: Launch flags that work as root and offline (no sandbox when root; no GPU, network services or first-run tasks).
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
               "--disable-dev-shm-usage"]

#: What to tell a user when ``find_chromium`` finds nothing.
NO_CHROMIUM = ("no chromium found (looked at $KFAC_LAB_CHROMIUM, /usr/bin/chromium and the PATH); "
               "install it with: bash scripts/install_browser.sh")

__all__ = ["find_chromium", "figure_png", "CHROMIUM_CANDIDATES", "LAUNCH_ARGS", "NO_CHROMIUM"]


def find_chromium() -> str | None:
    """``$KFAC_LAB_CHROMIUM``, Debian's ``/usr/bin/chromium``, or a chromium on the PATH."""
    env = os.environ.get("KFAC_LAB_CHROMIUM", "").strip()
    for exe in ([env] if env else []) + list(CHROMIUM_CANDIDATES):
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            return exe
    return shutil.which("chromium") or shutil.which("chromium-browser")


def figure_png(fig: go.Figure, path: str | Path, width: int = 1000, height: int = 520) -> Path:
    """Draw ``fig`` at ``width × height`` CSS pixels and save it as a PNG at ``path``."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise RuntimeError(f"figure_png needs playwright ({exc}): pip install -c constraints.txt -e '.[test]'") from exc
    exe = find_chromium()
    if exe is None:
        raise RuntimeError(f"figure_png: {NO_CHROMIUM}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = go.Figure(fig).update_layout(width=width, height=height)

    def draw(page_file: Path) -> None:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=LAUNCH_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": width, "height": height})
                page.goto(page_file.as_uri())
                page.wait_for_selector(".main-svg", timeout=30_000)
                page.locator(".js-plotly-plot").first.screenshot(path=str(path))
            finally:
                browser.close()

    with tempfile.TemporaryDirectory() as tmp:
        page_file = Path(tmp) / "figure.html"
        page_file.write_text(fig.to_html(include_plotlyjs=True, full_html=True, config={"staticPlot": True}))
        # Playwright's sync API refuses to run where an asyncio loop runs (a notebook, or a process
        # that already drives a browser): a worker thread has none
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(draw, page_file).result()
    return path
