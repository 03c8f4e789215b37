"""Fixtures of the JupyterLab browser tests: a real JupyterLab server (headless, 127.0.0.1, a free
port, a token) on a temporary folder, and one chromium page on it with the internet cut off.

The browser plumbing (Debian's chromium through pytest-playwright; skipped with the reason where
it is missing, failing under ``CI=true``) is the dashboards' (tests/dashboards/conftest.py).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# The dashboards' browser fixtures, shared (pytest registers fixtures imported into a conftest).
from dashboards.conftest import (  # noqa: F401 - fixtures used by name
    PageWatch,
    browser_context_args,
    browser_type_launch_args,
    chromium_path,
    free_port,
    screenshot_dir,
)

ROOT = Path(__file__).resolve().parents[2]

#: User settings of the test's JupyterLab: every cell in the DOM (no windowing), no news / update checks.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


def lab_command(port: int, token: str, root: Path) -> list[str]:
    """JupyterLab as ``make notebooks`` starts it (127.0.0.1, a token), on ``root``, headless,
    with nothing that asks the internet (news, update checks, the PyPI extension manager)."""
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI machines run as root
    return cmd


class JupyterLab:
    """A running JupyterLab: ``url(path)`` (token included), ``root`` (its folder), ``log``."""

    def __init__(self, proc: subprocess.Popen, port: int, token: str, root: Path, log: Path):
        self.proc, self.port, self.token, self.root, self.log = proc, port, token, root, log

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "lab") -> str:
        return f"{self.base}/{path.lstrip('/')}?token={self.token}"

    def api(self, path: str, method: str = "GET", body: dict | None = None):
        req = urllib.request.Request(f"{self.base}/api/{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
        return json.loads(text) if text else None

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float = 120.0) -> None:
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("status")
                return
            except (OSError, urllib.error.URLError):
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"JupyterLab did not answer within {timeout} s:\n{self.log_tail()}")
                time.sleep(0.3)

    def stop(self) -> None:
        """Shut the server down with its kernels (its API), else end its process group."""
        if self.proc.poll() is None:
            try:
                self.api("shutdown", method="POST")
                self.proc.wait(timeout=30)
            except (OSError, urllib.error.URLError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory, chromium_path):
    """JupyterLab serving a fresh temporary folder (``jupyterlab.root``): nothing tracked is
    written. Its config, data, runtime and settings folders are temporary too, so a user's own
    Jupyter set-up neither leaks in nor is touched; the kernels import this checkout's kfac_lab."""
    base = tmp_path_factory.mktemp("jupyterlab")
    root = base / "root"
    root.mkdir()
    settings = base / "settings"
    for rel, value in LAB_SETTINGS.items():
        path = settings / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               JUPYTER_CONFIG_DIR=str(base / "config"), JUPYTER_DATA_DIR=str(base / "data"),
               JUPYTER_RUNTIME_DIR=str(base / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"))
    port, token = free_port(), secrets.token_hex(16)
    log = base / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(lab_command(port, token, root), cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    lab = JupyterLab(proc, port, token, root, log)
    try:
        lab.wait_ready()
        yield lab
    finally:
        lab.stop()


@pytest.fixture(scope="module")
def lab_page(browser, jupyterlab, browser_context_args):
    """One chromium page for the module, with every request off this machine refused (as
    offline) and recorded in ``lab_page.watch.external``."""
    context = browser.new_context(**browser_context_args)
    local = (jupyterlab.base + "/", f"ws://127.0.0.1:{jupyterlab.port}/", "data:", "blob:")
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(local) else route.abort())
    page = context.new_page()
    page.watch = PageWatch(page, jupyterlab.port)
    try:
        yield page
    finally:
        context.close()
