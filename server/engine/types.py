"""The engine's public types: what a caller submits and what comes back (no torch, no HTTP)."""

from __future__ import annotations

from dataclasses import dataclass, field

FINISH_LENGTH = "length"
FINISH_EOS = "eos_token"
FINISH_STOP = "stop_sequence"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


@dataclass(frozen=True)
class Share:
    """Whose share of the batch a request draws on: its tenant and its weight (scheduling/fair_share.py)."""

    tenant: str = ""
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError("Share.weight must be > 0")


NO_SHARE = Share()  # no tenant: every request one queue, first in, first out


@dataclass(frozen=True)
class PromptTokens:
    """A request's input as `Engine.tokenize` returns it: token ids, checked against the vocabulary and
    `max_input_tokens`. `Engine.submit` queues them as they are: a text is tokenized once per request."""

    ids: list[int]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation parameters. Greedy unless do_sample is set."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int | None = None
    repetition_penalty: float = 1.0  # 1.0: off
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class TokenEvent:
    """One generated token as it streams out."""

    index: int  # 0-based position among the generated tokens
    token_id: int
    text: str  # the text this token adds (may be "" while a multi-byte character is incomplete)
    logprob: float
    is_special: bool = False
    is_last: bool = False  # True on the request's final token (lets TGI's last SSE event carry details)


@dataclass(frozen=True)
class Timings:
    """Seconds: waiting in the queue, submit to first token, submit to finish."""

    queue_s: float
    first_token_s: float | None
    total_s: float


@dataclass(frozen=True)
class GenerationResult:
    """The final outcome of one request."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    virtual_tokens: int
    generated_tokens: int
    task_id: str | None
    task_version: str | None
    seed: int | None
    timings: Timings
    tokens: list[TokenEvent] = field(default_factory=list)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for /metrics and /ready."""

    is_running: bool
    num_waiting: int
    num_running: int
    num_steps: int
    num_finished: int
    num_failed: int = 0
    num_cancelled: int = 0
    num_preempted: int = 0  # rows given to a less served tenant's request (fair share), or out of KV blocks
    num_generated_tokens: int = 0
    kv: KVStats | None = None  # the paged engine's KV memory (None on the legacy path)


@dataclass(frozen=True)
class KVStats:
    """The paged engine's KV memory and its prefix cache."""

    num_blocks: int
    block_tokens: int
    num_blocks_used: int  # held by running requests
    num_blocks_cached: int  # holding a full block registered for sharing (held or free)
    num_bytes: int  # allocated once, at start
    num_tokens_used: int  # context positions held by running requests
    num_prompt_tokens: int  # context tokens of admitted requests (counted at each admission)
    num_prefix_hit_tokens: int  # of those, found in cached blocks (not computed)
