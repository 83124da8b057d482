"""The slot engine's KV memory on tiny tensors (no model): the pool's slots, writes, views, moves and
prefix copies, and how the KV budget sizes the pool."""

from __future__ import annotations


import pytest
import torch

from server.engine import kv_budget
from server.engine.kv_budget import KVBudgetTooSmall, PoolSize, size_pool
from server.engine.kv_pool import KVGeometry, KVPool

GEOMETRY = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=3, dtype=torch.float32, device=torch.device("cpu"))



# -- KVPool -----------------------------------------------------------------------------------------
def _filled_pool(num_slots: int = 3, slot_tokens: int = 5) -> KVPool:
    """All slots in use; every (layer, kind, slot, head, column, dim) holds a distinct value."""
    pool = KVPool(GEOMETRY, num_slots, slot_tokens)
    for _ in range(num_slots):
        pool.allocate()
    for layer in range(GEOMETRY.num_layers):
        keys, values = pool.view(layer, 0, num_slots, slot_tokens)
        keys.copy_(torch.arange(keys.numel(), dtype=torch.float32).view_as(keys) + 1000 * layer)
        values.copy_(-keys)
    return pool


def _snapshot(pool: KVPool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(t.clone() for t in pool.view(layer, 0, pool.num_slots, pool.slot_tokens))
            for layer in range(GEOMETRY.num_layers)]


def test_bytes_per_token_and_pool_bytes():
    assert GEOMETRY.bytes_per_token == 2 * 2 * 2 * 3 * 4  # keys + values, layers, heads, head_dim, float32
    pool = KVPool(GEOMETRY, num_slots=3, slot_tokens=5)
    keys, values = pool.view(0, 0, 3, 5)
    assert pool.num_bytes == 3 * 5 * GEOMETRY.bytes_per_token
    assert pool.num_bytes == GEOMETRY.num_layers * 2 * keys.numel() * keys.element_size()
    assert not keys.any() and not values.any()  # zeroed: masked columns stay finite


def test_allocate_counts_up_and_refuses_when_full():
    pool = KVPool(GEOMETRY, num_slots=3, slot_tokens=4)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    assert pool.num_used == 3 and pool.num_free == 0
    with pytest.raises(RuntimeError, match="no free KV slot"):
        pool.allocate()


def test_pool_needs_a_slot_of_a_token():
    with pytest.raises(ValueError):
        KVPool(GEOMETRY, num_slots=0, slot_tokens=4)
    with pytest.raises(ValueError):
        KVPool(GEOMETRY, num_slots=2, slot_tokens=0)


def test_release_of_a_middle_slot_moves_the_last_into_the_hole():
    pool = _filled_pool(num_slots=3, slot_tokens=5)
    before = _snapshot(pool)
    assert pool.release(1, num_tokens_of_last=3) == 2
    assert pool.num_used == 2 and pool.num_free == 1
    after = _snapshot(pool)
    for layer in range(GEOMETRY.num_layers):
        for kind in (0, 1):  # keys, values
            old, new = before[layer][kind], after[layer][kind]
            assert torch.equal(new[1, :, :3], old[2, :, :3]), (layer, kind)  # the last slot's columns moved
            assert torch.equal(new[1, :, 3:], old[1, :, 3:])  # columns past them are not copied
            assert torch.equal(new[0], old[0]) and torch.equal(new[2], old[2])  # nothing else changes
    assert pool.allocate() == 2  # the freed one is again the next after the used ones


def test_release_of_the_last_slot_moves_nothing():
    pool = _filled_pool(num_slots=3)
    before = _snapshot(pool)
    assert pool.release(2, num_tokens_of_last=5) is None
    assert pool.num_used == 2
    assert all(torch.equal(a, b) for pair_a, pair_b in zip(before, _snapshot(pool)) for a, b in zip(pair_a, pair_b))


def test_release_of_an_unused_slot_raises():
    pool = KVPool(GEOMETRY, num_slots=3, slot_tokens=4)
    pool.allocate()
    with pytest.raises(ValueError, match="not in use"):
        pool.release(1, num_tokens_of_last=1)
    with pytest.raises(ValueError, match="not in use"):
        pool.release(-1, num_tokens_of_last=1)
    assert pool.num_used == 1


