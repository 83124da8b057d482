"""OpenAI's files and fine-tuning routes, so that `openai` clients work: a job trains a task's soft prompt
on the served model (server/training/) and publishes it to the store. Our own fields (`task_id`,
`prompt_tuning`) go in the body (`extra_body` in the Python client). Files and jobs are private to the
tenant that made them (an admin key too sees only its own)."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from prompt_store.task_ids import check_task_id
from server.api.deps import get_runtime, get_tenant
from server.api.responses import error_responses
from server.auth import ForbiddenError, Tenant
from server.errors import ApiError
from server.runtime import Runtime
from server.training.examples import ExampleError, ExampleLimits, read_jsonl
from server.training.prompt_trainer import Hyperparameters
from server.training.state import ACTIVE_STATUSES, new_job

router = APIRouter(tags=["fine-tuning"])
MAX_EPOCHS = 100
EVENT_POLL_S = 0.5


class PromptTuningSpec(BaseModel):
    """How the prompt starts: PEFT's PromptTuningInit."""

    num_virtual_tokens: int = Field(20, ge=1, le=512)
    init: Literal["random", "text", "sample_vocab"] = "random"
    init_text: str | None = Field(None, max_length=10_000)


class JobHyperparameters(BaseModel):
    """OpenAI's names; "auto" takes the default."""

    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate: float | Literal["auto"] = "auto"


class JobCreate(BaseModel):
    """POST /v1/fine_tuning/jobs."""

    training_file: str
    validation_file: str | None = None
    model: str
    task_id: str = Field(min_length=1, max_length=128)
    hyperparameters: JobHyperparameters = JobHyperparameters()
    prompt_tuning: PromptTuningSpec = PromptTuningSpec()
    seed: int | None = None
    suffix: str | None = None  # OpenAI's; the task id names the result here


def _training(request: Request):
    """(state, runner) of this server; with a shared store, jobs made here may run on another server."""
    get_runtime(request)  # 503 while loading or draining
    training = request.app.state.training
    return training.state, training.runner


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("tenant", "num_examples")}


def _owned(record: dict | None, tenant: Tenant, what: str, ident: str) -> dict:
    if record is None or record["tenant"] != tenant.name:
        raise ApiError(404, "not_found", f"no {what} {ident!r}")
    return record


@router.post("/v1/files", responses=error_responses(400, 401, 413, 422, 503))
async def upload_file(request: Request, purpose: str = Form(...), file: UploadFile = File(...),
                      runtime: Runtime = Depends(get_runtime), tenant: Tenant = Depends(get_tenant)) -> dict:
    """A JSONL training file; every line is checked now (422 naming the first bad line)."""
    state, _ = _training(request)
    if purpose != "fine-tune":
        raise ApiError(422, "invalid_request", f"purpose must be 'fine-tune', not {purpose!r}")
    data = await file.read()
    settings = runtime.settings
    if len(data) > settings.training_max_file_bytes:
        raise ApiError(413, "payload_too_large", f"the file is {len(data)} bytes; the limit is "
                                                 f"{settings.training_max_file_bytes}")
    examples = await asyncio.to_thread(_check_examples, runtime, data)
    record = await asyncio.to_thread(state.add_file, data, filename=file.filename or "train.jsonl", purpose=purpose,
                                     tenant=tenant.name, num_examples=len(examples))
    return _public(record)


@router.get("/v1/files", responses=error_responses(401, 503))
async def list_files(request: Request, tenant: Tenant = Depends(get_tenant)) -> dict:
    state, _ = _training(request)
    files = await asyncio.to_thread(state.files)
    return {"object": "list", "data": [_public(f) for f in files if f["tenant"] == tenant.name]}


@router.get("/v1/files/{file_id}", responses=error_responses(401, 404, 422, 503))
async def get_file(file_id: str, request: Request, tenant: Tenant = Depends(get_tenant)) -> dict:
    state, _ = _training(request)
    return _public(_owned(_lookup(state.file, file_id), tenant, "file", file_id))


