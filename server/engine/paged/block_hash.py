"""The prefix hash chain: a full block of a request's context is named by its parent block's hash and
its own token ids, and the chain's root by the task id and version (or none, for the bare model).

A task's virtual tokens are the chain's first positions. They have no token ids, so position i of them
is named -(i + 1): with the task id and version in the root, that names exactly what PEFT puts there.
Two tasks never share a block, even with the same text after their virtual tokens (their roots differ);
two requests of one task share every full block of their common leading text. BLAKE2b (128 bits), so a
collision, which would serve one request another's keys, is out of reach.
"""

from __future__ import annotations

import hashlib
from array import array

_DIGEST_BYTES = 16


def root(task_id: str | None, version: str | None) -> bytes:
    """The chain's root for a task version, or for the bare model."""
    key = b"bare" if task_id is None else f"task\0{task_id}\0{version}".encode()
    return hashlib.blake2b(b"promptserve-kv\0" + key, digest_size=_DIGEST_BYTES).digest()


def context_ids(num_virtual: int, token_ids: list[int]) -> list[int]:
    """A context's names, position by position: -1..-n for the virtual tokens, then the token ids."""
    return [-(i + 1) for i in range(num_virtual)] + token_ids


def extend(hashes: list[bytes], chain_root: bytes, ids: list[int], block_tokens: int, num_blocks: int) -> None:
    """Append to `hashes` (the chain of the first len(hashes) blocks of `ids`) until it covers
    `num_blocks` full blocks (never past the last full block of `ids`)."""
    num_blocks = min(num_blocks, len(ids) // block_tokens)
    parent = hashes[-1] if hashes else chain_root
    for block in range(len(hashes), num_blocks):
        tokens = array("q", ids[block * block_tokens:(block + 1) * block_tokens]).tobytes()
        parent = hashlib.blake2b(parent + tokens, digest_size=_DIGEST_BYTES).digest()
        hashes.append(parent)
