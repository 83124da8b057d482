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
    max_prefill_tokens: int = 4096  # legacy path: padded tokens (rows x longest row) in one prefill step
    # Paged engine (causal models): prompt tokens computed in one step; longer prompts continue next step.
    # While rows decode, at most this many; each waiting request earns a quarter of it (ChunkBudget).
    prefill_chunk_tokens: int = 512  # the server's default too (--prefill-chunk-tokens)
    idle_prefill_tokens: int = 2048  # the same, in a step where no request is decoding (no next token waits)
    # A step that prefills while rows decode takes at most this multiple of a decode-only step (estimated
    # from recent steps; the backlog's chunk stays the ceiling); 0 (default): off.
    max_stall_ratio: float = 0.0
    # KV memory: bytes (> 1), or a fraction of the device's free memory (0 < x <= 1); None: enough for
    # max_batch_size full contexts, within half the free memory.
    kv_cache_memory: float | None = None
    kv_block_tokens: int = 16  # paged engine: positions per KV block (a power of two)
    prefix_caching: bool = True  # paged engine: full blocks shared by content between requests
    use_paged: bool = True  # False: every model takes the legacy path (debugging, comparisons)
    compile: bool = False  # paged engine: torch.compile the model's step (the server turns it on)
    native_attention: bool = True  # paged engine on CPU: the native attention kernels (paged/cpu) where they build
    prepack_weights: bool = True  # paged engine on CPU: linear weights also kept in oneDNN's layout
    fair_share: bool = True  # admission by tenants' weighted token shares; False: first in, first out
    # Paged engine with fair share: a least-served tenant's request that waited this many steps with every
    # row busy takes a row from a more served tenant (recomputed when it runs again); 0: never preempt.
    preempt_after_steps: int = 32
    max_stop_sequences: int = 8
    max_stop_length: int = 256  # characters in one stop sequence
    idle_wait_s: float = 0.5  # how long the worker sleeps when idle before checking again
    burst_wait_s: float = 0.002  # an idle engine's first step waits while requests keep arriving this close

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_input_tokens", "max_new_tokens",
                     "max_total_tokens", "max_prefill_tokens", "prefill_chunk_tokens", "idle_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError("EngineConfig.kv_cache_memory must be > 0 (bytes, or a fraction <= 1)")
        if self.max_stall_ratio < 0 or 0 < self.max_stall_ratio <= 1:
            raise ValueError("EngineConfig.max_stall_ratio must be 0 (off) or > 1")
        if self.burst_wait_s < 0:
            raise ValueError("EngineConfig.burst_wait_s must be >= 0")
        if self.preempt_after_steps < 0:
            raise ValueError("EngineConfig.preempt_after_steps must be >= 0 (0: never preempt)")
        if self.kv_block_tokens < 1 or self.kv_block_tokens & (self.kv_block_tokens - 1):
            raise ValueError("EngineConfig.kv_block_tokens must be a power of two")
