"""The tasks' prefix cache (hits, versions, LRU within bytes) and slot admission in the scheduler
(deferred requests keep their place), on tiny tensors and no model."""

from __future__ import annotations


import torch

from server.engine.config import EngineConfig
from server.engine.kv_pool import KVGeometry, PrefixKV
from server.engine.prefix_cache import PrefixCache
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, Status
from server.engine.types import SamplingParams

GEOMETRY = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=3, dtype=torch.float32, device=torch.device("cpu"))



# -- PrefixCache ----------------------------------------------------------------------------------
def _prefix(num_tokens: int = 1, value: float = 0.0) -> PrefixKV:
    """8 bytes per token (1 layer, 1 head, head_dim 1, keys and values in float32)."""
    return PrefixKV(torch.full((1, 1, num_tokens, 1), value), torch.full((1, 1, num_tokens, 1), value))


def test_prefix_get_counts_misses_and_hits():
    cache = PrefixCache(max_bytes=1 << 10)
    assert cache.is_enabled
    assert cache.get("a", "v1") is None
    entry = _prefix(2)
    cache.put("a", "v1", entry)
    assert cache.contains("a", "v1") and not cache.contains("a", "v2")  # contains counts nothing
    assert cache.get("a", "v1") is entry
    assert cache.get("a", "v1") is entry
    stats = cache.stats()
    assert (stats.num_hits, stats.num_misses, stats.num_entries, stats.num_bytes) == (2, 1, 1, 16)


def test_prefix_of_another_version_misses_and_drops_the_old_entry():
    cache = PrefixCache(max_bytes=1 << 10)
    cache.put("a", "v1", _prefix())
    cache.put("b", "v1", _prefix())
    assert cache.get("a", "v2") is None
    assert not cache.contains("a", "v1")  # the old version is gone, not kept beside the new
    assert cache.get("a", "v1") is None
    stats = cache.stats()
    assert (stats.num_hits, stats.num_misses, stats.num_entries, stats.num_bytes) == (0, 2, 1, 8)
    assert cache.contains("b", "v1")


def test_prefix_put_replaces_the_task_entry():
    cache = PrefixCache(max_bytes=1 << 10)
    cache.put("a", "v1", _prefix(2))
    cache.put("a", "v2", _prefix(3))
    assert not cache.contains("a", "v1") and cache.contains("a", "v2")
    assert cache.stats().num_bytes == 24 and cache.stats().num_entries == 1


def test_prefix_eviction_drops_the_least_recently_used():
    cache = PrefixCache(max_bytes=24)  # three one-token entries
    for task in "abc":
        cache.put(task, "v", _prefix())
    assert cache.get("a", "v") is not None  # a is now the most recently used: b is the oldest
    cache.put("d", "v", _prefix())
    assert [cache.contains(t, "v") for t in "abcd"] == [True, False, True, True]
    cache.put("e", "v", _prefix(2))  # needs two entries' room: c, then a go
    assert [cache.contains(t, "v") for t in "acde"] == [False, False, True, True]
    stats = cache.stats()
    assert (stats.num_evictions, stats.num_entries, stats.num_bytes) == (3, 2, 24)


def test_prefix_larger_than_the_budget_is_not_kept():
    cache = PrefixCache(max_bytes=24)
    cache.put("a", "v", _prefix())
    cache.put("big", "v", _prefix(4))  # 32 bytes > 24
    assert not cache.contains("big", "v")
    assert cache.contains("a", "v")  # and nothing was evicted for it
    stats = cache.stats()
    assert (stats.num_evictions, stats.num_entries, stats.num_bytes) == (0, 1, 8)


def test_prefix_forget():
    cache = PrefixCache(max_bytes=1 << 10)
    cache.put("a", "v", _prefix(2))
    cache.put("b", "v", _prefix(1))
    cache.forget("a")
    cache.forget("never-cached")
    assert not cache.contains("a", "v") and cache.contains("b", "v")
    assert cache.stats().num_bytes == 8 and cache.stats().num_entries == 1


