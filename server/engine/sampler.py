"""Per-row next-token choice: greedy, or temperature / top-k / top-p with the row's own generator;
repetition penalty. A seeded row draws from its own torch.Generator, so its tokens do not depend on
its batch mates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server.engine.types import SamplingParams

if TYPE_CHECKING:
    from server.engine.request.sequence import Sequence


@dataclass
class SampleOutput:
    """Chosen token and its log-probability per row; rows whose sampling raised are in `errors`."""

    token_ids: list[int]
    logprobs: list[float]
    errors: dict[int, Exception] = field(default_factory=dict)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A row's private random stream."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def causal_penalty_history(seq: Sequence) -> list[int]:
    """Tokens the repetition penalty sees in a causal model's row: prompt and generated tokens, as in HF
    generate (the same on both paths; an encoder-decoder's runner has its own)."""
    return seq.prompt_ids + seq.generated


def apply_repetition_penalty(row: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    """HF semantics: seen tokens' logits divided by the penalty when positive, multiplied when negative."""
    ids = torch.tensor(sorted(set(history)), dtype=torch.long, device=row.device)
    seen = row[ids]
    row = row.clone()
    row[ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return row


def warp(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (HF's order); returns filtered logits [V]."""
    row = row / params.temperature
    if 0 < params.top_k < row.shape[-1]:
        kth = torch.topk(row, params.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keeps at least the top token
        row = row.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    return row


def choose(row: torch.Tensor, params: SamplingParams, history: list[int],
           generator: torch.Generator | None) -> int:
    """One row's token from its logits [V]."""
    if params.repetition_penalty != 1.0 and history:
        row = apply_repetition_penalty(row, history, params.repetition_penalty)
    if not params.do_sample:
        return int(torch.argmax(row))
    probs = warp(row, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]],
           generators: list[torch.Generator | None]) -> SampleOutput:
    """Tokens for every row of `logits` [B, V] (float32). Plain greedy rows take one batched argmax."""
    log_probs = torch.log_softmax(logits, dim=-1)  # [B, V]: reported logprobs are the model's own
    token_ids = torch.argmax(logits, dim=-1).tolist()
    errors: dict[int, Exception] = {}
    for row, p in enumerate(params):
        if p.do_sample or p.repetition_penalty != 1.0:
            try:
                token_ids[row] = choose(logits[row], p, histories[row], generators[row])
            except (RuntimeError, ValueError) as exc:  # e.g. NaN logits: this row fails alone
                errors[row] = exc
    chosen = torch.tensor(token_ids, dtype=torch.long, device=logits.device)
    logprobs = log_probs.gather(1, chosen[:, None]).squeeze(1).tolist()
    return SampleOutput(token_ids=token_ids, logprobs=logprobs, errors=errors)
