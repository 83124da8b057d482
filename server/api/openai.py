"""OpenAI-compatible API: /v1/completions, /v1/chat/completions (streaming too), /v1/models.

`model` is a task id; the served model's own name (see `--served-model-name`) means the bare model.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.deps import check_use, get_runtime, get_tenant
from server.api.generation import Generation, GenerationCall, submit
from server.api.responses import error_responses, generation_responses
from server.api_error import ApiError
from server.engine.types import FINISH_LENGTH, GenerationResult, SamplingParams
from server.errors import stream_error
from server.runtime import Runtime
from server.schemas import ChatRequest, CompletionRequest, _OpenAIBase
from server.tenancy.tenant import Tenant

router = APIRouter(prefix="/v1", tags=["openai"])

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 128


def _finish(reason: str) -> str:
    return "length" if reason == FINISH_LENGTH else "stop"


def _params(request: Request, body: _OpenAIBase, max_tokens: int | None, default_tokens: int) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI samples by default
    try:
        stops = tuple(body.stop_list())
    except ValueError as e:
        raise ApiError(422, "validation", str(e)) from None
    default_tokens = min(default_tokens, request.app.state.settings.max_new_tokens)
    return SamplingParams(max_new_tokens=max_tokens or default_tokens, do_sample=temperature > 0,
                          temperature=temperature if temperature > 0 else 1.0, top_p=body.top_p or 1.0,
                          seed=body.seed, stop=stops)


def _task_id(runtime: Runtime, model: str) -> str | None:
    return None if model == runtime.model_name else model


def _usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.generated_tokens,
            "total_tokens": result.prompt_tokens + result.generated_tokens}


@router.get("/models", responses=error_responses(401, 503))
async def models(runtime: Runtime = Depends(get_runtime), tenant: Tenant = Depends(get_tenant)) -> dict:
    """The bare model (if allowed) and every task this key may use."""
    infos = await asyncio.to_thread(runtime.store.list)
    created = int(time.time())
    data = [{"id": runtime.model_name, "object": "model", "created": created, "owned_by": "promptserve"}
            ] if tenant.may_use(None) else []
    data += [{"id": i.task_id, "object": "model", "created": int(i.created), "owned_by": tenant.name,
              "parent": runtime.model_name} for i in sorted(infos, key=lambda i: i.task_id)
             if tenant.may_use(i.task_id) and not getattr(i, "error", None)]
    return {"object": "list", "data": data}


@router.get("/models/{model_id}", responses=error_responses(400, 401, 403, 404, 422, 503))
async def model(model_id: str, request: Request, runtime: Runtime = Depends(get_runtime),
                tenant: Tenant = Depends(get_tenant)) -> dict:
    """One model: the bare model or a task this key may use."""
    task_id = _task_id(runtime, model_id)
    check_use(request, tenant, task_id)
    if task_id is None:
        return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "promptserve"}
    info = await asyncio.to_thread(runtime.store.info, task_id)
    return {"id": task_id, "object": "model", "created": int(info.created), "owned_by": tenant.name,
            "parent": runtime.model_name}


@router.post("/completions", responses=generation_responses())
async def completions(body: CompletionRequest, request: Request, runtime: Runtime = Depends(get_runtime),
                      tenant: Tenant = Depends(get_tenant)):
    """Text completion of one prompt."""
    try:
        prompt = body.prompt_text()
    except ValueError as e:
        raise ApiError(422, "validation", str(e)) from None
    call = GenerationCall(prompt, _task_id(runtime, body.model),
                          _params(request, body, body.max_tokens, DEFAULT_COMPLETION_TOKENS))
    generation = await submit(request, tenant, call)
    head = {"id": f"cmpl-{request.state.request_id}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    echo = prompt if body.echo else ""
    if body.stream:
        def choice(text: str, reason: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return _stream(generation, head, choice, first=echo or None, include_usage=_include_usage(body))
    result = await generation.complete()
    return {**head, "choices": [{"index": 0, "text": echo + result.text, "logprobs": None,
                                 "finish_reason": _finish(result.finish_reason)}], "usage": _usage(result)}


@router.post("/chat/completions", responses=generation_responses())
async def chat_completions(body: ChatRequest, request: Request, runtime: Runtime = Depends(get_runtime),
                           tenant: Tenant = Depends(get_tenant)):
    """Chat completion, rendered with the tokenizer's chat template."""
    prompt = render_chat(runtime, body)
    call = GenerationCall(prompt, _task_id(runtime, body.model),
                          _params(request, body, body.new_tokens(), DEFAULT_CHAT_TOKENS))
    generation = await submit(request, tenant, call)
    head = {"id": f"chatcmpl-{request.state.request_id}", "object": "chat.completion", "created": int(time.time()),
            "model": body.model}
    if body.stream:
        head["object"] = "chat.completion.chunk"

        def choice(text: str | None, reason: str | None) -> dict:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return _stream(generation, head, choice, first=None, include_usage=_include_usage(body), is_chat=True)
    result = await generation.complete()
    message = {"role": "assistant", "content": result.text}
    return {**head, "choices": [{"index": 0, "message": message, "logprobs": None,
                                 "finish_reason": _finish(result.finish_reason)}], "usage": _usage(result)}


def render_chat(runtime: Runtime, body: ChatRequest) -> str:
    """The prompt text from the chat template (without a BOS the tokenizer will add again)."""
    if not runtime.has_chat_template:
        raise ApiError(422, "validation", "the served model has no chat template; use /v1/completions")
    tokenizer = runtime.tokenizer
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template may reject roles or orderings: that is bad input
        raise ApiError(422, "validation", f"chat template error: {e}") from None
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos):]
    return text


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _include_usage(body: _OpenAIBase) -> bool:
    options = getattr(body, "stream_options", None) or {}
    return bool(options.get("include_usage"))


def _data(payload: dict | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _stream(generation: Generation, head: dict, choice: Callable, *, first: str | None, include_usage: bool,
            is_chat: bool = False) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        try:
            if is_chat:
                yield _data({**head, "choices": [{**choice("", None), "delta": {"role": "assistant",
                                                                                "content": ""}}]})
            if first:
                yield _data({**head, "choices": [choice(first, None)]})
            async for event in generation.tokens():
                if event.text:
                    yield _data({**head, "choices": [choice(event.text, None)]})
            result = await generation.result()
            yield _data({**head, "choices": [choice(None if is_chat else "", _finish(result.finish_reason))]})
            if include_usage:
                yield _data({**head, "choices": [], "usage": _usage(result)})
            yield _data("[DONE]")
        except Exception as e:  # noqa: BLE001 - after the 200 was sent, an error can only be an event
            body = stream_error(e)  # OpenAI's in-stream shape, so its client raises with the message
            yield _data({"error": {"message": body["error"], "type": body["error_type"]}})
        finally:
            generation.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