def test_write_puts_each_token_at_its_slot_and_position_for_all_heads():
    pool = KVPool(GEOMETRY, num_slots=3, slot_tokens=6)
    slots, positions = torch.tensor([2, 0, 2, 1]), torch.tensor([0, 5, 3, 1])
    keys = torch.arange(4 * 2 * 3, dtype=torch.float32).view(4, 2, 3) + 1  # [N, kv_heads, head_dim]
    pool.write(1, slots, positions, keys, keys * 10)
    k, v = pool.view(1, 0, 3, 6)
    for t in range(4):
        assert torch.equal(k[slots[t], :, positions[t]], keys[t])  # every head
        assert torch.equal(v[slots[t], :, positions[t]], keys[t] * 10)
    assert int((k != 0).sum()) == keys.numel()  # nothing else written
    assert not pool.view(0, 0, 3, 6)[0].any()  # nor another layer


def test_view_shares_the_pool_memory():
    pool = KVPool(GEOMETRY, num_slots=4, slot_tokens=6)
    keys, values = pool.view(0, 1, 2, 4)
    assert keys.shape == values.shape == (2, GEOMETRY.num_kv_heads, 4, GEOMETRY.head_dim)
    pool.write(0, torch.tensor([2]), torch.tensor([3]), torch.ones(1, 2, 3), torch.full((1, 2, 3), 2.0))
    assert keys[1, :, 3].eq(1).all() and values[1, :, 3].eq(2).all()  # seen through the earlier view
    keys[0, 0, 0, 0] = 7.0
    assert pool.view(0, 0, 4, 6)[0][1, 0, 0, 0] == 7.0


def test_save_and_load_prefix_round_trip():
    pool = _filled_pool(num_slots=3, slot_tokens=5)
    prefix = pool.save_prefix(0, num_tokens=3)
    assert prefix.keys.shape == (GEOMETRY.num_layers, GEOMETRY.num_kv_heads, 3, GEOMETRY.head_dim)
    assert prefix.num_tokens == 3
    assert prefix.num_bytes == 3 * GEOMETRY.bytes_per_token
    want = _snapshot(pool)
    pool.view(0, 0, 1, 5)[0].fill_(0.5)  # a copy: later writes to the slot do not reach the prefix
    assert torch.equal(prefix.keys[0], want[0][0][0, :, :3])
    pool.load_prefix(2, prefix)
    got = _snapshot(pool)
    for layer in range(GEOMETRY.num_layers):
        for kind in (0, 1):
            assert torch.equal(got[layer][kind][2, :, :3], want[layer][kind][0, :, :3])
            assert torch.equal(got[layer][kind][2, :, 3:], want[layer][kind][2, :, 3:])  # the rest untouched


# -- kv_budget -----------------------------------------------------------------------------------
PER_TOKEN = GEOMETRY.bytes_per_token  # 96


def test_budget_in_bytes():
    assert size_pool(GEOMETRY, 4, 1000, budget=4 * 32 * PER_TOKEN) == PoolSize(4, 32)
    assert size_pool(GEOMETRY, 4, 1000, budget=4 * 32 * PER_TOKEN + PER_TOKEN) == PoolSize(4, 32)  # rounds down
    assert size_pool(GEOMETRY, 4, 64, budget=10**9) == PoolSize(4, 64)  # never more than max_context


def test_budget_as_a_fraction_of_free_memory(monkeypatch):
    monkeypatch.setattr(kv_budget, "free_memory", lambda device: 8 * 100 * PER_TOKEN)
    assert size_pool(GEOMETRY, 8, 1000, budget=0.5) == PoolSize(8, 50)
    assert size_pool(GEOMETRY, 8, 1000, budget=1) == PoolSize(8, 100)  # 1 is a fraction, not one byte


def test_default_budget_is_capped_by_context_and_free_memory(monkeypatch):
    monkeypatch.setattr(kv_budget, "free_memory", lambda device: 10**12)
    assert size_pool(GEOMETRY, 4, 300, budget=None) == PoolSize(4, 300)  # full contexts fit
    free = 4 * 100 * PER_TOKEN
    monkeypatch.setattr(kv_budget, "free_memory", lambda device: free)
    tokens = int(kv_budget.DEFAULT_FRACTION * free) // (4 * PER_TOKEN)
    assert size_pool(GEOMETRY, 4, 300, budget=None) == PoolSize(4, tokens)
    assert tokens < 300


def test_budget_too_small_names_the_flag(monkeypatch):
    size_pool(GEOMETRY, 2, 1000, budget=2 * kv_budget.MIN_SLOT_TOKENS * PER_TOKEN)  # just enough
    with pytest.raises(KVBudgetTooSmall, match="--kv-cache-memory"):
        size_pool(GEOMETRY, 2, 1000, budget=2 * kv_budget.MIN_SLOT_TOKENS * PER_TOKEN - 1)
    monkeypatch.setattr(kv_budget, "free_memory", lambda device: 1000)
    with pytest.raises(KVBudgetTooSmall, match="--kv-cache-memory"):
        size_pool(GEOMETRY, 2, 1000, budget=None)


