"""Training files: each line encoded as PEFT's prompt-tuning examples do, and a bad line named."""

from __future__ import annotations

import json

import pytest

from server.demo import demo_corpus, train_tokenizer
from server.training.examples import IGNORE, ExampleError, ExampleLimits, encode, read_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(demo_corpus(), vocab_size=512)


def _lines(*records) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records).encode()


def test_causal_inputs_are_the_served_prompt_then_the_completion_and_eos(tokenizer):
    example = encode("The river", " runs on", tokenizer, is_encoder_decoder=False)
    prompt = tokenizer("The river")["input_ids"]  # exactly how a served request's text is tokenized
    target = tokenizer(" runs on", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example.input_ids == prompt + target
    assert example.labels == [IGNORE] * len(prompt) + target  # the loss counts the completion and EOS only


def test_seq2seq_labels_are_the_completion_ending_in_eos(tokenizer):
    example = encode("The river", " runs on", tokenizer, is_encoder_decoder=True)
    assert example.input_ids == tokenizer("The river")["input_ids"]
    assert example.labels[-1] == tokenizer.eos_token_id and IGNORE not in example.labels


def test_a_file_reads_line_by_line_and_skips_blank_lines(tokenizer):
    data = _lines({"prompt": "a", "completion": " b"}, "", {"prompt": "c", "completion": " d"})
    assert len(read_jsonl(data, tokenizer, is_encoder_decoder=False)) == 2


@pytest.mark.parametrize("bad, problem", [
    ("{not json", "not JSON"),
    ('["a", "b"]', "JSON object"),
    ({"prompt": "a"}, '"prompt" and "completion"'),
    ({"prompt": "a", "completion": ""}, "empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "at least 2"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "assistant"),
])
def test_a_bad_line_is_named_with_its_problem(tokenizer, bad, problem):
    data = _lines({"prompt": "a", "completion": " b"}, bad)
    with pytest.raises(ExampleError, match=problem) as caught:
        read_jsonl(data, tokenizer, is_encoder_decoder=False)
    assert caught.value.line == 2 and str(caught.value).startswith("line 2:")


def test_limits_bound_examples_and_their_length(tokenizer):
    data = _lines(*[{"prompt": "a", "completion": " b"}] * 3)
    with pytest.raises(ExampleError, match="more than 2 examples"):
        read_jsonl(data, tokenizer, is_encoder_decoder=False, limits=ExampleLimits(max_examples=2))
    with pytest.raises(ExampleError, match="tokens, more than 3"):
        read_jsonl(_lines({"prompt": "a long prompt here", "completion": " b c"}), tokenizer,
                   is_encoder_decoder=False, limits=ExampleLimits(max_tokens_per_example=3))
    with pytest.raises(ExampleError, match="no examples"):
        read_jsonl(b"\n\n", tokenizer, is_encoder_decoder=False)


def test_messages_use_the_chat_template(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (example,) = read_jsonl(_lines({"messages": messages}), tokenizer, is_encoder_decoder=False)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert example == encode(prompt, "yo", tokenizer, is_encoder_decoder=False)
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ExampleError, match="chat template"):
            read_jsonl(_lines({"messages": messages}), tokenizer, is_encoder_decoder=False)
    finally:
        tokenizer.chat_template = template
