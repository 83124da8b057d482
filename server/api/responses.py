"""What a route documents besides success: `error_responses(...)` (or `generation_responses()`) as `responses=`.

    @router.get("/v1/usage", responses=error_responses(400, 401, 403, 422))
    @router.post("/generate", responses=generation_responses())  # 400 401 403 404 413 422 429 503, rate limited

List exactly the statuses the route can answer (schemathesis' status_code_conformance checks it), never 500.
Every error body is `ErrorOut`, request-validation 422s too: server/errors.py writes one shape for all.
FastAPI documents a 422 of its own `HTTPValidationError` shape on every route with parameters, so list 422 on
those as well: then the schema shows the body that is really sent.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorOut(BaseModel):
    """The body of every error response."""

    error: str = Field(description="What went wrong, for a person to read.",
                       examples=["task 'acme-x': not found in the store"])
    error_type: str = Field(description="The kind of error, for a program: validation, not_found, overloaded, ...",
                            examples=["not_found"])


# Generic on purpose: the same status means the same thing on every route.
DESCRIPTIONS: dict[int, str] = {
    400: "Malformed request: a body that cannot be parsed, or an invalid task id.",
    401: "Missing or unknown API key (only when the server has API keys).",
    403: "This API key may not use or change this task, or this route.",
    404: "Not found: no such task, model, file or job.",
    409: "The resource's state forbids this (for example, the job has already ended).",
    413: "The request body exceeds the server's limit.",
    415: "Unsupported Content-Type.",
    422: "Invalid request: a field, a limit (input or new tokens), or a task that does not fit the model.",
    429: "Too many requests: retry after `Retry-After` seconds.",
    503: "Not ready: the model is loading, or the server is shutting down.",
}

RETRY_AFTER_HEADER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                      "schema": {"type": "integer"}}}
WWW_AUTHENTICATE_HEADER = {"WWW-Authenticate": {"description": "The scheme to authenticate with: `Bearer`.",
                                                "schema": {"type": "string"}}}


def _limit(what: str) -> dict:
    return {"description": f"The tenant's {what} allowed per window.", "schema": {"type": "integer"}}


def _remaining(what: str) -> dict:
    return {"description": f"The {what} left in the current window.", "schema": {"type": "integer"}}


def _reset(what: str) -> dict:
    return {"description": f"Until the {what} budget is full again, as a duration such as `20ms`, `1s` or `6m0s`.",
            "schema": {"type": "string", "examples": ["20ms", "1s", "6m0s"]}}


# OpenAI's names, so its clients' backoff logic reads them.
RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests": _limit("requests"),
    "x-ratelimit-remaining-requests": _remaining("requests"),
    "x-ratelimit-reset-requests": _reset("requests"),
    "x-ratelimit-limit-tokens": _limit("tokens"),
    "x-ratelimit-remaining-tokens": _remaining("tokens"),
    "x-ratelimit-reset-tokens": _reset("tokens"),
}


def error_responses(*statuses: int, rate_limited: bool = False) -> dict[int, dict]:
    """`responses=` for a route: each status with its description and the `ErrorOut` body.

    A 429 documents `Retry-After`, a 401 `WWW-Authenticate`. `rate_limited=True` (routes behind the per-tenant
    rate limiter; needs 429) adds the `x-ratelimit-*` headers to the 429. A fresh dict on every call.
    """
    unknown = [s for s in statuses if s not in DESCRIPTIONS]
    if unknown:  # 500 among them: an unexpected error is never part of a route's contract
        raise ValueError(f"no description for status {unknown}; add one to DESCRIPTIONS")
    if rate_limited and 429 not in statuses:
        raise ValueError("rate_limited=True documents the headers of a 429: list 429 too")
    return {status: _response(status, rate_limited) for status in sorted(statuses)}


def _response(status: int, rate_limited: bool) -> dict:
    response: dict = {"model": ErrorOut, "description": DESCRIPTIONS[status]}
    if status == 429:
        response["headers"] = {**RETRY_AFTER_HEADER, **(RATE_LIMIT_HEADERS if rate_limited else {})}
    elif status == 401:
        response["headers"] = dict(WWW_AUTHENTICATE_HEADER)
    return response


# Every generation route (TGI's and OpenAI's): body parsing, auth and scope, the engine, the rate limiter.
GENERATION_STATUSES = (400, 401, 403, 404, 413, 422, 429, 503)


def generation_responses() -> dict[int, dict]:
    """`responses=` of a generation route: GENERATION_STATUSES, the rate-limit headers on its 429 and its 200."""
    # The 200 entry only adds headers: FastAPI merges it into the route's own success response.
    success = {"description": "Successful Response", "headers": dict(RATE_LIMIT_HEADERS)}
    return {200: success, **error_responses(*GENERATION_STATUSES, rate_limited=True)}
