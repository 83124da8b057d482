"""A client that goes away cancels its request in the engine; a failure after the 200 is an SSE error event."""

from __future__ import annotations

import time

import httpx
import pytest
from live_server_util import sse_events


def http_count(live, route: str) -> float:
    # A stream cut by its client ends as a 200 (already sent); a plain request as 499 (never sent).
    status = "200" if route.endswith("_stream") else "499"
    return live.app.state.metrics.http_requests.labels(route, "POST", status)._value.get()


def wait_for(predicate, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


SLOW = ("slow-generate_stream", "slow-generate")


class Stall:
    """The fault injector holds the engine inside the step after request `slow-*` got its first token (its
    first decode step), until `set()`: no time limit that a slow machine could outlast."""

    def __init__(self, faults):
        self.faults = faults
        for request_id in SLOW:
            faults.hold(request_id, phase="decode")

    def set(self) -> None:
        for request_id in SLOW:
            self.faults.release(request_id)


@pytest.fixture()
def stalled(server):
    stall = Stall(server.runtime.engine.fault_injector)
    yield stall
    stall.set()


@pytest.mark.parametrize("route", ["/generate_stream", "/generate"])
def test_client_disconnect_cancels_the_request(server, stalled, route):
    engine = server.runtime.engine
    cancelled_before = engine.stats().num_cancelled
    counted = server.app.state.metrics.generations.labels("cancelled")._value
    counted_before = counted.get()
    done_before = http_count(server, route)
    body = {"task_id": "task-0", "inputs": "x", "parameters": {"max_new_tokens": 50, "ignore_eos_token": True}}
    headers = {"X-Request-Id": f"slow-{route.strip('/')}"}
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, read=1.0)) as c:
        if route == "/generate_stream":
            with c.stream("POST", route, json=body, headers=headers) as r:
                next(r.iter_lines())  # the first token arrived; now hang up
        else:
            with pytest.raises(httpx.ReadTimeout):  # gives up while the engine is stalled, and hangs up
                c.post(route, json=body, headers=headers)
    wait_for(lambda: http_count(server, route) > done_before)  # the handler saw the disconnect and ended
    stalled.set()
    wait_for(lambda: engine.stats().num_cancelled > cancelled_before)
    wait_for(lambda: counted.get() > counted_before)  # the abandoned request is still counted
    assert engine.stats().num_running == 0


def test_failure_after_the_stream_started_is_an_error_event(server):
    injector = server.runtime.engine.fault_injector
    injector.fail_request("fails-mid-stream", phase="decode")
    body = {"task_id": "task-0", "inputs": "x", "parameters": {"max_new_tokens": 8, "ignore_eos_token": True}}
    try:
        with server.client() as c, c.stream("POST", "/generate_stream", json=body,
                                            headers={"X-Request-Id": "fails-mid-stream"}) as r:
            assert r.status_code == 200
            events = sse_events(r)
    finally:
        injector.clear()
    assert "token" in events[0]
    assert events[-1]["error_type"] == "generation" and set(events[-1]) == {"error", "error_type"}


def test_openai_stream_failure_raises_in_the_openai_client(server):
    import openai

    injector = server.runtime.engine.fault_injector
    injector.fail_request("fails-openai", phase="decode")
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                           default_headers={"X-Request-Id": "fails-openai"}) as client:
            with pytest.raises(openai.APIError, match="injected"):
                list(client.completions.create(model="task-0", prompt="x", max_tokens=8, temperature=0,
                                               stream=True))
    finally:
        injector.clear()
