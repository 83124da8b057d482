"""How big the paged KV memory is: `--kv-cache-memory` (bytes, or a fraction of free device memory) into
blocks of `--kv-block-tokens`.

The budget bounds tokens in flight, not rows: any mix of long and short contexts fits while their blocks
do. With no budget given, the memory is what `max_batch_size` full contexts need (no request could use
more), capped at half the free memory and, on the CPU, at DEFAULT_CPU_BYTES: there the KV shares RAM with
everything else on the machine, and a 1 GiB default holds tens of thousands of tokens of a small model
(23k of SmolLM2-135M in float32) while keeping the server's footprint small. On a GPU the device is the
server's own, so half its free memory is the default.
"""

from __future__ import annotations

import os

import torch

from server.engine.paged.kv_memory import KVGeometry

DEFAULT_FRACTION = 0.5  # with no budget given: at most this much of the free memory
DEFAULT_CPU_BYTES = 1 << 30
MIN_BLOCKS = 2


class KVBudgetTooSmall(ValueError):
    """The budget does not give the engine a useful amount of KV memory."""


def free_memory(device: torch.device) -> int:
    """Bytes free on the device (host memory available, for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def budget_bytes(geometry: KVGeometry, num_rows: int, max_context: int, budget: float | None,
                 block_tokens: int = 1) -> int:
    """The KV memory's size in bytes for `budget` (None: the default above, whole blocks per context)."""
    if budget is not None:
        return int(budget * free_memory(geometry.device)) if budget <= 1 else int(budget)
    full = num_rows * -(-max_context // block_tokens) * block_tokens * geometry.bytes_per_token
    cap = int(DEFAULT_FRACTION * free_memory(geometry.device))
    if geometry.device.type == "cpu":
        cap = min(cap, DEFAULT_CPU_BYTES)
    return min(full, cap)


def num_blocks(geometry: KVGeometry, block_tokens: int, num_bytes: int) -> int:
    """Blocks of `block_tokens` that fit in `num_bytes`; raises KVBudgetTooSmall below MIN_BLOCKS."""
    blocks = num_bytes // (block_tokens * geometry.bytes_per_token)
    if blocks < MIN_BLOCKS:
        raise KVBudgetTooSmall(
            f"a KV budget of {num_bytes} bytes holds {blocks} blocks of {block_tokens} tokens "
            f"({geometry.bytes_per_token} bytes per token); raise --kv-cache-memory")
    return int(blocks)
