"""Worker: one engine step (cancel, admit, prefill newcomers, merge, decode, sample, emit, filter) with
fault isolation: a failing forward is retried on halves of its rows until the culprit fails alone."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from server.engine import kv_cache
from server.engine.batch import Batch
from server.engine.errors import EngineError, RequestFailed
from server.engine.runner import ModelRunner
from server.engine.runner_seq2seq import Seq2SeqRunner
from server.engine.sampler import make_generator, sample
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.engine.types import FINISH_ERROR

log = logging.getLogger(__name__)

LogitsTap = Callable[[str, int, torch.Tensor], None]  # (request_id, token index, logits [V])


class Worker:
    """Owns the running batch; every method runs on the engine's single worker thread."""

    def __init__(self, runner: ModelRunner | Seq2SeqRunner, scheduler: Scheduler, release: Callable[[Any], None],
                 flush: Callable[[], None] = lambda: None):
        self._runner = runner
        self._flush = flush  # hands this step's stream events to the callers' event loops
        self._scheduler = scheduler
        self._release = release
        self.batch: Batch | None = None
        self.logits_tap: LogitsTap | None = None
        self.num_steps = self.num_finished = self.num_failed = self.num_cancelled = 0
        self.num_generated_tokens = 0

    def step(self) -> None:
        """One iteration: newcomers are prefilled and merged, then every running row gets one token."""
        self._drop_cancelled()
        newcomers = self._scheduler.admit()
        if newcomers:
            now = time.monotonic()
            for seq in newcomers:
                seq.admitted_at = now
            fresh = self._prefill(newcomers)
            self._flush()  # first tokens out before the decode: time to first token
            self.batch = _merge(self.batch, fresh)
        if self.batch is not None:
            self.batch = self._decode(self.batch)
        self._flush()
        self.num_steps += 1

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
        seqs = batch.seqs
        if self.logits_tap is not None:
            for row, seq in enumerate(seqs):
                self.logits_tap(seq.request_id, len(seq.generated), logits[row].clone())
        histories = [self._runner.penalty_history(s) if s.params.repetition_penalty != 1.0 else [] for s in seqs]
        out = sample(logits, [s.params for s in seqs], histories, batch.generators)
        keep: list[int] = []
        for row, seq in enumerate(seqs):
            if row in out.errors:
                self.fail(seq, out.errors[row])
                continue
            try:
                event = seq.append_token(out.token_ids[row], out.logprobs[row])
            except Exception as exc:  # noqa: BLE001 - e.g. the tokenizer chokes on this row's output
                self.fail(seq, exc)
                continue
            self.num_generated_tokens += 1
            seq.sink.on_token(event)
            if seq.is_finished:
                self._finish(seq)
            else:
                keep.append(row)
        batch.set_last_tokens(out.token_ids)
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
        for seq in cancelled:
            seq.cancel()
            self.num_cancelled += 1
            self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        self._scheduler.finish([seq])
        self._release_prompt(seq)
        self.num_finished += 1
        seq.sink.on_finish(seq.result())

    def fail(self, seq: Sequence, exc: BaseException) -> None:
        """End one request with an error; its batch mates carry on."""
        log.warning("request %s failed: %s", seq.request_id, exc)
        seq.finish_reason = FINISH_ERROR
        self._scheduler.finish([seq])
        self._release_prompt(seq)
        self.num_failed += 1
        error = exc if isinstance(exc, EngineError) else RequestFailed(
            f"request {seq.request_id} failed in the model step: {exc}")
        if error is not exc:
            error.__cause__ = exc
        seq.sink.on_error(error)

    def fail_all(self, exc: BaseException) -> None:
        """An error not tied to any row (a bug): fail the running rows, keep the worker alive."""
        for seq in self._scheduler.running():
            if not seq.is_finished:
                self.fail(seq, exc)
        self.batch = None

    def _release_prompt(self, seq: Sequence) -> None:
        if seq.prompt is None or seq.is_prompt_released:
            return
        seq.is_prompt_released = True
        try:
            self._release(seq.prompt)
        except Exception:
            log.exception("releasing the prompt of task %s failed", seq.task_id)


def _merge(first: Batch | None, second: Batch | None) -> Batch | None:
    if first is None:
        return second
    if second is None:
        return first
    return first.merge(second)
