"""Between the routers and the engine: scope check, submit, wait (cancel if the client leaves), metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from server.api.deps import check_use, get_runtime
from server.api_error import ApiError
from server.engine.errors import InputTooLong, QueueFull
from server.engine.types import GenerationResult, SamplingParams, Share, TokenEvent
from server.tenancy.gate import TenantGate
from server.tenancy.tenant import Tenant

# An ASGI server may put a callable under this key of the scope's "extensions": it is called once the
# engine admits the request (the scale-out replica tells its ingress that a retry is no longer safe).
ENGINE_START_EXTENSION = "promptserve.engine_start"


@dataclass(frozen=True)
class GenerationCall:
    """One request for the engine, in the engine's terms."""

    inputs: str
    task_id: str | None
    params: SamplingParams


class Generation:
    """A submitted request: iterate its tokens, await its result; cancels itself if abandoned."""

    def __init__(self, request: Request, stream):
        self._request = request
        self._stream = stream
        self._is_recorded = False

    async def tokens(self) -> AsyncIterator[TokenEvent]:
        """Token events as they are generated."""
        async for event in self._stream:
            yield event

    async def result(self) -> GenerationResult:
        """The final result (after the stream ends); recorded in metrics once."""
        result = await self._stream.result()
        if not self._is_recorded:
            self._is_recorded = True
            self._request.app.state.metrics.observe_generation(result)
        return result

    def cancel(self) -> None:
        """Stop generating (client gone); a no-op once finished. Still counted in metrics when it ends."""
        if self._stream.done:
            return
        self._stream.cancel()
        if not self._is_recorded:
            asyncio.ensure_future(self.result()).add_done_callback(_retrieve)

    async def complete(self) -> GenerationResult:
        """Drain the tokens and return the result; cancels the request if the client disconnects."""
        work = asyncio.ensure_future(self._drain())
        gone = asyncio.ensure_future(_client_gone(self._request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # nobody to answer: cancel, let it wind down (and count) on its own
                self.cancel()
                work.add_done_callback(_retrieve)
                raise ClientDisconnected()
            return await work
        finally:
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone

    async def _drain(self) -> GenerationResult:
        async for _ in self._stream:
            pass
        return await self.result()


async def submit(request: Request, tenant: Tenant, call: GenerationCall) -> Generation:
    """Check the tenant may use the task and is within its limits, then submit; engine errors
    (422/404/429...) raise here. The tenant's usage is metered when the request ends, however it ends."""
    check_use(request, tenant, call.task_id)
    runtime = get_runtime(request)
    gate: TenantGate = request.app.state.tenant_gate
    limit = runtime.engine.config.max_new_tokens
    if call.params.max_new_tokens > limit:  # before the limiter reserves tokens for it
        raise InputTooLong(f"max_new_tokens {call.params.max_new_tokens} exceeds the limit {limit}")
    tokens = runtime.engine.tokenize(call.inputs)  # once: the engine queues these very ids
    grant = gate.admit(tenant, call.task_id, len(tokens), call.params.max_new_tokens)
    request.state.ratelimit_headers = grant.headers
    try:
        stream = await runtime.engine.submit(tokens, task_id=call.task_id, params=call.params,
                                             request_id=getattr(request.state, "request_id", None),
                                             share=Share(tenant.name, tenant.weight))
    except QueueFull:
        gate.refused(tenant.name, call.task_id, "overloaded", grant)
        raise
    except BaseException:
        gate.not_queued(grant)
        raise
    gate.queued(grant, stream.num_virtual_tokens)
    stream.when_done(lambda result: gate.finished(grant, result))
    on_start = (request.scope.get("extensions") or {}).get(ENGINE_START_EXTENSION)
    if on_start is not None:
        stream.when_started(on_start)
    return Generation(request, stream)


class ClientDisconnected(ApiError):
    """The client closed the connection before its result was ready (logged as 499, never sent)."""

    def __init__(self):
        super().__init__(499, "client_closed", "the client closed the connection")


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # a late failure of an abandoned request is not an "unretrieved" error


async def _client_gone(request: Request) -> None:
    # After the body is read, the next ASGI message is http.disconnect when the client closes.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
