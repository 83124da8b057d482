"""What both workers share: sampling and emitting each row's token, finishing, failing and cancelling
requests, the store pins, and the counters. A subclass owns the rows' model state and frees it in
`_leave`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from server.engine.errors import EngineError, RequestFailed
from server.engine.request.sequence import Sequence
from server.engine.sampler import sample
from server.engine.scheduling.scheduler import Scheduler
from server.engine.types import FINISH_ERROR

log = logging.getLogger(__name__)

LogitsTap = Callable[[str, int, torch.Tensor], None]  # (request_id, token index, logits [V])


class WorkerBase:
    """Request lifecycle on the engine's single worker thread."""

    def __init__(self, runner: Any, scheduler: Scheduler, release: Callable[[Any], None],
                 flush: Callable[[], None] = lambda: None):
        self._runner = runner
        self._flush = flush  # hands this step's stream events to the callers' event loops
        self._scheduler = scheduler
        self._release = release
        self.logits_tap: LogitsTap | None = None
        self.num_steps = self.num_finished = self.num_failed = self.num_cancelled = self.num_preempted = 0
        self.num_generated_tokens = 0

    @property
    def runner(self) -> Any:
        """The runner that calls the model for this worker."""
        return self._runner

    def _leave(self, seq: Sequence) -> None:
        """Free whatever the row holds besides its prompt pin (subclass hook)."""

    def reset(self) -> None:
        """Forget every row (after the engine stopped)."""

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor,
              generators: list[torch.Generator | None]) -> tuple[list[int], list[int]]:
        """Sample each row of `logits` [B, V], stream its token, finish or fail it; returns the sampled
        token ids and the rows still running."""
        if self.logits_tap is not None:
            for row, seq in enumerate(seqs):
                self.logits_tap(seq.request_id, len(seq.generated), logits[row].clone())
        histories = [self._runner.penalty_history(s) if s.params.repetition_penalty != 1.0 else [] for s in seqs]
        out = sample(logits, [s.params for s in seqs], histories, generators)
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
        return out.token_ids, keep

    @staticmethod
    def _mark_admitted(seq: Sequence, now: float) -> None:
        if seq.admitted_at is None:  # the first admission: a preempted request's queue time stays its first
            seq.admitted_at = now
            seq.sink.on_start()

    def _end_cancelled(self, cancelled: list[Sequence]) -> None:
        for seq in cancelled:
            seq.cancel()
            self.num_cancelled += 1
            self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        self._scheduler.finish([seq])
        self._leave(seq)
        self._release_prompt(seq)
        self.num_finished += 1
        seq.sink.on_finish(seq.result())

    def fail(self, seq: Sequence, exc: BaseException) -> None:
        """End one request with an error; its batch mates carry on."""
        log.warning("request %s failed: %s", seq.request_id, exc)
        seq.finish_reason = FINISH_ERROR
        self._scheduler.finish([seq])
        self._leave(seq)
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
        self.reset()

    def _release_prompt(self, seq: Sequence) -> None:
        if seq.prompt is None or seq.is_prompt_released:
            return
        seq.is_prompt_released = True
        try:
            self._release(seq.prompt)
        except Exception:
            log.exception("releasing the prompt of task %s failed", seq.task_id)
