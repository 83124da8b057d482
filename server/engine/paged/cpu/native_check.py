"""Whether the built native attention kernels may serve a model: checked once, on the model's KV geometry and
dtype, against float64 attention written out in torch (decode plain, and with a sliding window and a logit
cap; prefill chunks over scattered blocks). A kernel that disagrees is refused (logged) and the engine keeps
SDPA for what it would have computed. (The exactness probe then checks the whole step against the model's
own attention, kernels included.)"""

from __future__ import annotations

import logging

import torch

from server.engine.paged.cpu.native_decode import DecodeReads, NativeDecode
from server.engine.paged.cpu.native_prefill import NativePrefill
from server.engine.paged.kv_memory import ContextReads, KVGeometry, PagedKV

log = logging.getLogger(__name__)

# Relative error allowed against float64 attention: a few roundings of the dtype (measured: float32 3e-7,
# bfloat16 3e-3, as SDPA's own 4e-3). A wrong column, head or scale is off by far more.
_NATIVE_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}
_BLOCK = 8
_TABLES = [[5, 2, 7, 0, 3], [1], [6, 4, 8]]  # decoding rows' blocks: scattered, one row within one block
_LENGTHS = [37, 6, 20]
# (window, softcap), 0 for none: plain, then both variants (a window shorter than every row, a cap that bends
# scores of about 0.3 * sqrt(head_dim)).
_VARIANTS = ((0, 0.0), (5, 1.0))
# A prefill chunk's context: blocks in 4 runs (a shared prefix's, then its own), and chunks from position 0 and
# from inside a block, over several runs.
_PREFILL_TABLE = [5, 6, 2, 7, 0]
_PREFILL_CHUNKS = ((0, 13), (21, 19))  # (start, tokens)


def accept(native: NativeDecode, geometry: KVGeometry) -> NativeDecode | None:
    """`native` if, on this geometry and dtype, it stores keys and values exactly and attends within
    tolerance of float64 attention (random data: decoding rows over scattered blocks, then prefill tokens),
    plain and with a sliding window and a logit cap."""
    if not native.covers(geometry.dtype, geometry.device):
        return None
    gen = torch.Generator(device=geometry.device).manual_seed(0)
    kv_heads, dim, layer = geometry.num_kv_heads, geometry.head_dim, geometry.num_layers - 1
    heads = kv_heads * 2 if kv_heads > 1 else 4  # a query head group, as in GQA

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=geometry.device).to(geometry.dtype)

    memory = PagedKV(geometry, num_blocks=10, block_tokens=_BLOCK, native=native)
    history = [rand(kv_heads, memory.num_tokens, dim) for _ in range(2)]
    for past, now in zip(history, memory.context(layer, _all_rows(memory))):
        now[0].copy_(past)
    # Each decoding row's newest position, then two prefill tokens; keys contiguous, values a strided view
    # (as a fused projection's slice): each keeps its own strides.
    rows = [memory.rows(t, [n - 1])[0] for t, n in zip(_TABLES, _LENGTHS)] + [79, 72]
    new_kv = [rand(5, kv_heads, dim), rand(5, kv_heads, 3 * dim)[:, :, dim:2 * dim]]
    for past, new in zip(history, new_kv):
        past[:, rows] = new.transpose(0, 1)
    width = max(len(t) for t in _TABLES)
    reads = DecodeReads(torch.tensor([t + [0] * (width - len(t)) for t in _TABLES]), torch.tensor(_LENGTHS),
                        _BLOCK.bit_length() - 1)
    for window, softcap in _VARIANTS:
        queries, out = rand(5, heads, dim), rand(5, heads, dim)
        memory.write_and_decode(layer, queries, *new_kv, torch.tensor(rows), reads, 0.3, out, window, softcap)
        stored = memory.context(layer, _all_rows(memory))
        if not all(torch.equal(now[0], past) for now, past in zip(stored, history)):
            return _refuse("it stored keys or values in the wrong place")
        for row, (table, length) in enumerate(zip(_TABLES, _LENGTHS)):
            first = max(0, length - window) if window else 0
            keys, values = (past[:, memory.rows(table, range(first, length))].double() for past in history)
            want = _reference(queries[row].double(), keys, values, 0.3, softcap)  # [H, d]
            error = float((out[row].double() - want).abs().max() / want.abs().max())
            if not error <= _NATIVE_TOLERANCE[geometry.dtype]:
                return _refuse(f"row {row} (window {window}, softcap {softcap:g}) differs from float64 attention "
                               f"by {error:.2e} (relative)")
    return native


def accept_prefill(native: NativePrefill, geometry: KVGeometry) -> NativePrefill | None:
    """`native` if, on this geometry and dtype, each prefill chunk's attention (its positions over the context
    up to each, read through scattered blocks) is within tolerance of float64 attention (random data)."""
    if not native.covers(geometry.dtype, geometry.device, geometry.head_dim):
        return None
    gen = torch.Generator(device=geometry.device).manual_seed(0)
    kv_heads, dim, layer = geometry.num_kv_heads, geometry.head_dim, geometry.num_layers - 1
    heads = kv_heads * 2 if kv_heads > 1 else 4  # a query head group, as in GQA
    memory = PagedKV(geometry, num_blocks=10, block_tokens=_BLOCK, native_prefill=native)
    for stored in memory.context(layer, _all_rows(memory)):
        stored[0].copy_(torch.randn(stored.shape[1:], generator=gen, device=geometry.device))
    for start, num_tokens in _PREFILL_CHUNKS:
        end = start + num_tokens
        queries = torch.randn(num_tokens, heads, dim, generator=gen, device=geometry.device).to(geometry.dtype)
        out = torch.full_like(queries, float("nan"))
        memory.prefill(layer, queries, ContextReads.of(memory, _PREFILL_TABLE, end), start, 0.3, out)
        keys, values = (stored[0][:, memory.rows(_PREFILL_TABLE, range(end))].double()
                        for stored in memory.context(layer, _all_rows(memory)))
        for t in range(num_tokens):
            seen = start + t + 1
            want = _reference(queries[t].double(), keys[:, :seen], values[:, :seen], 0.3, 0.0)
            error = float((out[t].double() - want).abs().max() / want.abs().max())
            if not error <= _NATIVE_TOLERANCE[geometry.dtype]:
                log.warning("engine: native prefill kernel not used (position %d of a chunk from %d differs from "
                            "float64 attention by %.2e, relative); prefill attention runs through SDPA", start + t,
                            start, error)
                return None
    return native


def _reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
               softcap: float) -> torch.Tensor:
    """Attention of one token's query `[H, d]` over keys/values `[KVH, W, d]` (its positions), in plain torch:
    `[H, d]`."""
    group = query.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)  # [H, W, d]
    scores = torch.einsum("hd,hwd->hw", query, keys) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    return torch.einsum("hw,hwd->hd", scores.softmax(-1), values)


def _all_rows(memory: PagedKV) -> ContextReads:
    return ContextReads(memory.num_tokens, [(0, memory.num_tokens)])


def _refuse(reason: str) -> None:
    log.warning("engine: native decode kernel not used (%s); decode attention runs through SDPA", reason)
