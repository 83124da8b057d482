"""OpenAI's files routes (training data for fine-tuning jobs): upload, list, show, delete. Each tenant keeps
at most --training-max-files-per-tenant files and --training-max-bytes-per-tenant bytes; a file expires
after --training-file-ttl-s (`expires_at`). Uploads are checked line by line on the training service's own
small pool, never on the pool that serves requests."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from server.api.deps import get_runtime, get_tenant
from server.api.responses import error_responses
from server.api.training_access import lookup, owned, public, training_of
from server.api_error import ApiError
from server.runtime import Runtime
from server.tenancy.tenant import Tenant
from server.training.examples import ExampleError, ExampleLimits, longest, read_jsonl

router = APIRouter(tags=["fine-tuning"])


@router.post("/v1/files", responses=error_responses(400, 401, 413, 422, 429, 503))
async def upload_file(request: Request, purpose: str = Form(..., max_length=64), file: UploadFile = File(...),
                      runtime: Runtime = Depends(get_runtime), tenant: Tenant = Depends(get_tenant)) -> dict:
    """A JSONL training file; every line is checked now (422 naming the first bad line)."""
    training = training_of(request)
    if purpose != "fine-tune":
        raise ApiError(422, "invalid_request", f"purpose must be 'fine-tune', not {purpose[:64]!r}")
    data = await file.read()
    settings = runtime.settings
    if len(data) > settings.training_max_file_bytes:
        raise ApiError(413, "payload_too_large", f"the file is {len(data)} bytes; the limit is "
                                                 f"{settings.training_max_file_bytes}")
    counts = await asyncio.get_running_loop().run_in_executor(training.checker, _check_examples, runtime, data)
    async with training.tenant_lock:  # counted and saved with no other upload of this server in between
        mine = [f for f in await asyncio.to_thread(training.state.files) if f["tenant"] == tenant.name]
        _check_quota(runtime, mine, len(data))
        record = await asyncio.to_thread(training.state.add_file, data, filename=(file.filename or "train.jsonl")[:256],
                                         purpose=purpose, tenant=tenant.name, counts=counts,
                                         ttl_s=settings.training_file_ttl_s)
    return public(record)


@router.get("/v1/files", responses=error_responses(401, 503))
async def list_files(request: Request, tenant: Tenant = Depends(get_tenant)) -> dict:
    training = training_of(request)
    files = await asyncio.to_thread(training.state.files)
    return {"object": "list", "data": [public(f) for f in files if f["tenant"] == tenant.name]}


@router.get("/v1/files/{file_id}", responses=error_responses(401, 404, 422, 503))
async def get_file(file_id: str, request: Request, tenant: Tenant = Depends(get_tenant)) -> dict:
    state = training_of(request).state
    return public(owned(lookup(state.file, file_id), tenant, "file", file_id))


@router.delete("/v1/files/{file_id}", responses=error_responses(401, 404, 422, 503))
async def delete_file(file_id: str, request: Request, tenant: Tenant = Depends(get_tenant)) -> dict:
    state = training_of(request).state
    owned(lookup(state.file, file_id), tenant, "file", file_id)
    await asyncio.to_thread(state.delete_file, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


def _check_quota(runtime: Runtime, mine: list[dict], num_bytes: int) -> None:
    settings = runtime.settings
    if len(mine) >= settings.training_max_files_per_tenant:
        raise ApiError(429, "quota_exceeded", f"this tenant already keeps {len(mine)} files (limit "
                       f"{settings.training_max_files_per_tenant}); delete some first")
    kept = sum(f["bytes"] for f in mine)
    if kept + num_bytes > settings.training_max_bytes_per_tenant:
        raise ApiError(429, "quota_exceeded", f"this tenant keeps {kept} bytes of files; {num_bytes} more would "
                       f"pass its limit of {settings.training_max_bytes_per_tenant}; delete some first")


def _check_examples(runtime: Runtime, data: bytes) -> dict:
    """The file's counts (longest() of its examples), or a 422 naming its first bad line. A causal example
    must fit the model's position table with at least one virtual token."""
    settings = runtime.settings
    max_tokens = settings.training_max_tokens_per_example
    max_positions = getattr(runtime.loaded, "max_positions", None)
    is_seq2seq = runtime.loaded.task_type == "SEQ_2_SEQ_LM"
    if max_positions is not None and not is_seq2seq:  # seq2seq: input and labels fit apart (job_prep.py checks)
        max_tokens = min(max_tokens, max_positions - 1)
    limits = ExampleLimits(max_examples=settings.training_max_examples, max_tokens_per_example=max_tokens)
    try:
        return longest(read_jsonl(data, runtime.tokenizer, is_encoder_decoder=is_seq2seq, limits=limits))
    except ExampleError as exc:
        raise ApiError(422, "invalid_training_file", str(exc)) from None
    except UnicodeDecodeError:
        raise ApiError(422, "invalid_training_file", "the file is not UTF-8 text") from None
