"""Fixtures for the loadtest tests: a small TGI-shaped stub server under a real uvicorn on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, PlainTextResponse, RedirectResponse, StreamingResponse


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class StubState:
    """What the stub does and what it saw."""

    mode: str = "ok"  # "ok" | "redirect" | "hang" | "stream_error" | "trickle"
    num_tokens: int = 3
    hits: dict[str, int] = field(default_factory=dict)
    task_ids: list[str] = field(default_factory=list)
    keys: Counter = field(default_factory=Counter)  # generation requests by bearer key ("" for none)
    rate_limited_keys: set[str] = field(default_factory=set)  # these keys get HTTP 429 on every generation


RATE_LIMIT_HEADERS = {"Retry-After": "1", "x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "0",
                      "x-ratelimit-reset-requests": "1"}


def rate_limited(state: StubState, request: Request) -> JSONResponse | None:
    """Count the request's key; a 429 (shaped like promptserve's) when that key is rate limited."""
    key = request.headers.get("authorization", "").removeprefix("Bearer ")
    state.keys[key] += 1
    if key not in state.rate_limited_keys:
        return None
    return JSONResponse({"error": "rate limit reached", "error_type": "rate_limited"}, status_code=429,
                        headers=RATE_LIMIT_HEADERS)


def stub_app(state: StubState) -> FastAPI:
    """/generate, /generate_stream, /metrics, /health and task admin, just enough to be loaded."""
    app = FastAPI()

    def count(route: str) -> None:
        state.hits[route] = state.hits.get(route, 0) + 1

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/generate")
    async def generate(request: Request):
        count("/generate")
        if (limited := rate_limited(state, request)) is not None:
            return limited
        body = await request.json()
        n = body["parameters"]["max_new_tokens"]
        return {"generated_text": "x" * n, "details": {"finish_reason": "length", "generated_tokens": n,
                                                       "prompt_tokens": 5}}

    @app.post("/generate_stream")
    async def generate_stream(request: Request):
        count("/generate_stream")
        if (limited := rate_limited(state, request)) is not None:
            return limited
        if state.mode == "redirect":
            return RedirectResponse("http://127.0.0.2:9/generate_stream", status_code=307)

        async def events():
            if state.mode == "hang":
                await asyncio.sleep(30)
            if state.mode == "trickle":  # a token every 0.1 s, for a long time: no read ever times out
                for i in range(600):
                    yield f"data: {json.dumps({'token': {'id': i, 'text': 'a', 'logprob': 0.0, 'special': False}})}\n\n"
                    await asyncio.sleep(0.1)
            for i in range(state.num_tokens):
                if state.mode == "stream_error" and i == 1:
                    yield f"data: {json.dumps({'error': 'boom', 'error_type': 'generation'})}\n\n"
                    return
                last = i == state.num_tokens - 1
                event = {"token": {"id": i, "text": "a", "logprob": -1.0, "special": False},
                         "generated_text": "a" * state.num_tokens if last else None,
                         "details": {"finish_reason": "length", "generated_tokens": state.num_tokens} if last else None}
                yield f"data: {json.dumps(event)}\n\n"
                await asyncio.sleep(0.001)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/metrics")
    async def metrics():
        lines = ["# TYPE stub_requests counter"]
        for route, n in state.hits.items():
            lines.append(f'stub_requests_total{{route="{route}",status="200"}} {n}')
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.put("/v1/tasks/{task_id}")
    async def put_task(task_id: str):
        state.task_ids.append(task_id)
        return JSONResponse({"id": task_id}, status_code=201)

    @app.delete("/v1/tasks/{task_id}")
    async def delete_task(task_id: str):
        state.task_ids.remove(task_id)
        return Response(status_code=204)

    return app


@pytest.fixture
def stub_server():
    """(base url, StubState) of a stub server running in a thread; stopped after the test."""
    state = StubState()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(stub_app(state), host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "stub server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=10)
