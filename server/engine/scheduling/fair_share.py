"""Weighted fair sharing of the batch between tenants, counted in tokens (no torch).

Each tenant has a virtual token counter: the tokens it has been served (its context tokens when a request
is admitted, then one per generated token), divided by its weight. Admission serves the waiting tenant
with the smallest counter; within a tenant, arrival order. A tenant coming back from idle is lifted to the
smallest counter among the active tenants (or, when none is active, to the largest counter of all), so
being idle banks no credit and an idle tenant's share goes to the others. This is the virtual token
counter of Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024).

No starvation: a waiting tenant's counter stands still while every tenant served ahead of it moves up, so
it is admitted once the others have been served at most (its lag + one request's tokens) / weight more;
when long requests hold every row, the scheduler preempts one of a more served tenant (`victim`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol


class Queued(Protocol):
    """What the fair share needs of a request (Sequence has it)."""

    tenant: str
    weight: float
    num_charged: int  # tokens already counted against its tenant

    @property
    def num_context_tokens(self) -> int: ...  # virtual + input + generated tokens so far


@dataclass
class _Tenant:
    counter: float = 0.0  # tokens served / weight
    weight: float = 1.0
    num_running: int = 0
    waiting: deque = field(default_factory=deque)

    @property
    def is_active(self) -> bool:
        return bool(self.waiting) or self.num_running > 0


class FairShare:
    """Per-tenant waiting queues and counters. Not thread-safe: the scheduler holds its lock around it."""

    def __init__(self):
        self._tenants: dict[str, _Tenant] = {}
        self._running: set[int] = set()  # ids of admitted requests not yet left (leave is idempotent)
        self.num_waiting = 0

    # -- queueing -------------------------------------------------------------------------------
    def add(self, seq: Queued) -> None:
        """Queue `seq` behind its tenant's earlier requests."""
        tenant = self._tenants.setdefault(seq.tenant, _Tenant())
        tenant.weight = seq.weight
        if not tenant.is_active:
            tenant.counter = max(tenant.counter, self._lift_level(exclude=seq.tenant))
        tenant.waiting.append(seq)
        self.num_waiting += 1

    def is_active(self, tenant: str) -> bool:
        """Whether `tenant` has requests waiting or running."""
        found = self._tenants.get(tenant)
        return found is not None and found.is_active

    def num_waiting_of(self, tenant: str) -> int:
        """Requests of `tenant` waiting."""
        found = self._tenants.get(tenant)
        return len(found.waiting) if found else 0

    def queue_share(self, tenant: str, weight: float, max_queue: int) -> float:
        """How many of `max_queue` waiting places are `tenant`'s by weight, among the tenants waiting."""
        total = weight + sum(t.weight for name, t in self._tenants.items() if t.waiting and name != tenant)
        return max_queue * weight / total

    def remove_waiting(self, should_remove: Callable[[Queued], bool]) -> list[Queued]:
        """Take out the waiting requests `should_remove` picks (cancelled ones); returns them."""
        removed: list[Queued] = []
        for tenant in self._tenants.values():
            kept = deque()
            for seq in tenant.waiting:
                (removed if should_remove(seq) else kept).append(seq)
            tenant.waiting = kept
        self.num_waiting -= len(removed)
        return removed

    # -- admission ------------------------------------------------------------------------------
    def candidates(self) -> Iterator[Queued]:
        """Waiting requests in the order admission should consider them: the least served tenant's, in
        arrival order, then the next tenant's. Recompute after each `admit` (counters move)."""
        order = sorted((t for t in self._tenants.values() if t.waiting),
                       key=lambda t: (t.counter, t.num_running / t.weight))
        for tenant in order:
            yield from tenant.waiting

    def admit(self, seq: Queued) -> None:
        """`seq` leaves its queue for the batch: its context tokens count against its tenant."""
        tenant = self._tenants[seq.tenant]
        tenant.waiting.remove(seq)
        self.num_waiting -= 1
        tenant.num_running += 1
        self._running.add(id(seq))
        self._charge(seq, tenant)

    def charge(self, running: list[Queued]) -> None:
        """Count the tokens generated since the last call."""
        for seq in running:
            self._charge(seq, self._tenants[seq.tenant])

    def leave(self, seq: Queued) -> None:
        """A running request finished (or failed, or was cancelled); once only counts."""
        if id(seq) not in self._running:
            return
        self._running.discard(id(seq))
        tenant = self._tenants[seq.tenant]
        self._charge(seq, tenant)
        tenant.num_running -= 1

    def requeue(self, seq: Queued) -> None:
        """A preempted request goes back to the head of its tenant's queue (its tokens stay counted)."""
        if id(seq) in self._running:
            self._running.discard(id(seq))
            self._tenants[seq.tenant].num_running -= 1
        self._tenants[seq.tenant].waiting.appendleft(seq)
        self.num_waiting += 1

    def victim(self, running: list[Queued], waiting_tenant: str) -> Queued | None:
        """The request to preempt for `waiting_tenant`: the latest admitted of the most served running
        tenant, if that tenant is served more than `waiting_tenant` (by counter); else None."""
        mine = self._tenants[waiting_tenant].counter
        over = [s for s in running if s.tenant != waiting_tenant and self._tenants[s.tenant].counter > mine]
        if not over:
            return None
        top = max(self._tenants[s.tenant].counter for s in over)
        return [s for s in over if self._tenants[s.tenant].counter == top][-1]

    def last_ranked(self, running: list[Queued]) -> Queued:
        """The running request fair share ranks last: the latest admitted of the most served tenant."""
        top = max(self._tenants[s.tenant].counter for s in running)
        return [s for s in running if self._tenants[s.tenant].counter == top][-1]

    # -- internals ------------------------------------------------------------------------------
    def _charge(self, seq: Queued, tenant: _Tenant) -> None:
        num_new = seq.num_context_tokens - seq.num_charged
        if num_new > 0:
            seq.num_charged += num_new
            tenant.counter += num_new / tenant.weight

    def _lift_level(self, exclude: str) -> float:
        active = [t.counter for name, t in self._tenants.items() if t.is_active and name != exclude]
        if active:
            return min(active)
        return max((t.counter for name, t in self._tenants.items() if name != exclude), default=0.0)
