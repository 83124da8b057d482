"""Memory over many requests: the slot engine's KV bytes (allocated once) against the tokens in flight,
and the process's resident memory, sampled every --every requests over --requests requests (default
10,000: waves of --concurrency requests of random tasks, prompt lengths and new-token counts).

Run: python bench/bench_memory.py [--requests 10000] [--hidden 512 --layers 8]
"""

from __future__ import annotations

from server.preloads import reexec_with_preloads

reexec_with_preloads()  # before torch loads, as `promptserve serve` does (server/preloads.py)

import argparse
import asyncio
import os
import random

from bench_common import add_model_args, make_engine, make_store, prepare_model


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, hidden=256, layers=4, heads=4)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--every", type=int, default=1000)
    p.add_argument("--tasks", type=int, default=64)
    return p.parse_args()


def rss_bytes() -> int:
    """Resident memory of this process."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _wave(engine, rng: random.Random, tasks: list[str], size: int, vocab: int, peak: list[int]) -> int:
    from server.engine.types import SamplingParams

    streams = []
    for _ in range(size):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 200))]
        params = SamplingParams(max_new_tokens=rng.randint(1, 24), ignore_eos=True)
        streams.append(await engine.submit(ids, task_id=rng.choice(tasks), params=params))
    await asyncio.sleep(0.05)
    peak[0] = max(peak[0], engine.stats().kv.num_tokens_used)
    return sum([(await s.result()).generated_tokens for s in streams])


def main() -> None:
    """Run the waves; print a line of memory figures every --every requests."""
    args = parse_args()
    loaded = prepare_model(args)
    store, tasks = make_store(loaded, args.tasks, 20)
    engine = make_engine(loaded, store, args, max_batch_size=args.concurrency)
    rng, done, peak, next_report = random.Random(3), 0, [0], args.every
    memory = engine.memory
    print(f"model {loaded.name}; KV memory {memory.num_bytes / 2**20:.1f} MiB "
          f"({memory.num_blocks} blocks x {memory.block_tokens} tokens)")
    print(f"{'requests':>9} {'RSS MiB':>8} {'KV MiB':>7} {'peak tokens in flight':>22} {'cached blocks':>14} "
          f"{'hit tokens':>11} {'blocks used after':>18}")
    while done < args.requests:
        asyncio.run(_wave(engine, rng, tasks, min(args.concurrency, args.requests - done), loaded.vocab_size, peak))
        done += min(args.concurrency, args.requests - done)
        if done >= next_report or done == args.requests:
            next_report += args.every
            kv = engine.stats().kv
            print(f"{done:>9} {rss_bytes() / 2**20:>8.1f} {kv.num_bytes / 2**20:>7.1f} {peak[0]:>22} "
                  f"{kv.num_blocks_cached:>14} {kv.num_prefix_hit_tokens:>11} {kv.num_blocks_used:>18}",
                  flush=True)
            peak[0] = 0
    engine.stop(grace_s=1)


if __name__ == "__main__":
    main()
