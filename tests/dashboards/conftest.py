"""Fixtures of the dashboard tests: Debian's chromium driven by pytest-playwright, and the two
apps served in-process on a free port of 127.0.0.1 with a fresh store.

Browser tests are skipped (with the reason) where no chromium is found — unless ``CI=true``,
where a missing browser or Playwright fails them: CI must run them
(``bash scripts/install_browser.sh`` installs the browser).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from kfac_lab.viz.export import LAUNCH_ARGS, NO_CHROMIUM, find_chromium

#: Where the browser tests save their screenshots: ``$KFAC_LAB_SCREENSHOTS`` when set (``make
#: screenshots`` sets it to docs/screenshots, the README's pictures), else the test's own temporary
#: directory — so that running the tests never rewrites a tracked file.
SCREENSHOTS_ENV = "KFAC_LAB_SCREENSHOTS"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(msg: str) -> None:
    """A test cannot run here (no chromium, no git, …): fail under CI (it must run there), skip
    elsewhere, with ``msg``."""
    if in_ci():
        pytest.fail(msg)
    pytest.skip(msg)


def require_browser() -> str:
    """The chromium path, or skip (fail under CI) with the reason and the fix."""
    try:
        import playwright  # noqa: F401
        import pytest_playwright  # noqa: F401
    except ImportError as exc:
        msg = (f"browser tests need playwright and pytest-playwright ({exc}); install the test extras: "
               "pip install -c constraints.txt -e '.[test]'")
        unavailable(msg)
    exe = find_chromium()
    if exe is None:
        unavailable(NO_CHROMIUM)
    return exe


@pytest.fixture(scope="session")
def chromium_path() -> str:
    return require_browser()


@pytest.fixture(scope="session")
def browser_type_launch_args(chromium_path):  # overrides pytest-playwright's
    return {"executable_path": chromium_path, "args": LAUNCH_ARGS, "headless": True}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):  # overrides pytest-playwright's
    return {**browser_context_args, "viewport": {"width": 1400, "height": 1000}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> None:
    import urllib.request

    t0 = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() - t0 > timeout:
                raise
            time.sleep(0.2)


class Served:
    """A running in-process server of both apps: ``url(app)``, ``store_path``, ``server``."""

    def __init__(self, server, port: int, store_path: Path):
        self.server, self.port, self.store_path = server, port, store_path

    def url(self, app: str) -> str:
        return f"http://127.0.0.1:{self.port}/{app}"


@pytest.fixture(scope="module")
def served(tmp_path_factory, chromium_path):
    """Both dashboards served by ``pn.serve`` (threaded) on a free port with a fresh store."""
    import panel as pn

    from kfac_lab.dashboards import fisher_explorer, training_lab
    from kfac_lab.dashboards.common import ENV_STORE, local_origins

    store_path = tmp_path_factory.mktemp("dash") / "lab.zarr"
    old = os.environ.get(ENV_STORE)
    os.environ[ENV_STORE] = str(store_path)
    port = free_port()
    apps = {
        "training_lab": lambda: training_lab.create_app(problem="tiny"),
        "fisher_explorer": lambda: fisher_explorer.create_app(**fisher_explorer.FAST_DEFAULTS),
    }
    server = pn.serve(apps, address="127.0.0.1", port=port, threaded=True, show=False,
                      websocket_origin=local_origins(port))
    try:
        wait_http(f"http://127.0.0.1:{port}/training_lab")
        yield Served(server, port, store_path)
    finally:
        server.stop()
        training_lab._stop_all()  # sessions of pages still open when the server went
        if old is None:
            os.environ.pop(ENV_STORE, None)
        else:
            os.environ[ENV_STORE] = old


class PageWatch:
    """Records a page's console errors, page errors and the hosts it requested."""

    def __init__(self, page, port: int):
        self.errors: list[str] = []
        self.external: list[str] = []
        self.port = port
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("request", self._request)

    def _console(self, msg) -> None:
        if msg.type == "error":
            self.errors.append(f"console.error: {msg.text}")

    def _request(self, req) -> None:
        url = req.url
        local = (url.startswith(f"http://127.0.0.1:{self.port}/") or url.startswith(f"ws://127.0.0.1:{self.port}/")
                 or url.startswith("blob:") or url.startswith("data:"))
        if not local:
            self.external.append(url)


@pytest.fixture
def screenshot_dir(tmp_path) -> Path:
    """The directory the browser tests save screenshots to (see :data:`SCREENSHOTS_ENV`)."""
    where = os.environ.get(SCREENSHOTS_ENV, "").strip()
    path = Path(where).resolve() if where else tmp_path
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def watch_page(page, served):
    return PageWatch(page, served.port)


def poll(fn, timeout=60.0, every=0.2, what="condition"):
    """``fn()`` until it returns something truthy (which is returned)."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            last = fn()
        except Exception as exc:  # noqa: BLE001 - the element may not exist yet
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"{what} not met within {timeout} s (last: {last!r})")


def require_playwright() -> None:
    """At a browser-test module's top: skip the module without pytest-playwright (it brings the
    ``page`` / ``browser`` fixtures), except under CI, where the missing package is an error."""
    try:
        import pytest_playwright  # noqa: F401
    except ImportError:
        if in_ci():
            raise
        pytest.skip("browser tests need pytest-playwright: pip install -c constraints.txt -e '.[test]'",
                    allow_module_level=True)
