"""How big the KV pool is: `--kv-cache-memory` (bytes, or a fraction of free device memory) into slots.

There is one slot per batch row (max_batch_size). A slot holds a whole context, so a slot's length is the
context limit, max_total_tokens, unless the budget is smaller: then every slot gets budget / rows tokens,
and that becomes the context limit (longer requests are refused with 422 before they queue).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from server.engine.kv_pool import KVGeometry

DEFAULT_FRACTION = 0.5  # with no budget given: at most this much of the free memory
MIN_SLOT_TOKENS = 16


class KVBudgetTooSmall(ValueError):
    """The budget does not give every row a useful slot."""


@dataclass(frozen=True)
class PoolSize:
    """Slots and tokens per slot."""

    num_slots: int
    slot_tokens: int


def free_memory(device: torch.device) -> int:
    """Bytes free on the device (host memory available, for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def size_pool(geometry: KVGeometry, num_rows: int, max_context: int, budget: float | None) -> PoolSize:
    """The pool for `num_rows` slots of up to `max_context` tokens within `budget`."""
    per_token = geometry.bytes_per_token
    if budget is None:
        available = int(DEFAULT_FRACTION * free_memory(geometry.device))
        num_bytes = min(num_rows * max_context * per_token, available)
    elif budget <= 1:
        num_bytes = int(budget * free_memory(geometry.device))
    else:
        num_bytes = int(budget)
    slot_tokens = min(max_context, num_bytes // (num_rows * per_token))
    if slot_tokens < MIN_SLOT_TOKENS:
        raise KVBudgetTooSmall(
            f"KV budget of {num_bytes} bytes gives {num_rows} rows {slot_tokens} tokens each "
            f"({per_token} bytes per token); raise --kv-cache-memory or lower --max-batch-size")
    return PoolSize(num_rows, slot_tokens)
