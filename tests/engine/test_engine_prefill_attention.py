"""A prefill chunk's attention in pieces (unmasked over each run of the cached prefix, causal over its own keys,
merged by log-sum-exp) against one SDPA call with the explicit offset-causal mask, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine.paged import prefill_attention

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _masked(query, keys, values, start, scale):
    num_tokens = query.shape[2]
    mask = torch.ones(num_tokens, start + num_tokens, dtype=torch.bool).tril(start)
    return F.scaled_dot_product_attention(query.double(), keys.double(), values.double(), attn_mask=mask,
                                          scale=scale, enable_gqa=query.shape[1] != keys.shape[1]), mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (6, 2, 8), (3, 1, 32)])
@pytest.mark.parametrize("runs,num_tokens", [([1], 1), ([5], 7), ([16, 48], 3), ([4, 32, 1], 50), ([8] * 5, 9)])
def test_split_equals_one_masked_call(dtype, heads, kv_heads, head_dim, runs, num_tokens):
    start = sum(runs)
    gen = torch.Generator().manual_seed(start * 100 + num_tokens)
    query = torch.randn(1, heads, num_tokens, head_dim, generator=gen).to(dtype)
    keys = torch.randn(1, kv_heads, start + num_tokens, head_dim, generator=gen).to(dtype)
    values = torch.randn(1, kv_heads, start + num_tokens, head_dim, generator=gen).to(dtype)
    want, mask = _masked(query, keys, values, start, 0.3)
    cuts = [sum(runs[:i]) for i in range(len(runs) + 1)]
    pieces = [(keys[:, :, a:b], values[:, :, a:b]) for a, b in zip(cuts, cuts[1:])]
    got = prefill_attention.split(query, [k for k, _ in pieces], [v for _, v in pieces],
                                  keys[:, :, start:], values[:, :, start:], 0.3)
    assert got.dtype == dtype and got.shape == want.shape
    error = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert error <= TOLERANCE[dtype], error


@pytest.mark.parametrize("start,num_tokens,one_run,expected", [
    (0, 4096, False, False),  # nothing cached: plain causal
    (16, 40, False, False),  # a shared block and a short chunk: copying 16 positions is nothing
    (300, 40, True, False),  # short, one run: one masked call
    (300, 40, False, True),  # several runs: read in place rather than copied together
    (7000, 2048, True, True),  # long: the split is faster
])
def test_which_chunks_split(start, num_tokens, one_run, expected):
    query = torch.zeros(1, 2, num_tokens, 8)
    assert prefill_attention.splits(query, start, one_run) == expected
    assert not prefill_attention.splits(query.half(), start, one_run)  # no log-sum-exp for float16 on CPU
