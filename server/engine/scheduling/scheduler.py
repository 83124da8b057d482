"""Waiting and running queues; admission under the batch and prefill limits, fair between tenants (no torch)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from server.engine.config import EngineConfig
from server.engine.errors import QueueFull
from server.engine.request.sequence import Sequence, Status
from server.engine.scheduling.fair_share import FairShare

# What the paged worker says of a request it may admit (Scheduler.admit_slots).
ADMIT = "admit"  # placed: it runs from this step
DEFER = "defer"  # not now (its shared prefix is being computed): look at the next one, keep its place
STOP = "stop"  # no memory for it: admit nobody else this step (the next in fair order is not overtaken)


class Scheduler:
    """Admission: each step takes waiting requests while the batch (and legacy prefill) budgets allow, the
    least served tenant's first (fair_share.py); with one tenant, or fair share off, first in first out."""

    def __init__(self, config: EngineConfig):
        self._config = config
        self._lock = threading.Lock()  # submit() adds from the event loop; the worker admits
        self._fair = FairShare()
        self._running: list[Sequence] = []
        self._num_admissions = 0  # admission rounds so far (a step each in the slot engine)
        self._last_served: dict[str, int] = {}  # tenant -> round of its last admission, or of its arrival

    @property
    def num_waiting(self) -> int:
        """Requests queued, not yet admitted."""
        return self._fair.num_waiting

    @property
    def num_running(self) -> int:
        """Requests in the running batch."""
        return len(self._running)

    def running(self) -> list[Sequence]:
        """A copy of the running list."""
        return list(self._running)

    def has_work(self) -> bool:
        """Whether the worker has anything to do."""
        return bool(self._fair.num_waiting or self._running)

    def check_room(self, tenant: str, weight: float) -> None:
        """Raise QueueFull if `tenant` may not queue one more request.

        The queue holds `max_queue` requests; when it is full, a tenant still below its weighted share of
        it may queue (so one tenant's flood never locks the others out), up to twice `max_queue` in all.
        """
        num_waiting, limit = self._fair.num_waiting, self._config.max_queue
        if num_waiting < limit:
            return
        num_mine = self._fair.num_waiting_of(tenant)
        if num_waiting >= 2 * limit or num_mine >= self._fair.queue_share(tenant, weight, limit):
            raise QueueFull(f"{num_waiting} requests already waiting (max_queue {limit}), {num_mine} of them "
                            "from this API key's tenant")

    def add(self, seq: Sequence) -> None:
        """Queue a new request, or raise QueueFull."""
        with self._lock:
            self.check_room(seq.tenant, seq.weight)
            if not self._fair.is_active(seq.tenant):
                self._last_served[seq.tenant] = self._num_admissions  # its wait starts now
            self._fair.add(seq)

    def admit(self) -> list[Sequence]:
        """Move the waiting requests that fit into this step's prefill to running (fair order)."""
        admitted: list[Sequence] = []
        longest = 0
        with self._lock:
            self._fair.charge(self._running)
            while len(self._running) + len(admitted) < self._config.max_batch_size:
                seq = next(self._fair.candidates(), None)
                if seq is None:
                    break
                longest_if = max(longest, seq.num_context_tokens)
                # Padded cost: every row of a prefill is as long as its longest row.
                if admitted and longest_if * (len(admitted) + 1) > self._config.max_prefill_tokens:
                    break
                self._fair.admit(seq)
                admitted.append(seq)
                longest = longest_if
        return self._start(admitted)

    def admit_slots(self, num_free: int, is_ready: Callable[[Sequence], str]) -> list[Sequence]:
        """Paged engine: move up to `num_free` waiting requests to running, in fair order. `is_ready` is
        asked only of a request that will be admitted if it says ADMIT; DEFER passes over it (it keeps its
        place), STOP ends this step's admissions. Chunked prefill bounds the step, so no prefill budget
        applies here."""
        admitted: list[Sequence] = []
        deferred: set[int] = set()
        self._num_admissions += 1
        with self._lock:
            self._fair.charge(self._running)
            while len(admitted) < min(num_free, self._config.max_batch_size - len(self._running)):
                seq = self._next_ready(is_ready, deferred)
                if seq is None:
                    break
                self._fair.admit(seq)  # counters move: the next pick is made afresh
                self._last_served[seq.tenant] = self._num_admissions
                admitted.append(seq)
        return self._start(admitted)

    def preempt_for_waiting(self, num_free: int) -> Sequence | None:
        """Slot engine, batch full: if the least served waiting tenant has had nothing admitted for
        `preempt_after_steps` steps (since it began waiting), take a row from a tenant served more than
        it (its latest admitted request, which loses the least work). The row goes back to the head of its
        tenant's queue; the caller frees its slot. None: nobody to preempt. At most one a step."""
        after = self._config.preempt_after_steps
        if not after or num_free > 0 or len(self._running) < 1:
            return None
        with self._lock:
            head = next(self._fair.candidates(), None)
            if head is None or self._num_admissions - self._last_served.get(head.tenant, 0) < after:
                return None
            self._fair.charge(self._running)
            seq = self._fair.victim(self._running, head.tenant)
            if seq is None:
                return None
            self._fair.requeue(seq)
            self._last_served[head.tenant] = self._num_admissions  # (its admission follows at once)
        self._running = [s for s in self._running if s is not seq]
        seq.status = Status.WAITING
        return seq

    def preempt_for_memory(self) -> Sequence | None:
        """Paged engine, out of KV blocks: the running request fair share ranks last goes back to the head
        of its tenant's queue (the caller frees its blocks). None when nothing runs."""
        with self._lock:
            if not self._running:
                return None
            self._fair.charge(self._running)
            seq = self._fair.last_ranked(self._running)
            self._fair.requeue(seq)
        self._running = [s for s in self._running if s is not seq]
        seq.status = Status.WAITING
        return seq

    def take_cancelled(self) -> list[Sequence]:
        """Remove and return every request whose cancellation was asked for."""
        with self._lock:
            cancelled = self._fair.remove_waiting(lambda s: s.is_cancel_requested)
            gone = [s for s in self._running if s.is_cancel_requested]
            for seq in gone:
                self._fair.leave(seq)
        self._running = [s for s in self._running if not s.is_cancel_requested]
        return cancelled + gone

    def finish(self, seqs: list[Sequence]) -> None:
        """Remove finished (or failed) requests from running; their slots are free at once."""
        gone = {id(s) for s in seqs}
        with self._lock:
            for seq in seqs:
                self._fair.leave(seq)
                seq.status = Status.FINISHED
        self._running = [s for s in self._running if id(s) not in gone]

    def drain(self) -> list[Sequence]:
        """Remove and return everything (shutdown)."""
        with self._lock:
            everything = self._fair.remove_waiting(lambda s: True) + self._running
            for seq in self._running:
                self._fair.leave(seq)
            self._running = []
        return everything

    def _next_ready(self, is_ready: Callable[[Sequence], str], deferred: set[int]) -> Sequence | None:
        for seq in self._fair.candidates():
            if id(seq) in deferred:
                continue
            verdict = is_ready(seq)
            if verdict == ADMIT:
                return seq
            if verdict == STOP:
                return None
            deferred.add(id(seq))
        return None

    def _start(self, admitted: list[Sequence]) -> list[Sequence]:
        for seq in admitted:
            seq.status = Status.RUNNING
        self._running.extend(admitted)
        return admitted
