"""Outbox: stream items produced during one engine step, handed to each event loop in one call.

One cross-thread wake-up per step instead of one per token keeps the event-loop thread from
preempting the model's compute threads sixteen times a step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

Delivery = Callable[[], None]


class Outbox:
    """Collects deliveries from the worker thread; `flush` posts them to their loops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list[Delivery]] = {}

    def post(self, loop: asyncio.AbstractEventLoop, delivery: Delivery) -> None:
        """Queue `delivery` to run on `loop` at the next flush."""
        with self._lock:
            self._pending.setdefault(loop, []).append(delivery)

    def flush(self) -> None:
        """Send everything queued so far: one call_soon_threadsafe per event loop."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for loop, deliveries in pending.items():
            try:
                loop.call_soon_threadsafe(_run_all, deliveries)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass


def _run_all(deliveries: list[Delivery]) -> None:
    for deliver in deliveries:
        deliver()
