"""ApiError: an error that carries its own HTTP status, `error_type` and headers.

Raised by the HTTP layer and by the tenancy gate (a 429 with its x-ratelimit-* headers); errors.py sends
it as it is. It imports nothing of the server, so any layer below the API may raise it.
"""

from __future__ import annotations


class ApiError(Exception):
    """An error raised by the HTTP layer itself, with its status and type."""

    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.headers: dict[str, str] = {}  # sent with the error (a 429's Retry-After and x-ratelimit-*)
