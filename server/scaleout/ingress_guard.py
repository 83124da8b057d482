"""What the scale-out ingress checks before it forwards anything: the key (with keys set), the body's size
(read as it arrives, never past the route's limit), and which task id may steer routing. The replicas
check everything again, as a single server does; this keeps a client without a key, or with a huge or
hostile body, from costing the ingress memory or the router state it keeps per task."""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request

from prompt_store.task_ids import TASK_ID_PATTERN
from server.auth import KeyRing
from server.auth_first import OPEN_PATHS
from server.config import Settings
from server.errors import BodyTooLarge
from server.middleware import body_limits
from server.scaleout.routing import task_of
from server.tenancy.tenant import OPEN_TENANT, Tenant


class IngressGuard:
    """Built from the replicas' settings (the same keys file and body limits)."""

    def __init__(self, keyring: KeyRing | None, limit_for: Callable[[str, str], int]):
        self._keyring = keyring
        self._limit_for = limit_for

    @classmethod
    def from_settings(cls, values: dict) -> IngressGuard:
        settings = Settings(**values)
        return cls(KeyRing.from_file(settings.api_keys) if settings.api_keys else None, body_limits(settings))

    def tenant(self, request: Request) -> Tenant:
        """The caller (AuthError, a 401, without a valid key when keys are set; the probes are open)."""
        if self._keyring is None or request.url.path in OPEN_PATHS:
            return OPEN_TENANT
        return self._keyring.authenticate(request.headers.get("authorization"))

    async def body(self, request: Request) -> bytes:
        """The whole body, or BodyTooLarge (a 413) as soon as it passes the route's limit."""
        limit = self._limit_for(request.method, request.url.path)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            chunks.append(chunk)
        return b"".join(chunks)


def routing_task(tenant: Tenant, method: str, path: str, body: bytes) -> str:
    """The task id that may steer the request to a replica: a valid id this tenant may use, else "" (the
    replica answers the request with its 400 or 403; the router keeps no state for it)."""
    task_id = task_of(method, path, body)
    if not task_id or TASK_ID_PATTERN.fullmatch(task_id) is None or not tenant.may_use(task_id):
        return ""
    return task_id
