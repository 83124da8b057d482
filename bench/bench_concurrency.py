"""Concurrency at a fixed KV budget: how many rows the paged engine runs at once, against what the budget
holds, budget / (mean context x bytes per token).

Many more requests than fit are submitted at once (prompts of random lengths, one task each of 16), with a
row limit far above what the memory holds, so memory alone bounds the rows. A thread samples the running
rows while requests still wait; the table shows their peak and mean against the ideal.

Run: python bench/bench_concurrency.py [--kv-mib 256] [--requests 256] [--hidden 512 --layers 8 --heads 8]
"""

from __future__ import annotations

from server.preloads import reexec_with_preloads

reexec_with_preloads()  # before torch loads, as `promptserve serve` does (server/preloads.py)

import argparse
import asyncio
import random
import statistics
import threading

from bench_common import add_model_args, make_engine, make_store, prepare_model

NUM_VIRTUAL = 16


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, hidden=512, layers=8, heads=8)
    p.add_argument("--kv-mib", type=int, default=256, help="KV memory budget, MiB")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=(40, 160), help="range of prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32)
    return p.parse_args()


async def _run_all(engine, prompts: list[list[int]], tasks: list[str], new_tokens: int) -> None:
    from server.engine.types import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    streams = await asyncio.gather(*(engine.submit(ids, task_id=task, params=params)
                                     for ids, task in zip(prompts, tasks)))
    for stream in streams:
        await stream.result()


def main() -> None:
    """Submit every request at once; print rows at once against the budget's ideal."""
    args = parse_args()
    loaded = prepare_model(args)
    store, tasks = make_store(loaded, 16, NUM_VIRTUAL)
    engine = make_engine(loaded, store, args, kv_cache_memory=args.kv_mib << 20, max_batch_size=4096,
                         max_queue=args.requests)
    memory = engine.memory
    rng = random.Random(5)
    prompts = [[rng.randrange(3, loaded.vocab_size) for _ in range(rng.randint(*args.prompt_tokens))]
               for _ in range(args.requests)]
    contexts = [NUM_VIRTUAL + len(p) + args.new_tokens for p in prompts]
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:  # rows running while others still wait: the memory is the bound
        while not done.wait(0.005):
            stats = engine.stats()
            if stats.num_waiting:
                samples.append(stats.num_running)

    sampler = threading.Thread(target=sample)
    sampler.start()
    asyncio.run(_run_all(engine, prompts, [tasks[i % len(tasks)] for i in range(args.requests)], args.new_tokens))
    done.set()
    sampler.join()
    preempted = engine.stats().num_preempted
    engine.stop(grace_s=1)

    per_token = memory.geometry.bytes_per_token
    mean_context = statistics.mean(contexts)
    ideal = memory.num_bytes / (mean_context * per_token)
    print(f"model {loaded.name}; KV memory {memory.num_bytes / 2**20:.0f} MiB = {memory.num_tokens} tokens "
          f"({memory.num_blocks} blocks x {memory.block_tokens}), {per_token // 1024} KiB a token")
    print(f"{args.requests} requests at once, contexts {min(contexts)}-{max(contexts)} (mean {mean_context:.0f}: "
          f"{NUM_VIRTUAL} virtual + prompt + {args.new_tokens} new), {preempted} preemptions")
    print(f"{'ideal rows':>11} {'peak rows':>10} {'mean rows':>10} {'peak/ideal':>11} {'mean/ideal':>11}")
    peak, mean = max(samples, default=0), statistics.mean(samples) if samples else 0.0
    print(f"{ideal:>11.1f} {peak:>10} {mean:>10.1f} {peak / ideal:>11.2f} {mean / ideal:>11.2f}")


if __name__ == "__main__":
    main()
