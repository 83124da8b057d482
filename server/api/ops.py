"""Operations: /health (alive), /ready (model loaded, engine running), /metrics, /info."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.deps import get_runtime, get_tenant, require_admin
from server.api.responses import error_responses
from server.engine.errors import EngineStopped
from server.errors import error_response
from server.runtime import Runtime
from server.tenancy.tenant import Tenant

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict:
    """Alive: the process answers HTTP (no auth)."""
    return {"status": "ok"}


@router.get("/ready", responses=error_responses(503))
async def ready(request: Request) -> JSONResponse:
    """Ready: the model is loaded and the engine loop runs (503 otherwise; no auth)."""
    runtime = getattr(request.app.state, "runtime", None)
    if request.app.state.load_error:  # its kind only: the message names paths of this machine (the log has it)
        kind = request.app.state.load_error.partition(":")[0]
        return error_response(EngineStopped(f"not ready: loading the model failed ({kind}); see the server's log"))
    is_draining = getattr(request.app.state, "is_draining", False)
    if runtime is None or is_draining or not runtime.engine.stats().is_running:
        return error_response(EngineStopped("not ready: model loading, engine stopped or shutting down"))
    return JSONResponse({"status": "ready", "model": runtime.model_name})


@router.get("/metrics", responses=error_responses(401, 403))
async def metrics(request: Request, tenant: Tenant = Depends(require_admin)) -> Response:
    """Prometheus metrics (an admin key when keys are set); task labels only of tasks the key covers, the
    server-wide series only for an operator key."""
    body = request.app.state.metrics.render_for(tenant.may_use, tenant.may_read_usage_of, tenant.is_operator)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/info", dependencies=[Depends(get_tenant)], responses=error_responses(401, 503))
async def info(runtime: Runtime = Depends(get_runtime)) -> dict:
    """The served model and limits (like TGI's /info)."""
    s = runtime.settings
    engine = runtime.engine
    max_total = engine.config.max_total_tokens
    if engine.memory is not None:  # a request must fit in KV memory alone
        max_total = min(max_total, engine.memory.num_tokens)
    return {
        "model_id": runtime.model_name, "model_path": runtime.loaded.name, "device": str(runtime.loaded.device),
        "dtype": str(runtime.loaded.dtype).removeprefix("torch."), "hidden_size": runtime.loaded.hidden_size,
        "model_type": runtime.loaded.model.config.model_type, "task_type": runtime.loaded.task_type,
        "max_total_tokens": max_total, **engine.describe(),
        "max_batch_size": s.max_batch_size, "max_queue": s.max_queue, "max_input_tokens": s.max_input_tokens,
        "max_new_tokens": s.max_new_tokens, "max_virtual_tokens": s.max_virtual_tokens,
        "has_chat_template": runtime.has_chat_template,
    }
