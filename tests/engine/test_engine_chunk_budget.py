"""ChunkBudget (server/engine/scheduling/chunk_budget.py): prompt tokens per step from measured step times."""

from __future__ import annotations

import pytest

from server.engine.scheduling.chunk_budget import MIN_CHUNK_TOKENS, ChunkBudget

BACKLOG = 10_000  # prompt tokens waiting: enough for the ceiling


def _budget(ratio: float = 1.8) -> ChunkBudget:
    return ChunkBudget(max_tokens=128, idle_tokens=2048, max_stall_ratio=ratio)


def test_a_step_no_row_waits_on_takes_the_idle_budget():
    budget = _budget()
    budget.record(0.010, num_decode=32, num_prefill=0)
    budget.record(0.030, num_decode=32, num_prefill=100)
    assert budget.tokens(False, 1, BACKLOG) == 2048


def test_without_estimates_the_chunk_is_the_ceiling():
    budget = _budget()
    assert budget.tokens(True, 1, BACKLOG) == 128
    budget.record(0.010, num_decode=4, num_prefill=0)  # a decode step, but no prefill cost measured yet
    assert budget.tokens(True, 1, BACKLOG) == 128


def test_the_chunk_keeps_a_mixed_step_within_the_ratio_of_a_decode_step():
    budget = _budget(ratio=1.8)
    budget.record(0.010, num_decode=8, num_prefill=0)  # decode-only: 10 ms
    budget.record(0.030, num_decode=8, num_prefill=100)  # 20 ms more for 100 tokens: 0.2 ms a token
    assert budget.tokens(True, 1, BACKLOG) == 40  # 0.8 x 10 ms / 0.2 ms
    assert 0.010 + 40 * 0.0002 == pytest.approx(1.8 * 0.010)
    assert budget.tokens(True, 1, BACKLOG) >= MIN_CHUNK_TOKENS


def test_more_decoding_rows_make_longer_steps_and_allow_larger_chunks():
    budget = _budget()
    budget.record(0.030, num_decode=0, num_prefill=100)  # a prefill alone seeds the per-token cost
    budget.record(0.005, num_decode=2, num_prefill=0)
    small = budget.tokens(True, 1, BACKLOG)
    for _ in range(30):
        budget.record(0.020, num_decode=32, num_prefill=0)
    assert budget.tokens(True, 1, BACKLOG) > small


def test_the_chunk_stays_between_the_floor_and_the_ceiling():
    slow = _budget()
    slow.record(0.001, num_decode=1, num_prefill=0)
    slow.record(1.0, num_decode=1, num_prefill=10)  # 0.1 s a token
    assert slow.tokens(True, 1, BACKLOG) == MIN_CHUNK_TOKENS
    fast = _budget()
    fast.record(0.100, num_decode=32, num_prefill=0)
    fast.record(0.101, num_decode=32, num_prefill=100)
    assert fast.tokens(True, 1, BACKLOG) == 128
    assert ChunkBudget(max_tokens=8, idle_tokens=64, max_stall_ratio=1.8).tokens(True, 1, BACKLOG) == 8


def test_ratio_zero_turns_it_off():
    budget = _budget(ratio=0)
    budget.record(0.010, num_decode=8, num_prefill=0)
    budget.record(1.0, num_decode=8, num_prefill=100)
    assert budget.tokens(True, 1, BACKLOG) == 128


@pytest.mark.parametrize("requests, tokens, chunk", [
    (1, 0, 32), (1, 100, 32), (1, 200, 50), (1, 600, 128), (1, 10_000, 128),  # a backlog over 4 steps at most
    (2, 40, 64), (3, 60, 96), (8, 160, 128),  # each waiting request earns a quarter of the ceiling
])
def test_while_rows_decode_the_chunk_follows_the_backlog(requests, tokens, chunk):
    """The larger of 32 (a quarter of the ceiling, 128 here) per waiting request and a quarter of their
    prompt tokens, up to the ceiling."""
    assert _budget(ratio=0).tokens(True, requests, tokens) == chunk
    assert _budget(ratio=0).tokens(False, requests, tokens) == 2048  # no row decodes: the idle budget
    assert ChunkBudget(max_tokens=2, idle_tokens=8, max_stall_ratio=0).tokens(True, 1, 0) == 1  # progress
