"""The paged engine's packed step plan on fake sequences (no model): chunks, order, the KV rows written,
what decoding rows and prefill chunks read (block tables, views of a run of blocks, gathers, masks),
sampled rows, and the embeddings of virtual and text tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.engine.paged import step_plan
from server.engine.paged.kv_memory import KVGeometry, PagedKV
from server.engine.paged.step_plan import Chunk

# -- step_plan -----------------------------------------------------------------------------------
HIDDEN = 4


@dataclass
class _Prompt:
    embeddings: torch.Tensor  # [n, HIDDEN]

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])


@dataclass
class _Seq:
    """What step_plan reads of a Sequence (as the runner's _WarmUpSeq, with a prompt)."""

    block_table: list[int]
    prompt_ids: list[int]
    prompt: _Prompt | None = None
    generated: list[int] = field(default_factory=list)
    request_id: str = "r"

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.prompt is None else self.prompt.num_virtual_tokens

    @property
    def num_context_tokens(self) -> int:
        return self.num_virtual_tokens + len(self.prompt_ids) + len(self.generated)


def _prompt(n: int, seed: int = 0) -> _Prompt:
    return _Prompt(torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed)) + 100)


def _embed() -> torch.nn.Embedding:
    embed = torch.nn.Embedding(50, HIDDEN)
    with torch.no_grad():
        embed.weight.copy_(torch.arange(50, dtype=torch.float32)[:, None].expand(50, HIDDEN))  # row i = i
    return embed


def _memory() -> PagedKV:
    """16 blocks of 4 positions; no native kernel: decoding rows carry their gathered rows too."""
    return PagedKV(KVGeometry(1, 1, 2, torch.float32, torch.device("cpu")), num_blocks=16, block_tokens=4)


def test_chunk_sampling_and_decode():
    prefilling = _Seq([0, 1], [4, 5, 6], _prompt(2))  # context 5
    assert Chunk(prefilling, 0, 5).is_sampling and not Chunk(prefilling, 0, 5).is_decode
    assert not Chunk(prefilling, 0, 3).is_sampling
    assert Chunk(prefilling, 4, 1).is_sampling and not Chunk(prefilling, 4, 1).is_decode  # last prompt token
    decoding = _Seq([2, 3], [4, 5, 6], _prompt(2), generated=[9])  # context 6
    assert Chunk(decoding, 5, 1).is_decode and Chunk(decoding, 5, 1).end == 6
    assert not Chunk(decoding, 4, 2).is_decode and Chunk(decoding, 4, 2).is_sampling


def test_order_puts_decodes_first():
    decode_a = Chunk(_Seq([2], [1], generated=[3]), 1, 1)
    decode_b = Chunk(_Seq([0], [1], generated=[3]), 1, 1)
    prefill_a, prefill_b = Chunk(_Seq([1], [1, 2, 3]), 0, 2), Chunk(_Seq([3], [1, 2]), 0, 2)
    ordered = step_plan.order([prefill_a, decode_a, prefill_b, decode_b])
    assert ordered == [decode_a, decode_b, prefill_a, prefill_b]


def test_build_decodes_and_an_offset_prefill():
    # Two decoding rows sharing block 5 (one task's prefix), then a prefill chunk over a run of blocks.
    a = _Seq([5, 9], [1, 2, 3], _prompt(1), generated=[7, 8])  # context 6: feeds position 5
    b = _Seq([5, 2, 14], [1, 2, 3, 4, 5, 6, 7], _prompt(1), generated=[7])  # context 9: feeds position 8
    late = _Seq([10, 11], [1, 2, 3, 4, 5], _prompt(2))  # context 7; positions 0..3 already cached
    chunks = step_plan.order([Chunk(late, 4, 3), Chunk(a, 5, 1), Chunk(b, 8, 1)])
    inputs = step_plan.build(chunks, _embed(), _memory())
    plan = inputs.plan
    assert plan.write_rows.tolist() == [9 * 4 + 1, 14 * 4 + 0, 11 * 4 + 0, 11 * 4 + 1, 11 * 4 + 2]
    assert inputs.position_ids.tolist() == [[5, 8, 4, 5, 6]]
    reads = plan.decode.reads
    assert reads.tables.tolist() == [[5, 9, 0], [5, 2, 14]] and reads.lengths.tolist() == [6, 9]
    assert reads.block_shift == 2 and reads.num_decode == 2
    assert plan.decode.gather_rows.tolist() == [[20, 21, 22, 23, 36, 37, 0, 0, 0],
                                                [20, 21, 22, 23, 8, 9, 10, 11, 56]]
    assert plan.decode.mask[:, 0, 0].tolist() == [[c < n for c in range(9)] for n in (6, 9)]
    (chunk,) = plan.prefills
    assert (chunk.token_start, chunk.num_tokens, chunk.start) == (2, 3, 4)
    assert (chunk.context.runs, chunk.context.num_tokens) == ([(40, 7)], 7)  # one run: a view
    assert chunk.mask.tolist() == [[c <= 4 + r for c in range(7)] for r in range(3)]  # offset causal
    assert inputs.sample_index.tolist() == [0, 1, 4]
    assert inputs.inputs_embeds.shape == (1, 5, HIDDEN)


def test_a_prefill_over_scattered_blocks_reads_each_run():
    scattered = _Seq([3, 1], [1, 2, 3, 4, 5, 6])  # context 6, from position 0: plain causal
    inputs = step_plan.build([Chunk(scattered, 0, 5)], _embed(), _memory())
    (chunk,) = inputs.plan.prefills
    assert chunk.mask is None and not chunk.context.is_one_run
    assert chunk.context.runs == [(12, 4), (4, 1)]  # block 3's four rows, then block 1's first
    assert inputs.sample_index.tolist() == []  # the chunk stops short of its context end
    assert inputs.plan.decode.reads.num_decode == 0


def test_embeddings_are_prompt_rows_then_token_rows():
    embed = _embed()
    spanning = _Seq([0, 1], [11, 12, 13], _prompt(3, seed=1))  # positions 1..4: virtual 1, 2 then tokens 11, 12
    virtual_only = _Seq([2], [21, 22], _prompt(4, seed=2))  # positions 0..1: virtual only
    bare = _Seq([3], [31, 32, 33])
    decoding = _Seq([4, 5], [41, 42], _prompt(2, seed=3), generated=[43, 44])  # feeds 44 at position 5
    text_and_generated = _Seq([6], [15, 16], _prompt(1, seed=4), generated=[17])  # positions 2..3: 16, 17
    chunks = step_plan.order([Chunk(spanning, 1, 4), Chunk(virtual_only, 0, 2), Chunk(bare, 1, 2),
                              Chunk(decoding, 5, 1)])
    got = step_plan.build(chunks, embed, _memory()).inputs_embeds[0]

    def rows(ids: list[int]) -> torch.Tensor:
        return embed.weight[ids].detach()

    want = torch.cat([rows([44]), spanning.prompt.embeddings[1:3], rows([11, 12]),
                      virtual_only.prompt.embeddings[0:2], rows([32, 33])])
    assert torch.equal(got, want)
    got = step_plan.build([Chunk(text_and_generated, 2, 2)], embed, _memory()).inputs_embeds[0]
    assert torch.equal(got, rows([16, 17]))