def test_prefix_cache_disabled_by_zero_bytes():
    cache = PrefixCache(max_bytes=0)
    assert not cache.is_enabled
    cache.put("a", "v", _prefix())
    assert cache.get("a", "v") is None and cache.stats().num_entries == 0


def test_prefix_stats_is_a_snapshot():
    cache = PrefixCache(max_bytes=1 << 10)
    before = cache.stats()
    cache.get("a", "v")
    assert before.num_misses == 0 and cache.stats().num_misses == 1
    assert set(vars(before)) == {"num_hits", "num_misses", "num_evictions", "num_entries", "num_bytes"}


# -- Scheduler.admit_slots -----------------------------------------------------------------------
def _seq(name: str) -> Sequence:
    return Sequence(request_id=name, task_id=None, prompt=None, prompt_ids=[5, 6], params=SamplingParams(),
                    seed=None, eos_token_ids=frozenset(), tokenizer=None, sink=None)


def _queued(num: int, max_batch_size: int = 16) -> tuple[Scheduler, list[Sequence]]:
    sched = Scheduler(EngineConfig(max_batch_size=max_batch_size))
    seqs = [_seq(f"s{i}") for i in range(num)]
    for seq in seqs:
        sched.add(seq)
    return sched, seqs


def _always(seq: Sequence) -> bool:
    return True


def test_admit_slots_takes_at_most_the_free_slots():
    sched, seqs = _queued(5)
    assert sched.admit_slots(2, _always) == seqs[:2]
    assert all(s.status is Status.RUNNING for s in seqs[:2]) and seqs[2].status is Status.WAITING
    assert sched.admit_slots(0, _always) == []
    assert sched.num_running == 2 and sched.num_waiting == 3


def test_admit_slots_takes_at_most_the_batch_room():
    sched, seqs = _queued(5, max_batch_size=3)
    assert sched.admit_slots(2, _always) == seqs[:2]
    assert sched.admit_slots(10, _always) == [seqs[2]]  # 3 - 2 running, though 10 slots are free
    assert sched.admit_slots(10, _always) == []
    sched.finish([seqs[0]])
    assert sched.admit_slots(10, _always) == [seqs[3]]


def test_deferred_request_keeps_its_place_while_later_ones_pass():
    sched, seqs = _queued(5)
    deferred = {"s1"}
    assert sched.admit_slots(2, lambda s: s.request_id not in deferred) == [seqs[0], seqs[2]]
    assert seqs[1].status is Status.WAITING
    deferred.clear()
    assert sched.admit_slots(1, _always) == [seqs[1]]  # still first in the queue
    assert sched.admit_slots(5, _always) == seqs[3:]


def test_several_deferred_keep_their_order():
    sched, seqs = _queued(6)
    assert sched.admit_slots(2, lambda s: s.request_id in {"s2", "s5"}) == [seqs[2], seqs[5]]
    assert sched.admit_slots(10, _always) == [seqs[0], seqs[1], seqs[3], seqs[4]]


def test_is_ready_is_asked_only_of_requests_that_would_be_admitted():
    sched, seqs = _queued(6)
    asked: list[tuple[str, bool]] = []

    def is_ready(seq: Sequence) -> bool:
        answer = seq.request_id != "s1"
        asked.append((seq.request_id, answer))
        return answer

    admitted = sched.admit_slots(2, is_ready)
    assert asked == [("s0", True), ("s1", False), ("s2", True)]  # s3.. are not asked: no room left
    assert {name for name, answer in asked if answer} == {s.request_id for s in admitted}
    asked.clear()
    sched.admit_slots(0, is_ready)  # no free slot: nobody is asked
    sched2, _ = _queued(3, max_batch_size=1)
    sched2.admit_slots(5, _always)
    sched2.admit_slots(5, is_ready)  # batch full: nobody is asked
    assert asked == []


