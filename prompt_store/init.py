"""PEFT's three prompt-tuning initialisations (PromptTuningInit), computed as PEFT computes them.

With a seed, RANDOM and SAMPLE_VOCAB draw from a private generator in the same order PEFT draws from
the global one, so `torch.manual_seed(s)` + PEFT's PromptEmbedding equals `seed=s` here; the global
RNG is never touched.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import torch


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


def _weight(word_embeddings: Any) -> torch.Tensor:
    """The [vocab, D] table of an embedding module (e.g. `model.get_input_embeddings()`) or a tensor."""
    weight = word_embeddings if isinstance(word_embeddings, torch.Tensor) else word_embeddings.weight
    if weight.dim() != 2:
        raise ValueError(f"word embeddings must be [vocab_size, token_dim], got shape {tuple(weight.shape)}")
    return weight


def _rows(word_embeddings: Any, ids: torch.Tensor) -> torch.Tensor:
    """Look the ids up as PEFT does: through the module's forward (which may scale, e.g. Gemma), or a tensor."""
    weight = _weight(word_embeddings)
    ids = ids.to(weight.device)
    with torch.no_grad():
        rows = weight[ids] if isinstance(word_embeddings, torch.Tensor) else word_embeddings(ids)
    return rows.detach().to("cpu", torch.float32).clone()  # [n, D]


def random_init(num_virtual_tokens: int, token_dim: int, seed: int | None = None) -> torch.Tensor:
    """RANDOM: a fresh nn.Embedding's weight, i.e. N(0, 1) of shape [n, D], float32."""
    return torch.empty(num_virtual_tokens, token_dim).normal_(generator=_generator(seed))


def sample_vocab_init(num_virtual_tokens: int, word_embeddings: Any, seed: int | None = None) -> torch.Tensor:
    """SAMPLE_VOCAB: rows of the word embeddings at uniformly drawn vocabulary ids, float32."""
    weight = _weight(word_embeddings)
    generator = _generator(seed)
    # PEFT builds the nn.Embedding (a normal_ draw) before sampling ids: draw and discard the same amount.
    torch.empty(num_virtual_tokens, weight.shape[1]).normal_(generator=generator)
    ids = torch.randint(0, weight.shape[0], (num_virtual_tokens,), dtype=torch.long, generator=generator)
    return _rows(word_embeddings, ids)


def text_token_ids(text: str, num_virtual_tokens: int, tokenizer: Any) -> list[int]:
    """TEXT's ids: the tokenizer's ids (special tokens included), truncated, or tiled then truncated."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError("the init text gives no tokens")
    if len(ids) < num_virtual_tokens:
        ids = ids * math.ceil(num_virtual_tokens / len(ids))
    return ids[:num_virtual_tokens]


def text_init(text: str, num_virtual_tokens: int, tokenizer: Any, word_embeddings: Any) -> torch.Tensor:
    """TEXT: the word-embedding rows of the init text's ids, float32 [n, D]."""
    ids = torch.tensor(text_token_ids(text, num_virtual_tokens, tokenizer), dtype=torch.long)
    return _rows(word_embeddings, ids)
