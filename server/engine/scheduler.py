"""Waiting and running queues; admission under the batch and prefill limits (no torch)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from server.engine.config import EngineConfig
from server.engine.errors import QueueFull
from server.engine.sequence import Sequence, Status


class Scheduler:
    """FIFO admission: each step takes waiting requests while the batch and prefill budgets allow."""

    def __init__(self, config: EngineConfig):
        self._config = config
        self._lock = threading.Lock()  # submit() adds from the event loop; the worker admits
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []

    @property
    def num_waiting(self) -> int:
        """Requests queued, not yet admitted."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests in the running batch."""
        return len(self._running)

    def running(self) -> list[Sequence]:
        """A copy of the running list."""
        return list(self._running)

    def has_work(self) -> bool:
        """Whether the worker has anything to do."""
        return bool(self._waiting or self._running)

    def add(self, seq: Sequence) -> None:
        """Queue a new request, or raise QueueFull."""
        with self._lock:
            if len(self._waiting) >= self._config.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests already waiting (max_queue)")
            self._waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move the waiting requests that fit into this step's prefill to running (in arrival order)."""
        admitted: list[Sequence] = []
        longest = 0
        with self._lock:
            while self._waiting and len(self._running) + len(admitted) < self._config.max_batch_size:
                seq = self._waiting[0]
                longest_if = max(longest, seq.num_context_tokens)
                # Padded cost: every row of a prefill is as long as its longest row.
                if admitted and longest_if * (len(admitted) + 1) > self._config.max_prefill_tokens:
                    break
                admitted.append(self._waiting.popleft())
                longest = longest_if
        for seq in admitted:
            seq.status = Status.RUNNING
        self._running.extend(admitted)
        return admitted

    def admit_slots(self, num_free: int, is_ready: Callable[[Sequence], bool]) -> list[Sequence]:
        """Slot engine: move up to `num_free` waiting requests to running, in arrival order, passing over
        those `is_ready` defers (they keep their place). `is_ready` is asked only of a request that will
        be admitted if it says yes. Chunked prefill bounds the step, so no prefill budget applies here."""
        admitted: list[Sequence] = []
        with self._lock:
            kept: deque[Sequence] = deque()
            while self._waiting and len(admitted) < min(num_free, self._config.max_batch_size - len(self._running)):
                seq = self._waiting.popleft()
                (admitted if is_ready(seq) else kept).append(seq)
            self._waiting.extendleft(reversed(kept))
        for seq in admitted:
            seq.status = Status.RUNNING
        self._running.extend(admitted)
        return admitted

    def take_cancelled(self) -> list[Sequence]:
        """Remove and return every request whose cancellation was asked for."""
        with self._lock:
            cancelled = [s for s in self._waiting if s.is_cancel_requested]
            self._waiting = deque(s for s in self._waiting if not s.is_cancel_requested)
        cancelled += [s for s in self._running if s.is_cancel_requested]
        self._running = [s for s in self._running if not s.is_cancel_requested]
        return cancelled

    def finish(self, seqs: list[Sequence]) -> None:
        """Remove finished (or failed) requests from running; their slots are free at once."""
        gone = {id(s) for s in seqs}
        for seq in seqs:
            seq.status = Status.FINISHED
        self._running = [s for s in self._running if id(s) not in gone]

    def drain(self) -> list[Sequence]:
        """Remove and return everything (shutdown)."""
        with self._lock:
            everything = list(self._waiting) + self._running
            self._waiting.clear()
            self._running = []
        return everything
