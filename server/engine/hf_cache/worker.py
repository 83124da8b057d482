"""Worker (the DynamicCache path: encoder-decoders, and causal models the paged path cannot run): one
engine step (cancel, admit, prefill newcomers, merge, decode, sample, emit, filter) over a transformers
cache, with fault isolation: a failing forward is retried on halves of its rows until the culprit fails alone."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from server.engine.hf_cache import kv_cache
from server.engine.hf_cache.batch import Batch
from server.engine.hf_cache.runner import ModelRunner
from server.engine.hf_cache.runner_seq2seq import Seq2SeqRunner
from server.engine.request.sequence import Sequence
from server.engine.sampler import make_generator
from server.engine.scheduling.scheduler import Scheduler
from server.engine.worker_base import WorkerBase


class Worker(WorkerBase):
    """Owns the running batch; every method runs on the engine's single worker thread."""

    def __init__(self, runner: ModelRunner | Seq2SeqRunner, scheduler: Scheduler, release: Callable[[Any], None],
                 flush: Callable[[], None] = lambda: None):
        super().__init__(runner, scheduler, release, flush)
        self.batch: Batch | None = None

    def step(self) -> None:
        """One iteration: newcomers are prefilled and merged, then every running row gets one token."""
        self._drop_cancelled()
        newcomers = self._scheduler.admit()
        if newcomers:
            now = time.monotonic()
            for seq in newcomers:
                self._mark_admitted(seq, now)
            fresh = self._prefill(newcomers)
            self._flush()  # first tokens out before the decode: time to first token
            self.batch = _merge(self.batch, fresh)
        if self.batch is not None:
            self.batch = self._decode(self.batch)
        self.num_steps += 1  # before the flush: a caller woken by a result sees its step counted
        self._flush()

    def _prefill(self, seqs: list[Sequence]) -> Batch | None:
        try:
            batch, logits = self._runner.prefill(seqs)
        except Exception as exc:  # noqa: BLE001 - any model error: isolate the culprit by halving
            if len(seqs) == 1:
                self.fail(seqs[0], exc)
                return None
            mid = len(seqs) // 2
            return _merge(self._prefill(seqs[:mid]), self._prefill(seqs[mid:]))
        device = logits.device
        batch.generators = [make_generator(s.seed, device) if s.params.do_sample else None for s in seqs]
        return self._emit(batch, logits)

    def _decode(self, batch: Batch) -> Batch | None:
        width = batch.width
        try:
            logits = self._runner.decode(batch)
        except Exception as exc:  # noqa: BLE001
            kv_cache.truncate(batch.cache, width)  # layers that ran before the error grew by one column
            if len(batch) == 1:
                self.fail(batch.seqs[0], exc)
                return None
            mid = len(batch) // 2
            left = self._decode(batch.select(list(range(mid))))
            right = self._decode(batch.select(list(range(mid, len(batch)))))
            return _merge(left, right)
        return self._emit(batch, logits)

    def _emit(self, batch: Batch, logits: torch.Tensor) -> Batch | None:
        """Sample each row, stream its token, and drop the rows that finished or failed."""
        token_ids, keep = super()._emit(batch.seqs, logits, batch.generators)
        batch.set_last_tokens(token_ids)
        if len(keep) == len(batch):
            return batch
        return batch.select(keep) if keep else None

    def _drop_cancelled(self) -> None:
        cancelled = self._scheduler.take_cancelled()
        if not cancelled:
            return
        gone = {id(s) for s in cancelled}
        if self.batch is not None:
            keep = [i for i, s in enumerate(self.batch.seqs) if id(s) not in gone]
            self.batch = self.batch.select(keep) if keep else None
        self._end_cancelled(cancelled)

    def reset(self) -> None:
        """Forget the running batch."""
        self.batch = None


def _merge(first: Batch | None, second: Batch | None) -> Batch | None:
    if first is None:
        return second
    if second is None:
        return first
    return first.merge(second)
