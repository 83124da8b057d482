"""Every error is JSON {"error", "error_type"} with the right status; bad input is never a 500."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from live_server_util import assert_error


def test_unknown_task_404_and_invalid_id_400(server):
    with server.client() as c:
        assert_error(c.post("/generate", json={"inputs": "x", "task_id": "nope"}), 404, "not_found")
        assert_error(c.post("/generate", json={"inputs": "x", "task_id": "../etc"}), 400, "invalid_task_id")
        assert_error(c.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "a/b"}}), 400)
        assert_error(c.get("/v1/tasks/nope"), 404, "not_found")
        assert_error(c.get("/v1/tasks/%2e%2e"), 400, "invalid_task_id")
        assert_error(c.delete("/v1/tasks/nope"), 404, "not_found")
        assert_error(c.get("/no/such/route"), 404, "not_found")
        assert_error(c.delete("/generate"), 405)


@pytest.mark.parametrize("body", [
    {},  # no inputs
    {"inputs": ""},
    {"inputs": 5},
    {"inputs": "x", "parameters": {"temperature": -1}},
    {"inputs": "x", "parameters": {"top_p": 1.5}},
    {"inputs": "x", "parameters": {"max_new_tokens": 0}},
    {"inputs": "x", "parameters": {"seed": -3}},
    {"inputs": "x", "parameters": {"best_of": 2}},
    {"inputs": "x", "parameters": {"watermark": True}},
    {"inputs": "x", "parameters": {"stop": [""]}},
    {"inputs": "x", "parameters": "not an object"},
    {"inputs": "x", "task_id": "task-1", "parameters": {"adapter_id": "task-2"}},
    [1, 2, 3],
])
def test_invalid_body_422(server, body):
    with server.client() as c:
        assert_error(c.post("/generate", json=body), 422, "validation")


def test_malformed_json_and_wrong_types_are_422_not_500(server):
    with server.client() as c:
        for raw in (b"{", b"\xff\xfe", b"null", b'{"inputs": "x", "parameters": {"top_k": "many"}}'):
            assert_error(c.post("/generate", content=raw, headers={"content-type": "application/json"}), 422)
        assert_error(c.post("/v1/completions", json={"model": "task-0"}), 422)
        assert_error(c.post("/v1/chat/completions", json={"model": "task-0", "messages": []}), 422)
        assert_error(c.put("/v1/tasks/x1", json={"init": "text", "num_virtual_tokens": 4}), 422)
        assert_error(c.put("/v1/tasks/x1", json={"init": "random", "num_virtual_tokens": 0}), 422)
        assert_error(c.put("/v1/tasks/x1", content=b"abc", headers={"content-type": "text/plain"}), 415)


def test_input_too_long_names_the_limit(tight_server):
    with tight_server.client() as c:
        body = assert_error(c.post("/generate", json={"inputs": "word " * 200, "task_id": "t1"}), 422, "validation")
        assert "16" in body["error"]  # max_input_tokens of the tight server
        body = assert_error(c.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 500}}), 422)
        assert "32" in body["error"]  # max_new_tokens


def test_body_too_large_413(tight_server):
    big = json.dumps({"inputs": "x" * 10_000}).encode()
    with tight_server.client() as c:
        assert_error(c.post("/generate", content=big, headers={"content-type": "application/json"}), 413,
                     "payload_too_large")

        def chunks():  # no Content-Length: counted as it arrives
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]
        assert_error(c.post("/generate", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_queue_full_429_with_retry_after(tight_server):
    engine = tight_server.runtime.engine
    gate, inside = threading.Event(), threading.Event()

    def hold(request_id, step, logits):  # stall the engine inside a step: one running, one waiting
        inside.set()
        gate.wait(30)

    async def scenario():
        async with httpx.AsyncClient(base_url=tight_server.url, timeout=60) as c:
            body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
            first = asyncio.ensure_future(c.post("/generate", json=body))
            await asyncio.to_thread(inside.wait, 30)
            second = asyncio.ensure_future(c.post("/generate", json=body))
            while engine.stats().num_waiting < 1:
                await asyncio.sleep(0.01)
            third = await c.post("/generate", json=body)
            gate.set()
            return third, await first, await second

    engine.logits_tap = hold
    try:
        third, first, second = asyncio.run(scenario())
    finally:
        engine.logits_tap = None
        gate.set()
    assert_error(third, 429, "overloaded")
    assert third.headers["retry-after"] == "1"
    assert first.status_code == 200 and second.status_code == 200


def test_failure_inside_the_engine_is_500_generation_and_isolated(server):
    injector = server.runtime.engine.fault_injector
    injector.fail_request("doomed-1")
    try:
        with server.client() as c:
            r = c.post("/generate", json={"inputs": "x", "task_id": "task-0"}, headers={"X-Request-Id": "doomed-1"})
            ok = c.post("/generate", json={"inputs": "x", "task_id": "task-0"})
    finally:
        injector.clear()
    assert_error(r, 500, "generation")
    assert r.headers["x-request-id"] == "doomed-1"
    assert ok.status_code == 200


GARBAGE = [b"", b"[]", b"{}", b'"text"', b'{"inputs": null}', b"[" * 5000 + b"]" * 5000,
           b'{"inputs": "x", "parameters": {"stop": "abc"}}',
           b'{"inputs": "x", "parameters": {"max_new_tokens": 1e308}}',
           b'{"inputs": "x", "parameters": {"seed": 99999999999999999999999}}',
           b'{"inputs": "x", "parameters": {"temperature": NaN}}',
           b'{"inputs": "\\u0000\\ud800", "task_id": "\\u0000"}',
           b'{"model": 5, "prompt": {"a": 1}, "messages": [{"role": "user", "content": 5}]}',
           b'{"model": "task-0", "messages": [{"role": "wizard", "content": "x"}]}',
           b'{"init": "random", "num_virtual_tokens": 100000}']


@pytest.mark.parametrize("method,path", [("POST", "/generate"), ("POST", "/generate_stream"), ("POST", "/"),
                                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                         ("PUT", "/v1/tasks/fuzz"), ("POST", "/tasks/task-0/generate")])
def test_garbage_is_never_a_500(server, method, path):
    with server.client() as c:
        for raw in GARBAGE:
            r = c.request(method, path, content=raw, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (raw[:60], r.status_code, r.text[:200])
            assert set(r.json()) == {"error", "error_type"}
