"""SlotWorker: one step of the slot engine (causal models).

Each step: drop cancelled requests; admit waiting ones while KV slots are free (memory-bounded: a
request's slot holds its whole context, so it can never run out); plan the step, every decoding row's
next token plus prompt chunks within the ChunkBudget (chunked prefill: a long prompt spreads over steps
while the running rows keep decoding, each such step kept within `max_stall_ratio` of a decode-only
one; when no row is decoding, up to `idle_prefill_tokens`); run it as one packed forward; sample the rows
whose context is complete; emit. A request of a task whose virtual-token KV is cached starts from a copy
of it; while the first request of a task computes it, the task's other requests wait in the queue
(others pass them). A failing forward is retried on halves of its chunks until the culprit fails alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from server.engine import step_plan
from server.engine.chunk_budget import ChunkBudget
from server.engine.config import EngineConfig
from server.engine.kv_pool import KVPool
from server.engine.prefix_cache import PrefixCache
from server.engine.runner_slots import SlotRunner
from server.engine.sampler import make_generator
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.engine.step_plan import Chunk
from server.engine.worker_base import WorkerBase


class SlotWorker(WorkerBase):
    """Owns the slots' occupants; every method runs on the engine's single worker thread."""

    def __init__(self, runner: SlotRunner, scheduler: Scheduler, pool: KVPool, prefixes: PrefixCache,
                 config: EngineConfig, release: Callable[[Any], None], flush: Callable[[], None] = lambda: None):
        super().__init__(runner, scheduler, release, flush)
        runner.attach(pool)
        self._pool = pool
        self._prefixes = prefixes
        self._budget = ChunkBudget(config.prefill_chunk_tokens, config.idle_prefill_tokens, config.max_stall_ratio)
        self._owners: list[Sequence | None] = [None] * pool.num_slots
        self._generators: dict[int, torch.Generator] = {}
        self._computing: dict[tuple[str, str], Sequence] = {}  # task's prefix -> the request computing it

    def step(self) -> None:
        """One iteration: admit, then one packed forward of decode tokens and prompt chunks."""
        self._end_cancelled(self._scheduler.take_cancelled())
        preempted = self._scheduler.preempt_for_waiting(self._pool.num_free)
        if preempted is not None:
            self._preempt(preempted)
        for seq in self._scheduler.admit_slots(self._pool.num_free, self._is_ready):
            self._place(seq)
        chunks = self._plan()
        if chunks:
            self._run(step_plan.order(chunks))
        self.num_steps += 1  # before the flush: a caller woken by a result sees its step counted
        self._flush()

    def reset(self) -> None:
        """Free every slot (after the engine stopped or a step failed as a whole)."""
        self._pool.num_used = 0
        self._owners = [None] * self._pool.num_slots
        self._generators.clear()
        self._computing.clear()

    # -- admission ------------------------------------------------------------------------------
    def _is_ready(self, seq: Sequence) -> bool:
        """Defer a request whose task's prefix another running request is computing right now."""
        if seq.prompt is None or not self._prefixes.is_enabled:
            return True
        if seq.num_virtual_tokens * self._pool.geometry.bytes_per_token > self._prefixes.max_bytes:
            return True  # it will never be cached: waiting for it would only serialize the task's requests
        key = (seq.task_id, seq.prompt.version)
        if self._prefixes.contains(*key):
            return True
        if key in self._computing:
            return False
        self._computing[key] = seq
        return True

    def _place(self, seq: Sequence) -> None:
        self._mark_admitted(seq, time.monotonic())
        seq.slot = self._pool.allocate()
        self._owners[seq.slot] = seq
        if seq.params.do_sample and id(seq) not in self._generators:  # a preempted one keeps its stream
            self._generators[id(seq)] = make_generator(seq.seed, self._pool.geometry.device)
        seq.num_cached = 0
        if seq.prompt is not None and self._prefixes.is_enabled:
            prefix = self._prefixes.get(seq.task_id, seq.prompt.version)
            if prefix is not None:
                self._pool.load_prefix(seq.slot, prefix)
                seq.shared_prefix = prefix  # decode reads it in place (held even if the cache drops it)
                # At least the last position is computed: its logits give the first token.
                seq.num_cached = min(prefix.num_tokens, seq.num_context_tokens - 1)

    def _plan(self) -> list[Chunk]:
        running = self._scheduler.running()
        # While rows decode, a chunk delays their next token, so it is kept short. When none does, nobody
        # waits on the step: one large prefill then starts every waiting request at once (with short chunks,
        # a burst of requests would join over many steps and finish over as many, at smaller batches).
        chunks, budget = [], self._budget.tokens(is_decoding=any(seq.generated for seq in running))
        for seq in running:
            remaining = seq.num_context_tokens - seq.num_cached
            if seq.generated:
                chunks.append(Chunk(seq, seq.num_cached, remaining))
            elif budget > 0:
                take = min(remaining, budget)
                budget -= take
                chunks.append(Chunk(seq, seq.num_cached, take))
        return chunks

    # -- the forward --------------------------------------------------------------------------
    def _run(self, chunks: list[Chunk]) -> None:
        started = time.perf_counter()
        try:
            logits = self._runner.forward(chunks)
        except Exception as exc:  # noqa: BLE001 - any model error: isolate the culprit by halving
            if len(chunks) == 1:
                self.fail(chunks[0].seq, exc)
                return
            mid = len(chunks) // 2
            self._run(chunks[:mid])
            self._run([c for c in chunks[mid:] if not c.seq.is_finished])
            return
        num_decode = sum(c.is_decode for c in chunks)
        self._budget.record(time.perf_counter() - started, num_decode, sum(c.num_tokens for c in chunks) - num_decode)
        sampling = [c.seq for c in chunks if c.is_sampling]
        for chunk in chunks:
            chunk.seq.num_cached = chunk.end
            self._keep_prefix(chunk.seq)
        self._emit(sampling, logits, [self._generators.get(id(s)) for s in sampling])

    def _keep_prefix(self, seq: Sequence) -> None:
        if seq.prompt is None:
            return
        key = (seq.task_id, seq.prompt.version)
        if self._computing.get(key) is seq and seq.num_cached >= seq.num_virtual_tokens:
            seq.shared_prefix = self._pool.save_prefix(seq.slot, seq.num_virtual_tokens)
            self._prefixes.put(*key, seq.shared_prefix, computed_since=seq.submitted_at)  # pinned then
            del self._computing[key]

    def _preempt(self, seq: Sequence) -> None:
        """Its row goes to another tenant: the slot is freed; admitted again, it recomputes its context
        (prompt and the tokens it generated) in one chunk and goes on, its sampler where it was."""
        generator = self._generators.get(id(seq))
        self._leave(seq)
        if generator is not None:
            self._generators[id(seq)] = generator
        seq.num_cached = 0
        self.num_preempted += 1

    def _leave(self, seq: Sequence) -> None:
        """Free the row's slot (the last slot moves into it) and whatever it was computing."""
        self._generators.pop(id(seq), None)
        seq.shared_prefix = None
        if seq.prompt is not None and self._computing.get((seq.task_id, seq.prompt.version)) is seq:
            del self._computing[(seq.task_id, seq.prompt.version)]
        if seq.slot is None:
            return
        slot, seq.slot = seq.slot, None
        last = self._owners[self._pool.num_used - 1]
        moved = self._pool.release(slot, last.num_cached)
        self._owners[self._pool.num_used] = None
        if moved is not None:
            self._owners[slot] = last
            last.slot = slot
