"""One session against a server: check the target, set up tasks, run (one level or a sweep), clean up."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import datetime, timezone
from typing import Sequence

import httpx

from loadtest.client import monotonic_clock
from loadtest.config import LoadConfig
from loadtest.cpu import CpuUse, cpu_seconds
from loadtest.metrics import FIGURES, MetricsSnapshot, find_family, scrape
from loadtest.progress import NullProgress
from loadtest.report import Report, count_check, request_rows, workload_dict
from loadtest.runner import Loop, LoopResult, run_loop
from loadtest.safety import TargetError, check_target, make_client
from loadtest.server_figures import GaugeSampler, ServerFigures, compare
from loadtest.stats import run_figures, throughput_series
from loadtest.tasks import CreatedTasks, create_tasks, delete_tasks, existing_tasks
from loadtest.tenant_mix import closed_workers, tenant_shares
from loadtest.tenant_stats import tenant_summaries
from loadtest.workload import Workload

SETTLE_TRIES = 10  # scrapes after a run until the server's counters stop moving


async def settled_scrape(client: httpx.AsyncClient) -> MetricsSnapshot | None:
    """Scrape /metrics until two scrapes in a row agree (the server may count a request just after answering)."""
    previous = await scrape(client)
    for _ in range(SETTLE_TRIES):
        await asyncio.sleep(0.2)
        current = await scrape(client)
        if current is None or previous is None or counters_of(current) == counters_of(previous):
            return current
        previous = current
    return previous


def counters_of(snapshot: MetricsSnapshot) -> dict:
    """The counter samples of a snapshot (gauges move by themselves)."""
    names = {name for name, kind in snapshot.types.items() if kind == "counter"}
    return {k: v for k, v in snapshot.samples.items() if k[0].removesuffix("_total") in names}


async def run_level(config: LoadConfig, client: httpx.AsyncClient, task_ids: list[str], created: bool,
                    progress) -> Report:
    """One run at `config`'s load against tasks `task_ids`."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    before = await settled_scrape(client)
    clock = monotonic_clock()
    gauges = {s.key: f for s in FIGURES if s.kind == "gauge" and before and (f := find_family(before, s))}
    sampler = GaugeSampler(client, gauges, config.metrics_interval_s, clock)
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler.run(stop))
    progress.begin(describe_level(config), config.num_requests, config.duration_s)
    cpu_before = cpu_seconds(config.server_pid) if config.server_pid else 0.0
    client_cpu_before = time.process_time()
    loop = Loop(config, client, Workload(config, task_ids), clock, on_record=lambda r: progress.update(clock()))
    try:
        result = await run_loop(loop)
    finally:
        stop.set()
        await sampling
        progress.end()
    client_cpu_s = time.process_time() - client_cpu_before
    server_cpu_s = cpu_seconds(config.server_pid) - cpu_before if config.server_pid else None
    server = compare(before, await settled_scrape(client))
    server.gauge_series = sampler.series
    report = build_report(config, str(client.base_url), started_at, task_ids, created, result, server)
    report.client_cpu_s = client_cpu_s
    if server_cpu_s is not None:
        report.server_cpu = CpuUse(config.server_pid, server_cpu_s, result.wall_s, report.client.generated_tokens)
    return report


def build_report(config: LoadConfig, target: str, started_at: str, task_ids: list[str], created: bool,
                 result: LoopResult, server: ServerFigures) -> Report:
    """The report of one run from its records and the server's figures."""
    figures = run_figures(result.records, result.wall_s)
    return Report(target=target, started_at=started_at, workload=workload_dict(config),
                  num_tasks=len(task_ids), tasks_created=created, client=figures, server=server,
                  counts=count_check(figures, server),
                  throughput_series=throughput_series(result.records, result.wall_s),
                  requests=request_rows(result.records),
                  tenants=tenant_summaries(result.records, result.wall_s, tenant_shares(config),
                                           config.noisy_tenant))


def describe_level(config: LoadConfig) -> str:
    """The progress bar's label."""
    per = " per steady tenant" if config.noisy_tenant else ""
    return f"concurrency {config.concurrency}{per}" if config.mode == "closed" else f"{config.rate:g} req/s{per}"


async def choose_tasks(config: LoadConfig, client: httpx.AsyncClient, created: CreatedTasks) -> list[str]:
    """The task ids of the run: created now, given by name, or none (the bare model)."""
    if config.setup.num_tasks:
        await create_tasks(client, config.setup, created)
        return list(created.task_ids)
    if config.num_existing_tasks:
        return await existing_tasks(client, limit=config.num_existing_tasks)
    return list(config.task_ids)


async def preflight(client: httpx.AsyncClient) -> None:
    """Refuse to start when nothing answers at the target (any HTTP answer will do)."""
    try:
        await client.get("/health")
    except httpx.TransportError as exc:
        raise TargetError(f"nothing answers at {client.base_url}: {type(exc).__name__}") from None


async def run_session(config: LoadConfig, levels: Sequence[int] = (), progress=None) -> list[Report]:
    """Run `config` once, or once per concurrency level in `levels` (a sweep); tasks made here are deleted."""
    config.validate()
    target = check_target(config.url)
    if config.server_pid:
        cpu_seconds(config.server_pid)  # refuse at once a pid we cannot read
    progress = progress or NullProgress()
    level_configs = [dataclasses.replace(config, concurrency=level).validate()
                     for level in levels or [config.concurrency]]
    # +2: /metrics scrapes during the run must not wait behind the load's own connections.
    max_workers = max(len(closed_workers(c)) for c in level_configs)
    max_conn = (max_workers if config.mode == "closed" else config.max_inflight) + 2
    created = CreatedTasks()
    async with make_client(target, max_connections=max_conn, timeout_s=config.request_timeout_s,
                           api_key=config.api_key) as client:
        await preflight(client)
        try:
            task_ids = await choose_tasks(config, client, created)
            if len(task_ids) < config.num_existing_tasks:
                progress.note(f"the server lists {len(task_ids)} task(s), fewer than --num-tasks "
                              f"{config.num_existing_tasks}: using those")
            reports = []
            for level_config in level_configs:
                reports.append(await run_level(level_config, client, task_ids, bool(created.task_ids), progress))
            return reports
        finally:
            leftover = await delete_tasks(client, created.task_ids)
            if leftover:
                progress.note(f"could not delete {len(leftover)} task(s): {', '.join(leftover[:5])}")
