"""The paged KV memory on tiny tensors (no model): where positions live through a block table, reads of a
run of blocks as views and of scattered blocks as gathers, and how a budget becomes blocks."""

from __future__ import annotations

import pytest
import torch

from server.engine.paged import sizing
from server.engine.paged.kv_memory import ContextReads, KVGeometry, PagedKV
from server.engine.paged.sizing import KVBudgetTooSmall

GEOMETRY = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=3, dtype=torch.float32, device=torch.device("cpu"))
PER_TOKEN = GEOMETRY.bytes_per_token  # 96


def _written(memory: PagedKV, table: list[int], num_tokens: int) -> torch.Tensor:
    """Write keys = position + 1 (values = -keys) for positions 0..num_tokens-1 of `table`; return them."""
    keys = torch.arange(1, num_tokens + 1, dtype=torch.float32)[:, None, None].expand(num_tokens, 2, 3)
    rows = torch.tensor(memory.rows(table, range(num_tokens)))
    for layer in range(GEOMETRY.num_layers):
        memory.write(layer, rows, keys, -keys)
    return keys


def test_positions_live_where_the_table_says():
    memory = PagedKV(GEOMETRY, num_blocks=6, block_tokens=4)
    assert memory.rows([5, 1], range(6)) == [20, 21, 22, 23, 4, 5]
    assert (memory.num_tokens, memory.num_bytes) == (24, 24 * PER_TOKEN)
    with pytest.raises(ValueError, match="power-of-two"):
        PagedKV(GEOMETRY, num_blocks=6, block_tokens=3)


@pytest.mark.parametrize("table,is_view", [([2, 3, 4], True), ([4, 0, 2], False)], ids=["run", "scattered"])
def test_context_reads_a_run_in_place_and_gathers_the_rest(table, is_view):
    memory = PagedKV(GEOMETRY, num_blocks=6, block_tokens=4)
    keys = _written(memory, table, 10)
    reads = ContextReads.of(memory, table, 10)
    assert reads.is_one_run == is_view
    got_keys, got_values = memory.context(1, reads)
    assert got_keys.shape == (1, 2, 10, 3)
    assert torch.equal(got_keys[0], keys.transpose(0, 1)) and torch.equal(got_values[0], -keys.transpose(0, 1))
    if is_view:  # the same memory, not a copy
        got_keys[0, 0, 0, 0] = 99.0
        assert memory.context(1, reads)[0][0, 0, 0, 0] == 99.0


def test_gather_pads_rows_per_request():
    memory = PagedKV(GEOMETRY, num_blocks=4, block_tokens=2)
    keys = _written(memory, [3, 1], 3)
    got_keys, _ = memory.gather(0, torch.tensor([[6, 7, 2], [6, 0, 0]]))
    assert got_keys.shape == (2, 2, 3, 3)  # [rows, kv heads, width, head_dim]
    assert torch.equal(got_keys[0].transpose(0, 1), keys) and got_keys[1, 0, :, 0].tolist() == [1.0, 0.0, 0.0]


def test_budget_in_bytes_becomes_whole_blocks():
    assert sizing.num_blocks(GEOMETRY, 16, 10 * 16 * PER_TOKEN) == 10
    assert sizing.num_blocks(GEOMETRY, 16, 10 * 16 * PER_TOKEN + 15 * PER_TOKEN) == 10  # rounds down
    assert sizing.budget_bytes(GEOMETRY, 4, 1000, budget=12345.0) == 12345


def test_budget_as_a_fraction_of_free_memory(monkeypatch):
    monkeypatch.setattr(sizing, "free_memory", lambda device: 8000 * PER_TOKEN)
    assert sizing.budget_bytes(GEOMETRY, 8, 1000, budget=0.5) == 4000 * PER_TOKEN
    assert sizing.budget_bytes(GEOMETRY, 8, 1000, budget=1) == 8000 * PER_TOKEN  # 1 is a fraction, not a byte


def test_default_budget_is_full_contexts_within_free_memory_and_the_cpu_cap(monkeypatch):
    monkeypatch.setattr(sizing, "free_memory", lambda device: 10**12)
    assert sizing.budget_bytes(GEOMETRY, 4, 300, budget=None) == 4 * 300 * PER_TOKEN  # no row could use more
    assert sizing.budget_bytes(GEOMETRY, 4, 10**9, budget=None) == sizing.DEFAULT_CPU_BYTES
    monkeypatch.setattr(sizing, "free_memory", lambda device: 1000 * PER_TOKEN)
    assert sizing.budget_bytes(GEOMETRY, 4, 300, budget=None) == int(sizing.DEFAULT_FRACTION * 1000 * PER_TOKEN)


def test_budget_too_small_names_the_flag():
    sizing.num_blocks(GEOMETRY, 16, sizing.MIN_BLOCKS * 16 * PER_TOKEN)  # just enough
    with pytest.raises(KVBudgetTooSmall, match="--kv-cache-memory"):
        sizing.num_blocks(GEOMETRY, 16, sizing.MIN_BLOCKS * 16 * PER_TOKEN - 1)


def test_context_pieces_are_views_of_each_run():
    """Blocks 4, 5 then 0, then 2: three runs, the last partly filled; each piece reads memory in place."""
    memory = PagedKV(GEOMETRY, num_blocks=6, block_tokens=4)
    table = [4, 5, 0, 2]
    keys = _written(memory, table, 14)
    reads = ContextReads.of(memory, table, 14)
    assert reads.runs == [(16, 8), (0, 4), (8, 2)]
    pieces, value_pieces = memory.pieces(1, reads, 10)  # the first 10 positions: 8 + 2
    assert [p.shape[2] for p in pieces] == [8, 2]
    assert torch.equal(torch.cat(pieces, 2)[0], keys[:10].transpose(0, 1))
    assert torch.equal(torch.cat(value_pieces, 2)[0], -keys[:10].transpose(0, 1))
    pieces[1][0, 0, 0, 0] = 99.0
    assert memory.context(1, reads)[0][0, 0, 8, 0] == 99.0
