"""One packed step of the paged engine: which context positions of which requests are computed, as model
inputs (`inputs_embeds [1, N, D]`, `position_ids [1, N]`) and as the attention glue's StepPlan.

A request's context is `[P][E(prompt_ids)][E(generated)]`, position 0 at its first virtual token (what
PEFT computes for it alone). A chunk is a run of its positions not yet in KV memory: a decode step feeds the
last generated token; a prefill chunk feeds the next part of the prompt (chunked prefill). Every position
of a chunk already has its block in the request's block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.paged.attention import DecodeGroup, PrefillChunk, StepPlan
from server.engine.paged.cpu.native_decode import DecodeReads
from server.engine.paged.kv_memory import ContextReads, PagedKV
from server.engine.request.sequence import Sequence


@dataclass
class Chunk:
    """Positions [start, start + num_tokens) of one request, computed this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        """One past its last position."""
        return self.start + self.num_tokens

    @property
    def is_sampling(self) -> bool:
        """Whether it reaches the end of the context known so far: its last logits pick the next token."""
        return self.end == self.seq.num_context_tokens

    @property
    def is_decode(self) -> bool:
        """A decode chunk: the one generated token not yet in the cache."""
        return bool(self.seq.generated) and self.num_tokens == 1 and self.is_sampling


@dataclass
class StepInputs:
    """The forward's inputs and where each sampled row's logits are."""

    inputs_embeds: torch.Tensor  # [1, N, D]
    position_ids: torch.Tensor  # [1, N]
    plan: StepPlan
    sample_index: torch.Tensor  # [S] packed positions whose logits are sampled (chunk order)


def order(chunks: list[Chunk]) -> list[Chunk]:
    """Decode chunks first (the kernel takes the step's first tokens as its decoding rows), then prefills."""
    return [c for c in chunks if c.is_decode] + [c for c in chunks if not c.is_decode]


def build(chunks: list[Chunk], embed: torch.nn.Module, memory: PagedKV) -> StepInputs:
    """Inputs for `chunks`, which must already be in `order`."""
    device = embed.weight.device
    rows, positions, sample_index = [], [], []
    for chunk in chunks:
        rows += memory.rows(chunk.seq.block_table, range(chunk.start, chunk.end))
        positions += range(chunk.start, chunk.end)
        if chunk.is_sampling:
            sample_index.append(len(positions) - 1)
    plan = StepPlan(memory, _long(rows, device), _long(positions, device))
    decodes = [c for c in chunks if c.is_decode]
    plan.decode = _decode_group(decodes, memory, device)
    offset = len(decodes)
    for chunk in chunks[len(decodes):]:
        plan.prefills.append(PrefillChunk(offset, chunk.num_tokens, chunk.start,
                                          ContextReads.of(memory, chunk.seq.block_table, chunk.end),
                                          None if memory.has_native_prefill else _offset_causal_mask(chunk, device)))
        offset += chunk.num_tokens
    return StepInputs(_embeddings(chunks, embed), plan.positions[None], plan, _long(sample_index, device))


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _decode_group(decodes: list[Chunk], memory: PagedKV, device: torch.device) -> DecodeGroup:
    """The decoding rows' block tables (padded with block 0) and lengths; without the native kernel, also
    every row's KV rows, padded to the longest (masked)."""
    size = memory.block_tokens
    lengths = [c.end for c in decodes]
    num_blocks = max((-(-n // size) for n in lengths), default=1)
    tables = [c.seq.block_table[:num_blocks] + [0] * (num_blocks - len(c.seq.block_table[:num_blocks]))
              for c in decodes]
    reads = DecodeReads(torch.tensor(tables, dtype=torch.long).reshape(len(decodes), num_blocks),
                        _long(lengths, torch.device("cpu")), size.bit_length() - 1)
    if memory.has_native_decode or not decodes:
        return DecodeGroup(reads)
    width = max(lengths)
    gather = [memory.rows(c.seq.block_table, range(n)) + [0] * (width - n) for c, n in zip(decodes, lengths)]
    mask = torch.arange(width, device=device)[None, :] < _long(lengths, device)[:, None]  # [Bd, W]
    return DecodeGroup(reads, _long(gather, device), mask[:, None, None, :])


def _offset_causal_mask(chunk: Chunk, device: torch.device) -> torch.Tensor | None:
    if chunk.start == 0:
        return None
    rows = torch.arange(chunk.num_tokens, device=device)[:, None] + chunk.start
    return torch.arange(chunk.end, device=device)[None, :] <= rows  # [T, start + T]


def _embeddings(chunks: list[Chunk], embed: torch.nn.Module) -> torch.Tensor:
    """`[1, N, D]`: virtual rows from each task's prompt, token rows from one embedding lookup."""
    weight = embed.weight
    ids: list[int] = []
    for chunk in chunks:
        ids += _token_ids(chunk)
    token_rows = iter(embed(_long(ids, weight.device)).split(_token_counts(chunks)))
    pieces = []
    for chunk in chunks:
        num_virtual = chunk.seq.num_virtual_tokens
        if chunk.start < num_virtual:
            # The prompt is not pre-scaled: models that scale embeddings do it inside forward (PEFT semantics).
            prompt = chunk.seq.prompt.embeddings[chunk.start:min(chunk.end, num_virtual)]
            pieces.append(prompt.to(device=weight.device, dtype=weight.dtype))
        pieces.append(next(token_rows))
    return torch.cat(pieces)[None]


def _token_counts(chunks: list[Chunk]) -> list[int]:
    return [c.end - max(c.start, c.seq.num_virtual_tokens) if c.end > c.seq.num_virtual_tokens else 0
            for c in chunks]


def _token_ids(chunk: Chunk) -> list[int]:
    """The token ids at the chunk's positions past the virtual tokens."""
    seq, num_virtual = chunk.seq, chunk.seq.num_virtual_tokens
    first, last = max(chunk.start, num_virtual) - num_virtual, chunk.end - num_virtual
    if last <= 0:
        return []
    num_prompt = len(seq.prompt_ids)
    if first >= num_prompt:  # decoding: generated tokens only
        return seq.generated[first - num_prompt:last - num_prompt]
    return (seq.prompt_ids + seq.generated)[first:last]
