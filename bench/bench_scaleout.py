"""Scale-out on Ray Serve: the same requests through 1 and 2 engine replicas (1 torch thread each) and
through the single-process server (1 thread), on bench_peer's model (8-layer, 512-wide Llama).

  throughput  at each of --concurrency (16 and 64 concurrent requests), one request per task (20 virtual
              tokens, ~12-token inputs, --new-tokens new tokens), closed loop, --rounds rounds, every round
              on tasks no replica has seen yet: tokens/s; 2 replicas / 1 replica
  overhead    one request at a time (--new-tokens 1): median latency through 1 replica minus the single
              process's, i.e. what Ray's proxy, ingress and hand-offs add to a request
  affinity    --affinity-requests requests over --affinity-tasks tasks with Zipf popularity (s = 1.1),
              16 at a time, through 2 replicas: the share that landed on a replica that had already served
              their task (read from x-promptserve-replica)

The configurations run one after another (each owns the machine while it runs); medians are reported.
Each configuration is measured once all its replicas are up (/ready's x-promptserve-replicas-live).
Run: python bench/bench_scaleout.py [--rounds 3] [--concurrency 16 64] [--work-dir DIR] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import peer_servers as ps

TEXT = "The river runs past the old mill and the"


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument("--tasks", type=int, default=64, help="tasks in the store (at least --affinity-tasks)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--overhead-requests", type=int, default=30)
    p.add_argument("--affinity-tasks", type=int, default=1000)
    p.add_argument("--affinity-requests", type=int, default=2000)
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--model-dir", type=Path, default=None, help="model folder (default: bench_peer's, built "
                   "in the work dir)")
    return p.parse_args()


def body(task: str, new_tokens: int) -> dict:
    """A greedy /generate request that makes exactly `new_tokens` tokens."""
    return {"task_id": task, "inputs": TEXT, "parameters": {"max_new_tokens": new_tokens, "ignore_eos_token": True}}


async def closed_round(url: str, tasks: list[str], num: int, new_tokens: int, offset: int) -> tuple[float, list[int]]:
    """`num` requests at once over `tasks` (starting at task `offset`): generated tokens/s, and how many
    requests each replica served."""
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=256)) as c:
        start = time.perf_counter()
        replies = await asyncio.gather(*(c.post("/generate", json=body(tasks[(offset + i) % len(tasks)], new_tokens))
                                         for i in range(num)))
        wall = time.perf_counter() - start
    assert all(r.status_code == 200 for r in replies), [r.text[:200] for r in replies if r.status_code != 200]
    split = Counter(r.headers.get("x-promptserve-replica", "-") for r in replies)
    return sum(r.json()["details"]["generated_tokens"] for r in replies) / wall, sorted(split.values(), reverse=True)


def wait_for_replicas(url: str, num: int, timeout_s: float = 600) -> None:
    """/ready answers once one replica is up; wait until `num` are, and the ingress's router sends requests
    to all of them (it learns of a replica a moment after the replica reports itself)."""
    async def answered_by() -> tuple[set, set]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            replies = await asyncio.gather(*(c.get("/ready") for _ in range(8)))
        return ({r.headers.get("x-promptserve-replicas-live") for r in replies},
                {r.headers.get("x-promptserve-replica") for r in replies})

    deadline = time.monotonic() + timeout_s
    while True:
        live, replicas = asyncio.run(answered_by())
        if live == {str(num)} and len(replicas) == num:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{num} replicas never came up")
        time.sleep(0.5)


def latency_ms(url: str, tasks: list[str], num: int) -> float:
    """Median time of one-token requests sent one at a time."""
    times = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(num + 3):
            start = time.perf_counter()
            assert c.post("/generate", json=body(tasks[i % 4], 1)).status_code == 200
            if i >= 3:  # the first ones warm up
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


async def affinity(url: str, tasks: list[str], num: int) -> tuple[float, float]:
    """Of `num` Zipf-popular requests, the share served by a replica that had served their task before,
    over all requests and over repeat requests only (a task's first request cannot be a hit)."""
    rng = random.Random(0)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(tasks))]
    picks = rng.choices(tasks, weights=weights, k=num)
    served: dict[str, set[str]] = {}
    hits = 0
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as c:
        for start in range(0, num, 16):
            replies = await asyncio.gather(*(c.post("/generate", json=body(t, 1)) for t in picks[start:start + 16]))
            for task, r in zip(picks[start:start + 16], replies):
                replica = r.headers["x-promptserve-replica"]
                hits += replica in served.get(task, set())
                served.setdefault(task, set()).add(replica)
    return hits / num, hits / max(1, num - len(served))


