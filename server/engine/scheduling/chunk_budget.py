"""ChunkBudget: how many prompt tokens the slot engine's next step may compute.

A step that prefills while rows decode delays every decoding row's next token. The budget keeps such a
step within `max_stall_ratio` times a decode-only step, from two running estimates (exponential moving
averages over recent steps): the time of a decode-only step, and what each prefill token adds to a step.
Few decoding rows make a short decode step, hence a small chunk; many make a long one, which a larger
chunk then stretches by the same ratio. `prefill_chunk_tokens` stays the ceiling. When no row decodes,
nobody waits on the step, and it may compute up to `idle_prefill_tokens`.
"""

from __future__ import annotations

MIN_CHUNK_TOKENS = 32  # prompts always progress, whatever the estimates say
SMOOTHING = 0.2  # weight of the newest step in the moving averages


class ChunkBudget:
    """Tokens per step, adapted to measured step times; `record` every step, ask `tokens` before one."""

    def __init__(self, max_tokens: int, idle_tokens: int, max_stall_ratio: float):
        self.max_tokens = max_tokens
        self.idle_tokens = max(idle_tokens, max_tokens)
        self.max_stall_ratio = max_stall_ratio
        self.decode_s: float | None = None  # a decode-only step
        self.token_s: float | None = None  # what one prefill token adds to a step

    def tokens(self, is_decoding: bool) -> int:
        """Prompt tokens the next step may compute (`is_decoding`: some row waits for its next token)."""
        if not is_decoding:
            return self.idle_tokens
        if self.max_stall_ratio <= 0 or self.decode_s is None or not self.token_s:
            return self.max_tokens
        fit = int((self.max_stall_ratio - 1) * self.decode_s / self.token_s)
        return max(min(MIN_CHUNK_TOKENS, self.max_tokens), min(fit, self.max_tokens))

    def record(self, seconds: float, num_decode: int, num_prefill: int) -> None:
        """One step's forward took `seconds` for `num_decode` decoding rows and `num_prefill` prompt tokens."""
        if num_prefill == 0:
            if num_decode > 0:
                self.decode_s = _average(self.decode_s, seconds)
        elif num_decode == 0:
            self.token_s = _average(self.token_s, seconds / num_prefill)  # an upper bound: fixed costs included
        elif self.decode_s is not None:
            self.token_s = _average(self.token_s, max(seconds - self.decode_s, 0.0) / num_prefill)


def _average(mean: float | None, sample: float) -> float:
    return sample if mean is None else mean + SMOOTHING * (sample - mean)
