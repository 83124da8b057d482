"""Whether a built native decode kernel may serve a model: checked once, on the model's KV geometry and
dtype, against float64 SDPA. A kernel that disagrees is refused (logged) and the engine keeps SDPA."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from server.engine.kv_pool import KVGeometry, KVPool
from server.engine.native_decode import NativeDecode

log = logging.getLogger(__name__)


# Relative error allowed against float64 attention: a few roundings of the dtype (measured: float32 3e-7,
# bfloat16 3e-3, as SDPA's own 4e-3). A wrong column, head or scale is off by far more.
_NATIVE_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def accept(native: NativeDecode, geometry: KVGeometry) -> NativeDecode | None:
    """`native` if, on this geometry and dtype, it stores keys and values exactly and attends within
    tolerance of float64 SDPA (random data: decoding rows in scattered slots, then prefill tokens)."""
    if not native.covers(geometry.dtype, geometry.device):
        return None
    gen = torch.Generator(device=geometry.device).manual_seed(0)
    heads = geometry.num_kv_heads * 2 if geometry.num_kv_heads > 1 else 4  # a query head group, as in GQA
    pool = KVPool(geometry, num_slots=4, slot_tokens=40, native=native)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=geometry.device).to(geometry.dtype)

    history = [rand(4, geometry.num_kv_heads, 40, geometry.head_dim) for _ in range(2)]
    slots, positions = torch.tensor([2, 0, 3, 1, 1]), torch.tensor([30, 7, 39, 0, 1])
    new_kv = [rand(5, geometry.num_kv_heads, geometry.head_dim) for _ in range(2)]
    queries, out = rand(5, heads, geometry.head_dim), rand(5, heads, geometry.head_dim)
    keys, values = pool.view(0, 0, 4, 40)
    keys.copy_(history[0]), values.copy_(history[1])
    pool.write_and_decode(0, queries, *new_kv, slots, positions, 3, 0.3, out)
    for t in range(5):
        for past, new in zip(history, new_kv):
            past[slots[t], :, positions[t]] = new[t]
    keys, values = pool.view(0, 0, 4, 40)
    if not (torch.equal(keys, history[0]) and torch.equal(values, history[1])):
        return _refuse("it stored keys or values in the wrong place")
    for row in range(3):
        cols = slice(0, int(positions[row]) + 1)
        want = F.scaled_dot_product_attention(
            queries[row, :, None].double(), history[0][slots[row], :, cols].double(),
            history[1][slots[row], :, cols].double(), scale=0.3, enable_gqa=True)[:, 0]  # [H, d]
        error = float((out[row].double() - want).abs().max() / want.abs().max())
        if not error <= _NATIVE_TOLERANCE[geometry.dtype]:
            return _refuse(f"row {row} differs from SDPA by {error:.2e} (relative)")
    return native


def _refuse(reason: str) -> None:
    log.warning("engine: native decode kernel not used (%s); decode attention runs through SDPA", reason)
