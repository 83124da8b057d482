"""Checks done at submit time, before anything is queued: each failure is a typed error."""

from __future__ import annotations

import math
from typing import Any

from prompt_store.soft_prompt import CAUSAL_LM, SEQ_2_SEQ_LM
from server.engine.config import EngineConfig
from server.engine.errors import IncompatibleTask, InputTooLong, InvalidRequest
from server.engine.types import SamplingParams

# Smaller values overflow float32 logits (logits / t -> inf, NaN probabilities): refuse them, as TGI does.
MIN_TEMPERATURE = 1e-3
MIN_TOP_P = 1e-3
PENALTY_RANGE = (1e-3, 1e3)


def check_params(params: SamplingParams, config: EngineConfig) -> None:
    """Ranges of the sampling parameters; max_new_tokens against the configured limit."""
    if not isinstance(params.max_new_tokens, int) or params.max_new_tokens < 1:
        raise InvalidRequest("max_new_tokens must be an integer >= 1")
    if params.max_new_tokens > config.max_new_tokens:
        raise InputTooLong(f"max_new_tokens {params.max_new_tokens} exceeds the limit {config.max_new_tokens}")
    if not (math.isfinite(params.temperature) and params.temperature >= MIN_TEMPERATURE):
        raise InvalidRequest(f"temperature must be >= {MIN_TEMPERATURE} (use do_sample=false for greedy)")
    if not isinstance(params.top_k, int) or params.top_k < 0:
        raise InvalidRequest("top_k must be an integer >= 0 (0: off)")
    if not (MIN_TOP_P <= params.top_p <= 1.0):
        raise InvalidRequest(f"top_p must be in [{MIN_TOP_P}, 1]")
    low, high = PENALTY_RANGE
    if not (math.isfinite(params.repetition_penalty) and low <= params.repetition_penalty <= high):
        raise InvalidRequest(f"repetition_penalty must be in [{low}, {high}]")
    if params.seed is not None and (not isinstance(params.seed, int) or not 0 <= params.seed < 2**63):
        raise InvalidRequest("seed must be an integer in [0, 2**63)")
    if len(params.stop) > config.max_stop_sequences:
        raise InvalidRequest(f"at most {config.max_stop_sequences} stop sequences")
    if any(not isinstance(s, str) or not s or len(s) > config.max_stop_length for s in params.stop):
        raise InvalidRequest(f"stop sequences must be non-empty strings of at most {config.max_stop_length} chars")


def tokenize(inputs: str | list[int], tokenizer: Any, vocab_size: int) -> list[int]:
    """Text through the model's tokenizer (special tokens added, as PEFT's callers do); ids checked."""
    if isinstance(inputs, str):
        ids = list(tokenizer(inputs)["input_ids"])
    elif isinstance(inputs, (list, tuple)):
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in inputs):
            raise InvalidRequest(f"token ids must be integers in [0, {vocab_size})")
        ids = list(inputs)
    else:
        raise InvalidRequest("inputs must be a string or a list of token ids")
    if not ids:
        raise InvalidRequest("inputs are empty")
    return ids


def check_input_length(num_ids: int, config: EngineConfig) -> None:
    """Text tokens against max_input_tokens."""
    if num_ids > config.max_input_tokens:
        raise InputTooLong(f"{num_ids} input tokens exceed the limit {config.max_input_tokens}")


MODEL_KINDS = {CAUSAL_LM: "a causal LM", SEQ_2_SEQ_LM: "an encoder-decoder (seq2seq) LM"}


def check_prompt(prompt: Any, hidden_size: int, task_type: str = CAUSAL_LM) -> None:
    """The task's adapter must be a prompt of the served model's task type and width."""
    if prompt.task_type != task_type:
        raise IncompatibleTask(f"task {prompt.task_id!r} is {prompt.task_type}; this server runs "
                               f"{MODEL_KINDS[task_type]} ({task_type} adapters fit)")
    if prompt.token_dim != hidden_size:
        raise IncompatibleTask(f"task {prompt.task_id!r} has token_dim {prompt.token_dim}; "
                               f"the model's hidden size is {hidden_size}")


def check_context(num_virtual: int, num_ids: int, max_new: int, config: EngineConfig,
                  max_positions: int | None, is_encoder_decoder: bool = False, kv_tokens: int | None = None) -> None:
    """Virtual + input + new tokens against max_total_tokens and the model's position tables (causal: one
    context; encoder-decoder: the encoder's virtual + input tokens and the decoder's new tokens apart).
    The paged engine (`kv_tokens` given: its whole KV memory) also refuses a request that could never fit
    in it, even alone, and chunks prefills."""
    total = num_virtual + num_ids + max_new
    if is_encoder_decoder:
        limit = config.max_total_tokens
        if max_positions is not None and num_virtual + num_ids > max_positions:
            raise InputTooLong(f"{num_virtual} virtual + {num_ids} input tokens = {num_virtual + num_ids} "
                               f"exceed the encoder's {max_positions} positions")
        if max_positions is not None and max_new > max_positions:
            raise InputTooLong(f"max_new_tokens {max_new} exceeds the decoder's {max_positions} positions")
    else:
        limit = config.max_total_tokens if max_positions is None else min(config.max_total_tokens, max_positions)
    if total > limit:
        raise InputTooLong(f"{num_virtual} virtual + {num_ids} input + {max_new} new tokens = {total} "
                           f"exceed the context limit {limit}")
    if kv_tokens is not None and total > kv_tokens:
        raise InputTooLong(f"{num_virtual} virtual + {num_ids} input + {max_new} new tokens = {total} could "
                           f"never fit in the server's KV memory of {kv_tokens} tokens (--kv-cache-memory); "
                           "ask for fewer tokens")
    if kv_tokens is None and num_virtual + num_ids > config.max_prefill_tokens:
        raise InputTooLong(f"{num_virtual + num_ids} prompt tokens exceed max_prefill_tokens "
                           f"{config.max_prefill_tokens}")
