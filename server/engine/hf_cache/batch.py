"""The running batch: rows, attention mask, positions and cache kept aligned; prefill and decode inputs.

Row i of a prefill is `[pads][P_i][E(ids_i)]`: pads on the left of the virtual tokens, mask 0 on pads,
position ids 0 on pads then 0..n_i+L_i-1 from the first virtual token (what PEFT computes for the request
alone). Decode feeds each row's last token at position n_i+L_i+k with the mask grown by one column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.hf_cache import kv_cache
from server.engine.request.sequence import Sequence


@dataclass
class ForwardInputs:
    """One model call's inputs: exactly one of input_ids / inputs_embeds is set."""

    attention_mask: torch.Tensor  # [B, past + T] long
    position_ids: torch.Tensor  # [B, T] long
    input_ids: torch.Tensor | None = None  # [B, T]
    inputs_embeds: torch.Tensor | None = None  # [B, T, D]


def prefill_inputs(seqs: list[Sequence], embed: Callable[[torch.Tensor], torch.Tensor]) -> ForwardInputs:
    """Left-padded `[pads][P_i][E(ids_i)]` rows for the newcomers of one step."""
    weight = embed.weight  # type: ignore[attr-defined]
    device, dtype = weight.device, weight.dtype
    lengths = [s.num_virtual_tokens + len(s.prompt_ids) for s in seqs]
    num_rows, width = len(seqs), max(lengths)
    flat_ids = torch.tensor([t for s in seqs for t in s.prompt_ids], dtype=torch.long, device=device)
    text_embeds = embed(flat_ids).split([len(s.prompt_ids) for s in seqs])  # L_i x [L_i, D]
    embeds = torch.zeros(num_rows, width, weight.shape[1], dtype=dtype, device=device)  # [B, T, D]
    mask = torch.zeros(num_rows, width, dtype=torch.long, device=device)
    positions = torch.zeros(num_rows, width, dtype=torch.long, device=device)
    for row, (seq, length, text) in enumerate(zip(seqs, lengths, text_embeds)):
        start = width - length
        num_virtual = seq.num_virtual_tokens
        if num_virtual:
            # The prompt is not pre-scaled: models that scale embeddings do it inside forward (PEFT semantics).
            embeds[row, start:start + num_virtual] = seq.prompt.embeddings.to(device=device, dtype=dtype)
        embeds[row, start + num_virtual:] = text
        mask[row, start:] = 1
        positions[row, start:] = torch.arange(length, device=device)
    return ForwardInputs(attention_mask=mask, position_ids=positions, inputs_embeds=embeds)


@dataclass
class EncoderState:
    """Encoder-decoder models: each row's encoder output, left-padded like the cross-attention cache."""

    hidden_states: torch.Tensor  # [B, S, D]
    attention_mask: torch.Tensor  # [B, S] long: 1 on real encoder positions (virtual tokens included)

    def select(self, index: torch.Tensor) -> tuple[EncoderState, int]:
        """The given rows with all-pad columns trimmed; also returns how many columns were cut."""
        mask = self.attention_mask[index]
        first = int((mask.shape[1] - mask.sum(dim=1)).min()) if len(index) else 0
        return EncoderState(self.hidden_states[index, first:], mask[:, first:]), first

    def merge(self, other: EncoderState) -> EncoderState:
        """This state's rows then `other`'s, the narrower left-padded (mask 0) to the common width."""
        width_a, width_b = self.attention_mask.shape[1], other.attention_mask.shape[1]
        target = max(width_a, width_b)
        pad = torch.nn.functional.pad
        hidden = torch.cat([pad(self.hidden_states, (0, 0, target - width_a, 0)),
                            pad(other.hidden_states, (0, 0, target - width_b, 0))])
        mask = torch.cat([pad(self.attention_mask, (target - width_a, 0)),
                          pad(other.attention_mask, (target - width_b, 0))])
        return EncoderState(hidden, mask)


@dataclass
class Batch:
    """Rows decoded together; everything indexed by row stays aligned through select and merge."""

    seqs: list[Sequence]
    cache: Any  # the model's KV cache (see kv_cache.py), [B, heads, W, head_dim] per layer
    attention_mask: torch.Tensor  # [B, W] long: 1 where the cache column holds a real token
    generators: list[torch.Generator | None]  # sampled rows draw from their own stream
    positions: torch.Tensor  # [B] long: position of the token fed next (n + L + k)
    last_tokens: torch.Tensor  # [B] long: the token fed next (sampled, not yet in the cache)
    encoder: EncoderState | None = None  # encoder-decoder models only

    @classmethod
    def after_prefill(cls, seqs: list[Sequence], cache: Any, attention_mask: torch.Tensor) -> Batch:
        """The newcomers' batch: the first generated token will sit at position n + L."""
        device = attention_mask.device
        positions = torch.tensor([s.num_context_tokens for s in seqs], dtype=torch.long, device=device)
        return cls(seqs, cache, attention_mask, [None] * len(seqs), positions,
                   torch.zeros(len(seqs), dtype=torch.long, device=device))

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def width(self) -> int:
        """Cache columns per row (mask width)."""
        return int(self.attention_mask.shape[1])

    def set_last_tokens(self, token_ids: list[int]) -> None:
        """The tokens just sampled: fed at the next decode step."""
        self.last_tokens = torch.tensor(token_ids, dtype=torch.long, device=self.attention_mask.device)

    def decode_inputs(self) -> ForwardInputs:
        """Each row's last token at its own position; the mask grows by one column of ones."""
        ones = torch.ones(len(self), 1, dtype=torch.long, device=self.attention_mask.device)
        return ForwardInputs(attention_mask=torch.cat([self.attention_mask, ones], dim=1),
                             position_ids=self.positions[:, None], input_ids=self.last_tokens[:, None])

    def advance(self, inputs: ForwardInputs) -> None:
        """After a successful decode forward: the fed tokens are now in the cache."""
        self.attention_mask = inputs.attention_mask
        self.positions = self.positions + 1

    def select(self, rows: list[int]) -> Batch:
        """A batch of the given rows, with columns that are padding for every kept row trimmed."""
        index = torch.tensor(rows, dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask[index]
        first = int((self.width - mask.sum(dim=1)).min()) if rows else 0
        encoder, first_cross = self.encoder.select(index) if self.encoder is not None else (None, 0)
        return Batch([self.seqs[i] for i in rows], kv_cache.select(self.cache, index, first, first_cross),
                     mask[:, first:], [self.generators[i] for i in rows], self.positions[index],
                     self.last_tokens[index], encoder)

    def merge(self, other: Batch) -> Batch:
        """This batch's rows then `other`'s; the narrower side is left-padded."""
        target = max(self.width, other.width)
        pad = torch.nn.functional.pad
        mask = torch.cat([pad(self.attention_mask, (target - self.width, 0)),
                          pad(other.attention_mask, (target - other.width, 0))])
        return Batch(self.seqs + other.seqs, kv_cache.merge(self.cache, other.cache), mask,
                     self.generators + other.generators, torch.cat([self.positions, other.positions]),
                     torch.cat([self.last_tokens, other.last_tokens]),
                     None if self.encoder is None else self.encoder.merge(other.encoder))
