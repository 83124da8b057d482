"""Noisy neighbour: tenant B's p99 latency while tenant A floods, fair share against first in, first out.

    python bench/bench_fairness.py                              # about 6 minutes on 2 CPU cores
    python bench/bench_fairness.py --baseline-commit f77aaae    # also the commit before fair share

Each server is a real `python -m server.cli serve` on loopback with the same model, flags and API keys
(tenants A and B, weight 1 each), run one after the other:
  fair      this tree (fair share is the default)
  fifo      this tree with --no-fair-share
  baseline  --baseline-commit, checked out into a temporary git worktree (first in, first out by construction)
Phases: the capacity C (completed requests/s, closed loop at twice the batch, on `fair`); then on each
server B alone (open loop, Poisson, at --b-share of C) and B beside A, who sends at --flood x its fair
share of capacity (C/2). Prints B's p50/p99 per phase, 429s, and total generated tokens/s while A floods,
and the ratios: B's p99 beside A over B's p99 alone (target <= 1.5 with fair share), fair throughput over
FIFO's (target within 5 %).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

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
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--queue", type=int, default=64)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(root: Path, model: Path, work: Path, args, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--store", str(work / "store"),
           "--port", str(port), "--device", "cpu", "--max-batch-size", str(args.batch), "--max-queue",
           str(args.queue), "--api-keys", str(work.parent / "keys.yaml"), "--log-level", "warning", *extra]
    with open(work / "server.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                for tenant, task in TASKS.items():
                    httpx.put(f"{url}/v1/tasks/{task}", json={"init": "random", "num_virtual_tokens": 8},
                              headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=60).raise_for_status()
                return proc, url
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {(work / 'server.err').read_text()[-2000:]}")
        time.sleep(0.5)
    raise SystemExit("server did not become ready")


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
    tasks, end = [], time.perf_counter() + seconds
    while (now := time.perf_counter()) < end:
        tasks.append(asyncio.create_task(one(client, tenant, args.new_tokens, tally)))
        await asyncio.sleep(max(0.0, rng.expovariate(rate) - (time.perf_counter() - now)))
    await asyncio.gather(*tasks)


async def capacity(url: str, args) -> float:
    tally, end = Tally(), time.perf_counter() + args.phase_s / 2
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def worker():
            while time.perf_counter() < end:
                await one(client, "B", args.new_tokens, tally)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(2 * args.batch)))
    return len(tally.latencies) / (time.perf_counter() - t0)


async def phases(url: str, cap: float, args) -> dict[str, Tally]:
    rng = random.Random(args.seed)
    out = {"B alone": Tally(), "B beside A": Tally(), "A": Tally()}
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await open_loop(client, "B", args.b_share * cap, args.phase_s, args, out["B alone"], rng)
        t0 = time.perf_counter()
        await asyncio.gather(open_loop(client, "A", args.flood * cap / 2, args.phase_s, args, out["A"], rng),
                             open_loop(client, "B", args.b_share * cap, args.phase_s, args, out["B beside A"], rng))
        out["seconds"] = time.perf_counter() - t0
    return out


def report(name: str, r: dict) -> None:
    alone, beside, a = r["B alone"], r["B beside A"], r["A"]
    tokens_s = (beside.num_tokens + a.num_tokens) / r["seconds"]
    print(f"{name:9s} B alone p50 {alone.p(.5) * 1e3:7.0f} ms  p99 {alone.p(.99) * 1e3:7.0f} ms | beside A: "
          f"p50 {beside.p(.5) * 1e3:7.0f} ms  p99 {beside.p(.99) * 1e3:7.0f} ms  B 429s {beside.num_429:4d}/"
          f"{beside.num_429 + len(beside.latencies)} | A ok {len(a.latencies):5d} 429s {a.num_429:5d} | "
          f"{tokens_s:7.1f} tokens/s | p99 ratio {beside.p(.99) / alone.p(.99):6.2f}x | errors "
          f"{alone.num_errors + beside.num_errors + a.num_errors}")


def main() -> None:
    args = parse_args()
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bench-fair-") as tmp:
        tmp = Path(tmp)
        from server.demo import build_model_folder

        model = build_model_folder(tmp / "model", family="llama", hidden_size=args.hidden, num_layers=args.layers,
                                   num_heads=max(1, args.hidden // 64))
        keys = [{"key": key, "tenant": name, "tasks": [TASKS[name]], "admin": True} for name, key in KEYS.items()]
        (tmp / "keys.yaml").write_text(yaml.safe_dump({"keys": keys}))
        servers = [("fair", repo, ()), ("fifo", repo, ("--no-fair-share",))]
        if args.baseline_commit:
            subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tmp / "baseline"),
                            args.baseline_commit], check=True, capture_output=True)
            servers.append((f"baseline {args.baseline_commit[:7]}", tmp / "baseline", ()))
        results, cap = {}, None
        try:
            for name, root, extra in servers:
                work = tmp / name.split()[0]
                work.mkdir()
                proc, url = start(root, model, work, args, *extra)
                try:
                    if cap is None:
                        cap = asyncio.run(capacity(url, args))
                        print(f"capacity {cap:.1f} requests/s ({args.new_tokens} new tokens, batch {args.batch}); "
                              f"B at {args.b_share * cap:.1f}/s, A at {args.flood * cap / 2:.1f}/s")
                    results[name] = asyncio.run(phases(url, cap, args))
                    report(name, results[name])
                finally:
                    proc.terminate()
                    proc.wait(30)
        finally:
            if args.baseline_commit:
                subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tmp / "baseline")],
                               check=False, capture_output=True)
        _ratios(results)


def _ratios(results: dict) -> None:
    def tokens_s(r):
        return (r["B beside A"].num_tokens + r["A"].num_tokens) / r["seconds"]

    fair = results["fair"]
    print(f"fair: B p99 beside A / alone = {fair['B beside A'].p(.99) / fair['B alone'].p(.99):.2f}x (target <= 1.5)")
    for name, r in results.items():
        if name != "fair":
            print(f"{name}: B p99 beside A / alone = {r['B beside A'].p(.99) / r['B alone'].p(.99):.2f}x; "
                  f"fair tokens/s over {name}'s = {tokens_s(fair) / tokens_s(r):.3f} (target >= 0.95)")
    print("median B latency beside A, fair vs fifo:",
          f"{statistics.median(fair['B beside A'].latencies):.3f}s vs "
          f"{statistics.median(results['fifo']['B beside A'].latencies or [float('nan')]):.3f}s")


if __name__ == "__main__":
    main()