def run_config(name: str, extra: str, model: Path, store: Path, work: Path, args, num_replicas: int) -> dict:
    """Start one configuration, measure it, stop it."""
    import os

    if not num_replicas:
        os.environ["OMP_NUM_THREADS"] = "1"  # the single process, on one thread like a replica
    server = ps.start_promptserve(model, store, "float32", "cpu", extra, work / f"{name}.log")
    os.environ.pop("OMP_NUM_THREADS", None)
    try:
        print(f"{name}: ready after {server.wait_ready(600):.0f} s", flush=True)
        if num_replicas:
            wait_for_replicas(server.url, num_replicas)
        tasks = [f"task{i:02d}" for i in range(max(args.tasks, args.affinity_tasks))]
        asyncio.run(closed_round(server.url, tasks, 16, 4, len(tasks) - 16))  # warm-up, on the last tasks
        out: dict = {"tok_s": {}}
        offset = 0
        for num in args.concurrency:
            rounds = []
            for _ in range(args.rounds):
                rounds.append(asyncio.run(closed_round(server.url, tasks, num, args.new_tokens, offset)))
                offset += num  # tasks no replica has seen, every round
            out["tok_s"][num] = statistics.median(r for r, _ in rounds)
            print(f"  {name}, {num} concurrent: {out['tok_s'][num]:.1f} tokens/s (rounds "
                  f"{', '.join(f'{r:.0f}' for r, _ in rounds)}; requests per replica "
                  f"{' | '.join('/'.join(map(str, split)) for _, split in rounds)})", flush=True)
        out["latency_ms"] = latency_ms(server.url, tasks, args.overhead_requests)
        print(f"  {name}: one-token request {out['latency_ms']:.1f} ms", flush=True)
        if num_replicas == 2:
            every = [f"task{i:02d}" for i in range(args.affinity_tasks)]
            out["affinity"], out["affinity_repeat"] = asyncio.run(affinity(server.url, every, args.affinity_requests))
            print(f"  affinity hit rate: {out['affinity']:.1%} of all requests, {out['affinity_repeat']:.1%} of "
                  f"repeat requests", flush=True)
        return out
    finally:
        server.stop()


def main() -> None:
    """Three configurations, then the ratios."""
    args = parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    model = args.model_dir or ps.build_model_dir(work / "model")
    ps.write_tasks(work / "store", "task", max(args.tasks, args.affinity_tasks), 20, seed=1,
                   hidden=ps.hidden_size(model))
    flags = "--replica-threads 1 --replica-num-cpus 1"
    single = run_config("single process", "", model, work / "store", work, args, 0)
    one = run_config("1 replica", f"--replicas 1 {flags}", model, work / "store", work, args, 1)
    two = run_config("2 replicas", f"--replicas 2 {flags}", model, work / "store", work, args, 2)
    for num in args.concurrency:
        print(f"{num} concurrent: 2 replicas / 1 replica = {two['tok_s'][num] / one['tok_s'][num]:.2f}; "
              f"1 replica / single process = {one['tok_s'][num] / single['tok_s'][num]:.2f}")
    print(f"Ray's added time per one-token request = {one['latency_ms'] - single['latency_ms']:.1f} ms "
          f"({one['latency_ms']:.1f} against {single['latency_ms']:.1f}); affinity hit rate {two['affinity']:.1%} "
          f"of all, {two['affinity_repeat']:.1%} of repeat requests ({args.affinity_requests} over "
          f"{args.affinity_tasks} Zipf tasks)")


if __name__ == "__main__":
    main()
