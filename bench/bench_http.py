"""What HTTP costs: the same workload through a real `promptserve serve` (TGI /generate) and through an
engine in this process, in alternating rounds, on bench_peer's model (8-layer, 512-wide Llama).

Workload (the one measured in issue 11): --requests concurrent requests of as many tasks, 20 virtual
tokens, ~12-token inputs, 32 new tokens. Both sides run the same engine settings (compiled step). While
one side runs, the other is idle. Prints tokens/s medians and HTTP / in-process.

Run: python bench/bench_http.py [--rounds 5] [--requests 16] [--dtype bfloat16] [--server-args "..."]
     [--model-dir DIR]  (another model folder, e.g. a tiny one for a smoke run)
"""

from __future__ import annotations

from server.preloads import reexec_with_preloads

reexec_with_preloads()  # before torch loads, as `promptserve serve` does (server/preloads.py)

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import peer_servers as ps
import torch
from bench_common import run_closed


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eager", action="store_true", help="both sides without torch.compile")
    p.add_argument("--server-args", default="", help="extra flags for promptserve serve")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--model-dir", type=Path, default=None, help="model folder (default: bench_peer's, built "
                   "in the work dir)")
    return p.parse_args()


def texts(num: int) -> list[str]:
    """~12-token inputs from the demo corpus."""
    from server.demo import demo_corpus

    words = demo_corpus().split()
    return [" ".join(words[9 * i:9 * i + 9]) for i in range(num)]


async def _http_round(url: str, tasks: list[str], inputs: list[str], new_tokens: int) -> tuple[int, float]:
    side = ps.PromptserveSide(url)
    reqs = [ps.Request(t, x, [], new_tokens) for t, x in zip(tasks, inputs)]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(reqs))) as client:
        started = time.perf_counter()
        replies = await asyncio.gather(*(client.post(f"{url}/generate", json=side.body(r)) for r in reqs))
        wall = time.perf_counter() - started
    assert all(r.status_code == 200 for r in replies), [r.text[:200] for r in replies if r.status_code != 200]
    return sum(r.json()["details"]["generated_tokens"] for r in replies), wall


def in_process_engine(model_dir: Path, store_dir: Path, args: argparse.Namespace):
    """The engine `promptserve serve` would build for these settings, in this process, started."""
    from server.config import Settings
    from server.runtime import build_runtime

    settings = Settings(model=str(model_dir), store=store_dir, dtype=args.dtype, device=args.device,
                        max_batch_size=max(32, args.requests), compile=not args.eager, demo_tasks=False)
    engine = build_runtime(settings).engine
    print(f"  in-process warm-up {engine.warm_up():.0f} s", flush=True)
    engine.start()
    return engine


def main() -> None:
    """Start the server, build the in-process engine, alternate rounds, print medians and the ratio."""
    args = parse_args()
    torch.set_grad_enabled(False)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-http-"))
    model_dir = args.model_dir or ps.build_model_dir(work / "model")
    ps.write_tasks(work / "store", "task", args.requests, 20, seed=1, hidden=ps.hidden_size(model_dir))
    tasks, inputs = [f"task{i:02d}" for i in range(args.requests)], texts(args.requests)
    extra = args.server_args + (" --no-compile" if args.eager else "")
    server = ps.start_promptserve(model_dir, work / "store", args.dtype, args.device, extra, work / "server.log")
    try:
        print(f"  server ready in {server.wait_ready(900):.0f} s", flush=True)
        engine = in_process_engine(model_dir, work / "store", args)
        rates = {"http": [], "engine": []}
        for round_no in range(args.rounds + 1):  # round 0 warms both up (prefix KV, allocator)
            for side in (("http", "engine") if round_no % 2 else ("engine", "http")):
                if side == "http":
                    tokens, wall = asyncio.run(_http_round(server.url, tasks, inputs, args.new_tokens))
                    rate = tokens / wall
                else:
                    rate = run_closed(engine, inputs, tasks, args.new_tokens).wall
                if round_no:
                    rates[side].append(rate)
                    print(f"  round {round_no} {side}: {rate:.1f} tokens/s", flush=True)
        engine.stop(grace_s=1)
    finally:
        server.stop()
    ratios = [h / e for h, e in zip(rates["http"], rates["engine"])]
    print(f"{args.requests} requests x {args.new_tokens} new tokens, {args.dtype}, "
          f"{'eager' if args.eager else 'compiled'}: HTTP {statistics.median(rates['http']):.1f} tokens/s, "
          f"in-process {statistics.median(rates['engine']):.1f} tokens/s; HTTP / in-process = "
          f"{statistics.median(ratios):.3f} (per round {', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
