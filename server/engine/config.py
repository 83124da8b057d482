"""EngineConfig: the engine's limits and knobs (plain values; server/config.py fills them from settings)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Limits enforced at submit time and by the scheduler at every step."""

    max_batch_size: int = 32  # rows decoded together
    max_queue: int = 256  # requests waiting for admission
    max_input_tokens: int = 1024  # text tokens of one request (virtual tokens not counted)
    max_new_tokens: int = 512  # upper bound of SamplingParams.max_new_tokens
    max_total_tokens: int = 2048  # virtual + input + new tokens of one request (capped by the model)
    max_prefill_tokens: int = 4096  # padded tokens (rows x longest row) in one prefill step
    max_stop_sequences: int = 8
    max_stop_length: int = 256  # characters in one stop sequence
    idle_wait_s: float = 0.5  # how long the worker sleeps when idle before checking again

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_input_tokens", "max_new_tokens",
                     "max_total_tokens", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")
