"""Plain ASGI middleware: request ids + structured access log + request counts, and body size limits.

Plain ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched and a client's
disconnect still reaches the handler.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from server.errors import BodyTooLarge, error_response

access_log = logging.getLogger("promptserve.access")

MAX_LOGGED_PATH = 256  # a path is the client's: a megabyte of it is not written to the log
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class AccessLogMiddleware:
    """Gives each request an id (X-Request-Id, echoed back), logs one JSON line, counts it in metrics."""

    def __init__(self, app, on_finish: Callable[[str, str, int], None] | None = None):
        self.app = app
        self.on_finish = on_finish  # (route template, method, status) -> None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = {"code": 500}
        started = time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                extra = [(b"x-request-id", request_id.encode())]
                if message["status"] < 400:  # a 429 carries its own; set by generation.submit
                    extra += [(k.encode(), v.encode()) for k, v in state.get("ratelimit_headers", {}).items()]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._finish(scope, state, status["code"], time.perf_counter() - started)

    def _finish(self, scope, state: dict, status: int, elapsed_s: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        if self.on_finish is not None:
            self.on_finish(template, scope["method"], status)
        # Only the path: never headers (keys) or query strings. Bodies are never logged.
        record = {
            "request_id": state.get("request_id"), "method": scope["method"], "path": scope["path"][:MAX_LOGGED_PATH],
            "status": status, "duration_ms": round(elapsed_s * 1000, 2), "tenant": state.get("tenant"),
            "task_id": state.get("task_id"), "client": (scope.get("client") or ("", 0))[0],
        }
        access_log.info(json.dumps(record, separators=(",", ":")))


def _incoming_request_id(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _REQUEST_ID_OK.match(text) else None  # never echo arbitrary bytes
    return None


class BodyLimitMiddleware:
    """Refuses bodies above a limit with 413, by Content-Length up front or by counting as they arrive."""

    def __init__(self, app, limit_for: Callable[[str, str], int]):
        self.app = app
        self.limit_for = limit_for  # (method, path) -> max bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return await error_response(BodyTooLarge(limit))(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)  # surfaces in the handler that reads the body -> 413
            return message

        await self.app(scope, counting_receive, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def body_limits(settings) -> Callable[[str, str], int]:
    """(method, path) -> the largest body that route takes (here and at the scale-out ingress)."""
    def limit_for(method: str, path: str) -> int:
        if method == "PUT" and path.startswith("/v1/tasks/"):
            return settings.max_upload_bytes
        if method == "POST" and path == "/v1/files":
            return settings.training_max_file_bytes + 64 * 1024  # the file, plus the form around it
        return settings.max_body_bytes
    return limit_for
