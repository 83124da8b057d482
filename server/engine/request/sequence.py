"""Sequence: one request's state from submit to finish (no torch)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from server.engine.request.detokenizer import IncrementalDetokenizer
from server.engine.request.stop_matcher import StopMatcher
from server.engine.types import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationResult,
    SamplingParams,
    Timings,
    TokenEvent,
)


class Status(Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sink(Protocol):
    """Where a sequence's output goes (RequestStream implements it; called from the worker thread)."""

    def on_start(self) -> None:
        """The engine admitted the request: its prefill has begun."""

    def on_token(self, event: TokenEvent) -> None:
        """A token was generated."""

    def on_finish(self, result: GenerationResult) -> None:
        """The request ended normally (length, eos, stop, cancelled)."""

    def on_error(self, error: BaseException) -> None:
        """The request failed."""


@dataclass
class Sequence:
    """A request: its inputs, its soft prompt (pinned), its output so far, and where output goes."""

    request_id: str
    task_id: str | None
    prompt: Any  # SoftPrompt or None (bare base model); opaque here
    prompt_ids: list[int]
    params: SamplingParams
    seed: int | None  # the seed actually used (drawn when sampling without one)
    eos_token_ids: frozenset[int]
    tokenizer: Any
    sink: Sink
    # Causal LMs continue the prompt's text, so its last tokens decode with the output (word-initial
    # spaces); an encoder-decoder's output starts a fresh text, decoded alone as HF's decode does.
    continues_prompt: bool = True
    tenant: str = ""  # whose share of the batch it draws on (scheduling/fair_share.py); "" if fair share is off
    weight: float = 1.0  # its tenant's weight
    num_charged: int = 0  # context tokens already counted against its tenant's share
    status: Status = Status.WAITING
    generated: list[int] = field(default_factory=list)
    events: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None
    is_cancel_requested: bool = False  # set from any thread; read by the worker at each step
    is_prompt_released: bool = False  # the store's pin was given back (exactly once)
    # Paged engine: the KV blocks it holds while running (position p in block_table[p // block size]),
    # context positions whose keys and values are in them, the prefix hash chain of its full blocks, and
    # how many of those are registered for sharing.
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0
    block_hashes: list[bytes] = field(default_factory=list)
    num_committed: int = 0
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None

    def __post_init__(self) -> None:
        self._detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids if self.continues_prompt else [])
        self._stops = StopMatcher(self.params.stop)

    @property
    def num_virtual_tokens(self) -> int:
        """n: the task's virtual tokens (0 for the bare model)."""
        return 0 if self.prompt is None else int(self.prompt.num_virtual_tokens)

    @property
    def num_context_tokens(self) -> int:
        """Virtual + prompt + generated tokens: the row's length, and the next token's position."""
        return self.num_virtual_tokens + len(self.prompt_ids) + len(self.generated)

    @property
    def context_ids(self) -> list[int]:
        """Prompt and generated token ids (the context after the virtual tokens)."""
        return self.prompt_ids + self.generated

    @property
    def is_finished(self) -> bool:
        """Whether a finish reason is set."""
        return self.finish_reason is not None

    def append_token(self, token_id: int, logprob: float) -> TokenEvent:
        """Record a generated token; decide whether the request is done; return its stream event."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.generated.append(token_id)
        is_eos = token_id in self.eos_token_ids
        update = self._stops.feed(self._detok.add(token_id))
        text = update.text
        if update.is_stopped:
            self.finish_reason = FINISH_STOP
        elif is_eos and not self.params.ignore_eos:
            self.finish_reason = FINISH_EOS
        elif len(self.generated) >= self.params.max_new_tokens:
            self.finish_reason = FINISH_LENGTH
        if self.finish_reason is not None and not update.is_stopped:
            tail = self._stops.feed(self._detok.flush())  # the held-back bytes may complete a stop
            if tail.is_stopped:
                self.finish_reason = FINISH_STOP
            text += tail.text + self._stops.finish()
        event = TokenEvent(index=len(self.generated) - 1, token_id=token_id, text=text,
                           logprob=logprob, is_special=is_eos, is_last=self.finish_reason is not None)
        self.events.append(event)
        return event

    def cancel(self) -> None:
        """Mark as cancelled (the worker removes it at its next step)."""
        self.finish_reason = self.finish_reason or FINISH_CANCELLED

    def result(self) -> GenerationResult:
        """The final outcome (valid once finished)."""
        now = time.monotonic()
        admitted = self.admitted_at if self.admitted_at is not None else now
        first = None if self.first_token_at is None else self.first_token_at - self.submitted_at
        timings = Timings(queue_s=admitted - self.submitted_at, first_token_s=first, total_s=now - self.submitted_at)
        return GenerationResult(
            text=self._stops.text, token_ids=list(self.generated), finish_reason=self.finish_reason or FINISH_LENGTH,
            prompt_tokens=len(self.prompt_ids), virtual_tokens=self.num_virtual_tokens,
            generated_tokens=len(self.generated), task_id=self.task_id,
            task_version=None if self.prompt is None else self.prompt.version, seed=self.seed,
            timings=timings, tokens=list(self.events),
        )
