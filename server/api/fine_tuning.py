"""OpenAI's fine-tuning routes, so that `openai` clients work: a job trains a task's soft prompt on the
served model (server/training/) and publishes it to the store. Our own fields (`task_id`, `prompt_tuning`)
go in the body (`extra_body` in the Python client). Jobs are private to the tenant that made them (an admin
key too sees only its own); the training files are server/api/files.py's."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from prompt_store.task_ids import check_task_id
from server.api.deps import get_runtime, get_tenant
from server.api.responses import error_responses
from server.api.training_access import lookup, owned, public, training_of
from server.api_error import ApiError
from server.auth import ForbiddenError
from server.runtime import Runtime
from server.tenancy.tenant import Tenant
from server.training.prompt_trainer import Hyperparameters
from server.training.service import Training
from server.training.state import ACTIVE_STATUSES, new_job

router = APIRouter(tags=["fine-tuning"])
MAX_EPOCHS = 100
MAX_BATCH_SIZE = 256  # OpenAI's bound; a slice takes a few examples of a batch at a time either way
EVENT_POLL_S = 0.5


class PromptTuningSpec(BaseModel):
    """How the prompt starts: PEFT's PromptTuningInit."""

    num_virtual_tokens: int = Field(20, ge=1, le=512)
    init: Literal["random", "text", "sample_vocab"] = "random"
    init_text: str | None = Field(None, max_length=10_000)


class JobHyperparameters(BaseModel):
    """OpenAI's names; "auto" takes the default."""

    n_epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] | Literal["auto"] = "auto"
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] | Literal["auto"] = "auto"
    learning_rate: Annotated[float, Field(gt=0, le=10)] | Literal["auto"] = "auto"


