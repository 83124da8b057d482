"""The paged engine's memory manager with no model: refcounts, the prefix hash chain, cached free blocks
evicted least recently used, forgetting a task, and never handing out a held block."""

from __future__ import annotations

import random

import pytest

from server.engine.paged import block_hash
from server.engine.paged.block_manager import BlockManager, OutOfBlocks


def _chain(task: str | None, ids: list[int], num_virtual: int = 0, block: int = 4) -> list[bytes]:
    hashes: list[bytes] = []
    block_hash.extend(hashes, block_hash.root(task, "v1" if task else None),
                      block_hash.context_ids(num_virtual, ids), block, 100)
    return hashes


def test_the_chain_names_content_and_task():
    same = _chain("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(same) == 2  # full blocks only: the ninth token's block is partial
    assert _chain("a", [1, 2, 3, 4, 5, 6, 7, 8]) == same
    assert _chain("a", [1, 2, 3, 4, 0, 6, 7, 8])[0] == same[0] != _chain("a", [1, 2, 3, 4, 0, 6, 7, 8])[1]
    assert _chain("b", [1, 2, 3, 4, 5, 6, 7, 8])[0] != same[0]  # another task: another chain
    assert _chain(None, [1, 2, 3, 4])[0] != same[0]
    other_version: list[bytes] = []
    block_hash.extend(other_version, block_hash.root("a", "v2"), [1, 2, 3, 4], 4, 1)
    assert other_version[0] != same[0]
    # A later block's name depends on everything before it.
    assert _chain("a", [9, 2, 3, 4, 5, 6, 7, 8])[1] != same[1]
    # Virtual tokens are the chain's first positions.
    assert _chain("a", [5, 6], num_virtual=2)[0] == _chain("a", [5, 6, 7], num_virtual=2)[0]
    assert block_hash.context_ids(2, [7]) == [-1, -2, 7]


def test_shared_blocks_are_held_by_reference_and_cached_after():
    manager = BlockManager(num_blocks=4, block_tokens=4)
    a = manager.allocate(2)
    assert a == [0, 1] and manager.num_free == 2
    digests = _chain("t", list(range(8)))
    manager.commit(a[0], digests[0], "t")
    manager.commit(a[1], digests[1], "t")
    assert manager.match(digests) == a and manager.num_cached == 2
    manager.pin(a)  # a second request shares them
    manager.free(a)
    assert manager.num_used == 2  # still held by the second
    manager.free(a)
    assert manager.num_used == 0 and manager.num_free == 4 and manager.num_cached == 2
    assert manager.match(digests) == a  # cached while free
    manager.pin(a[:1])
    assert manager.num_free == 3 and manager.num_free_among(a) == 1
    with pytest.raises(RuntimeError, match="freed more often"):
        manager.free([3])


def test_plain_blocks_go_first_then_the_least_recently_used_cached():
    manager = BlockManager(num_blocks=3, block_tokens=4)
    blocks = manager.allocate(3)
    digests = _chain("t", list(range(12)))
    for block, digest in zip(blocks, digests):
        manager.commit(block, digest, "t")
    manager.free([blocks[1]])
    manager.free([blocks[0]])  # freed last: used most recently
    assert manager.allocate(1) == [blocks[1]]  # the oldest cached one is evicted
    assert manager.match(digests) == [blocks[0]]  # its successor's content is gone, the chain stops
    with pytest.raises(OutOfBlocks):
        manager.allocate(2)
    assert manager.num_free == 1  # a failed allocation takes nothing


def test_a_second_copy_of_one_content_stays_unshared():
    manager = BlockManager(num_blocks=2, block_tokens=4)
    first, second = manager.allocate(2)
    digest = _chain("t", [1, 2, 3, 4])[0]
    manager.commit(first, digest, "t")
    manager.commit(second, digest, "t")
    assert manager.match([digest]) == [first] and manager.num_cached == 1
    manager.free([second])
    assert manager.allocate(1) == [second]


def test_forgetting_a_task_drops_its_cache_not_its_holders():
    manager = BlockManager(num_blocks=4, block_tokens=4)
    held, free = manager.allocate(1), manager.allocate(1)
    other = manager.allocate(1)
    manager.commit(held[0], b"h" * 16, "gone")
    manager.commit(free[0], b"f" * 16, "gone")
    manager.commit(other[0], b"o" * 16, "kept")
    manager.free(free + other)
    assert manager.forget_owner("gone") == 2
    assert manager.match([b"h" * 16]) == [] and manager.match([b"f" * 16]) == []
    assert manager.match([b"o" * 16]) == other
    assert manager.num_used == 1  # the held block stays with its holder
    assert manager.allocate(1) == free  # the dropped free block is plain again, lowest first


def test_random_traffic_never_hands_out_a_held_block():
    rng = random.Random(0)
    manager = BlockManager(num_blocks=16, block_tokens=4)
    held: list[list[int]] = []
    refs = [0] * 16
    for step in range(3000):
        if held and rng.random() < 0.45:
            table = held.pop(rng.randrange(len(held)))
            manager.free(table)
            for b in table:
                refs[b] -= 1
            continue
        want = rng.randint(1, 4)
        shared = manager.match([bytes([rng.randrange(6)]) * 16])
        if want > manager.num_free - manager.num_free_among(shared):
            continue
        manager.pin(shared)
        table = shared + manager.allocate(want)
        assert all(refs[b] == 0 for b in table[len(shared):]), step  # fresh blocks are nobody's
        for b in table:
            refs[b] += 1
        manager.commit(table[-1], bytes([rng.randrange(6)]) * 16, None)
        held.append(table)
        assert manager.num_used == sum(r > 0 for r in refs)
    for table in held:
        manager.free(table)
    assert manager.num_used == 0 and manager.num_free == 16
