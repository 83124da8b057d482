"""RequestStream: the caller's async view of one request (fed from the worker thread)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial

from server.engine.request.outbox import Outbox
from server.engine.types import GenerationResult, TokenEvent

_END = object()


log = logging.getLogger("promptserve.engine")


class RequestStream:
    """`async for event in stream` yields TokenEvents; `await stream.result()` gives the GenerationResult."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, outbox: Outbox, *,
                 cancel: Callable[[], None], num_prompt_tokens: int = 0, num_virtual_tokens: int = 0):
        """`cancel`: asks the engine to drop the request (called by `cancel()`, on the event loop)."""
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.num_virtual_tokens = num_virtual_tokens
        self._loop = loop
        self._outbox = outbox
        self._queue: asyncio.Queue = asyncio.Queue()
        self._result: asyncio.Future = loop.create_future()
        self._result.add_done_callback(_mark_retrieved)
        self._cancel = cancel
        self._start_listeners: list[Callable[[], None]] | None = []  # None once started
        self._done_listeners: list[Callable[[GenerationResult | None], None]] = []

    # -- called from the worker thread (the Sink protocol) --------------------------------------
    def on_start(self) -> None:
        """The engine admitted the request."""
        self._post(self._started)

    def on_token(self, event: TokenEvent) -> None:
        """Queue one token event for the caller."""
        self._post(self._queue.put_nowait, event)

    def on_finish(self, result: GenerationResult) -> None:
        """Settle the result; iteration ends."""
        self._post(self._settle, result, None)

    def on_error(self, error: BaseException) -> None:
        """Fail the request; iteration and result() raise `error`."""
        self._post(self._settle, None, error)

    def _post(self, fn, *args) -> None:
        self._outbox.post(self._loop, partial(fn, *args))

    def _started(self) -> None:
        listeners, self._start_listeners = self._start_listeners or [], None
        for listener in listeners:
            listener()

    def _settle(self, result: GenerationResult | None, error: BaseException | None) -> None:
        if self._result.done():
            return
        if error is not None:
            self._result.set_exception(error)
            self._queue.put_nowait(error)
        else:
            self._result.set_result(result)
            self._queue.put_nowait(_END)
        for listener in self._done_listeners:  # before any reader of the result runs again
            try:
                listener(result)
            except Exception:
                log.exception("a listener of request %s failed", self.request_id)

    # -- the caller's side ---------------------------------------------------------------------
    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # iterating again ends at once
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        return item

    def when_started(self, listener: Callable[[], None]) -> None:
        """Call `listener` on the event loop once the engine admits the request (at once if it has)."""
        if self._start_listeners is None:
            listener()
        else:
            self._start_listeners.append(listener)

    def when_done(self, listener: Callable[[GenerationResult | None], None]) -> None:
        """Call `listener` on the event loop when the request ends: its result, or None if it failed; it
        runs before anyone awaiting the result or the tokens resumes (at once if it has ended)."""
        if self._result.done():
            listener(None if self._result.exception() else self._result.result())
        else:
            self._done_listeners.append(listener)

    async def result(self) -> GenerationResult:
        """The final result (raises RequestFailed / EngineStopped if the request failed)."""
        return await asyncio.shield(self._result)

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (result: finish_reason 'cancelled')."""
        self._cancel()

    @property
    def done(self) -> bool:
        """Whether the request has ended (finished, cancelled or failed)."""
        return self._result.done()


def _mark_retrieved(future: asyncio.Future) -> None:
    # An unawaited failed request must not log "exception was never retrieved".
    if not future.cancelled():
        future.exception()
