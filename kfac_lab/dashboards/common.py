"""Pieces both dashboards share: the store, input validation, the session lifecycle, serving.

Nothing here draws a figure (that is :mod:`kfac_lab.viz`) or trains (that is
:mod:`kfac_lab.train`); this module only connects them to Panel safely:

- one :class:`~kfac_lab.store.Store` per path and process, shared by every browser session
  (the Store serialises its writers; each run has one writer);
- :func:`attach` — the thread-safe update path: a periodic callback on the session's own
  event loop drains what background threads produced, and the session's threads are
  stopped when the browser goes away (``pn.state.on_session_destroyed``);
- :func:`serve` — both apps on 127.0.0.1 with websocket origins restricted to it;
- :func:`client_allowed` — a page opened from another machine is refused unless
  ``KFAC_LAB_ALLOW_REMOTE=1`` (bare ``panel serve`` listens on every interface).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..lab.controls import parse_float, parse_int  # typed values: checked as in the Jupyter widgets

__all__ = [
    "ENV_STORE", "ENV_ALLOW_REMOTE", "DEFAULT_STORE", "DEFAULT_ADDRESS", "DEFAULT_PORT",
    "store_path", "open_store", "parse_float", "parse_int", "client_allowed", "attach",
    "in_server_session", "local_origins", "serve", "panel_serve_args", "APPS",
]

log = logging.getLogger(__name__)

ENV_STORE = "KFAC_LAB_STORE"
ENV_ALLOW_REMOTE = "KFAC_LAB_ALLOW_REMOTE"
DEFAULT_STORE = "runs/lab.zarr"
DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 5006
#: URL path → module of the app factory (``create_app``), as ``panel serve dashboards/*.py`` names them.
APPS = {"training_lab": "kfac_lab.dashboards.training_lab",
        "fisher_explorer": "kfac_lab.dashboards.fisher_explorer"}

_STORES: dict[str, Any] = {}
_STORES_LOCK = threading.Lock()


# --------------------------------------------------------------------------- the store
def store_path(path: str | os.PathLike | None = None) -> str:
    """The lab store's path: ``path`` if given, else ``$KFAC_LAB_STORE``, else ``runs/lab.zarr``
    (relative to the working directory; ``runs/`` is git-ignored)."""
    if path is not None and str(path).strip():
        return os.fspath(path)
    env = os.environ.get(ENV_STORE, "").strip()
    return env or DEFAULT_STORE


def open_store(path: str | os.PathLike | None = None):
    """The process-wide :class:`~kfac_lab.store.Store` at :func:`store_path` (created if missing).

    Every browser session of a server shares it: the Store is thread-safe and each run has a
    single writer. Rows are committed every 100 rows or 2 s (what a headless ``Session`` does),
    at every checkpoint, when a run stops and when the server shuts down (Ctrl-C, SIGTERM): a
    server killed outright loses at most the last 2 s of steps.
    Raises :class:`~kfac_lab.store.StoreError` naming the path when it is not a lab store.
    """
    from ..store import Store

    p = store_path(path)
    key = p if "://" in p else str(Path(p).expanduser().resolve())
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None or getattr(store, "_closed", False):
            if "://" not in p:
                Path(key).parent.mkdir(parents=True, exist_ok=True)
            store = _STORES[key] = Store(p if "://" in p else key, mode="a", flush_every=100, flush_interval=2.0)
        return store


# --------------------------------------------------------------------------- sessions
def in_server_session() -> bool:
    """True while building a page for a browser session of a Bokeh/Panel server."""
    import panel as pn

    doc = pn.state.curdoc
    return doc is not None and getattr(doc, "session_context", None) is not None


def _remote_ip() -> str | None:
    import panel as pn

    try:
        ctx = pn.state.curdoc.session_context
        req = ctx.request if ctx is not None else None
        return getattr(req, "remote_ip", None) if req is not None else None
    except Exception:  # noqa: BLE001 - no request (notebook, tests): local
        return None


def client_allowed() -> bool:
    """False when the page is requested from another machine and ``KFAC_LAB_ALLOW_REMOTE`` is
    not set: the lab starts threads and writes files, so it serves this machine only."""
    if os.environ.get(ENV_ALLOW_REMOTE, "").strip().lower() in ("1", "true", "yes"):
        return True
    ip = _remote_ip()
    if not ip:
        return True
    try:
        return ipaddress.ip_address(ip.split("%")[0]).is_loopback
    except ValueError:
        return False


def refusal(title: str):
    """The page shown to a remote client (see :func:`client_allowed`)."""
    import panel as pn

    return pn.pane.Alert(
        f"**{title}** serves this machine only. Open it on the server itself "
        f"(http://127.0.0.1:PORT/), or set `{ENV_ALLOW_REMOTE}=1` where it is served to allow "
        "other machines.", alert_type="warning")


def attach(poll: Callable[[], Any], close: Callable[[], Any], period_ms: int = 100):
    """Run ``poll`` every ``period_ms`` on this browser session's event loop (the thread-safe
    path for UI updates: background threads only fill queues, ``poll`` drains them), and call
    ``close`` when the session is destroyed (browser tab closed or reloaded).

    Outside a server session (unit tests, notebooks) nothing is scheduled and ``None`` is
    returned: call ``poll()`` yourself. Returns the periodic callback otherwise.
    """
    import panel as pn

    if not in_server_session():
        return None

    def safe_poll():
        try:
            poll()
        except Exception:  # noqa: BLE001 - a failed refresh must not kill the periodic callback
            log.exception("dashboard refresh failed")

    cb = pn.state.add_periodic_callback(safe_poll, period=period_ms)

    def destroyed(_ctx):
        try:
            cb.stop()
        except Exception:  # noqa: BLE001
            pass
        close()

    pn.state.on_session_destroyed(destroyed)
    return cb


# --------------------------------------------------------------------------- serving
def local_origins(port: int, address: str = DEFAULT_ADDRESS) -> list[str]:
    """Websocket origins to allow: the address itself, and ``localhost`` when it is loopback."""
    origins = [f"{address}:{port}"]
    if address in ("127.0.0.1", "localhost", "::1"):
        origins += [f"localhost:{port}", f"127.0.0.1:{port}"]
    return list(dict.fromkeys(origins))


def panel_serve_args(address: str = DEFAULT_ADDRESS, port: int = DEFAULT_PORT, show: bool = False) -> list[str]:
    """The ``panel serve`` command for both dashboards, bound and restricted to ``address``.

    ``--warm`` builds each page once before the server listens: the imports (torch, xarray,
    plotly) are paid at start, and the Fisher explorer's default study starts computing in the
    background (:func:`~kfac_lab.dashboards.fisher_explorer.warm_up`), so the first visitor
    does not wait for either."""
    root = Path(__file__).resolve().parents[2] / "dashboards"
    args = ["panel", "serve", str(root / "training_lab.py"), str(root / "fisher_explorer.py"),
            "--address", address, "--port", str(port), "--warm"]
    for o in local_origins(port, address):
        args += ["--allow-websocket-origin", o]
    if show:
        args.append("--show")
    return args


def serve(apps: list[str] | tuple[str, ...] | None = None, *, address: str = DEFAULT_ADDRESS,
          port: int = DEFAULT_PORT, show: bool = False, threaded: bool = False,
          websocket_origin: list[str] | None = None, store: str | os.PathLike | None = None, **kwargs):
    """Serve the dashboards in this process (what ``panel serve dashboards/*.py`` does).

    Bound to ``address`` (127.0.0.1 by default) with websocket origins restricted to it.
    ``store`` sets ``KFAC_LAB_STORE`` for the apps. ``threaded=True`` returns at once with a
    running server (stop it with ``server.stop()``); otherwise this blocks until interrupted.
    """
    import importlib

    import panel as pn

    if store is not None:
        os.environ[ENV_STORE] = os.fspath(store)
    names = list(APPS) if apps is None else list(apps)
    unknown = [a for a in names if a not in APPS]
    if unknown:
        raise ValueError(f"unknown dashboards {unknown}; choose from {list(APPS)}")
    factories = {name: importlib.import_module(APPS[name]).create_app for name in names}
    _warm_up(names)
    origins = websocket_origin if websocket_origin is not None else local_origins(port, address)
    return pn.serve(factories, address=address, port=port, show=show, threaded=threaded,
                    websocket_origin=origins, title={"training_lab": "K-FAC training lab",
                                                     "fisher_explorer": "K-FAC Fisher explorer"},
                    **kwargs)


def _warm_up(names: list[str]) -> None:
    """What ``panel serve --warm`` does for :func:`serve`: import the apps' heavy dependencies
    now and start the Fisher explorer's default study in the background."""
    import importlib

    for name in names:
        if name == "fisher_explorer":
            importlib.import_module(APPS[name]).warm_up()
    importlib.import_module("kfac_lab.viz")
    importlib.import_module("kfac_lab.train")


# --------------------------------------------------------------------------- widgets
MESSAGE_STYLE = {"color": "#b00020", "font-size": "12px", "margin-top": "-4px"}


class NumberField:
    """A typed-number control: a text box whose value is parsed on Enter/blur, with a message
    right below it when the text is not acceptable (the previous value then stays in force).

    ``parse(text) -> value`` raises ``ValueError`` with the message to show; ``apply(value)``
    uses it and may itself raise ``ValueError`` (e.g. the optimizer refused it).
    """

    def __init__(self, label: str, value: Any, parse: Callable[[str], Any], apply: Callable[[Any], Any],
                 *, width: int = 140, fmt: Callable[[Any], str] = lambda v: f"{v:g}" if isinstance(v, float) else str(v),
                 name: str | None = None):
        import panel as pn

        self.parse, self.apply, self.fmt = parse, apply, fmt
        css = [f"kfac-field-{name}"] if name else []
        self.input = pn.widgets.TextInput(label=label, value=fmt(value), width=width, css_classes=css)
        self.message = pn.pane.HTML("", styles=MESSAGE_STYLE, css_classes=["kfac-message"] + css, margin=(0, 10),
                                    width=width + 60)
        self.input.param.watch(self._changed, "value")
        self._quiet = False
        self._error = ""

    def _changed(self, event) -> None:
        if self._quiet:
            return
        self.submit(event.new)

    def submit(self, text: str) -> bool:
        """Parse and apply ``text`` as if typed; returns whether it was accepted."""
        try:
            value = self.parse(text)
            self.apply(value)
        except ValueError as exc:
            self.set_error(str(exc))
            return False
        self.set_error("")
        return True

    def set_error(self, text: str) -> None:
        """Show ``text`` (plain text) under the box; ``""`` clears it."""
        self._error = text
        self.message.object = _escape(text)

    def show(self, value: Any) -> None:
        """Display ``value`` without applying it (the setting changed elsewhere)."""
        self._quiet = True
        try:
            self.input.value = self.fmt(value)
        finally:
            self._quiet = False
        self.set_error("")

    @property
    def error(self) -> str:
        """The message shown (plain text), ``""`` when the last input was accepted."""
        return self._error

    def __panel__(self):
        import panel as pn

        return pn.Column(self.input, self.message, margin=0)


def escape_html(text: Any) -> str:
    """``text`` safe to put in an HTML pane (messages may quote what a user typed)."""
    import html

    return html.escape(str(text or ""))


_escape = escape_html
