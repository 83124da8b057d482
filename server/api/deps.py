"""Request dependencies shared by the routers: the runtime, the calling tenant, scope checks."""

from __future__ import annotations

from fastapi import Request

from prompt_store.task_ids import check_task_id
from server.auth import ForbiddenError
from server.auth_first import TENANT_STATE_KEY
from server.engine.errors import EngineStopped
from server.runtime import Runtime
from server.tenancy.tenant import OPEN_TENANT, Tenant


def get_runtime(request: Request) -> Runtime:
    """The loaded model, store and engine; 503 while the server is still starting or stopping."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None or getattr(request.app.state, "is_draining", False):
        raise EngineStopped("the server is not ready (model loading or shutting down)")
    return runtime


def get_tenant(request: Request) -> Tenant:
    """The caller's tenant from `Authorization: Bearer <key>` (everyone is admin when no keys are set)."""
    keyring = request.app.state.keyring
    tenant = request.scope.get("state", {}).get(TENANT_STATE_KEY)  # AuthFirstMiddleware's, before the body
    if tenant is None:
        tenant = OPEN_TENANT if keyring is None else keyring.authenticate(request.headers.get("authorization"))
    request.state.tenant = tenant.name  # for the access log
    return tenant


def require_admin(request: Request) -> Tenant:
    """A tenant with the admin flag, else 403."""
    tenant = get_tenant(request)
    if not tenant.is_admin:
        raise ForbiddenError("this API key may not administer tasks")
    return tenant


def check_use(request: Request, tenant: Tenant, task_id: str | None) -> None:
    """403 unless the tenant may run or read `task_id` (checked before the store is asked: no leaks). The id is
    checked first (400): only a valid id reaches the access log, the meters or an error message."""
    if task_id is not None:
        check_task_id(task_id)
    request.state.task_id = task_id
    if not tenant.may_use(task_id):
        what = "the base model" if task_id is None else f"task {task_id!r}"
        raise ForbiddenError(f"{what} is not available to this API key")


def check_write(request: Request, tenant: Tenant, task_id: str) -> None:
    """403 unless the tenant is an admin whose patterns cover `task_id` (a valid id: 400 before)."""
    check_task_id(task_id)
    request.state.task_id = task_id
    if not tenant.may_write(task_id):
        raise ForbiddenError(f"this API key may not write task {task_id!r}")
