"""Noisy neighbour: tenant B's p99 latency while tenant A floods, fair share against first in, first out.

    python bench/bench_fairness.py                              # about 6 minutes on 2 CPU cores
    python bench/bench_fairness.py --baseline-commit f77aaae    # also the commit before fair share
    python bench/bench_fairness.py --a-spread 8                 # A's lengths vary: its rows free steadily

Each server is a real `python -m server.cli serve` on loopback with the same model, flags and API keys
(tenants A and B, weight 1 each), run one after the other:
  fair      this tree (fair share is the default)
  fifo      this tree with --no-fair-share
  baseline  --baseline-commit, checked out into a temporary git worktree (first in, first out by construction)
Phases: the capacity C (completed requests/s, closed loop at twice the batch, on `fair`); then on each
server, B sending at --b-share of C (open loop, Poisson): alone; beside A sending its fair share C/2 (the
machine full, no flood); beside A flooding at --flood x its share, from its own process through a lean
client (flood_client.py; through httpx the flood's client took the server's CPU). Prints B's p50/p99 and mean queue time
(from the server's /v1/usage) per phase, 429s, total generated tokens/s, and the ratios: B's p99 while A
floods over B's p99 alone (target <= 1.5 with fair share) and over B's p99 beside A at its share (what the
flood itself costs B), and fair throughput over FIFO's while A floods (target within 5 %).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flood_client import FloodClient, poisson_arrivals, poisson_flood
from servers import ServerProcess, free_port, promptserve_command

KEYS = {"A": "noisy-key-0001", "B": "steady-key-001"}
TASKS = {"A": "task-a", "B": "task-b"}  # each tenant its own prompt-tuned task (8 virtual tokens)
PROMPT = "The kitchen smelled of fresh bread and the river ran by the mill"


@dataclass
class Tally:
    """One tenant's outcomes in one phase."""

    latencies: list[float] = field(default_factory=list)
    num_429: int = 0
    num_errors: int = 0
    num_tokens: int = 0

    def p(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-commit", help="also run this commit (first in, first out) from a git worktree")
    p.add_argument("--phase-s", type=float, default=40, help="seconds per phase (default 40)")
    p.add_argument("--flood", type=float, default=10, help="A's rate as a multiple of its fair share (default 10)")
    p.add_argument("--b-share", type=float, default=0.2, help="B's rate as a fraction of capacity (default 0.2)")
    p.add_argument("--new-tokens", type=int, default=16, help="B's new tokens, and A's on average")
    p.add_argument("--a-spread", type=int, default=0, help="A's new tokens uniform in new-tokens +- this (default "
                   "0: all alike, so A's rows start and end in step: rows free in waves)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--queue", type=int, default=64)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=None, help="model folder (default: a llama of --hidden and "
                   "--layers, built)")
    return p.parse_args()


def start(root: Path, model: Path, work: Path, args, *extra: str) -> ServerProcess:
    """The server of the tree at `root` (this one, or the baseline's worktree), ready, with both tenants' tasks."""
    port = free_port()
    cmd = promptserve_command("--model", str(model), "--store", str(work / "store"), "--port", str(port), "--device",
                              "cpu", "--max-batch-size", str(args.batch), "--max-queue", str(args.queue),
                              "--api-keys", str(work.parent / "keys.yaml"), "--log-level", "warning", *extra)
    server = ServerProcess("server", cmd, work / "server.log", port, cwd=root)
    try:
        server.wait_ready(300)
    except RuntimeError as exc:
        server.stop()
        raise SystemExit(str(exc)) from None
    for tenant, task in TASKS.items():
        httpx.put(f"{server.url}/v1/tasks/{task}", json={"init": "random", "num_virtual_tokens": 8},
                  headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=60).raise_for_status()
    return server


async def one(client: httpx.AsyncClient, tenant: str, new_tokens: int, tally: Tally) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": new_tokens, "ignore_eos": True}}
    t0 = time.perf_counter()
    try:
        r = await client.post(f"/tasks/{TASKS[tenant]}/generate", json=body, headers={"Authorization": f"Bearer {KEYS[tenant]}"})
    except httpx.HTTPError:
        tally.num_errors += 1
        return
    if r.status_code == 429:
        tally.num_429 += 1
    elif r.status_code != 200:
        tally.num_errors += 1
    else:
        tally.latencies.append(time.perf_counter() - t0)
        tally.num_tokens += new_tokens


async def open_loop(client, tenant: str, rate: float, seconds: float, args, tally: Tally, rng: random.Random):
    """Poisson arrivals at `rate` per second for `seconds`; waits for every request sent."""
    await poisson_arrivals(rate, seconds, rng, lambda: one(client, tenant, args.new_tokens, tally))


async def capacity(url: str, args) -> float:
    tally, end = Tally(), time.perf_counter() + args.phase_s / 2
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def worker():
            while time.perf_counter() < end:
                await one(client, "B", args.new_tokens, tally)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(2 * args.batch)))
    return len(tally.latencies) / (time.perf_counter() - t0)


PHASES = ("alone", "A at its share", "A floods")


