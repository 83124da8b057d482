"""Training examples: JSONL lines to token ids and labels, as PEFT's prompt-tuning examples build them.

A line is `{"prompt": ..., "completion": ...}`, or `{"messages": [...]}` when the tokenizer has a chat
template (the last message, the assistant's, is the completion; the ones before it, rendered by the
template with the generation prompt, are the prompt).

- Causal LM: `input_ids = tok(prompt) + tok(completion, no special tokens) + [eos]`. The prompt is
  tokenized exactly as a served request's input is (`tokenizer(text)["input_ids"]`), so what the prompt
  learns to continue is what the server will see. Labels are -100 on the prompt's tokens, so the loss
  counts the completion and its EOS only (the trainer puts -100 on the virtual tokens too).
- Seq2seq: the encoder gets `tok(prompt)`; the labels are `tok(completion)` with the tokenizer's special
  tokens, ending in EOS, as HF's seq2seq models expect (the decoder inputs are the labels shifted right).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One encoded example. Causal: `labels` aligns with `input_ids`. Seq2seq: `labels` are the decoder's."""

    input_ids: list[int]
    labels: list[int]


class ExampleError(ValueError):
    """A line that cannot be used; `line` is 1-based."""

    def __init__(self, line: int, problem: str):
        super().__init__(f"line {line}: {problem}")
        self.line = line
        self.problem = problem


@dataclass(frozen=True)
class ExampleLimits:
    """Bounds on a training file."""

    max_examples: int = 100_000
    max_tokens_per_example: int = 2048


def read_jsonl(data: bytes, tokenizer: Any, *, is_encoder_decoder: bool,
               limits: ExampleLimits = ExampleLimits()) -> list[Example]:
    """Every line encoded; the first bad line raises ExampleError naming it and the problem."""
    examples: list[Example] = []
    for number, raw in enumerate(data.decode("utf-8", errors="strict").splitlines(), start=1):
        if not raw.strip():
            continue
        if len(examples) >= limits.max_examples:
            raise ExampleError(number, f"more than {limits.max_examples} examples")
        try:
            record = json.loads(raw)
        except ValueError as exc:
            raise ExampleError(number, f"not JSON: {exc}") from None
        prompt, completion = _prompt_and_completion(number, record, tokenizer)
        example = encode(prompt, completion, tokenizer, is_encoder_decoder=is_encoder_decoder)
        num_tokens = len(example.input_ids) + (len(example.labels) if is_encoder_decoder else 0)
        if num_tokens > limits.max_tokens_per_example:
            raise ExampleError(number, f"{num_tokens} tokens, more than {limits.max_tokens_per_example}")
        examples.append(example)
    if not examples:
        raise ExampleError(1, "the file has no examples")
    return examples


def encode(prompt: str, completion: str, tokenizer: Any, *, is_encoder_decoder: bool) -> Example:
    """One (prompt, completion) pair as token ids and labels (see the module's docstring)."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    if is_encoder_decoder:
        labels = list(tokenizer(completion)["input_ids"])
        if not labels or labels[-1] != tokenizer.eos_token_id:
            labels.append(tokenizer.eos_token_id)
        return Example(prompt_ids, labels)
    target = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return Example(prompt_ids + target, [IGNORE] * len(prompt_ids) + target)


def _prompt_and_completion(number: int, record: Any, tokenizer: Any) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise ExampleError(number, "each line must be a JSON object")
    if "messages" in record:
        return _from_messages(number, record["messages"], tokenizer)
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ExampleError(number, 'needs "prompt" and "completion" strings (or "messages")')
    if not completion:
        raise ExampleError(number, '"completion" is empty: there is nothing to learn')
    return prompt, completion


def _from_messages(number: int, messages: Any, tokenizer: Any) -> tuple[str, str]:
    if not getattr(tokenizer, "chat_template", None):
        raise ExampleError(number, '"messages" needs a tokenizer with a chat template; use "prompt" and "completion"')
    if not isinstance(messages, list) or len(messages) < 2 or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ExampleError(number, '"messages" must be a list of at least 2 {"role", "content"} objects')
    if messages[-1]["role"] != "assistant":
        raise ExampleError(number, 'the last message must be the assistant\'s (the completion)')
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return prompt, messages[-1]["content"]


def positions_needed(example: Example, num_virtual_tokens: int, *, is_encoder_decoder: bool) -> int:
    """Positions the model's table must hold for `example` behind its virtual tokens: the encoder's input
    and the decoder's labels each count from 0 (seq2seq); a causal row is one sequence."""
    if is_encoder_decoder:
        return max(num_virtual_tokens + len(example.input_ids), len(example.labels))
    return num_virtual_tokens + len(example.input_ids)


def longest(examples: list[Example]) -> dict:
    """What a file record keeps of its examples: how many, and the longest input and labels."""
    return {"num_examples": len(examples), "longest_input": max(len(e.input_ids) for e in examples),
            "longest_labels": max(len(e.labels) for e in examples)}