class JobCreate(BaseModel):
    """POST /v1/fine_tuning/jobs."""

    training_file: str = Field(max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    model: str = Field(max_length=256)
    task_id: str = Field(min_length=1, max_length=128)
    hyperparameters: JobHyperparameters = JobHyperparameters()
    prompt_tuning: PromptTuningSpec = PromptTuningSpec()
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    suffix: str | None = Field(None, max_length=64)  # OpenAI's; the task id names the result here


@router.post("/v1/fine_tuning/jobs", responses=error_responses(400, 401, 403, 404, 413, 422, 429, 503))
async def create_job(body: JobCreate, request: Request, runtime: Runtime = Depends(get_runtime),
                     tenant: Tenant = Depends(get_tenant)) -> dict:
    """Queue a job that trains `task_id` (created, or replaced by a new version when it succeeds)."""
    training = training_of(request)
    if (lock_error := training.watcher.lock_error) is not None:
        raise ApiError(503, "unavailable", f"training jobs cannot run here: {lock_error}; mount the shared store "
                                           "with file locking (NFSv4, or v3 with lockd)")
    if body.model != runtime.model_name:
        raise ApiError(404, "model_not_found", f"model {body.model!r} is not served here; it is {runtime.model_name!r}")
    check_task_id(body.task_id)
    if not tenant.may_write(body.task_id):
        raise ForbiddenError(f"this API key may not write task {body.task_id!r}")
    spec = body.prompt_tuning
    if spec.init == "text" and not spec.init_text:
        raise ApiError(422, "invalid_request", "prompt_tuning.init 'text' needs prompt_tuning.init_text")
    files = [owned(lookup(training.state.file, f), tenant, "file", f)
             for f in (body.training_file, body.validation_file) if f is not None]
    for record in files:
        _check_positions(runtime, record, spec.num_virtual_tokens)
    hyper = _hyperparameters(body.hyperparameters, files[0]["num_examples"], runtime.settings.training_max_steps)
    job = new_job(model=body.model, task_id=body.task_id, training_file=body.training_file,
                  validation_file=body.validation_file, hyperparameters=hyper, prompt_tuning=spec.model_dump(),
                  seed=body.seed, tenant=tenant.name)
    async with training.tenant_lock:  # counted and saved with no other create of this server in between
        num_active = await asyncio.to_thread(_num_active, training, tenant.name)
        if num_active >= runtime.settings.training_max_jobs_per_tenant:
            raise ApiError(429, "rate_limited", f"this tenant already has {num_active} jobs queued or running "
                                                f"(limit {runtime.settings.training_max_jobs_per_tenant})")
        # The event before the record: the server that runs the job may be another one, and starts it on sight.
        await asyncio.to_thread(training.state.add_event, job["id"], f"job queued: task {body.task_id!r}")
        await asyncio.to_thread(training.state.save_job, job)
    training.runner.submit(job["id"])
    return public(job)


@router.get("/v1/fine_tuning/jobs", responses=error_responses(401, 422, 503))
async def list_jobs(request: Request, after: str | None = Query(None, max_length=64),
                    limit: int = Query(20, ge=1, le=100), tenant: Tenant = Depends(get_tenant)) -> dict:
    """Newest first, paged with `after` (a job id) and `limit`."""
    training = training_of(request)
    jobs = [_current(training, j) for j in await asyncio.to_thread(training.state.jobs) if j["tenant"] == tenant.name]
    if after is not None:
        ids = [j["id"] for j in jobs]
        jobs = jobs[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": [public(j) for j in jobs[:limit]], "has_more": len(jobs) > limit}


@router.get("/v1/fine_tuning/jobs/{job_id}", responses=error_responses(401, 404, 422, 503))
async def get_job(job_id: str, request: Request, tenant: Tenant = Depends(get_tenant)) -> dict:
    """The job, with its progress and losses as of the latest step."""
    training = training_of(request)
    return public(_current(training, owned(lookup(training.state.job, job_id), tenant, "fine-tuning job", job_id)))


@router.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=None,
            responses=error_responses(401, 404, 422, 429, 503))
async def job_events(job_id: str, request: Request, after: str | None = Query(None, max_length=64),
                     limit: int = Query(20, ge=1, le=1000), stream: bool = False,
                     tenant: Tenant = Depends(get_tenant)) -> dict | StreamingResponse:
    """Newest first, as OpenAI lists them. With `stream=true`: server-sent events, oldest first, as they
    happen, then `data: [DONE]` when the job has ended (a tenant keeps a few such streams open at most)."""
    training = training_of(request)
    owned(lookup(training.state.job, job_id), tenant, "fine-tuning job", job_id)
    if stream:
        if not training.may_open_stream(tenant.name):
            raise ApiError(429, "rate_limited", "too many event streams open: close one, or poll without stream")
        return StreamingResponse(_event_stream(training, job_id, tenant.name), media_type="text/event-stream")
    events = list(reversed(await asyncio.to_thread(training.state.events, job_id)))
    if after is not None:
        ids = [e["id"] for e in events]
        events = events[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": events[:limit], "has_more": len(events) > limit}


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", responses=error_responses(401, 404, 409, 422, 503))
async def cancel_job(job_id: str, request: Request, tenant: Tenant = Depends(get_tenant)) -> dict:
    """The job stops before its next step; its task is left as it was."""
    training = training_of(request)
    job = _current(training, owned(lookup(training.state.job, job_id), tenant, "fine-tuning job", job_id))
    if job["status"] not in ACTIVE_STATUSES:
        raise ApiError(409, "conflict", f"the job has already ended ({job['status']})")
    await asyncio.to_thread(training.runner.cancel, job_id)
    return public(job)


async def _event_stream(training: Training, job_id: str, tenant: str):
    # Counted here, not in the route: a generator that never starts never runs a `finally`.
    if not training.open_stream(tenant):
        yield f"data: {json.dumps({'error': 'too many event streams open', 'error_type': 'rate_limited'})}\n\n"
        return
    num_sent = 0
    try:
        while True:
            # The job before its events: an ended job's are all written.
            job = await asyncio.to_thread(lambda: _current(training, training.state.job(job_id) or {}))
            events = await asyncio.to_thread(training.state.events, job_id)
            for event in events[num_sent:]:
                yield f"data: {json.dumps(event)}\n\n"
            num_sent = len(events)
            if job.get("status") not in ACTIVE_STATUSES:
                yield "data: [DONE]\n\n"
                return
            await asyncio.sleep(EVENT_POLL_S)
    finally:
        training.close_stream(tenant)


def _current(training: Training, job: dict) -> dict:
    """The job as its runner sees it, if this server runs it (an ending the disk refused shows here)."""
    return (training.runner.live_view(job["id"]) if job else None) or job


def _num_active(training: Training, tenant: str) -> int:
    jobs = (_current(training, j) for j in training.state.jobs() if j["tenant"] == tenant)
    return sum(1 for j in jobs if j["status"] in ACTIVE_STATUSES)


def _check_positions(runtime: Runtime, record: dict, num_virtual_tokens: int) -> None:
    """The longest example behind the prompt must fit the model's position table (job_prep.py checks each)."""
    table = getattr(runtime.loaded, "max_positions", None)
    if table is None or "longest_input" not in record:
        return
    needed = num_virtual_tokens + record["longest_input"]
    if runtime.loaded.task_type == "SEQ_2_SEQ_LM":
        needed = max(needed, record["longest_labels"])
    if needed > table:
        raise ApiError(422, "invalid_request", f"file {record['id']}: its longest example needs {needed} positions "
                       f"with {num_virtual_tokens} virtual tokens; the model has {table}: use fewer virtual tokens "
                       "or shorter examples")


def _hyperparameters(given: JobHyperparameters, num_examples: int, max_steps: int) -> dict:
    default = Hyperparameters()
    hyper = {"n_epochs": default.n_epochs if given.n_epochs == "auto" else given.n_epochs,
             "batch_size": default.batch_size if given.batch_size == "auto" else given.batch_size,
             "learning_rate": default.learning_rate if given.learning_rate == "auto" else given.learning_rate}
    steps = hyper["n_epochs"] * math.ceil(num_examples / hyper["batch_size"])
    if steps > max_steps:
        raise ApiError(422, "invalid_request", f"the job would take {steps} steps; the limit is {max_steps}")
    return hyper
