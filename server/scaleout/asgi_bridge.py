"""One HTTP request through an ASGI app in this process, its response as a stream of parts.

A replica runs the full promptserve app (every route, auth, error, SSE) and the ingress forwards requests
to it as plain records. httpx's ASGI transport would buffer a whole response (no SSE), so this drives the
app directly: the parts are a ResponseStart (status, headers and the first body chunk: a whole answer
when it is one chunk, as every JSON answer is), then each further body chunk as the app sends it, and,
wherever it happens, EngineStarted when the engine admits the request (before it, a retry elsewhere is
safe). Each part is one message through Ray, so the start waits for the first chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from server.api.generation import ENGINE_START_EXTENSION


@dataclass
class RequestRecord:
    """What the ingress forwards: enough to rebuild the HTTP request."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None


@dataclass
class ResponseStart:
    """The first part of a forwarded response."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""  # the first chunk
    is_complete: bool = False  # no chunk follows


@dataclass
class EngineStarted:
    """The engine has admitted the request (sent at most once, before or among the body chunks)."""


async def forward(app: Any, record: RequestRecord) -> AsyncIterator[ResponseStart | EngineStarted | bytes]:
    """Run `record` through `app`; yields ResponseStart, then body chunks as they are sent, with
    EngineStarted where the engine admitted the request."""
    parts: asyncio.Queue = asyncio.Queue()
    is_started = False

    def on_engine_start() -> None:
        nonlocal is_started
        if not is_started:  # once, even for several completions (OpenAI n)
            is_started = True
            parts.put_nowait({"type": "promptserve.engine_start"})

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": record.method,
             "scheme": "http", "path": record.path, "raw_path": record.path.encode(), "query_string": record.query,
             "headers": record.headers, "client": record.client, "server": ("127.0.0.1", 0), "root_path": "",
             "extensions": {ENGINE_START_EXTENSION: on_engine_start}}
    body_sent = False
    disconnected = asyncio.Event()

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": record.body, "more_body": False}
        await disconnected.wait()  # the caller went away (the ingress cancelled this generator)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await parts.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await parts.put(None)

    task = asyncio.create_task(run())
    start: ResponseStart | None = None  # held until the first body chunk
    try:
        while (message := await parts.get()) is not None:
            if message["type"] == "promptserve.engine_start":
                yield EngineStarted()
            elif message["type"] == "http.response.start":
                start = ResponseStart(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body" and start is not None:
                start.body, start.is_complete = message.get("body", b""), not message.get("more_body", False)
                yield start
                start = None
            elif message["type"] == "http.response.body" and message.get("body"):
                yield message["body"]
        if start is not None:
            start.is_complete = True
            yield start
        await task  # re-raise what the app raised, if anything
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
