"""ChunkBudget: how many prompt tokens the paged engine's next step may compute.

A step that prefills while rows decode delays every decoding row's next token; a small chunk keeps their
streams even, a large one computes a backlog of prompts in fewer, more efficient steps. So while rows
decode, the chunk follows the backlog: a quarter of `prefill_chunk_tokens` for each request waiting for
its first token, or a quarter of the prompt tokens they still have to compute, whichever is more, up to
`prefill_chunk_tokens`. One prompt arriving beside decoding rows (open-loop traffic) gets small chunks; a
burst of requests or a long prompt, large ones. When no row decodes, nobody waits on the step, and it may
compute up to `idle_prefill_tokens`.

With `max_stall_ratio` set, the chunk is also kept within that multiple of a decode-only step, from two
running estimates (exponential moving averages over recent steps): the time of a decode-only step, and
what each prefill token adds to a step.
"""

from __future__ import annotations

MIN_CHUNK_TOKENS = 32  # prompts always progress, whatever the estimates say
# While rows decode: each waiting request earns max_tokens / BACKLOG_STEPS of the chunk, and a backlog of
# prompt tokens is spread over at most this many steps.
BACKLOG_STEPS = 4
SMOOTHING = 0.2  # weight of the newest step in the moving averages


class ChunkBudget:
    """Tokens per step, adapted to measured step times; `record` every step, ask `tokens` before one."""

    def __init__(self, max_tokens: int, idle_tokens: int, max_stall_ratio: float):
        self.max_tokens = max_tokens
        self.idle_tokens = max(idle_tokens, max_tokens)
        self.max_stall_ratio = max_stall_ratio
        self.decode_s: float | None = None  # a decode-only step
        self.token_s: float | None = None  # what one prefill token adds to a step

    @property
    def share(self) -> int:
        """What each waiting request earns of a chunk while rows decode (the oldest always gets it)."""
        return max(1, self.max_tokens // BACKLOG_STEPS)

    def tokens(self, is_decoding: bool, waiting_requests: int, waiting_tokens: int) -> int:
        """Prompt tokens the next step may compute (`is_decoding`: some row waits for its next token;
        `waiting_requests` admitted requests have `waiting_tokens` prompt tokens still to compute)."""
        if not is_decoding:
            return self.idle_tokens
        ceiling = min(self.max_tokens, max(self.share * waiting_requests, waiting_tokens // BACKLOG_STEPS,
                                           self.share))
        if self.max_stall_ratio <= 0 or self.decode_s is None or not self.token_s:
            return ceiling
        fit = int((self.max_stall_ratio - 1) * self.decode_s / self.token_s)
        return max(min(MIN_CHUNK_TOKENS, ceiling), min(fit, ceiling))

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
