"""PagedWorker: one step of the paged engine (causal models).

Each step: drop cancelled requests; admit waiting ones while rows and KV blocks allow (fair order; a
request takes the cached blocks of its longest shared prefix by reference and fresh blocks for the rest of
its prompt, keeping a watermark of free blocks while others run); give every decoding row the block its
next position needs, preempting the request fair share ranks last when none is free (it recomputes when
admitted again); plan the step, every decoding row's next token plus prompt chunks within the ChunkBudget;
run it as one packed forward; register the blocks that became full under their hash; sample the rows whose
context is complete; emit. A request whose next prefix block another request is computing right now waits
for it (others pass it). A failing forward is retried on halves of its chunks until the culprit fails alone.

Only full blocks are shared. A prompt's partial last block is recomputed by each request in a block of its
own, never copied on write: it is at most block_tokens - 1 positions of a prefill chunk, and a shared
block is never written, so no request can see another's keys change under it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.config import EngineConfig
from server.engine.paged import block_hash, step_plan
from server.engine.paged.block_manager import BlockManager, OutOfBlocks
from server.engine.paged.kv_memory import PagedKV
from server.engine.paged.runner import PagedRunner
from server.engine.paged.step_plan import Chunk
from server.engine.request.sequence import Sequence
from server.engine.sampler import make_generator
from server.engine.scheduling.chunk_budget import ChunkBudget
from server.engine.scheduling.scheduler import ADMIT, DEFER, STOP, Scheduler
from server.engine.worker_base import WorkerBase

WATERMARK_FRACTION = 0.01  # blocks kept free at admission while others run, for their decode growth


@dataclass
class PrefixCounters:
    """Prompt tokens admitted, and how many of them were found in cached blocks."""

    num_prompt_tokens: int = 0
    num_hit_tokens: int = 0


class PagedWorker(WorkerBase):
    """Owns the running requests' blocks; every method runs on the engine's single worker thread (but
    `forget_task`)."""

    def __init__(self, runner: PagedRunner, scheduler: Scheduler, memory: PagedKV, config: EngineConfig,
                 release: Callable[[Any], None], flush: Callable[[], None] = lambda: None):
        super().__init__(runner, scheduler, release, flush)
        runner.attach(memory)
        self.memory = memory
        self.blocks = BlockManager(memory.num_blocks, memory.block_tokens)
        self.prefix = PrefixCounters()
        self._config = config
        self._budget = ChunkBudget(config.prefill_chunk_tokens, config.idle_prefill_tokens, config.max_stall_ratio)
        self._watermark = max(1, int(WATERMARK_FRACTION * memory.num_blocks))
        self._generators: dict[int, torch.Generator] = {}
        self._pending: dict[bytes, Sequence] = {}  # a block's hash -> the running request computing it
        self._forgotten: collections.deque[str] = collections.deque()  # appended from the event loop
        # When each task was last forgotten: blocks computed by a request submitted before then (it pinned
        # the old task) are not registered, so a deleted task's KV is not kept. One float per task forgotten.
        self._forgotten_at: dict[str, float] = {}

    def step(self) -> None:
        """One iteration: admit, grow, then one packed forward of decode tokens and prompt chunks."""
        while self._forgotten:
            self.blocks.forget_owner(self._forgotten.popleft())
        self._end_cancelled(self._scheduler.take_cancelled())
        preempted = self._scheduler.preempt_for_waiting(self._config.max_batch_size - self._scheduler.num_running)
        if preempted is not None:
            self._preempt(preempted)
        self._scheduler.admit_slots(self._config.max_batch_size - self._scheduler.num_running, self._place)
        self._grow()
        chunks = self._plan()
        if chunks:
            self._run(step_plan.order(chunks))
        self.num_steps += 1  # before the flush: a caller woken by a result sees its step counted
        self._flush()

    def forget_task(self, task_id: str) -> None:
        """A task was deleted or replaced: its cached blocks are dropped at the next step (thread-safe)."""
        self._forgotten_at[task_id] = time.monotonic()
        self._forgotten.append(task_id)

    def reset(self) -> None:
        """Free every block and forget the cache (after the engine stopped or a step failed as a whole)."""
        self.blocks = BlockManager(self.memory.num_blocks, self.memory.block_tokens)
        self._generators.clear()
        self._pending.clear()

    # -- admission ------------------------------------------------------------------------------
    def _place(self, seq: Sequence) -> str:
        """Admit `seq` if its blocks fit: the cached ones of its longest shared prefix (never its last
        position, whose logits give the next token) by reference, fresh ones for the rest."""
        size = self.memory.block_tokens
        num_context = seq.num_context_tokens
        matched = []
        if self._config.prefix_caching:
            self._extend_hashes(seq, num_context // size)
            matched = self.blocks.match(seq.block_hashes[:(num_context - 1) // size])
        following = seq.block_hashes[len(matched)] if len(matched) < len(seq.block_hashes) else None
        if self._pending.get(following, seq) is not seq:
            return DEFER  # another request computes that block now: start from it once it is done
        num_new = -(-num_context // size) - len(matched)
        reserve = self._watermark if self._scheduler.num_running else 0
        if num_new > self.blocks.num_free - self.blocks.num_free_among(matched) - reserve:
            return STOP
        self.blocks.pin(matched)
        seq.block_table = matched + self.blocks.allocate(num_new)
        seq.num_cached, seq.num_committed = len(matched) * size, len(matched)
        for digest in seq.block_hashes[len(matched):]:
            self._pending.setdefault(digest, seq)
        self.prefix.num_prompt_tokens += num_context
        self.prefix.num_hit_tokens += seq.num_cached
        self._mark_admitted(seq, time.monotonic())
        if seq.params.do_sample and id(seq) not in self._generators:  # a preempted one keeps its stream
            self._generators[id(seq)] = make_generator(seq.seed, self.memory.geometry.device)
        return ADMIT

    def _grow(self) -> None:
        """A block for each decoding row whose next position starts one; out of blocks, preempt."""
        for seq in self._scheduler.running():  # oldest first: the newest are preempted first
            while seq.block_table and len(seq.block_table) * self.memory.block_tokens < seq.num_context_tokens:
                try:
                    seq.block_table += self.blocks.allocate(1)
                except OutOfBlocks:
                    victim = self._scheduler.preempt_for_memory()
                    self._preempt(victim)
                    if victim is seq:
                        break

    def _plan(self) -> list[Chunk]:
        running = self._scheduler.running()
        decoding = [seq for seq in running if seq.generated]
        prompts = [seq for seq in running if not seq.generated]  # oldest first
        remaining = {id(seq): seq.num_context_tokens - seq.num_cached for seq in prompts}
        # While rows decode, a chunk delays their next token: it follows the backlog (ChunkBudget). When none
        # does, nobody waits on the step: one large prefill then starts every waiting request at once (with
        # short chunks, a burst would join over many steps and finish over as many).
        budget = self._budget.tokens(bool(decoding), len(prompts), sum(remaining.values()))
        take = dict.fromkeys(remaining, 0)
        # The oldest prompt first gets its share, so that none starves; the rest of the budget goes to the
        # prompts closest to their first token (most first tokens per step: in a burst of requests sharing a
        # template, the followers whose prefix is cached start before the next template is computed).
        if prompts:
            oldest = id(prompts[0])
            take[oldest] = min(remaining[oldest], budget, self._budget.share)
            budget -= take[oldest]
        for seq in sorted(prompts, key=lambda s: remaining[id(s)]):
            extra = min(remaining[id(seq)] - take[id(seq)], budget)
            take[id(seq)] += extra
            budget -= extra
        return ([Chunk(seq, seq.num_cached, seq.num_context_tokens - seq.num_cached) for seq in decoding]
                + [Chunk(seq, seq.num_cached, take[id(seq)]) for seq in prompts if take[id(seq)]])

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
            self._commit(chunk.seq)
        self._emit(sampling, logits, [self._generators.get(id(s)) for s in sampling])

    def _commit(self, seq: Sequence) -> None:
        """Register the request's blocks that became full: later requests with that prefix share them."""
        num_full = seq.num_cached // self.memory.block_tokens
        if num_full <= seq.num_committed or not self._config.prefix_caching:
            return
        if seq.task_id is not None and self._forgotten_at.get(seq.task_id, -1.0) >= seq.submitted_at:
            return  # its task was deleted or replaced since it was pinned
        self._extend_hashes(seq, num_full)
        for index in range(seq.num_committed, num_full):
            digest = seq.block_hashes[index]
            self.blocks.commit(seq.block_table[index], digest, seq.task_id)
            if self._pending.get(digest) is seq:
                del self._pending[digest]
        seq.num_committed = num_full

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        if len(seq.block_hashes) >= num_blocks:
            return
        version = None if seq.prompt is None else seq.prompt.version
        names = block_hash.context_ids(seq.num_virtual_tokens, seq.context_ids)
        block_hash.extend(seq.block_hashes, block_hash.root(seq.task_id, version), names,
                          self.memory.block_tokens, num_blocks)

    def _preempt(self, seq: Sequence) -> None:
        """Its blocks go to others: admitted again, it recomputes what is not cached of its context
        (prompt and the tokens it generated) and goes on, its sampler where it was."""
        generator = self._generators.get(id(seq))
        self._leave(seq)
        if generator is not None:
            self._generators[id(seq)] = generator
        self.num_preempted += 1

    def _leave(self, seq: Sequence) -> None:
        """Free the row's blocks (cached ones stay cached) and whatever it was computing."""
        self._generators.pop(id(seq), None)
        for digest in seq.block_hashes[seq.num_committed:]:
            if self._pending.get(digest) is seq:
                del self._pending[digest]
        self.blocks.free(seq.block_table)
        seq.block_table, seq.num_cached, seq.num_committed = [], 0, 0
