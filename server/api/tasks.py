"""Task admin API: list, show, create/replace (PEFT upload or init), delete."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompt_store.errors import TaskNotFound
from server.api.deps import check_use, check_write, get_runtime, get_tenant
from server.api.responses import error_responses
from server.api_error import ApiError
from server.runtime import Runtime
from server.schemas import TaskInit, TaskList, TaskOut
from server.tenancy.tenant import Tenant

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

CONFIG_FIELDS = ("config", "adapter_config", "adapter_config.json")
WEIGHTS_FIELDS = ("weights", "adapter_model", "adapter_model.safetensors", "adapter_model.bin")


def task_out(info) -> TaskOut:
    """The wire shape of a store TaskInfo."""
    return TaskOut(id=info.task_id, version=info.version, num_virtual_tokens=info.num_virtual_tokens,
                   task_type=info.task_type, num_bytes=info.num_bytes, created=info.created,
                   modified=info.modified, error=getattr(info, "error", None))


@router.get("", response_model=TaskList, responses=error_responses(401, 422, 503))
async def list_tasks(request: Request, limit: int = Query(1000, ge=1, le=100_000), offset: int = Query(0, ge=0),
                     prefix: str = Query("", max_length=128), runtime: Runtime = Depends(get_runtime),
                     tenant: Tenant = Depends(get_tenant)) -> TaskList:
    """The tasks this key may use, sorted by id, paged with limit/offset, filtered by id prefix."""
    infos = await asyncio.to_thread(runtime.store.list)
    visible = sorted((i for i in infos if i.task_id.startswith(prefix) and tenant.may_use(i.task_id)),
                     key=lambda i: i.task_id)
    return TaskList(tasks=[task_out(i) for i in visible[offset:offset + limit]], total=len(visible))


@router.get("/{task_id}", response_model=TaskOut, responses=error_responses(400, 401, 403, 404, 422, 503))
async def get_task(task_id: str, request: Request, runtime: Runtime = Depends(get_runtime),
                   tenant: Tenant = Depends(get_tenant)) -> TaskOut:
    """One task's metadata."""
    check_use(request, tenant, task_id)
    return task_out(await asyncio.to_thread(runtime.store.info, task_id))


@router.put("/{task_id}", response_model=TaskOut,
            responses={201: {"model": TaskOut}, **error_responses(400, 401, 403, 413, 415, 422, 503)})
async def put_task(task_id: str, request: Request, runtime: Runtime = Depends(get_runtime),
                   tenant: Tenant = Depends(get_tenant)) -> JSONResponse:
    """Create or replace a task: multipart PEFT files (`config`, `weights`), or JSON `TaskInit`."""
    check_write(request, tenant, task_id)
    is_new = not await asyncio.to_thread(_exists, runtime, task_id)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        await _upload(request, runtime, task_id)
    elif content_type.startswith("application/json"):
        spec = _parse_init(await request.body())
        _check_size(runtime, spec)  # before anything is allocated for it
        await asyncio.to_thread(_init, runtime, task_id, spec)
    else:
        raise ApiError(415, "unsupported_media_type",
                       "send multipart/form-data (fields 'config', 'weights') or application/json")
    runtime.engine.forget_task(task_id)  # a replaced task's cached virtual-token KV is stale
    info = await asyncio.to_thread(runtime.store.info, task_id)
    return JSONResponse(task_out(info).model_dump(), status_code=201 if is_new else 200)


@router.delete("/{task_id}", status_code=204, responses=error_responses(400, 401, 403, 404, 422, 503))
async def delete_task(task_id: str, request: Request, runtime: Runtime = Depends(get_runtime),
                      tenant: Tenant = Depends(get_tenant)) -> Response:
    """Delete a task (404 if it does not exist); its /metrics series and cached KV go with it."""
    check_write(request, tenant, task_id)
    await asyncio.to_thread(runtime.store.delete, task_id)  # TaskNotFound -> 404
    request.app.state.metrics.forget_task(task_id)
    runtime.engine.forget_task(task_id)
    return Response(status_code=204)


def _exists(runtime: Runtime, task_id: str) -> bool:
    try:
        runtime.store.info(task_id)
        return True
    except TaskNotFound:
        return False


def _parse_init(body: bytes) -> TaskInit:
    try:
        return TaskInit.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None


def _check_size(runtime: Runtime, spec: TaskInit) -> None:
    limit = runtime.store.limits.max_virtual_tokens
    if spec.num_virtual_tokens > limit:
        raise ApiError(422, "validation", f"num_virtual_tokens {spec.num_virtual_tokens} is more than this server's "
                                          f"limit of {limit} (--max-virtual-tokens)")


def _init(runtime: Runtime, task_id: str, spec: TaskInit) -> None:
    """A new prompt of the served model's task type (CAUSAL_LM, or SEQ_2_SEQ_LM on an encoder-decoder)."""
    common = {"num_virtual_tokens": spec.num_virtual_tokens, "task_type": runtime.loaded.task_type}
    if spec.init == "text":
        runtime.store.create_text(task_id, spec.text, tokenizer=runtime.tokenizer,
                                  word_embeddings=runtime.word_embeddings(), **common)
    elif spec.init == "random":
        runtime.store.create_random(task_id, seed=spec.seed, **common)
    else:
        runtime.store.create_sample_vocab(task_id, word_embeddings=runtime.word_embeddings(), seed=spec.seed,
                                          **common)


async def _upload(request: Request, runtime: Runtime, task_id: str) -> None:
    # The body size is already bounded by BodyLimitMiddleware (max_upload_bytes).
    try:
        form = await request.form(max_files=2, max_fields=4)
    except StarletteHTTPException as e:
        if e.status_code != 400:  # 413 from the body limit stays a 413
            raise
        raise ApiError(422, "validation", f"malformed multipart body: {e.detail}") from None
    try:
        config = _one_file(form, CONFIG_FIELDS, "config")
        weights = _one_file(form, WEIGHTS_FIELDS, "weights")
        config_bytes, weights_bytes = await config.read(), await weights.read()
        name = "adapter_model.bin" if (weights.filename or "").endswith(".bin") else "adapter_model.safetensors"
    finally:
        await form.close()
    # The store validates everything (JSON, tensor, shape, finiteness) before it writes anything.
    await asyncio.to_thread(runtime.store.put_adapter_files, task_id, config_bytes, weights_bytes,
                            weights_filename=name)


def _one_file(form, names: tuple[str, ...], label: str) -> UploadFile:
    found = [form[n] for n in names if n in form and isinstance(form[n], UploadFile)]
    if len(found) != 1:
        raise RequestValidationError([{"loc": ("body", label), "type": "missing",
                                       "msg": f"exactly one file field among {', '.join(names)}"}])
    return found[0]
