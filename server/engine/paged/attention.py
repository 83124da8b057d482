"""Attention glue: plugs the engine's paged KV memory into stock transformers models, with no copied
model code.

The model is switched to the attention implementation registered here (`AttentionInterface.register`).
The runner calls it on a packed step, `[1, N]` tokens of several requests, without a transformers cache
and with `promptserve_paged=True` as an extra forward keyword, which transformers hands down to every
attention call. There the work is one opaque custom op per layer: it writes the step's new keys and
values into their KV rows, then attends: all decoding rows at once, each over its own blocks read in place
(the native kernel) or gathered (SDPA elsewhere), and each prefill chunk over its context (read in place by
the native prefill kernel; for SDPA, a view when its blocks are one run, else gathered). The op reads the
step's StepPlan from the engine thread's `active_plan`, so a compiled model sees only `(q, k, v, layer)`:
one graph serves every batch and chunk layout. Called without the keyword, the function is plain SDPA (causal
over the call's own keys; the glue builds no masks): the model works as loaded, e.g. for right-padded
training.

Layers with a sliding window or attention logit soft-capping (their `sliding_window` and `softcap` keywords)
pass them to the op; the decode kernel computes both, and attention_variants.py the prefill chunks and SDPA
decode of those layers only.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx.node import has_side_effect
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from server.engine.paged import attention_variants, prefill_attention
from server.engine.paged.cpu.native_decode import DecodeReads
from server.engine.paged.kv_memory import ContextReads, PagedKV

IMPLEMENTATION = "promptserve_paged"
PAGED_KWARG = "promptserve_paged"
# Attention variants this glue does not compute: a model passing any of them stays on the legacy path.
_UNSUPPORTED_KWARGS = ("s_aux", "sinks", "position_bias")
_active = threading.local()  # the plan of the step running on this thread


@dataclass
class DecodeGroup:
    """Every row that feeds one token this step (the step's first tokens)."""

    reads: DecodeReads  # block tables and lengths (the native kernel reads them in place)
    gather_rows: torch.Tensor | None = None  # [Bd, W] KV rows for SDPA without the kernel (padded)
    mask: torch.Tensor | None = None  # [Bd, 1, 1, W] bool: True where a row may attend


@dataclass
class PrefillChunk:
    """One request's run of consecutive context positions [start, start + num_tokens)."""

    token_start: int  # where its tokens sit in the packed step
    num_tokens: int
    start: int  # context position of its first token
    context: ContextReads  # its positions 0..start + num_tokens - 1
    mask: torch.Tensor | None  # [T, start + T] bool; None: start == 0 (plain causal), or the native kernel's


@dataclass
class StepPlan:
    """Where a packed step's tokens go in KV memory, and who attends to what."""

    memory: PagedKV
    write_rows: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    decode: DecodeGroup | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)


class GeometryProbe:
    """Passed as the keyword's value: records each layer's key shape, so that the pool fits any family, and
    its variants, checked against the config (attention_variants.config_mismatch)."""

    def __init__(self) -> None:
        self.key_shapes: dict[int, tuple[int, int]] = {}  # layer -> (kv_heads, head_dim)
        self.variants: dict[int, tuple[int, float]] = {}  # layer -> (window, softcap), 0 for none
        self.dtype: torch.dtype | None = None

    def record(self, layer: int | None, key: torch.Tensor, window: int, softcap: float) -> None:
        """Called by the attention function of every layer."""
        if layer is None:
            raise NotImplementedError("an attention module without layer_idx")
        self.key_shapes[int(layer)] = (int(key.shape[1]), int(key.shape[3]))
        self.variants[int(layer)] = (window, softcap)
        self.dtype = key.dtype


def install(model) -> None:
    """Register the implementation (idempotent) and switch `model` to it."""
    AttentionInterface.register(IMPLEMENTATION, paged_attention)
    # The model's own mask is never used: the plan carries each row's, so building it is skipped.
    AttentionMaskInterface.register(IMPLEMENTATION, lambda *args, **kwargs: None)
    if model.config._attn_implementation != IMPLEMENTATION:
        model._promptserve_stock_attention = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)


@contextmanager
def stock_attention(model):
    """Run `model` with the attention it was loaded with (sdpa, eager, ...) for a while, glue or not."""
    current = model.config._attn_implementation
    if current != IMPLEMENTATION:
        yield
        return
    model.set_attn_implementation(model._promptserve_stock_attention)
    try:
        yield
    finally:
        model.set_attn_implementation(current)


@contextmanager
def active_plan(plan: StepPlan):
    """Make `plan` the one the op reads during a forward on this thread."""
    _active.plan = plan
    try:
        yield
    finally:
        _active.plan = None


