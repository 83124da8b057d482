"""The load loops: closed (fixed concurrency) and open (Poisson arrivals). Both bounded in count and time."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

import httpx

from loadtest.client import STATUS_CANCELLED, STATUS_DROPPED, RequestRecord, send
from loadtest.config import MAX_REQUESTS, LoadConfig
from loadtest.tenant_mix import closed_workers, tenant_streams
from loadtest.workload import RequestSpec, Workload, poisson_arrivals

Arrival = tuple[float, str | None]  # (seconds from the start, tenant; None: picked by popularity)

GRACE_S = 5.0  # beyond the last request's own timeout, before in-flight requests are cancelled


@dataclass
class LoopResult:
    """The records of one loop and how long it took."""

    records: list[RequestRecord] = field(default_factory=list)
    wall_s: float = 0.0
    num_cancelled: int = 0


class Loop:
    """Shared state of one run: records, in-flight requests, the bounds."""

    def __init__(self, config: LoadConfig, client: httpx.AsyncClient, workload: Workload, clock,
                 on_record: Callable[[RequestRecord], None] | None = None):
        self.config = config
        self.client = client
        self.workload = workload
        self.clock = clock
        self.on_record = on_record or (lambda record: None)
        self.limit = config.num_requests if config.num_requests is not None else MAX_REQUESTS
        self.result = LoopResult()
        self.inflight: dict[int, RequestSpec] = {}
        self.started_at: dict[int, float] = {}
        self.keys = {t.name: t.key for t in config.tenants}

    def keep_going(self, index: int) -> bool:
        """True while the count and time bounds allow request `index` to be sent."""
        return index < self.limit and self.clock() < self.config.deadline_s

    def add(self, record: RequestRecord) -> None:
        """Keep a finished record and tell the progress display."""
        self.result.records.append(record)
        self.on_record(record)

    async def one(self, spec: RequestSpec) -> None:
        """Send `spec` and keep its record."""
        self.inflight[spec.index] = spec
        self.started_at[spec.index] = self.clock()
        record = await send(self.client, spec, is_stream=self.config.is_stream, ignore_eos=self.config.ignore_eos,
                            clock=self.clock, api_key=self.keys.get(spec.tenant))
        del self.inflight[spec.index]
        self.add(record)

    async def finish(self, tasks: set[asyncio.Task]) -> LoopResult:
        """Wait for the running tasks up to the hard deadline, then cancel and record what is left."""
        hard_deadline = self.config.deadline_s + self.config.request_timeout_s + GRACE_S
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, hard_deadline - self.clock()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for index, spec in sorted(self.inflight.items()):
            self.add(RequestRecord(index, spec.task_id, self.started_at[index], self.clock(), STATUS_CANCELLED,
                                   "hard deadline", tenant=spec.tenant))
            self.result.num_cancelled += 1
        self.inflight.clear()
        self.result.wall_s = self.clock()
        return self.result


async def closed_loop(loop: Loop, workers: list[str | None]) -> LoopResult:
    """One worker per entry of `workers` (its tenant, or None), each sending its next request as soon as
    the previous one is done."""
    counter = itertools.count()

    async def worker(tenant: str | None) -> None:
        while True:
            index = next(counter)
            if not loop.keep_going(index):
                return
            await loop.one(loop.workload.spec(index, tenant))

    tasks = {asyncio.create_task(worker(tenant)) for tenant in workers}
    return await loop.finish(tasks)


def tagged(times: Iterator[float], tenant: str | None) -> Iterator[Arrival]:
    """Arrival times labelled with their tenant."""
    return ((t, tenant) for t in times)


def arrivals(config: LoadConfig) -> Iterator[Arrival]:
    """The run's arrivals: one Poisson stream at `rate`, or (noisy neighbour) one per tenant, merged."""
    streams = tenant_streams(config)
    if not streams:
        return tagged(poisson_arrivals(config.rate, random.Random(config.seed + 2)), None)
    # A seed per tenant name: a tenant's arrivals stay the same whatever the others do.
    return heapq.merge(*(tagged(poisson_arrivals(s.rate, random.Random(f"{config.seed}:arrivals:{s.name}")),
                                s.name) for s in streams))


async def open_loop(loop: Loop, schedule: Iterator[Arrival], max_inflight: int) -> LoopResult:
    """Requests arrive on `schedule`, whatever the server's pace (up to `max_inflight` in flight)."""
    tasks: set[asyncio.Task] = set()
    for index in range(loop.limit):
        at, tenant = next(schedule)
        if at >= loop.config.deadline_s:
            break
        await asyncio.sleep(max(0.0, at - loop.clock()))
        spec = loop.workload.spec(index, tenant)
        if len(tasks) >= max_inflight:
            now = loop.clock()
            loop.add(RequestRecord(index, spec.task_id, now, now, STATUS_DROPPED, "client in-flight limit",
                                   tenant=spec.tenant))
            continue
        task = asyncio.create_task(loop.one(spec))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return await loop.finish(set(tasks))


async def run_loop(loop: Loop) -> LoopResult:
    """Run the loop `loop.config.mode` asks for."""
    config = loop.config
    if config.mode == "closed":
        return await closed_loop(loop, closed_workers(config))
    return await open_loop(loop, arrivals(config), config.max_inflight)
