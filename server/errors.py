"""Every error the API returns, mapped to an HTTP status and an `error_type` in this one place.

Body: `{"error": "<message>", "error_type": "<type>"}`. The types of TGI ("validation", "overloaded",
"generation") are used where they fit, so TGI/LoRAX clients raise their matching exceptions.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompt_store.errors import InvalidPrompt, InvalidTaskId, TaskNotFound
from server.api_error import ApiError
from server.auth import AuthError, ForbiddenError
from server.engine.errors import EngineStopped, IncompatibleTask, InputTooLong, InvalidRequest, QueueFull, RequestFailed

log = logging.getLogger("promptserve.errors")

RETRY_AFTER_S = 1


class BodyTooLarge(StarletteHTTPException):
    """The request body exceeds the configured limit (HTTP 413).

    An HTTPException because FastAPI re-raises those from body parsing (others become a 400).
    """

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


@dataclass(frozen=True)
class ErrorSpec:
    """Status and error_type for one exception class."""

    status: int
    error_type: str


# Order matters only for subclasses; the first match wins.
_SPECS: tuple[tuple[type[BaseException], ErrorSpec], ...] = (
    (TaskNotFound, ErrorSpec(404, "not_found")),
    (InvalidTaskId, ErrorSpec(400, "invalid_task_id")),
    (InvalidPrompt, ErrorSpec(422, "invalid_adapter")),
    (InvalidRequest, ErrorSpec(422, "validation")),
    (InputTooLong, ErrorSpec(422, "validation")),
    (IncompatibleTask, ErrorSpec(422, "incompatible_task")),
    (QueueFull, ErrorSpec(429, "overloaded")),
    (EngineStopped, ErrorSpec(503, "unavailable")),
    (RequestFailed, ErrorSpec(500, "generation")),
    (AuthError, ErrorSpec(401, "unauthorized")),
    (ForbiddenError, ErrorSpec(403, "forbidden")),
)

# A full or read-only disk is the server's state, not a bug: 503, and the writer left nothing half-written.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})

_HTTP_TYPES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
               415: "unsupported_media_type"}


@dataclass(frozen=True)
class ErrorBody:
    """What to send for one exception."""

    status: int
    error_type: str
    message: str

    def json(self) -> dict:
        """The wire body."""
        return {"error": self.message, "error_type": self.error_type}


def describe(exc: BaseException) -> ErrorBody:
    """Status, type and message for any exception (unknown ones become a 500 without internals)."""
    if isinstance(exc, ApiError):
        return ErrorBody(exc.status, exc.error_type, str(exc))
    if isinstance(exc, RequestValidationError):
        return ErrorBody(422, "validation", _validation_message(exc))
    if isinstance(exc, StarletteHTTPException):
        return ErrorBody(exc.status_code, _HTTP_TYPES.get(exc.status_code, "http"), str(exc.detail))
    for cls, spec in _SPECS:
        if isinstance(exc, cls):
            return ErrorBody(spec.status, spec.error_type, str(exc) or cls.__name__)
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:  # without the path: the log has it
        return ErrorBody(503, "storage_unavailable", f"the server cannot write its storage "
                         f"({errno.errorcode.get(exc.errno, exc.errno)}: disk full or read-only); nothing was saved")
    return ErrorBody(500, "internal", "internal server error")


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON response for an exception, with Retry-After / WWW-Authenticate where they belong."""
    body = describe(exc)
    headers = dict(exc.headers) if isinstance(exc, ApiError) else {}
    if body.status == 429:
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    if body.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body.json(), status_code=body.status, headers=headers)


def stream_error(exc: BaseException) -> dict:
    """The body of an error event sent inside an already started stream (unexpected ones are logged)."""
    body = describe(exc)
    if body.error_type == "internal":
        log.error("unhandled error in a stream", exc_info=exc)
    return body.json()


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = err.get("msg", "invalid")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    body = describe(exc)
    if body.error_type == "storage_unavailable":
        log.error("cannot write: %s", exc)
    if body.status >= 500 and body.error_type == "internal":
        log.exception("unhandled error", extra={"request_id": getattr(request.state, "request_id", None)},
                      exc_info=exc)
    return error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception the app can raise through `error_response`."""
    # OSError by name: Starlette re-raises what only the `Exception` handler caught (after answering), which
    # drops the connection; a full disk is an answer (503), not a crash.
    for cls in (ApiError, RequestValidationError, StarletteHTTPException, OSError, Exception,
                *(c for c, _ in _SPECS)):
        app.add_exception_handler(cls, _handle)