@router.delete("/v1/files/{file_id}", responses=error_responses(401, 404, 422, 503))
async def delete_file(file_id: str, request: Request, tenant: Tenant = Depends(get_tenant)) -> dict:
    state, _ = _training(request)
    _owned(_lookup(state.file, file_id), tenant, "file", file_id)
    await asyncio.to_thread(state.delete_file, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.post("/v1/fine_tuning/jobs", responses=error_responses(400, 401, 403, 404, 413, 422, 429, 503))
async def create_job(body: JobCreate, request: Request, runtime: Runtime = Depends(get_runtime),
                     tenant: Tenant = Depends(get_tenant)) -> dict:
    """Queue a job that trains `task_id` (created, or replaced by a new version when it succeeds)."""
    state, runner = _training(request)
    if (lock_error := request.app.state.training.watcher.lock_error) is not None:
        raise ApiError(503, "unavailable", f"training jobs cannot run here: {lock_error}; mount the shared store "
                                           "with file locking (NFSv4, or v3 with lockd)")
    if body.model != runtime.model_name:
        raise ApiError(404, "model_not_found", f"model {body.model!r} is not served here; it is {runtime.model_name!r}")
    check_task_id(body.task_id)
    if not tenant.may_write(body.task_id):
        raise ForbiddenError(f"this API key may not write task {body.task_id!r}")
    if body.prompt_tuning.init == "text" and not body.prompt_tuning.init_text:
        raise ApiError(422, "invalid_request", "prompt_tuning.init 'text' needs prompt_tuning.init_text")
    training = _owned(_lookup(state.file, body.training_file), tenant, "file", body.training_file)
    if body.validation_file is not None:
        _owned(_lookup(state.file, body.validation_file), tenant, "file", body.validation_file)
    hyper = _hyperparameters(body.hyperparameters, training["num_examples"], runtime.settings.training_max_steps)
    mine = [j for j in await asyncio.to_thread(state.jobs)
            if j["tenant"] == tenant.name and j["status"] in ACTIVE_STATUSES]
    if len(mine) >= runtime.settings.training_max_jobs_per_tenant:
        raise ApiError(429, "rate_limited", f"this tenant already has {len(mine)} jobs queued or running "
                                            f"(limit {runtime.settings.training_max_jobs_per_tenant})")
    job = new_job(model=body.model, task_id=body.task_id, training_file=body.training_file,
                  validation_file=body.validation_file, hyperparameters=hyper,
                  prompt_tuning=body.prompt_tuning.model_dump(), seed=body.seed, tenant=tenant.name)
    # The event before the record: the server that runs the job may be another one, and starts it on sight.
    await asyncio.to_thread(state.add_event, job["id"], f"job queued: task {body.task_id!r}")
    await asyncio.to_thread(state.save_job, job)
    runner.submit(job["id"])
    return _public(job)


@router.get("/v1/fine_tuning/jobs", responses=error_responses(401, 422, 503))
async def list_jobs(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                    tenant: Tenant = Depends(get_tenant)) -> dict:
    """Newest first, paged with `after` (a job id) and `limit`."""
    state, _ = _training(request)
    jobs = [j for j in await asyncio.to_thread(state.jobs) if j["tenant"] == tenant.name]
    if after is not None:
        ids = [j["id"] for j in jobs]
        jobs = jobs[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": [_public(j) for j in jobs[:limit]], "has_more": len(jobs) > limit}


@router.get("/v1/fine_tuning/jobs/{job_id}", responses=error_responses(401, 404, 422, 503))
async def get_job(job_id: str, request: Request, tenant: Tenant = Depends(get_tenant)) -> dict:
    """The job, with its progress and losses as of the latest step."""
    state, runner = _training(request)
    job = _owned(_lookup(state.job, job_id), tenant, "fine-tuning job", job_id)
    return _public(runner.live_view(job_id) or job)


@router.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=None,
            responses=error_responses(401, 404, 422, 503))
async def job_events(job_id: str, request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=1000),
                     stream: bool = False, tenant: Tenant = Depends(get_tenant)) -> dict | StreamingResponse:
    """Newest first, as OpenAI lists them. With `stream=true`: server-sent events, oldest first, as they
    happen, then `data: [DONE]` when the job has ended."""
    state, _ = _training(request)
    _owned(_lookup(state.job, job_id), tenant, "fine-tuning job", job_id)
    if stream:
        return StreamingResponse(_event_stream(state, job_id), media_type="text/event-stream")
    events = list(reversed(await asyncio.to_thread(state.events, job_id)))
    if after is not None:
        ids = [e["id"] for e in events]
        events = events[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": events[:limit], "has_more": len(events) > limit}


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", responses=error_responses(401, 404, 409, 422, 503))
async def cancel_job(job_id: str, request: Request, tenant: Tenant = Depends(get_tenant)) -> dict:
    """The job stops before its next step; its task is left as it was."""
    state, runner = _training(request)
    job = _owned(_lookup(state.job, job_id), tenant, "fine-tuning job", job_id)
    if job["status"] not in ACTIVE_STATUSES:
        raise ApiError(409, "conflict", f"the job has already ended ({job['status']})")
    await asyncio.to_thread(runner.cancel, job_id)
    return _public(job)


async def _event_stream(state, job_id: str):
    num_sent = 0
    while True:
        job = await asyncio.to_thread(state.job, job_id)  # read before the events: an ended job's are all written
        events = await asyncio.to_thread(state.events, job_id)
        for event in events[num_sent:]:
            yield f"data: {json.dumps(event)}\n\n"
        num_sent = len(events)
        if job is None or job["status"] not in ACTIVE_STATUSES:
            yield "data: [DONE]\n\n"
            return
        await asyncio.sleep(EVENT_POLL_S)


def _lookup(read, ident: str):
    try:
        return read(ident)
    except KeyError:
        return None


def _check_examples(runtime: Runtime, data: bytes) -> list:
    settings = runtime.settings
    limits = ExampleLimits(max_examples=settings.training_max_examples,
                           max_tokens_per_example=settings.training_max_tokens_per_example)
    try:
        return read_jsonl(data, runtime.tokenizer, is_encoder_decoder=runtime.loaded.task_type == "SEQ_2_SEQ_LM",
                          limits=limits)
    except ExampleError as exc:
        raise ApiError(422, "invalid_training_file", str(exc)) from None
    except UnicodeDecodeError:
        raise ApiError(422, "invalid_training_file", "the file is not UTF-8 text") from None


def _hyperparameters(given: JobHyperparameters, num_examples: int, max_steps: int) -> dict:
    default = Hyperparameters()
    hyper = {"n_epochs": default.n_epochs if given.n_epochs == "auto" else given.n_epochs,
             "batch_size": default.batch_size if given.batch_size == "auto" else given.batch_size,
             "learning_rate": default.learning_rate if given.learning_rate == "auto" else given.learning_rate}
    if not 1 <= hyper["n_epochs"] <= MAX_EPOCHS or hyper["batch_size"] < 1 or not 0 < hyper["learning_rate"] <= 10:
        raise ApiError(422, "invalid_request", f"hyperparameters out of range: n_epochs 1-{MAX_EPOCHS}, "
                                               "batch_size >= 1, 0 < learning_rate <= 10")
    steps = hyper["n_epochs"] * math.ceil(num_examples / hyper["batch_size"])
    if steps > max_steps:
        raise ApiError(422, "invalid_request", f"the job would take {steps} steps; the limit is {max_steps}")
    return hyper
