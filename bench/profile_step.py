"""Where a decode step's time goes: bench_peer's P1 or P2, or "soft prompts are free" (bench_engine's
`--workload free` at 64 new tokens: `free`, and the same inputs on the bare model: `free-bare`), in process
(no HTTP), on bench_peer's model.

Each round submits the workload's requests together and prints tokens/s, the number of steps, the mean
decode-only step and the time in steps that prefill; with --profile, torch.profiler's table of one
decode-only step of the last round with every request decoding (that one step, slowed by the profiler,
is in the round's figures too). Tokens are random ids of the workload's lengths,
tasks random prompts in a temporary store.

Run: python bench/profile_step.py [--workload P1|P2|free|free-bare] [--dtype float32|bfloat16] [--rounds 3]
     [--profile] [--eager] [--model-dir DIR]
"""

from __future__ import annotations

from server.preloads import reexec_with_preloads

reexec_with_preloads()  # before torch loads, as `promptserve serve` does

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import peer_servers as ps
import torch
from bench_peer import WORKLOADS, Workload
from torch.profiler import ProfilerActivity, profile


# 16 requests of 16 tasks x 100 virtual tokens, 16-token inputs, 64 new; "bare": no task, the same inputs.
FREE = {"free": Workload("free", 16, 16, 100, (16, 16), (64, 64)),
        "free-bare": Workload("free-bare", 16, 0, 0, (16, 16), (64, 64))}


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="P1", choices=["P1", "P2", *FREE])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="print torch.profiler's table of one decode step")
    p.add_argument("--model-dir", type=Path, default=None, help="bench_peer's model folder (built if missing)")
    p.add_argument("--eager", action="store_true", help="the step without torch.compile (as --no-compile)")
    return p.parse_args()


class StepLog:
    """Wraps the runner's forward (Engine.runner): (seconds, decoding rows, prompt tokens) per step; profiles
    the first decode-only step of `profile_rows` rows (None: none)."""

    def __init__(self, runner, profile_rows: int | None):
        self.steps: list[tuple[float, int, int]] = []
        self.table: str | None = None
        self.profile_rows = profile_rows
        self._forward = runner.forward
        runner.forward = self.forward

    def forward(self, chunks):
        num_decode = sum(c.is_decode for c in chunks)
        num_prompt = sum(c.num_tokens for c in chunks if not c.is_decode)
        started = time.perf_counter()
        if self.profile_rows is not None and num_prompt == 0 and num_decode == self.profile_rows:
            self.profile_rows = None  # one step: the profiler slows the steps it watches
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                logits = self._forward(chunks)
            self.table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        else:
            logits = self._forward(chunks)
        self.steps.append((time.perf_counter() - started, num_decode, num_prompt))
        return logits


def main() -> None:
    """Warm-up round, then --rounds measured ones."""
    from prompt_store.store import PromptStore
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.model_loader import load_model
    from server.engine.types import SamplingParams

    args = parse_args()
    w = FREE.get(args.workload) or next(w for w in WORKLOADS if w.name == args.workload)
    torch.set_grad_enabled(False)
    model_dir = ps.build_model_dir(args.model_dir or Path(tempfile.mkdtemp(prefix="profile-step-")) / "model")
    loaded = load_model(str(model_dir), "cpu", args.dtype)
    store = PromptStore(tempfile.mkdtemp(prefix="profile-step-store-"), token_dim=loaded.hidden_size,
                        device=loaded.device, dtype=loaded.dtype)
    gen, tasks = torch.Generator().manual_seed(1), [f"t{i}" for i in range(w.num_tasks)]
    for task in tasks:
        store.put(task, torch.randn(w.num_virtual, loaded.hidden_size, generator=gen), task_type=loaded.task_type)
    engine = Engine(loaded, store, EngineConfig(compile=not args.eager))
    print(f"{w.name}, {args.dtype}: warm-up (compile) {engine.warm_up():.0f} s", flush=True)
    log = StepLog(engine.runner, None)
    engine.start()
    rng = random.Random(0)

    async def one_round() -> int:
        params = SamplingParams(max_new_tokens=w.new_range[1], ignore_eos=True)
        ids = [[rng.randrange(3, loaded.vocab_size) for _ in range(rng.randint(*w.input_range))]
               for _ in range(w.num_requests)]
        streams = await asyncio.gather(*(engine.submit(x, task_id=tasks[i % len(tasks)] if tasks else None,
                                                       params=params)
                                         for i, x in enumerate(ids)))
        return sum([(await s.result()).generated_tokens for s in streams])

    asyncio.run(one_round())
    for round_no in range(args.rounds):
        log.steps.clear()
        log.profile_rows = w.num_requests if args.profile and round_no == args.rounds - 1 else None
        started = time.perf_counter()
        tokens = asyncio.run(one_round())
        wall = time.perf_counter() - started
        decode = [s for s, _, p in log.steps if p == 0]
        prefill = sum(s for s, _, p in log.steps if p > 0)
        print(f"round {round_no + 1}: {tokens / wall:.0f} tokens/s ({wall:.2f} s); {len(log.steps)} steps, "
              f"decode-only {len(decode)} x {1000 * sum(decode) / max(1, len(decode)):.1f} ms, steps that "
              f"prefill {prefill:.2f} s", flush=True)
    engine.stop()
    if log.table:
        print(f"one {w.num_requests}-row decode step:\n{log.table}")


if __name__ == "__main__":
    main()
