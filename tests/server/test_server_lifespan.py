"""The model loads in the lifespan, in the background: /health answers at once, /ready when loaded."""

from __future__ import annotations

import threading

import httpx
from live_server_util import assert_error, run_server, wait_for_path

from server.runtime import build_runtime


def test_health_during_load_then_ready(make_settings):
    release = threading.Event()

    def slow_factory(settings):
        release.wait(30)
        return build_runtime(settings)

    with run_server(make_settings(), wait_path="/health", runtime_factory=slow_factory) as live:
        assert_error(httpx.get(live.url + "/ready"), 503, "unavailable")
        assert_error(httpx.post(live.url + "/generate", json={"inputs": "x"}), 503, "unavailable")
        assert live.app.state.runtime is None
        release.set()
        wait_for_path(live.url, threading.main_thread(), "/ready")
        assert httpx.post(live.url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}},
                          timeout=60).status_code == 200


def test_failed_load_is_reported_and_stops_the_server(make_settings, tmp_path):
    fatal = threading.Event()
    with run_server(make_settings(model=str(tmp_path / "no-model-here")), wait_path="/health") as live:
        live.app.state.on_fatal = fatal.set  # (set after start: the load may already have failed)
        if live.app.state.load_error is None:
            assert fatal.wait(60)
        body = assert_error(httpx.get(live.url + "/ready"), 503, "unavailable")
        assert "loading the model failed" in body["error"]
