"""Churn: requests of very different lengths arriving and leaving all the time, the paged engine against
the legacy engine (the engine before v2: transformers' DynamicCache, whole-cache merge and select, no
compile), in alternating rounds of one run.

64 requests arrive 0.3 s apart (open loop), prompts of 32-768 tokens, 16-128 new tokens, 16 tasks of 20
virtual tokens (seeded). Prints per engine: generated tokens/s over the run, time to first token and
inter-token time p50/p99 (from the streamed tokens), and their ratios. Then one profiled round per engine
(torch.profiler started on the engine's own thread through Engine.set_side_work, so that it sees the
steps) prints the share of the run's wall time spent in cache copies: for the legacy engine the cache's
own growth (`DynamicLayer.update`), merge and select; for the paged engine, which copies no cache, reading
prefill chunks' contexts (views of a run of blocks, gathers of scattered ones).

Run: python bench/bench_churn.py [--rounds 3] [--hidden 512 --layers 8] [--device cuda --dtype bf16]
     [--stall-ratios 0,1.8 --skip-legacy]  (paged engine settings against each other)
"""

from __future__ import annotations

from server.preloads import reexec_with_preloads

reexec_with_preloads()  # before torch loads, as `promptserve serve` does (server/preloads.py)

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import ExitStack

import torch
from bench_common import add_model_args, make_engine, make_store, prepare_model


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, hidden=512, layers=8, heads=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--interval", type=float, default=0.3, help="seconds between arrivals")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunk", type=int, default=512, help="slot engine: prefill_chunk_tokens (the server's default)")
    p.add_argument("--stall-ratios", default="0", help="slot engine: max_stall_ratio values to compare, "
                   "comma-separated (0, the server's default: always --chunk tokens)")
    p.add_argument("--skip-legacy", action="store_true", help="compare slot engine settings only")
    p.add_argument("--skip-profile", action="store_true")
    return p.parse_args()


def workload(loaded, tasks: list[str], num_requests: int) -> list[tuple[list[int], str, int]]:
    """(prompt ids, task, new tokens) per request, the same every run."""
    rng = random.Random(7)
    vocab = loaded.vocab_size
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(32, 768))], tasks[i % len(tasks)],
             rng.randint(16, 128)) for i in range(num_requests)]


async def _one(engine, ids, task, new_tokens, delay, times):
    from server.engine.types import SamplingParams

    await asyncio.sleep(delay)
    submitted = time.monotonic()
    stream = await engine.submit(ids, task_id=task, params=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    stamps = [time.monotonic() async for _ in stream]
    times.append((submitted, stamps))


def run_round(engine, requests, interval: float) -> dict[str, float]:
    """One open-loop run: tokens/s, TTFT and inter-token p50/p99 (seconds)."""
    times: list[tuple[float, list[float]]] = []

    async def all_requests():
        await asyncio.gather(*(_one(engine, ids, task, new, i * interval, times)
                               for i, (ids, task, new) in enumerate(requests)))

    started = time.monotonic()
    asyncio.run(all_requests())
    wall = time.monotonic() - started
    gaps = [b - a for _, s in times for a, b in zip(s, s[1:])]
    ttfts = [s[0] - submitted for submitted, s in times]
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1]  # noqa: E731
    return {"tokens_per_s": sum(len(s) for _, s in times) / wall, "ttft_p50": q(ttfts, 50),
            "ttft_p99": q(ttfts, 99), "itl_p50": q(gaps, 50), "itl_p99": q(gaps, 99)}


class OnEngineThread:
    """Side work (Engine.set_side_work) that makes one call on the engine's own thread, between two steps:
    torch.profiler sees only the thread that starts it."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self._pending: tuple[Callable[[], object], Future] | None = None

    def has_work(self) -> bool:
        return self._pending is not None

    def run_slice(self, is_serving: bool) -> None:
        (fn, future), self._pending = self._pending, None
        try:
            future.set_result(fn())
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            future.set_exception(exc)

    def call(self, fn: Callable[[], object]) -> object:
        """`fn()` on the engine's thread, between two steps; its result (or its exception) here."""
        future: Future = Future()
        self._pending = (fn, future)
        self._engine.notify()
        return future.result()


