"""Whether a built native decode kernel may serve a model: checked once, on the model's KV geometry and
dtype, against float64 SDPA. A kernel that disagrees is refused (logged) and the engine keeps SDPA."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from server.engine.kv_pool import KVGeometry, KVPool, PrefixKV
from server.engine.native_decode import NativeDecode

log = logging.getLogger(__name__)


# Relative error allowed against float64 attention: a few roundings of the dtype (measured: float32 3e-7,
# bfloat16 3e-3, as SDPA's own 4e-3). A wrong column, head or scale is off by far more.
_NATIVE_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def accept(native: NativeDecode, geometry: KVGeometry) -> NativeDecode | None:
    """`native` if, on this geometry and dtype, it stores keys and values exactly and attends within
    tolerance of float64 SDPA (random data: decoding rows in scattered slots, one reading a shared prefix,
    then prefill tokens)."""
    if not native.covers(geometry.dtype, geometry.device):
        return None
    gen = torch.Generator(device=geometry.device).manual_seed(0)
    kv_heads, dim, layer = geometry.num_kv_heads, geometry.head_dim, geometry.num_layers - 1
    heads = kv_heads * 2 if kv_heads > 1 else 4  # a query head group, as in GQA

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=geometry.device).to(geometry.dtype)

    pool = KVPool(geometry, num_slots=4, slot_tokens=40, native=native)
    history = [rand(4, kv_heads, 40, dim) for _ in range(2)]
    for past, now in zip(history, pool.view(layer, 0, 4, 40)):
        now.copy_(past)
    prefix = PrefixKV(rand(geometry.num_layers, kv_heads, 6, dim), rand(geometry.num_layers, kv_heads, 6, dim))
    slots, positions = torch.tensor([2, 0, 3, 1, 1]), torch.tensor([30, 7, 39, 0, 1])
    # Keys contiguous, values a strided view (as a fused projection's slice): each keeps its own strides.
    new_kv = [rand(5, kv_heads, dim), rand(5, kv_heads, 3 * dim)[:, :, dim:2 * dim]]
    queries, out = rand(5, heads, dim), rand(5, heads, dim)
    pool.write_and_decode(layer, queries, *new_kv, slots, positions, pool.shared_prefixes([prefix, None, None]),
                          0.3, out)
    for t in range(5):
        for past, new in zip(history, new_kv):
            past[slots[t], :, positions[t]] = new[t]
    if not all(torch.equal(now, past) for now, past in zip(pool.view(layer, 0, 4, 40), history)):
        return _refuse("it stored keys or values in the wrong place")
    for row in range(3):
        keys, values = (past[slots[row], :, :int(positions[row]) + 1].clone() for past in history)
        if row == 0:  # its first columns come from the shared prefix
            keys[:, :6], values[:, :6] = prefix.keys[layer], prefix.values[layer]
        want = F.scaled_dot_product_attention(queries[row, :, None].double(), keys.double(), values.double(),
                                              scale=0.3, enable_gqa=True)[:, 0]  # [H, d]
        error = float((out[row].double() - want).abs().max() / want.abs().max())
        if not error <= _NATIVE_TOLERANCE[geometry.dtype]:
            return _refuse(f"row {row} differs from SDPA by {error:.2e} (relative)")
    return native


def _refuse(reason: str) -> None:
    log.warning("engine: native decode kernel not used (%s); decode attention runs through SDPA", reason)
