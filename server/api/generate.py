"""TGI / LoRAX-compatible generation: POST /generate, /generate_stream, and the compat route POST /."""

from __future__ import annotations

import json
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.deps import get_tenant
from server.api.generation import Generation, GenerationCall, submit
from server.api.responses import generation_responses
from server.api_error import ApiError
from server.engine.types import GenerationResult, SamplingParams, TokenEvent
from server.errors import stream_error
from server.schemas import (
    GenerateDetails,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    StreamDetails,
    StreamEvent,
    TokenOut,
)
from server.tenancy.tenant import Tenant

router = APIRouter(tags=["generate"])

DEFAULT_MAX_NEW_TOKENS = 20  # TGI's and its clients' default
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sampling_params(p: GenerateParameters, max_new_tokens_limit: int) -> SamplingParams:
    """TGI semantics: sampling is on with do_sample, or when temperature/top_k/top_p ask for it."""
    is_sampling = (p.do_sample or p.temperature not in (None, 1.0) or bool(p.top_k)
                   or p.top_p not in (None, 1.0))
    return SamplingParams(
        max_new_tokens=p.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens_limit), do_sample=is_sampling,
        temperature=p.temperature or 1.0, top_k=p.top_k or 0, top_p=p.top_p or 1.0, seed=p.seed,
        repetition_penalty=p.repetition_penalty or 1.0, stop=tuple(p.stop), ignore_eos=p.ignore_eos_token,
    )


def _call(body: GenerateRequest, request: Request) -> GenerationCall:
    limit = request.app.state.settings.max_new_tokens  # the default never exceeds the server's limit
    return GenerationCall(inputs=body.inputs, task_id=body.resolved_task_id(),
                          params=sampling_params(body.parameters, limit))


def token_out(event: TokenEvent) -> TokenOut:
    """A TGI `Token` from an engine token event."""
    return TokenOut(id=event.token_id, text=event.text, logprob=event.logprob, special=event.is_special)


def response_body(body: GenerateRequest, result: GenerationResult) -> GenerateResponse:
    """The TGI response (details always; per-token list only with parameters.details)."""
    prefix = body.inputs if body.parameters.return_full_text else ""
    tokens = [token_out(t) for t in result.tokens] if body.parameters.details else []
    details = GenerateDetails(finish_reason=result.finish_reason, generated_tokens=result.generated_tokens,
                              prompt_tokens=result.prompt_tokens, virtual_tokens=result.virtual_tokens,
                              seed=result.seed, task_id=result.task_id, task_version=result.task_version,
                              tokens=tokens)
    return GenerateResponse(generated_text=prefix + result.text, details=details)


@router.post("/generate", response_model=GenerateResponse, responses=generation_responses())
async def generate(body: GenerateRequest, request: Request, tenant: Tenant = Depends(get_tenant)):
    """Generate the whole completion (TGI `/generate`)."""
    generation = await submit(request, tenant, _call(body, request))
    return response_body(body, await generation.complete())


@router.post("/generate_stream", responses=generation_responses())
async def generate_stream(body: GenerateRequest, request: Request, tenant: Tenant = Depends(get_tenant)):
    """Server-sent events, one per token, the last with generated_text and details (TGI format)."""
    generation = await submit(request, tenant, _call(body, request))
    return StreamingResponse(tgi_events(body, generation), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/", responses=generation_responses())
async def compat(body: GenerateRequest, request: Request, tenant: Tenant = Depends(get_tenant)):
    """TGI's compat route: a one-element list, or SSE when `"stream": true` (what TGI clients call)."""
    if body.stream:
        return await generate_stream(body, request, tenant)
    generation = await submit(request, tenant, _call(body, request))
    return [response_body(body, await generation.complete())]


# The task in the URL, for clients that cannot send a task id (text-generation's Client(base_url)).
@router.post("/tasks/{task_id}/generate", response_model=GenerateResponse, responses=generation_responses())
async def task_generate(task_id: str, body: GenerateRequest, request: Request, tenant: Tenant = Depends(get_tenant)):
    """`/generate` for the task in the URL."""
    return await generate(_with_task(body, task_id), request, tenant)


@router.post("/tasks/{task_id}/generate_stream", responses=generation_responses())
async def task_generate_stream(task_id: str, body: GenerateRequest, request: Request,
                               tenant: Tenant = Depends(get_tenant)):
    """`/generate_stream` for the task in the URL."""
    return await generate_stream(_with_task(body, task_id), request, tenant)


@router.post("/tasks/{task_id}", responses=generation_responses())
async def task_compat(task_id: str, body: GenerateRequest, request: Request, tenant: Tenant = Depends(get_tenant)):
    """The compat route `/` for the task in the URL."""
    return await compat(_with_task(body, task_id), request, tenant)


def _with_task(body: GenerateRequest, task_id: str) -> GenerateRequest:
    named = body.resolved_task_id()
    if named is not None and named != task_id:
        raise ApiError(422, "validation", f"the URL names task {task_id!r} but the body names {named!r}")
    return body.model_copy(update={"task_id": task_id})


def _sse(payload: dict) -> bytes:
    # TGI writes `data:` without a space; its clients strip the prefix either way.
    return b"data:" + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def tgi_events(body: GenerateRequest, generation: Generation) -> AsyncIterator[bytes]:
    """TGI's event stream: one event per token; the last token's event carries generated_text and details."""
    last: TokenEvent | None = None
    try:
        async for event in generation.tokens():
            if event.is_last:
                last = event
                break  # the result is settled right after the last token
            yield _sse(StreamEvent(index=event.index + 1, token=token_out(event)).model_dump())
        result = await generation.result()
        yield _sse(_last_event(body, result, last).model_dump())
    except Exception as e:  # noqa: BLE001 - after the 200 was sent, an error can only be an event (as TGI)
        yield _sse(stream_error(e))
    finally:
        generation.cancel()


def _last_event(body: GenerateRequest, result: GenerationResult, last: TokenEvent | None) -> StreamEvent:
    if last is None:  # ended without a final token (cancelled): TGI's event needs one, so an empty one
        last = TokenEvent(index=result.generated_tokens, token_id=0, text="", logprob=0.0, is_special=True)
    prefix = body.inputs if body.parameters.return_full_text else ""
    details = StreamDetails(finish_reason=result.finish_reason, generated_tokens=result.generated_tokens,
                            prompt_tokens=result.prompt_tokens, input_length=result.prompt_tokens,
                            virtual_tokens=result.virtual_tokens, seed=result.seed)
    return StreamEvent(index=last.index + 1, token=token_out(last), generated_text=prefix + result.text,
                       details=details)
