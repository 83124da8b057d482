"""Tiny configs of the causal families the engine accepts, each with the traits its real checkpoints have
that the engine must reproduce (partial rotary, parallel residual, ALiBi, sliding windows, soft-capping,
tied and untied heads, GQA and MQA, q/k norms, multipliers, layers without RoPE, experts).

`family_config(name, tokenizer, **size)` builds one from its transformers config class (no download);
`random_config(rng, tokenizer)` draws a small random one of these families for the fuzz-style check.
"""

from __future__ import annotations

import random
from typing import Any

# Sliding windows shorter than the test requests' contexts (4 to 33 tokens of prefill, 12 to 43 in all), so
# they bite in prefill and in decode.
WINDOW = 8
# A logit cap that bends this tiny model's attention scores (of a few units) visibly; Gemma 2's own is 50,
# which at this size would change logits by little more than the parity tolerance.
SOFTCAP = 5.0


def _rope(fraction: float = 1.0) -> dict:
    return {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": fraction}


# name -> (config class, its own keyword arguments); sizes come from `_sizes`.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", {}),  # learned positions, tied head
    "gptj": ("GPTJConfig", {"rotary_dim": 4}),  # partial rotary (interleaved), parallel residual
    "gpt_neox": ("GPTNeoXConfig", {"rope_parameters": _rope(0.25), "use_parallel_residual": True,
                                   "tie_word_embeddings": False}),  # partial rotary, fused qkv
    "opt": ("OPTConfig", {}),  # learned positions offset by 2
    "bloom": ("BloomConfig", {}),  # ALiBi
    "falcon": ("FalconConfig", {"multi_query": True, "parallel_attn": True, "new_decoder_architecture": False,
                                "alibi": False}),  # MQA, parallel attention, rotary
    "falcon_alibi": ("FalconConfig", {"alibi": True, "multi_query": False, "parallel_attn": False}),
    "llama": ("LlamaConfig", {"num_key_value_heads": 2}),  # GQA
    "mistral": ("MistralConfig", {"num_key_value_heads": 1, "sliding_window": WINDOW}),  # MQA, window
    "mixtral": ("MixtralConfig", {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
                                  "sliding_window": None}),  # experts
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen2_window": ("Qwen2Config", {"num_key_value_heads": 2, "use_sliding_window": True,
                                     "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 32}),  # q/k norms, head_dim != D/H
    "gemma": ("GemmaConfig", {"num_key_value_heads": 1, "head_dim": 16}),  # scaled embeddings, MQA
    "gemma2": ("Gemma2Config", {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": WINDOW,
                                "attn_logit_softcapping": SOFTCAP, "final_logit_softcapping": 30.0,
                                "query_pre_attn_scalar": 24}),  # soft-capping, alternating windows
    "phi": ("PhiConfig", {"rope_parameters": _rope(0.5), "tie_word_embeddings": False}),  # partial rotary
    "phi3": ("Phi3Config", {"num_key_value_heads": 2}),  # fused qkv, GQA
    "stablelm": ("StableLmConfig", {"rope_parameters": _rope(0.25), "num_key_value_heads": 2,
                                    "use_qkv_bias": True}),
    "olmo": ("OlmoConfig", {"clip_qkv": 0.5}),  # clipped q/k/v
    "granite": ("GraniteConfig", {"num_key_value_heads": 2, "embedding_multiplier": 2.0, "logits_scaling": 1.5,
                                  "residual_multiplier": 0.5, "attention_multiplier": 0.2}),
    "cohere": ("CohereConfig", {"num_key_value_heads": 2, "use_qk_norm": False, "logit_scale": 0.5}),
    "smollm3": ("SmolLM3Config", {"num_key_value_heads": 2, "no_rope_layer_interval": 2}),  # a layer without RoPE
}


def _sizes(class_name: str, hidden: int, layers: int, heads: int, max_positions: int) -> dict[str, Any]:
    if class_name == "GPT2Config":
        return {"n_embd": hidden, "n_layer": layers, "n_head": heads, "n_positions": max_positions}
    if class_name == "GPTJConfig":
        return {"n_embd": hidden, "n_layer": layers, "n_head": heads, "n_positions": max_positions}
    if class_name == "BloomConfig":
        return {"hidden_size": hidden, "n_layer": layers, "n_head": heads}
    sizes = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
             "max_position_embeddings": max_positions}
    if class_name == "OPTConfig":
        return sizes | {"ffn_dim": 2 * hidden, "word_embed_proj_dim": hidden}
    if class_name != "FalconConfig":
        sizes["intermediate_size"] = 2 * hidden
    return sizes


def family_config(name: str, tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                  max_positions: int = 512, init_std: float = 0.2, **overrides: Any):
    """The tiny config of family `name`, with `overrides` on top of its traits."""
    import transformers as tf

    class_name, traits = FAMILIES[name]
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = getattr(tf, class_name)(**_sizes(class_name, hidden, layers, heads, max_positions), **ids,
                                     **(traits | overrides))
    # Random init at the usual 0.02 gives near-uniform logits, where a greedy argmax hangs on 1e-7 ties.
    for key in ("initializer_range", "init_std"):
        if hasattr(config, key):
            setattr(config, key, init_std)
    return config


# Families whose head counts, kv heads, head size and rotary fraction the fuzz-style check varies freely.
_FUZZ = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "stablelm", "gpt_neox", "phi3", "granite",
         "cohere", "olmo", "falcon", "gptj", "gpt2", "smollm3", "qwen2_window", "gemma2")


def random_config(rng: random.Random, tokenizer) -> tuple[str, Any]:
    """A small random config of one of the families: layers, heads, kv heads, head size, rotary fraction."""
    name = rng.choice(_FUZZ)
    head_dim = rng.choice([8, 16, 32])
    heads = rng.choice([1, 2, 4, 6])
    kv_heads = rng.choice([h for h in (1, 2, 3, 6) if heads % h == 0] or [1])
    hidden = head_dim * heads
    overrides: dict[str, Any] = {}
    class_name, traits = FAMILIES[name]
    if "num_key_value_heads" in traits or name in ("llama", "qwen3", "gemma", "phi3", "granite", "cohere",
                                                   "olmo", "smollm3"):
        overrides["num_key_value_heads"] = kv_heads
    if name in ("qwen3", "gemma", "mistral", "gemma2"):
        overrides["head_dim"] = rng.choice([8, 16, 32])
    if name in ("phi", "stablelm", "gpt_neox"):
        overrides["rope_parameters"] = _rope(rng.choice([0.25, 0.5, 1.0]))
    if name == "gptj":
        overrides["rotary_dim"] = rng.choice([2, 4, head_dim])
    if name == "falcon":
        overrides["multi_query"] = rng.random() < 0.5
    config = family_config(name, tokenizer, hidden=hidden, layers=rng.randint(1, 3), heads=heads, **overrides)
    return name, config
