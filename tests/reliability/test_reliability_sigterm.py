"""SIGTERM on `promptserve serve`: stop admitting, finish the running requests, exit 0."""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import subprocess
import sys
import time

import httpx
from live_server_util import free_port, wait_for_process

NUM_TOKENS = 40


def _stream(url: str, first_event: cf.Future) -> list[dict]:
    body = {"task_id": "t", "inputs": "drain me", "parameters": {"max_new_tokens": NUM_TOKENS,
                                                                  "ignore_eos_token": True}}
    events = []
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if not first_event.done():
                    first_event.set_result(None)
    return events


def _refused(url: str) -> bool:
    """True if a new request is not admitted: connection refused, or 503 while draining."""
    try:
        r = httpx.post(url + "/generate", json={"task_id": "t", "inputs": "late"}, timeout=10)
    except httpx.TransportError:
        return True
    return r.status_code == 503


def test_sigterm_drains_running_requests_and_exits_0(tiny_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_model_dir("llama")), "--port", str(port),
           "--store", str(tmp_path / "prompts"), "--device", "cpu", "--shutdown-grace-s", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_process(url, proc)
        assert httpx.put(url + "/v1/tasks/t", json={"init": "random", "num_virtual_tokens": 4}).status_code == 201
        with cf.ThreadPoolExecutor(1) as pool:
            first_event: cf.Future = cf.Future()
            running = pool.submit(_stream, url, first_event)
            first_event.result(timeout=60)
            proc.send_signal(signal.SIGTERM)
            # Refused once the signal is handled: probe until then (bounded), not after a guessed 0.3 s.
            deadline = time.monotonic() + 30
            while not _refused(url):
                assert time.monotonic() < deadline, "still admitting requests 30 s after SIGTERM"
            events = running.result(timeout=60)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "error" not in events[-1], events[-1]
    assert events[-1]["details"]["generated_tokens"] == NUM_TOKENS  # the running request finished
    assert "Traceback" not in err
    assert '"path":"/generate_stream","status":200' in out
