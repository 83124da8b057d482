"""Helpers shared by the server and reliability tests: real uvicorn on loopback (tests/ is on sys.path)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx
import uvicorn

from server.app import create_app
from server.config import Settings


def assert_error(r: httpx.Response, status: int, error_type: str | None = None) -> dict:
    """The response is our JSON error with this status (and type)."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "error_type"} and isinstance(body["error"], str) and body["error"], body
    if error_type is not None:
        assert body["error_type"] == error_type, body
    return body


def sse_events(response: httpx.Response) -> list[dict]:
    """The JSON payloads of a server-sent event stream (every non-empty line must be `data:`)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data:"):
            payload = line[len("data:"):].strip()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", line
    return events


@dataclass
class LiveServer:
    """A running server: its base URL and the app (for its state: engine, store, metrics)."""

    url: str
    app: object
    store_dir: Path

    @property
    def runtime(self):
        return self.app.state.runtime

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a server started in a subprocess)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ok(url: str, is_alive: Callable[[], bool], path: str = "/ready", timeout_s: float = 120) -> None:
    """Poll `url + path` until it answers 200; fail at once if the server (thread or process) died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_alive():
            raise RuntimeError(f"the server at {url} died during startup")
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


def wait_for_path(url: str, thread: threading.Thread, path: str = "/ready", timeout_s: float = 120) -> None:
    """`wait_until_ok` for a server running in a thread of this process."""
    wait_until_ok(url, thread.is_alive, path, timeout_s)


def wait_for_process(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """`wait_until_ok` on /ready for a server started with `subprocess.Popen`."""
    wait_until_ok(url, lambda: proc.poll() is None, "/ready", timeout_s)


@contextmanager
def run_server(settings: Settings, *, wait_path: str = "/ready", **app_kw) -> Iterator[LiveServer]:
    """Start uvicorn in a thread on a pre-bound loopback socket; yield once `wait_path` answers 200."""
    app = create_app(settings, **app_kw)
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_path(url, thread, wait_path)
        yield LiveServer(url=url, app=app, store_dir=settings.store)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
