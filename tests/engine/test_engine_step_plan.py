"""The slot engine's packed step plan on fake sequences (no model): chunks, order, write positions,
decode and prefill masks, sampled rows, and the embeddings of virtual and text tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.engine import step_plan
from server.engine.kv_pool import KVGeometry, KVPool
from server.engine.step_plan import Chunk

GEOMETRY = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=3, dtype=torch.float32, device=torch.device("cpu"))



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
    """What step_plan reads of a Sequence (as runner_slots._ProbeSeq, with a prompt)."""

    slot: int
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


def _step_pool() -> KVPool:
    return KVPool(KVGeometry(1, 1, 2, torch.float32, torch.device("cpu")), num_slots=4, slot_tokens=32)


def test_chunk_sampling_and_decode():
    prefilling = _Seq(0, [4, 5, 6], _prompt(2))  # context 5
    assert Chunk(prefilling, 0, 5).is_sampling and not Chunk(prefilling, 0, 5).is_decode
    assert not Chunk(prefilling, 0, 3).is_sampling
    assert Chunk(prefilling, 4, 1).is_sampling and not Chunk(prefilling, 4, 1).is_decode  # last prompt token
    decoding = _Seq(1, [4, 5, 6], _prompt(2), generated=[9])  # context 6
    assert Chunk(decoding, 5, 1).is_decode and Chunk(decoding, 5, 1).end == 6
    assert not Chunk(decoding, 4, 2).is_decode and Chunk(decoding, 4, 2).is_sampling


def test_order_puts_decodes_first_by_slot():
    decode_slot2 = Chunk(_Seq(2, [1], generated=[3]), 1, 1)
    decode_slot0 = Chunk(_Seq(0, [1], generated=[3]), 1, 1)
    prefill_a, prefill_b = Chunk(_Seq(1, [1, 2, 3]), 0, 2), Chunk(_Seq(3, [1, 2]), 0, 2)
    ordered = step_plan.order([prefill_a, decode_slot2, prefill_b, decode_slot0])
    assert ordered == [decode_slot0, decode_slot2, prefill_a, prefill_b]


def test_build_dense_decodes_and_an_offset_prefill():
    decodes = [Chunk(_Seq(s, [1] * (2 + s), _prompt(1), generated=[7, 8]), 3 + s + 1, 1) for s in range(3)]
    late = _Seq(3, [1, 2, 3, 4, 5], _prompt(2))  # context 7; positions 0..3 already cached
    chunks = step_plan.order([Chunk(late, 4, 3), *decodes])
    inputs = step_plan.build(chunks, _embed(), _step_pool())
    plan = inputs.plan
    assert plan.write_slots.tolist() == [0, 1, 2, 3, 3, 3]
    assert plan.write_positions.tolist() == [4, 5, 6, 4, 5, 6]  # each decode feeds its last position
    assert inputs.position_ids.tolist() == [[4, 5, 6, 4, 5, 6]]
    group = plan.decode
    assert group.token_index.tolist() == [0, 1, 2] and group.slots.tolist() == [0, 1, 2]
    assert group.is_dense and group.num_view_slots == 3
    assert group.mask.shape == (3, 1, 1, 7)
    assert group.mask[:, 0, 0].tolist() == [[c < n for c in range(7)] for n in (5, 6, 7)]
    (chunk,) = plan.prefills
    assert (chunk.token_start, chunk.num_tokens, chunk.slot, chunk.start) == (3, 3, 3, 4)
    assert chunk.mask.tolist() == [[c <= 4 + r for c in range(7)] for r in range(3)]  # offset causal
    assert inputs.sample_index.tolist() == [0, 1, 2, 5]
    assert inputs.inputs_embeds.shape == (1, 6, HIDDEN)


def test_build_sparse_decodes_give_idle_rows_one_column():
    a = _Seq(1, [1, 2], generated=[3])  # context 3
    b = _Seq(3, [1, 2, 3, 4], generated=[5, 6])  # context 6
    prefill = _Seq(0, [9, 9, 9])
    chunks = step_plan.order([Chunk(b, 5, 1), Chunk(prefill, 0, 2), Chunk(a, 2, 1)])
    inputs = step_plan.build(chunks, _embed(), _step_pool())
    group = inputs.plan.decode
    assert group.slots.tolist() == [1, 3] and group.token_index.tolist() == [0, 1]
    assert not group.is_dense and group.num_view_slots == 4
    lengths = [1, 3, 1, 6]  # slots 0 and 2 are not decoding: one finite column, never an all-masked row
    assert group.mask[:, 0, 0].tolist() == [[c < n for c in range(6)] for n in lengths]
    (chunk,) = inputs.plan.prefills
    assert chunk.mask is None and chunk.token_start == 2  # from position 0: plain causal
    assert inputs.sample_index.tolist() == [0, 1]  # the prefill chunk stops short of its context end
    assert inputs.plan.write_slots.tolist() == [1, 3, 0, 0]
    assert inputs.position_ids.tolist() == [[2, 5, 0, 1]]


def test_decodes_with_a_gap_in_slots_are_not_dense():
    chunks = step_plan.order([Chunk(_Seq(s, [1], generated=[2]), 1, 1) for s in (0, 2)])
    group = step_plan.build(chunks, _embed(), _step_pool()).plan.decode
    assert not group.is_dense and group.num_view_slots == 3


def test_embeddings_are_prompt_rows_then_token_rows():
    embed = _embed()
    spanning = _Seq(0, [11, 12, 13], _prompt(3, seed=1))  # positions 1..4: virtual 1, 2 then tokens 11, 12
    virtual_only = _Seq(1, [21, 22], _prompt(4, seed=2))  # positions 0..1: virtual only
    bare = _Seq(2, [31, 32, 33])
    decoding = _Seq(3, [41, 42], _prompt(2, seed=3), generated=[43, 44])  # feeds 44 at position 5
    text_and_generated = _Seq(1, [15, 16], _prompt(1, seed=4), generated=[17])  # positions 2..3: 16, 17
    chunks = step_plan.order([Chunk(spanning, 1, 4), Chunk(virtual_only, 0, 2), Chunk(bare, 1, 2),
                              Chunk(decoding, 5, 1)])
    got = step_plan.build(chunks, embed, _step_pool()).inputs_embeds[0]

    def rows(ids: list[int]) -> torch.Tensor:
        return embed.weight[ids].detach()

    want = torch.cat([rows([44]), spanning.prompt.embeddings[1:3], rows([11, 12]),
                      virtual_only.prompt.embeddings[0:2], rows([32, 33])])
    assert torch.equal(got, want)
    got = step_plan.build([Chunk(text_and_generated, 2, 2)], embed, _step_pool()).inputs_embeds[0]
    assert torch.equal(got, rows([16, 17]))
