"""AuthFirstMiddleware: with API keys set, a request's key is checked before anything reads its body.

FastAPI parses a route's body (a JSON model, a multipart form spooled to disk) before it solves the route's
dependencies, so a `Depends(get_tenant)` alone comes after a client without a key has sent its 50 MiB. Here
the 401 is sent on the headers alone. The tenant found is kept in the scope's state for `get_tenant`. The
interactive docs and the OpenAPI schema need a key too; only the probes (/health, /ready) are open.
"""

from __future__ import annotations

from collections.abc import Callable

from server.auth import AuthError, KeyRing
from server.errors import error_response

OPEN_PATHS = frozenset({"/health", "/ready"})
TENANT_STATE_KEY = "auth_tenant"


class AuthFirstMiddleware:
    """Plain ASGI, inside the access log (a 401 is logged) and outside the body limit."""

    def __init__(self, app, keyring_of: Callable[[], KeyRing | None]):
        self.app = app
        self.keyring_of = keyring_of  # the app's keyring (None: no keys, everyone may call)

    async def __call__(self, scope, receive, send):
        keyring = self.keyring_of()
        if scope["type"] != "http" or keyring is None or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        try:
            tenant = keyring.authenticate(_header(scope, b"authorization"))
        except AuthError as exc:
            return await error_response(exc)(scope, receive, send)
        state = scope.setdefault("state", {})
        state[TENANT_STATE_KEY] = tenant
        state["tenant"] = tenant.name  # for the access log
        await self.app(scope, receive, send)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None