async def phases(url: str, cap: float, args) -> dict:
    """B alone; B beside A sending its fair share (C/2: a full machine, no flood); B beside A flooding."""
    rng = random.Random(args.seed)
    out: dict = {}
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        for phase, a_rate in zip(PHASES, (0.0, cap / 2, args.flood * cap / 2)):
            b = Tally()
            queue_before = await queue_seconds(client)
            t0 = time.perf_counter()
            # A's load comes from its own process, so that its flood does not delay B's client (its event loop).
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                a = pool.submit(a_load, url, a_rate, args, rng.random()) if a_rate else None
                await open_loop(client, "B", args.b_share * cap, args.phase_s, args, b, rng)
                a = await asyncio.wrap_future(a) if a is not None else Tally()
            queue_after = await queue_seconds(client)
            b_queue_ms = None if queue_before is None else (queue_after - queue_before) / max(1, len(b.latencies)) * 1e3
            out[phase] = {"B": b, "A": a, "seconds": time.perf_counter() - t0, "B queue ms": b_queue_ms}
    return out


def a_load(url: str, rate: float, args, seed: float) -> Tally:
    """Tenant A's open loop, in a process of its own, through the lean flood client (its CPU is the server's)."""
    tally = Tally()
    lengths = range(args.new_tokens - args.a_spread, args.new_tokens + args.a_spread + 1)
    bodies = [{"inputs": PROMPT, "parameters": {"max_new_tokens": n, "ignore_eos": True}} for n in lengths]
    rng = random.Random(seed)
    client = FloodClient(url, f"/tasks/{TASKS['A']}/generate", bodies, {"Authorization": f"Bearer {KEYS['A']}"}, rng)

    def done(status: int, body: bytes, latency_s: float) -> None:
        if status == 200:
            tally.latencies.append(latency_s)
            tally.num_tokens += json.loads(body)["details"]["generated_tokens"]
        elif status == 429:
            tally.num_429 += 1
        else:
            tally.num_errors += 1

    asyncio.run(poisson_flood(client, rate, args.phase_s, rng, done))
    return tally


async def queue_seconds(client: httpx.AsyncClient) -> float | None:
    """B's total queue seconds so far, from the server's usage (None where the server has no /v1/usage)."""
    r = await client.get("/v1/usage", headers={"Authorization": f"Bearer {KEYS['B']}"})
    return r.json()["totals"]["queue_seconds"] if r.status_code == 200 else None


def tokens_s(phase: dict) -> float:
    """Generated tokens per second, both tenants."""
    return (phase["B"].num_tokens + phase["A"].num_tokens) / phase["seconds"]


def report(name: str, r: dict) -> None:
    for phase in PHASES:
        b, a, queue_ms = r[phase]["B"], r[phase]["A"], r[phase]["B queue ms"]
        print(f"{name:16s} {phase:15s} B p50 {b.p(.5) * 1e3:6.0f} ms p99 {b.p(.99) * 1e3:6.0f} ms "
              f"(mean queue {'  n/a' if queue_ms is None else f'{queue_ms:5.0f}'} ms) ok {len(b.latencies):4d} "
              f"429 {b.num_429:3d} | A ok {len(a.latencies):5d} 429 {a.num_429:5d} | {tokens_s(r[phase]):6.1f} "
              f"tokens/s | errors {b.num_errors + a.num_errors}")


def main() -> None:
    args = parse_args()
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bench-fair-") as tmp:
        tmp = Path(tmp)
        model = args.model_dir
        if model is None:
            from server.demo import build_model_folder

            model = build_model_folder(tmp / "model", family="llama", hidden_size=args.hidden,
                                       num_layers=args.layers, num_heads=max(1, args.hidden // 64))
        keys = [{"key": key, "tenant": name, "tasks": [TASKS[name]], "admin": True} for name, key in KEYS.items()]
        (tmp / "keys.yaml").write_text(yaml.safe_dump({"keys": keys}))
        servers = [("fair", repo, ()), ("fifo", repo, ("--no-fair-share",))]
        if args.baseline_commit:
            subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tmp / "baseline-src"),
                            args.baseline_commit], check=True, capture_output=True)
            servers.append((f"baseline {args.baseline_commit[:7]}", tmp / "baseline-src", ()))
        results, cap = {}, None
        try:
            for name, root, extra in servers:
                work = tmp / name.split()[0]
                work.mkdir()
                server = start(root, model, work, args, *extra)
                try:
                    if cap is None:
                        cap = asyncio.run(capacity(server.url, args))
                        print(f"capacity {cap:.1f} requests/s ({args.new_tokens} new tokens, batch {args.batch}); "
                              f"B at {args.b_share * cap:.1f}/s, A at {args.flood * cap / 2:.1f}/s")
                    results[name] = asyncio.run(phases(server.url, cap, args))
                    report(name, results[name])
                finally:
                    server.stop(grace_s=30)
        finally:
            if args.baseline_commit:
                subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tmp / "baseline-src")],
                               check=False, capture_output=True)
        _ratios(results)


def _ratios(results: dict) -> None:
    def p99(name: str, phase: str) -> float:
        return results[name][phase]["B"].p(.99)

    print("B's p99 while A floods, over B's p99 alone (target <= 1.5 with fair share), and over B's p99 beside A at "
          "its share (the flood's own cost):")
    for name in results:
        print(f"  {name:16s} {p99(name, 'A floods') / p99(name, 'alone'):6.2f}x alone   "
              f"{p99(name, 'A floods') / p99(name, 'A at its share'):6.2f}x beside A at its share")
    fair = tokens_s(results["fair"]["A floods"])
    for name in results:
        if name != "fair":
            print(f"total tokens/s while A floods, fair over {name}: {fair / tokens_s(results[name]['A floods']):.3f} "
                  "(target >= 0.95)")


if __name__ == "__main__":
    main()