def copy_share(engine, requests, interval: float, is_legacy: bool) -> float:
    """One more round under torch.profiler, started and stopped on the engine's thread (where the steps
    run): the wall-time share of cache copies."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers.cache_utils import DynamicLayer

    from server.engine.hf_cache import kv_cache
    from server.engine.paged.kv_memory import PagedKV

    # The paged engine copies no cache: only the gathers of prefill chunks over scattered blocks remain.
    targets = ([(DynamicLayer, "update"), (kv_cache, "merge"), (kv_cache, "select")] if is_legacy else
               [(PagedKV, "context")])
    with profile(activities=[ProfilerActivity.CPU]):
        pass  # the profiler's library initialises once, on the thread that loaded it: this one
    on_engine = OnEngineThread(engine)
    prof = profile(activities=[ProfilerActivity.CPU])
    with ExitStack() as undo:
        for owner, name in targets:
            original = getattr(owner, name)

            def wrapped(*a, _original=original, **k):
                with record_function("cache_copy"):
                    return _original(*a, **k)
            setattr(owner, name, wrapped)
            undo.callback(setattr, owner, name, original)
        engine.stop(grace_s=1)  # and start again: memory freed and the prefix cache empty, as before round 1
        engine.start()
        engine.set_side_work(on_engine)
        undo.callback(engine.set_side_work, None)
        on_engine.call(prof.start)
        started = time.monotonic()
        run_round(engine, requests, interval)
        wall = time.monotonic() - started
        on_engine.call(prof.stop)
    copies = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "cache_copy") / 1e6
    return copies / wall


def main() -> None:
    """Alternate the two engines for --rounds, then profile each once; print medians and ratios."""
    args = parse_args()
    loaded = prepare_model(args)
    store, tasks = make_store(loaded, 16, 20)
    requests = workload(loaded, tasks, args.requests)
    print(f"model {loaded.name}, {loaded.dtype}, {torch.get_num_threads()} threads; {args.requests} requests "
          f"{args.interval} s apart, prompts 32-768, new 16-128, 16 tasks x 20 virtual tokens", flush=True)
    engines = {f"slots r={r}": make_engine(loaded, store, args, max_batch_size=32, prefill_chunk_tokens=args.chunk,
                                           max_stall_ratio=float(r)) for r in args.stall_ratios.split(",")}
    if not args.skip_legacy:
        engines["legacy"] = make_engine(loaded, store, args, legacy=True, max_batch_size=32)
    rounds = {k: [] for k in engines}
    for round_no in range(args.rounds):
        for key in (list(engines) if round_no % 2 == 0 else list(engines)[::-1]):
            rounds[key].append(run_round(engines[key], requests, args.interval))
            print(f"  round {round_no + 1} {key}: " + ", ".join(f"{k} {v:.3f}" for k, v in rounds[key][-1].items()),
                  flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rounds.items()}
    for key, figures in med.items():
        print(f"{key:>10}: {figures['tokens_per_s']:.1f} tokens/s; TTFT p50 {figures['ttft_p50']:.3f} s "
              f"p99 {figures['ttft_p99']:.3f} s; inter-token p50 {1000 * figures['itl_p50']:.1f} ms "
              f"p99 {1000 * figures['itl_p99']:.1f} ms (p99/p50 {figures['itl_p99'] / figures['itl_p50']:.2f})")
    first = next(iter(engines))
    if "legacy" in rounds:
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(rounds[first], rounds["legacy"])]
        print(f"tokens/s {first}/legacy = {statistics.median(ratios):.2f} "
              f"(per round {', '.join(f'{x:.2f}' for x in ratios)})")
    if not args.skip_profile:
        for key in (first, "legacy"):
            if key in engines:
                share = copy_share(engines[key], requests, args.interval, key == "legacy")
                print(f"{key:>10}: {100 * share:.1f} % of wall time in cache copies (profiled round)", flush=True)
    for engine in engines.values():
        engine.stop(grace_s=1)


if __name__ == "__main__":
    main()