def paged_attention(module, query, key, value, attention_mask, **kwargs):
    """query `[1, H, N, d]`, key/value `[1, KVH, N, d]` -> output `[1, N, H, d]`, no weights."""
    marker = kwargs.pop(PAGED_KWARG, None)
    window, softcap = int(kwargs.get("sliding_window") or 0), float(kwargs.get("softcap") or 0.0)
    if isinstance(marker, GeometryProbe):
        marker.record(module.layer_idx, key, window, softcap)
        marker = None
    scale = kwargs.get("scaling")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if not marker and (window or softcap):  # SDPA alone knows neither (the glue builds no masks)
        return attention_variants.unpaged(query, key, value, scale, window, softcap), None
    if not marker:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"paged attention does not support {name}")
    return torch.ops.promptserve.paged_attention(query, key, value, module.layer_idx, scale, window,
                                                 softcap)[None], None


@torch.library.custom_op("promptserve::paged_attention", mutates_args=())
def _paged_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int,
                        scale: float, window: int, softcap: float) -> torch.Tensor:
    """One layer of a packed step: store its keys and values, then attend; `[N, H, d]`. `window`, `softcap`:
    the layer's sliding window and logit cap (0: none)."""
    plan: StepPlan = _active.plan
    memory = plan.memory
    new_keys, new_values = _rows(key[0]), _rows(value[0])  # [N, KVH, d]
    options = {"scale": scale, "enable_gqa": query.shape[1] != key.shape[1]}
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [N, H, d]
    q = query[0]  # [H, N, d]
    by_token = _rows(q) if memory.has_native_decode or memory.has_native_prefill else None  # [N, H, d]
    if memory.has_native_decode:  # decoding rows are the step's first tokens (step_plan.order)
        memory.write_and_decode(layer, by_token, new_keys, new_values, plan.write_rows, plan.decode.reads, scale, out,
                                window, softcap)
    else:
        memory.write(layer, plan.write_rows, new_keys, new_values)
        if plan.decode.reads.num_decode and (window or softcap):
            out[:plan.decode.reads.num_decode] = _decode_variant(plan, layer, q, scale, window, softcap)
        elif plan.decode.reads.num_decode:
            out[:plan.decode.reads.num_decode] = _decode(plan, layer, q, options)
    for chunk in plan.prefills:
        rows = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
        if window or softcap:
            keys, values = memory.context(layer, chunk.context)
            out[rows] = attention_variants.prefill(q[:, rows], keys, values, chunk.start, scale, window, softcap)
            continue
        if memory.has_native_prefill:
            memory.prefill(layer, by_token[rows], chunk.context, chunk.start, scale, out[rows])
            continue
        queries = q[None, :, rows]  # [1, H, T, d]
        if prefill_attention.splits(queries, chunk.start, chunk.context.is_one_run):
            prefix_keys, prefix_values = memory.pieces(layer, chunk.context, chunk.start)
            attended = prefill_attention.split(queries, prefix_keys, prefix_values,
                                               new_keys[rows].transpose(0, 1)[None],
                                               new_values[rows].transpose(0, 1)[None], scale)
        else:
            keys, values = memory.context(layer, chunk.context)
            attended = prefill_attention.masked(queries, keys, values, chunk.mask, scale)
        out[rows] = attended[0].transpose(0, 1)  # [T, H, d]
    return out


@_paged_attention_op.register_fake
def _(query, key, value, layer, scale, window, softcap):
    return query.new_empty(query.shape[2], query.shape[1], query.shape[3])


# It writes KV memory, which no graph sees: without this, a compiled step whose output does not need an
# attention output (no row sampled) would drop the call, and the step's keys and values with it.
has_side_effect(torch.ops.promptserve.paged_attention.default)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`[heads, N, d]` -> `[N, heads, d]` (a view) with a contiguous last dim, as the writers need."""
    t = t.transpose(0, 1)
    return t if t.stride(-1) == 1 else t.contiguous()


def _decode(plan: StepPlan, layer: int, q: torch.Tensor, options: dict) -> torch.Tensor:
    """Attention of every decoding row over its gathered blocks: `[Bd, H, d]`."""
    group = plan.decode
    queries = q[:, :group.reads.num_decode].transpose(0, 1)  # [Bd, H, d]
    keys, values = plan.memory.gather(layer, group.gather_rows)  # [Bd, KVH, W, d]
    attended = F.scaled_dot_product_attention(queries[:, :, None], keys, values, attn_mask=group.mask, **options)
    return attended[:, :, 0]


def _decode_variant(plan: StepPlan, layer: int, q: torch.Tensor, scale: float, window: int,
                    softcap: float) -> torch.Tensor:
    """`_decode` for a layer with a window or a logit cap: `[Bd, H, d]`."""
    group = plan.decode
    keys, values = plan.memory.gather(layer, group.gather_rows)  # [Bd, KVH, W, d]
    queries = q[:, :group.reads.num_decode].transpose(0, 1)  # [Bd, H, d]
    return attention_variants.decode(queries, keys, values, group.reads.lengths, scale, window, softcap)
