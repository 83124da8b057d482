"""The embedded demo model: a tiny model and tokenizer built locally from a fixed seed (no download).

The same builders make the tiny models the tests use, so tests load models through the code path a
user's model folder takes (`save_pretrained` then `from_pretrained`).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

DEMO_FAMILY = "llama"
DEMO_SEED = 0
DEMO_VERSION = "1"  # bump when the recipe changes, so cached copies are rebuilt
# Encoder-decoder families sharing BART's config names (d_model, encoder_layers, ...): tests build them.
BART_LIKE_FAMILIES = ("bart", "mbart", "plbart", "pegasus", "marian", "blenderbot", "blenderbot-small",
                      "m2m_100")

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

# A minimal chat template so that /v1/chat/completions has something to render on the demo model.
DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def demo_corpus() -> str:
    """The text shipped in the package that the demo tokenizer is trained on."""
    return resources.files("server").joinpath("data/demo_corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(text: str, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `text`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    bos_id = tok.token_to_id(SPECIAL_TOKENS["bos_token"])
    # Prepend BOS like Llama tokenizers do, so "special tokens included" is exercised.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS['bos_token']} $A", special_tokens=[(SPECIAL_TOKENS["bos_token"], bos_id)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.chat_template = DEMO_CHAT_TEMPLATE
    return fast


def model_config(family: str, tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                 max_positions: int = 512):
    """A transformers config of the given family sized for tests and the demo."""
    import transformers as tf

    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "llama":
        return tf.LlamaConfig(hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                              num_hidden_layers=num_layers, num_attention_heads=num_heads,
                              num_key_value_heads=max(1, num_heads // 2),
                              max_position_embeddings=max_positions, **ids)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                             n_positions=max_positions, **ids)
    if family == "opt":
        return tf.OPTConfig(hidden_size=hidden_size, ffn_dim=hidden_size * 2, num_hidden_layers=num_layers,
                            num_attention_heads=num_heads, max_position_embeddings=max_positions,
                            word_embed_proj_dim=hidden_size, **ids)
    if family == "bloom":
        return tf.BloomConfig(hidden_size=hidden_size, n_layer=num_layers, n_head=num_heads, **ids)
    if family == "t5":
        return tf.T5Config(d_model=hidden_size, d_kv=hidden_size // num_heads, d_ff=hidden_size * 2,
                           num_layers=num_layers, num_heads=num_heads, decoder_start_token_id=tokenizer.pad_token_id,
                           **ids)
    if family in BART_LIKE_FAMILIES:  # one set of hyper-parameter names across the BART family
        return tf.AutoConfig.for_model(
            family, d_model=hidden_size, encoder_layers=num_layers, decoder_layers=num_layers,
            encoder_attention_heads=num_heads, decoder_attention_heads=num_heads, encoder_ffn_dim=hidden_size * 2,
            decoder_ffn_dim=hidden_size * 2, max_position_embeddings=max_positions,
            decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id, **ids)
    raise ValueError(f"unknown model family {family!r}")


def build_model_folder(path: str | os.PathLike, *, family: str = DEMO_FAMILY, seed: int = DEMO_SEED,
                       vocab_size: int = 512, **size) -> Path:
    """Build a randomly initialised model of `family` plus tokenizer, saved with `save_pretrained`."""
    import torch
    import transformers as tf

    path = Path(path)
    tokenizer = train_tokenizer(demo_corpus(), vocab_size=vocab_size)
    config = model_config(family, tokenizer, **size)
    torch.manual_seed(seed)
    auto = tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder else tf.AutoModelForCausalLM
    model = auto.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ensure_demo_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo model's folder, built once into the user's cache dir (atomic rename, safe to race)."""
    from server.cached_folder import build_once, default_cache_dir

    final = Path(cache_dir or default_cache_dir()) / f"demo-{DEMO_FAMILY}-v{DEMO_VERSION}"
    return build_once(final, lambda tmp: build_model_folder(tmp, hidden_size=128, num_layers=2, num_heads=4))
