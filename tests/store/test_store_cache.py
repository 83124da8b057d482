"""The two cache tiers: hits without disk, LRU bounds in bytes, pinning, single-flight, invalidation."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch

import prompt_store.store as store_module
from prompt_store import TaskNotFound

ENTRY = 4 * 64 * 4  # bytes of one cached [4, 64] float32 prompt


def fill(store, *task_ids):
    for task_id in task_ids:
        store.put(task_id, torch.randn(4, 64))


def test_hit_never_touches_disk(make_store, monkeypatch):
    writer = make_store()
    fill(writer, "a")
    reader = make_store()
    first = reader.get("a")

    def no_disk(*args, **kwargs):
        raise AssertionError("disk touched on a hit")

    for name in ("open", "stat", "scandir", "listdir"):
        monkeypatch.setattr(os, name, no_disk)
    assert reader.get("a") is first
    assert reader.acquire("a") is first
    stats = reader.stats()
    assert (stats.hits, stats.misses, stats.loads) == (2, 1, 1)


def test_device_tier_lru_demotes_to_host_and_host_tier_evicts(make_store):
    store = make_store(max_device_bytes=2 * ENTRY, max_host_bytes=2 * ENTRY)
    fill(store, "a", "b", "c")  # a is demoted to the host tier
    stats = store.stats()
    assert (stats.device.num_entries, stats.host.num_entries, stats.evictions) == (2, 1, 0)
    assert stats.device.num_bytes == 2 * ENTRY
    assert (stats.device.num_entries, stats.host.num_entries, stats.host.num_bytes) == (2, 1, ENTRY)
    store.get("b")  # b becomes most recent; c is now least recent on the device
    fill(store, "d", "e")  # device {d, e}; host gets c then b, and a drops out of memory
    stats = store.stats()
    assert (stats.device.num_entries, stats.host.num_entries, stats.evictions) == (2, 2, 1)
    loads = stats.loads
    store.get("c")  # host hit: promoted, no load
    assert store.stats().loads == loads and store.stats().hits >= 2
    store.get("a")  # evicted: loaded from disk again
    assert store.stats().loads == loads + 1


def test_pinned_prompt_is_never_evicted(make_store):
    store = make_store(max_device_bytes=ENTRY, max_host_bytes=0)
    fill(store, "a")
    pinned = store.acquire("a")
    fill(store, "b", "c")  # would push a out; it stays because it is pinned
    stats = store.stats()
    assert stats.pinned == 1 and stats.pinned_bytes == ENTRY
    assert store.get("a") is pinned and store.stats().loads == 0
    assert store.release(pinned) is True
    assert store.release(pinned) is False  # a second release is a no-op
    fill(store, "d")
    assert store.stats().device.num_entries == 1 and store.stats().pinned == 0
    loads = store.stats().loads
    store.get("a")
    assert store.stats().loads == loads + 1


def test_pins_count_per_version(store):
    first = store.put("a", torch.ones(2, 64))
    held = store.acquire("a")
    held_again = store.acquire("a")
    assert store.stats().pinned == 1
    second = store.put("a", torch.zeros(2, 64))
    assert second.version != first.version and store.get("a").version == second.version
    assert held.version == first.version  # the in-flight request keeps the prompt it started with
    store.release(held)
    assert store.stats().pinned == 1
    store.release(held_again)
    assert store.stats().pinned == 0


def test_concurrent_gets_of_a_cold_task_load_once(make_store, monkeypatch):
    fill(make_store(), "cold")
    store = make_store()
    num_threads = 8
    gate = threading.Event()
    real_read = store_module.read_folder
    reads = []

    def slow_read(*args, **kwargs):
        reads.append(1)
        assert gate.wait(timeout=10)  # hold the first load until every thread has asked
        return real_read(*args, **kwargs)

    monkeypatch.setattr(store_module, "read_folder", slow_read)
    results = [None] * num_threads

    def worker(i):
        results[i] = store.acquire("cold")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(num_threads)]
    for thread in threads:
        thread.start()
    while store.stats().misses < num_threads:  # every thread is waiting on the one flight
        threading.Event().wait(0.001)
    gate.set()
    for thread in threads:
        thread.join(timeout=10)
    assert len(reads) == 1 and store.stats().loads == 1
    assert all(r is results[0] for r in results)
    assert store.stats().pinned == 1


def test_concurrent_gets_of_a_missing_task_all_fail(store):
    errors = []

    def worker():
        try:
            store.get("ghost")
        except TaskNotFound as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 6 and store.stats().not_found >= 1


def test_put_and_delete_invalidate(make_store):
    store = make_store()
    v1 = store.put("a", torch.ones(2, 64))
    assert store.get("a").version == v1.version
    v2 = store.put("a", torch.full((3, 64), 2.0))
    got = store.get("a")
    assert got.version == v2.version and got.num_virtual_tokens == 3
    store.delete("a")
    with pytest.raises(TaskNotFound):
        store.get("a")
    with pytest.raises(TaskNotFound):
        store.delete("a")
    assert store.stats().device.num_entries == 0


def test_change_by_another_process_is_noticed_by_refresh_and_list(make_store, tmp_path):
    ours, theirs = make_store(), make_store()
    old = ours.put("a", torch.ones(2, 64))
    ours.put("b", torch.ones(2, 64))
    assert ours.get("a").version == old.version
    new = theirs.put("a", torch.zeros(2, 64))  # another writer on the same root
    assert ours.get("a").version == old.version  # hits do not look at the disk ...
    assert ours.refresh() == ["a"]  # ... an explicit refresh notices, by stat only
    assert ours.get("a").version == new.version
    assert ours.refresh("a") == [] and ours.refresh("never-cached") == []
    # a folder copied over by hand (files rewritten in place) is noticed by list() too
    shutil.copy(theirs.root / "b" / "adapter_model.safetensors", tmp_path / "w")
    theirs.put("c", torch.full((2, 64), 5.0))
    shutil.copy(theirs.root / "c" / "adapter_model.safetensors", ours.root / "b" / "adapter_model.safetensors")
    assert {i.task_id for i in ours.list()} == {"a", "b", "c"}
    assert torch.equal(ours.get("b").embeddings, torch.full((2, 64), 5.0))
    theirs.delete("a")
    assert ours.refresh() == ["a"]
    with pytest.raises(TaskNotFound):
        ours.get("a")


def test_many_unknown_ids_hold_no_memory(store):
    for i in range(2000):
        with pytest.raises(TaskNotFound):
            store.get(f"unknown-{i}")
    stats = store.stats()
    assert stats.not_found == 2000 and stats.device.num_entries == 0 and stats.host.num_entries == 0
