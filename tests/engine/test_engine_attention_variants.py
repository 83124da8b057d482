"""The paged glue's sliding window and logit soft-capping (server/engine/paged/attention_variants.py) against
transformers' own: Gemma 2's `eager_attention_forward` (soft-capping) or transformers' SDPA (windows alone)
under the mask transformers' `sliding_window_causal_mask_function` builds, for a prefill chunk at an offset, decoding rows and a call outside a paged step. And the
start-up cross-check of each layer's keywords against the config: a model whose masks have a window its layers
do not pass on (Qwen2-MoE in transformers 5.23) keeps the legacy path, even where the window is longer than the
exactness probe's contexts."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    causal_mask_function,
    sliding_window_causal_mask_function,
)
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from server.demo import demo_corpus, train_tokenizer
from server.engine.faults import FaultInjector
from server.engine.paged import attention_variants
from server.engine.paged.open import open_runner
from tests.engine.model_families import family_config

HEADS, KV_HEADS, DIM, SCALE = 6, 2, 16, 0.3


def _stock(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, softcap: float) -> torch.Tensor:
    """What the models' stock attention computes, mask from transformers' own mask function: Gemma 2's eager
    attention with a cap (it has no other), transformers' SDPA without (Mistral, Qwen2); q `[1, H, S, d]`
    over all S positions -> `[1, S, H, d]`."""
    num = q.shape[2]
    rule = sliding_window_causal_mask_function(window) if window else causal_mask_function
    positions = torch.arange(num)
    allowed = rule(torch.tensor(0), torch.tensor(0), positions[:, None], positions[None, :])  # [S, S]
    module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, training=False, head_dim=DIM, is_causal=True)
    if not softcap:
        return sdpa_attention_forward(module, q, k, v, allowed[None, None], scaling=SCALE)[0]
    mask = torch.zeros(num, num, dtype=q.dtype).masked_fill(~allowed, torch.finfo(q.dtype).min)[None, None]
    return eager_attention_forward(module, q, k, v, mask, scaling=SCALE, softcap=softcap)[0]


def _qkv(num: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, h, num, DIM, generator=gen, dtype=dtype) * 2 for h in (HEADS, KV_HEADS, KV_HEADS)]


@pytest.mark.parametrize("window,softcap", [(4, 0.0), (1, 0.0), (0, 2.0), (4, 2.0), (40, 2.0)])
def test_prefill_decode_and_unpaged_match_transformers(window, softcap):
    num, start = 23, 9  # a chunk of positions 9..22 over its whole context
    q, k, v = _qkv(num)
    want = _stock(q, k, v, window, softcap)[0]  # [S, H, d]
    chunk = attention_variants.prefill(q[0, :, start:], k, v[:, :, :num], start, SCALE, window, softcap)
    torch.testing.assert_close(chunk, want[start:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attention_variants.unpaged(q, k, v, SCALE, window, softcap)[0], want,
                               rtol=1e-12, atol=1e-12)
    # Decoding rows at positions 5, 22 and 13: each over its keys 0..p, padded to the widest with garbage.
    lengths = torch.tensor([6, 23, 14])
    keys = torch.stack([k[0]] * 3)  # [3, KVH, S, d]
    for row, n in enumerate(lengths):
        keys[row, :, n:] = 1e3  # what a row must not read
    values = torch.stack([v[0]] * 3)
    rows = attention_variants.decode(q[0, :, lengths - 1].transpose(0, 1), keys, values, lengths, SCALE, window,
                                     softcap)
    torch.testing.assert_close(rows, want[lengths - 1], rtol=1e-12, atol=1e-12)


def test_plain_calls_keep_sdpa_and_variants_change_the_answer():
    q, k, v = _qkv(12)
    plain = _stock(q, k, v, 0, 0.0)
    for window, softcap in [(3, 0.0), (0, 1.0)]:
        got = attention_variants.unpaged(q, k, v, SCALE, window, softcap)
        assert (got - plain).abs().max() > 1e-2  # the reference above can tell a variant that was dropped


def test_expected_variants_follow_the_config():
    tokenizer = train_tokenizer(demo_corpus(), vocab_size=512)
    assert attention_variants.expected(family_config("mistral", tokenizer), 2) == [(8, 0.0), (8, 0.0)]
    assert attention_variants.expected(family_config("qwen2_window", tokenizer), 2) == [(0, 0.0), (8, 0.0)]
    assert attention_variants.expected(family_config("qwen2", tokenizer), 2) == [(0, 0.0), (0, 0.0)]
    assert attention_variants.expected(family_config("gemma2", tokenizer), 2) == [(8, 5.0), (0, 5.0)]


def test_a_window_the_layers_do_not_pass_on_keeps_the_legacy_path(caplog):
    """Qwen2-MoE windows its sliding layers' masks but passes no `sliding_window` keyword to the attention
    function. A window of 64 is longer than every probe context, so only the config cross-check sees it."""
    import transformers as tf

    tokenizer = train_tokenizer(demo_corpus(), vocab_size=512)
    config = tf.Qwen2MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1,
                               moe_intermediate_size=32, shared_expert_intermediate_size=32,
                               use_sliding_window=True, sliding_window=64, max_window_layers=2)
    assert config.layer_types[0] == "sliding_attention"
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with caplog.at_level(logging.WARNING):
        assert open_runner(model, FaultInjector()) is None
    assert "differ from the config's [(64, 0.0), (0, 0.0)]" in caplog.text
