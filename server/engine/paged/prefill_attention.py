"""Attention of one prefill chunk over its context through SDPA: one masked call, or in pieces merged exactly.
(On a CPU with AVX-512, float32 chunks take the native kernel instead: cpu/native_prefill.py.)

A chunk of T positions starting at context position `start` attends to every cached position before it and
causally to its own. One SDPA call over the whole context with a `[T, start + T]` mask does that, but it
needs the context as one tensor (a copy when the request's blocks are not one run, e.g. a shared prefix
block followed by its own) and a masked call pays for the mask and cannot skip the causal half: measured on
the 8x512 model (2-core Xeon, float32), a 2,048-token chunk at offset 7,000 took 0.20 s a layer that way.

Split, each run of cached blocks is read in place with no mask (every query sees all of it), and the chunk's
own keys (this step's, not read back) are plain causal; each part returns its log-sum-exp, and the parts are
merged by their softmax weights: 0.133 s. Short chunks over short contexts stay on the single masked call,
which is as fast there as several calls and a merge.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

# Below this many query x prefix positions, one masked call is about as fast as the split (several calls and
# a merge); measured in float32 and bfloat16: 1,000 x 512 was a draw, 7,000 x 2,048 a third faster split.
MIN_SPLIT_PAIRS = 2 * 1024 * 1024
# A prefix of several runs is split from this many positions on: below it, copying it together is cheap.
MIN_SPLIT_COPY = 256
# A prefix of more runs than this is copied together: a 9,000-token prompt admitted after churn had dozens,
# and its merges took a third of its attention time (P4, py-spy).
MAX_PIECES = 2


def splits(query: torch.Tensor, start: int, is_one_run: bool) -> bool:
    """Whether a chunk of `query` `[1, H, T, d]` from context position `start` attends in pieces."""
    if start == 0 or query.device.type != "cpu" or query.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        return False  # the pieces need CPU flash attention's log-sum-exp
    return start * query.shape[2] >= MIN_SPLIT_PAIRS or (not is_one_run and start >= MIN_SPLIT_COPY)


def masked(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """One call: query `[1, H, T, d]` over the whole context `[1, KVH, start + T, d]`, `mask` `[T, start + T]`
    (None: plain causal, the chunk starts the context)."""
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=mask is None,
                                          scale=scale, enable_gqa=query.shape[1] != keys.shape[1])


def split(query: torch.Tensor, prefix_keys: list[torch.Tensor], prefix_values: list[torch.Tensor],
          own_keys: torch.Tensor, own_values: torch.Tensor, scale: float) -> torch.Tensor:
    """query `[1, H, T, d]` over the cached prefix (pieces `[1, KVH, n_i, d]`, in order) and causally over its
    own keys `[1, KVH, T, d]` -> `[1, H, T, d]`."""
    group = query.shape[1] // own_keys.shape[1]
    if group != 1:  # causal over T x T: repeating T keys per query head is cheap
        own_keys, own_values = own_keys.repeat_interleave(group, 1), own_values.repeat_interleave(group, 1)
    out, lse = _flash(query, own_keys, own_values, True, scale)
    out = out.to(lse.dtype)
    if len(prefix_keys) > MAX_PIECES:  # many short runs: one copy costs less than a call and a merge each
        prefix_keys, prefix_values = [torch.cat(prefix_keys, 2)], [torch.cat(prefix_values, 2)]
    for keys, values in zip(prefix_keys, prefix_values):
        part, part_lse = _unmasked(query, keys, values, group, scale)
        total = torch.logaddexp(lse, part_lse)  # [1, H, T]
        out = out * (lse - total).exp()[..., None] + part.to(lse.dtype) * (part_lse - total).exp()[..., None]
        lse = total
    return out.to(query.dtype)


@contextmanager
def split_from(num_pairs: int, num_copy: int):
    """Split chunks of at least `num_pairs` query x prefix positions, or a prefix of several runs from
    `num_copy` positions, for a while (the start-up probe: its short chunks take both forms)."""
    global MIN_SPLIT_PAIRS, MIN_SPLIT_COPY
    saved = MIN_SPLIT_PAIRS, MIN_SPLIT_COPY
    MIN_SPLIT_PAIRS, MIN_SPLIT_COPY = num_pairs, num_copy
    try:
        yield
    finally:
        MIN_SPLIT_PAIRS, MIN_SPLIT_COPY = saved


def _unmasked(query, keys, values, group: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over one run of the prefix. With grouped heads, each KV head's query heads are stacked as
    one longer query (no mask, so order does not matter): the run is read once, not once a head."""
    if group == 1:
        return _flash(query, keys, values, False, scale)
    _, num_heads, num_tokens, head_dim = query.shape
    stacked = query.reshape(1, keys.shape[1], group * num_tokens, head_dim)
    out, lse = _flash(stacked, keys, values, False, scale)
    return out.reshape(1, num_heads, num_tokens, head_dim), lse.reshape(1, num_heads, num_tokens)


def _flash(query, keys, values, is_causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output `[1, H, T, d]` and log-sum-exp `[1, H, T]` (at least float32: the merge is done in it) of CPU
    flash attention."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, keys, values, 0.0, is_causal,
                                                                         scale=scale)
    return out, lse.to(torch.promote_types(lse.dtype, torch.float32))
