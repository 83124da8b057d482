"""The load side of bench_peer.py: closed-loop and open-loop (Poisson) runs against one server, the figures
of a run (tokens/s, TTFT and inter-token percentiles), and waiting for a quiet machine before measuring."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time

import httpx

import peer_servers as ps

QUIET_CPU_SHARE = 0.05  # a server burning less of a core than this counts as idle
QUIET_MACHINE_CORES = 0.25  # the whole machine (this script included) while every server idles


async def closed_loop(side, reqs: list[ps.Request]) -> tuple[list[ps.Reply], float]:
    """All requests sent at once; replies and the wall time from first send to last reply."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=512)) as client:
        start = time.perf_counter()
        replies = await asyncio.gather(*(side.generate(client, r) for r in reqs))
        return list(replies), time.perf_counter() - start


async def clients_loop(side, reqs: list[ps.Request], concurrency: int | None,
                       stream: bool) -> tuple[list[ps.Reply], float]:
    """`concurrency` clients (None: one per request) each sending its next request when the last one
    ended, streamed or not; replies in request order and the wall time."""
    queue = list(enumerate(reqs))[::-1]
    replies: list[ps.Reply | None] = [None] * len(reqs)

    async def client_loop(client):
        while queue:
            index, req = queue.pop()
            replies[index] = await (side.stream(client, req) if stream else side.generate(client, req))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=512)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency or len(reqs))))
        return list(replies), time.perf_counter() - start


async def open_loop(side, reqs: list[ps.Request], arrivals: list[float], max_s: float) -> tuple[list, float]:
    """Streamed requests sent at their arrival offsets (s) up to max_s; any still running at 2 * max_s + 60 s
    is cancelled and counted as an error. Replies and wall time."""
    async def one(client, req, at):
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        return await side.stream(client, req)

    sent = [(r, a) for r, a in zip(reqs, arrivals) if a <= max_s]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=512)) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(one(client, r, a)) for r, a in sent]
        _, pending = await asyncio.wait(tasks, timeout=2 * max_s + 60)
        for task in pending:
            task.cancel()
        replies = [t.result() if t not in pending else ps.Reply([], 0.0, error="unfinished") for t in tasks]
        return replies, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def figures(replies: list[ps.Reply], wall: float) -> dict:
    """tokens/s, errors and (streamed replies) TTFT and inter-token p50/p99 in ms."""
    ok = [r for r in replies if r.error is None]
    out = {"tok_s": sum(len(r.ids) for r in ok) / wall, "errors": len(replies) - len(ok), "wall_s": wall}
    errors = [r.error for r in replies if r.error]
    if errors:
        out["first_error"] = errors[0]
    timed = [r for r in ok if r.token_times]
    if timed:
        ttft = [(r.token_times[0] - r.sent) * 1e3 for r in timed]
        itl = [(b - a) * 1e3 for r in timed for a, b in zip(r.token_times, r.token_times[1:])]
        out.update(ttft_p50=percentile(ttft, 50), ttft_p99=percentile(ttft, 99), itl_p50=percentile(itl, 50),
                   itl_p99=percentile(itl, 99), completed=len(timed),
                   tokens_per_burst=sum(len(r.ids) for r in timed) / (len(timed) + sum(g > 1 for g in itl)))
    return out


def summary_row(rounds: dict[str, list[dict]], outputs: dict[str, list[list[int]]]) -> dict:
    """One load's summary from each side's per-round figures: the medians, and against vLLM the median
    per-round tokens/s ratio, identical greedy outputs, and the mean share of an output vLLM repeats."""
    row = {}
    for name, figs in rounds.items():
        keys = [k for k in figs[0] if isinstance(figs[0][k], (int, float))]
        row[name] = {k: round(statistics.median(f[k] for f in figs), 2) for k in keys}
    if "vllm" in rounds:
        pairs = zip(rounds["promptserve"], rounds["vllm"])
        row["ratio"] = round(statistics.median(a["tok_s"] / b["tok_s"] for a, b in pairs), 3)
        mine, peer = outputs["promptserve"], outputs["vllm"]
        row["same"] = [sum(a == b and bool(a) for a, b in zip(mine, peer)), len(mine)]
        row["common_prefix"] = round(statistics.mean(common_prefix(a, b) for a, b in zip(mine, peer)), 3)
    return row


def common_prefix(mine: list[int], peer: list[int]) -> float:
    """Share of `mine` (from its start) that `peer` repeats token for token."""
    num_same = next((i for i, (a, b) in enumerate(zip(mine, peer)) if a != b), min(len(mine), len(peer)))
    return num_same / max(1, len(mine))


def wait_quiet(servers: list, timeout_s: float = 20.0) -> None:
    """Wait until the servers idle and nothing else keeps the machine busy (before each measurement), at most
    `timeout_s` (0: not at all, a smoke run)."""
    if timeout_s <= 0:
        return
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        shares, machine = ps.cpu_shares(servers, 1.0)
        if max(shares) < QUIET_CPU_SHARE and machine < QUIET_MACHINE_CORES:
            return
    print(f"  warning: not quiet after {timeout_s:.0f} s: servers {[round(x, 2) for x in shares]} cores, machine "
          f"{machine:.2f} cores busy (another process?): this measurement is disturbed", flush=True)


def arrivals_at(rate: float, count: int, seed: int) -> list[float]:
    """Poisson arrival offsets (s) at `rate` per second; the same list for both sides."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out
