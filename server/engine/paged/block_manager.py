"""BlockManager: which KV blocks are free, who holds each one, and which hold cached content (no torch).

A block is held by the running requests whose block tables list it (its refcount). A full block whose
content is known is registered under its hash (block_hash.py); when its last holder leaves, it stays
cached and goes to the end of a least-recently-used list, from which it is taken back by a request with
the same content, or evicted (its hash dropped) when a block is needed and no plain free block is left.
Plain free blocks are handed out lowest id first, so a request's blocks are often one run, which the
prefill reads in place.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict


class OutOfBlocks(RuntimeError):
    """Fewer free blocks than asked for (the caller preempts, or waits)."""


class BlockManager:
    """Refcounts, the hash table, the plain free heap and the LRU of cached free blocks."""

    def __init__(self, num_blocks: int, block_tokens: int):
        if num_blocks < 1 or block_tokens < 1:
            raise ValueError(f"a KV pool needs at least one block of one token ({num_blocks} x {block_tokens})")
        self.num_blocks = num_blocks
        self.block_tokens = block_tokens
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._owner_of: list[str | None] = [None] * num_blocks  # task id of a cached block (forget_owner)
        self._block_of: dict[bytes, int] = {}
        self._plain = list(range(num_blocks))  # a heap: free blocks with no cached content
        self._lru: OrderedDict[int, None] = OrderedDict()  # free blocks with cached content, oldest first

    @property
    def num_free(self) -> int:
        """Blocks a request can be given now (plain, or cached and evictable)."""
        return len(self._plain) + len(self._lru)

    @property
    def num_used(self) -> int:
        """Blocks held by running requests."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered under a hash (held or not)."""
        return len(self._block_of)

    def match(self, hashes: list[bytes]) -> list[int]:
        """The blocks caching the longest leading run of `hashes` (not pinned: `pin` them to keep them)."""
        found = []
        for digest in hashes:
            block = self._block_of.get(digest)
            if block is None:
                break
            found.append(block)
        return found

    def num_free_among(self, blocks: list[int]) -> int:
        """How many of `blocks` are free now (pinning them takes them out of `num_free`)."""
        return sum(self._refs[b] == 0 for b in blocks)

    def pin(self, blocks: list[int]) -> None:
        """One more holder for each of `blocks` (cached ones leave the free list)."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._lru[block]
            self._refs[block] += 1

    def allocate(self, num: int) -> list[int]:
        """`num` fresh blocks, each with one holder; raises OutOfBlocks (taking none) if fewer are free."""
        if num > self.num_free:
            raise OutOfBlocks(f"{num} KV blocks asked for, {self.num_free} free")
        blocks = []
        for _ in range(num):
            if self._plain:
                block = heapq.heappop(self._plain)
            else:
                block, _ = self._lru.popitem(last=False)
                self._unregister(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """One holder less for each of `blocks`; a block nobody holds becomes free (cached ones stay cached)."""
        for block in reversed(blocks):  # a table's tail first: its head is the likelier to be asked for again
            self._refs[block] -= 1
            if self._refs[block] < 0:
                raise RuntimeError(f"KV block {block} freed more often than held")  # a bug
            if self._refs[block] == 0:
                if self._hash_of[block] is None:
                    heapq.heappush(self._plain, block)
                else:
                    self._lru[block] = None

    def commit(self, block: int, digest: bytes, owner: str | None) -> None:
        """`block` (held) now holds the full block named `digest`: later requests may share it. If another
        block holds that content already (two requests computed it at once), this one stays unshared."""
        if digest in self._block_of or self._hash_of[block] is not None:
            return
        self._block_of[digest] = block
        self._hash_of[block] = digest
        self._owner_of[block] = owner

    def forget_owner(self, owner: str) -> int:
        """Drop every cached block of task `owner` (deleted or replaced); held ones stay with their holders.
        Returns how many were dropped."""
        dropped = [b for b in range(self.num_blocks) if self._owner_of[b] == owner and self._hash_of[b] is not None]
        for block in dropped:
            self._unregister(block)
            if self._refs[block] == 0:
                del self._lru[block]
                heapq.heappush(self._plain, block)
        return len(dropped)

    def _unregister(self, block: int) -> None:
        digest = self._hash_of[block]
        if digest is not None:
            del self._block_of[digest]
        self._hash_of[block] = None
        self._owner_of[block] = None
