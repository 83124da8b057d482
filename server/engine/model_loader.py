"""Load the one frozen model (causal LM, or T5/BART-family encoder-decoder) and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prompt_store.soft_prompt import CAUSAL_LM, SEQ_2_SEQ_LM
from server.engine.hf_cache import seq2seq_families

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64, "fp64": torch.float64}  # float64: exactness checks in tests


@dataclass
class LoadedModel:
    """The frozen model with what the engine needs to know about it."""

    model: Any  # a transformers PreTrainedModel (causal LM or seq2seq LM), eval mode, no grads
    tokenizer: Any  # a transformers tokenizer
    device: torch.device
    dtype: torch.dtype
    hidden_size: int
    vocab_size: int
    # Causal: the context's position table. Seq2seq: each side's (encoder input, decoder output) table.
    max_positions: int | None  # None: no position limit (ALiBi, T5's relative buckets)
    eos_token_ids: frozenset[int]
    name: str = ""
    is_encoder_decoder: bool = False  # True: the prompt goes to the encoder (PEFT SEQ_2_SEQ_LM)

    @property
    def task_type(self) -> str:
        """The PEFT task type of the adapters this model serves."""
        return SEQ_2_SEQ_LM if self.is_encoder_decoder else CAUSAL_LM


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` is CUDA when present, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None: float32 on CPU, bfloat16 on CUDA; strings like 'bf16' are accepted."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(name_or_path: str, device: str | torch.device = "auto",
               dtype: str | torch.dtype | None = None) -> LoadedModel:
    """Load once, frozen: `eval()`, `requires_grad_(False)`, on the chosen device and dtype."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    config = AutoConfig.from_pretrained(name_or_path)
    if config.is_encoder_decoder:
        seq2seq_families.check_supported(config.model_type)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(name_or_path, dtype=dt)
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return describe(model, tokenizer, name=str(name_or_path))


def describe(model: Any, tokenizer: Any, name: str = "") -> LoadedModel:
    """Wrap an already loaded model (tests, benchmarks) as a LoadedModel."""
    config = model.config.get_text_config(decoder=True)
    emb = model.get_input_embeddings()
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if is_seq2seq:
        seq2seq_families.check_supported(model.config.model_type)
    return LoadedModel(
        model=model, tokenizer=tokenizer, device=emb.weight.device, dtype=emb.weight.dtype,
        hidden_size=int(emb.weight.shape[1]), vocab_size=int(emb.weight.shape[0]),
        max_positions=seq2seq_families.position_limit(model.config) if is_seq2seq else _max_positions(config),
        eos_token_ids=_eos_ids(model, tokenizer), name=name, is_encoder_decoder=is_seq2seq,
    )


def _max_positions(config: Any) -> int | None:
    # ALiBi models (BLOOM) have no learned or rotary table, hence no hard limit.
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), model.config.get_text_config(decoder=True).eos_token_id,
                   tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return frozenset(ids)
