"""The shared dashboard pieces: store path, validation messages, serving defaults, remote guard."""
from __future__ import annotations

import pytest

from kfac_lab.dashboards import common


def test_store_path_env_and_default(monkeypatch, tmp_path):
    monkeypatch.delenv(common.ENV_STORE, raising=False)
    assert common.store_path() == "runs/lab.zarr"
    monkeypatch.setenv(common.ENV_STORE, str(tmp_path / "x.zarr"))
    assert common.store_path() == str(tmp_path / "x.zarr")
    assert common.store_path(tmp_path / "y.zarr") == str(tmp_path / "y.zarr")


def test_open_store_is_shared_per_path(tmp_path):
    a = common.open_store(tmp_path / "s.zarr")
    b = common.open_store(str(tmp_path / "s.zarr"))
    assert a is b
    assert a.runs().empty


@pytest.mark.parametrize("text, message", [
    ("abc", "is not a number"), ("", "enter a number"), ("-3", "must be > 0"), ("0", "must be > 0"),
    ("nan", "must be finite"), ("inf", "must be finite"),
])
def test_parse_float_messages(text, message):
    with pytest.raises(ValueError, match=message):
        common.parse_float(text, "damping λ", positive=True)


def test_parse_numbers_accept():
    assert common.parse_float(" 1e-3 ", "x", positive=True) == 1e-3
    assert common.parse_int("1e3", "n", minimum=1) == 1000
    with pytest.raises(ValueError, match="whole number"):
        common.parse_int("2.5", "n")
    with pytest.raises(ValueError, match="≥ 10"):
        common.parse_int("3", "cases", minimum=10)


def test_serving_is_local_by_default():
    assert common.DEFAULT_ADDRESS == "127.0.0.1" and common.DEFAULT_PORT == 5006
    args = common.panel_serve_args()
    assert args[:2] == ["panel", "serve"]
    assert args[args.index("--address") + 1] == "127.0.0.1"
    origins = [args[i + 1] for i, a in enumerate(args) if a == "--allow-websocket-origin"]
    assert set(origins) == {"127.0.0.1:5006", "localhost:5006"}
    assert all(a.endswith(".py") for a in args[2:4])
    assert common.local_origins(7000, "0.0.0.0") == ["0.0.0.0:7000"]


def test_remote_clients_refused_unless_allowed(monkeypatch):
    monkeypatch.delenv(common.ENV_ALLOW_REMOTE, raising=False)
    monkeypatch.setattr(common, "_remote_ip", lambda: "192.168.1.20")
    assert not common.client_allowed()
    monkeypatch.setattr(common, "_remote_ip", lambda: "127.0.0.1")
    assert common.client_allowed()
    monkeypatch.setattr(common, "_remote_ip", lambda: "::1")
    assert common.client_allowed()
    monkeypatch.setattr(common, "_remote_ip", lambda: None)  # no request: a notebook or a test
    assert common.client_allowed()
    monkeypatch.setattr(common, "_remote_ip", lambda: "10.0.0.1")
    monkeypatch.setenv(common.ENV_ALLOW_REMOTE, "1")
    assert common.client_allowed()


def test_number_field_shows_message_and_keeps_value():
    got = []
    field = common.NumberField("λ", 150.0, lambda t: common.parse_float(t, "damping λ", positive=True), got.append)
    field.input.value = "abc"
    assert "not a number" in field.error and got == []
    field.input.value = "-1"
    assert "must be > 0" in field.error and got == []
    field.input.value = "30"
    assert field.error == "" and got == [30.0]

    def refuse(v):
        raise ValueError("the optimizer refused it")

    field.apply = refuse
    assert not field.submit("5") and "refused" in field.error
    field.show(7.0)
    assert field.input.value == "7" and field.error == ""


def test_attach_outside_a_server_does_nothing():
    assert common.attach(lambda: None, lambda: None) is None
    assert not common.in_server_session()


def test_serve_both_apps_on_localhost(tmp_path):
    import urllib.request

    from .conftest import free_port, wait_http

    port = free_port()
    with pytest.raises(ValueError, match="unknown dashboards"):
        common.serve(["nope"], port=port, threaded=True)
    server = common.serve(port=port, threaded=True, store=tmp_path / "serve.zarr")
    try:
        for app in common.APPS:
            wait_http(f"http://127.0.0.1:{port}/{app}")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/{app}", timeout=30) as r:
                assert r.status == 200 and b"bokeh" in r.read().lower()
    finally:
        server.stop()
        import os

        os.environ.pop(common.ENV_STORE, None)


def test_missing_browser_skips_outside_ci_and_fails_under_ci(monkeypatch):
    from . import conftest

    monkeypatch.setattr(conftest, "find_chromium", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="install_browser.sh"):
        conftest.require_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="install_browser.sh"):
        conftest.require_browser()
