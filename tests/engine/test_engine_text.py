"""Incremental detokenization (multi-byte characters never split), stop sequences across token
boundaries, and finish reasons, on the demo byte-level BPE tokenizer; word-initial spaces on a
SentencePiece-style tokenizer, for output that continues the prompt and output that starts afresh."""

from __future__ import annotations

import pytest

from server.demo import demo_corpus, train_tokenizer
from server.engine.request.detokenizer import IncrementalDetokenizer
from server.engine.request.sequence import Sequence
from server.engine.request.stop_matcher import StopMatcher
from server.engine.types import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SamplingParams

TEXT = "Café naïve 😀 Zürich — 東京 ok"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(demo_corpus(), vocab_size=512)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_deltas_rebuild_text_without_split_characters(tokenizer):
    ids = _ids(tokenizer, TEXT)
    detok = IncrementalDetokenizer(tokenizer, tokenizer("Hello")["input_ids"])
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) + detok.flush() == TEXT
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some tokens are single bytes of a multi-byte character: they wait


def test_incomplete_character_at_the_end_is_flushed(tokenizer):
    emoji = _ids(tokenizer, "😀")
    assert len(emoji) > 1
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(emoji[0]) == ""
    assert detok.flush() == "\ufffd"  # what a plain decode of those bytes gives


def test_stop_matcher_across_boundaries_and_holdback():
    m = StopMatcher(("o wor",))
    assert m.feed("Hel").text == "Hel"
    update = m.feed("lo w")
    assert update.text == "l" and not update.is_stopped  # "o w" could start the stop: held back
    update = m.feed("orld")
    assert update.is_stopped and update.text == "" and m.text == "Hell"


def test_stop_matcher_releases_held_text_when_it_does_not_match():
    m = StopMatcher(("cd", "xyz"))
    assert m.feed("abc").text == "ab"
    assert m.feed("e").text == "ce"
    assert m.feed("xy").text == ""
    assert m.finish() == "xy"


def _sequence(tokenizer, **params) -> Sequence:
    return Sequence(request_id="r", task_id=None, prompt=None, prompt_ids=tokenizer("Hi")["input_ids"],
                    params=SamplingParams(**params), seed=None,
                    eos_token_ids=frozenset({tokenizer.eos_token_id}), tokenizer=tokenizer, sink=None)


def _feed(seq: Sequence, ids: list[int]) -> str:
    streamed = ""
    for t in ids:
        streamed += seq.append_token(t, 0.0).text
        if seq.is_finished:
            break
    return streamed


def test_stop_sequence_on_text_spanning_tokens(tokenizer):
    seq = _sequence(tokenizer, max_new_tokens=50, stop=("Zürich",))
    streamed = _feed(seq, _ids(tokenizer, TEXT))
    result = seq.result()
    assert result.finish_reason == FINISH_STOP
    assert result.text == streamed == "Café naïve 😀 "
    assert len(result.token_ids) < len(_ids(tokenizer, TEXT))


def test_eos_and_length_finish_reasons(tokenizer):
    seq = _sequence(tokenizer, max_new_tokens=50)
    _feed(seq, _ids(tokenizer, "ok") + [tokenizer.eos_token_id] + _ids(tokenizer, "more"))
    assert seq.result().finish_reason == FINISH_EOS and seq.result().text == "ok"
    assert seq.events[-1].is_special

    seq = _sequence(tokenizer, max_new_tokens=3, ignore_eos=True)
    streamed = _feed(seq, [tokenizer.eos_token_id] + _ids(tokenizer, TEXT))
    result = seq.result()
    assert result.finish_reason == FINISH_LENGTH and result.generated_tokens == 3
    assert streamed == result.text  # held-back bytes are flushed with the last token


@pytest.mark.parametrize(("continues_prompt", "text"), [(True, " Hello world"), (False, "Hello world")])
def test_first_word_space_depends_on_whether_output_continues_the_prompt(sentencepiece_tokenizer,
                                                                           continues_prompt, text):
    """A causal LM's output continues the prompt ("The river" + " Hello"); an encoder-decoder's starts a
    fresh text, which HF decodes without a leading space."""
    tok = sentencepiece_tokenizer
    ids = tok("Hello world", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[0]).startswith("▁")
    seq = Sequence(request_id="r", task_id=None, prompt=None, prompt_ids=tok("The river")["input_ids"],
                   params=SamplingParams(max_new_tokens=len(ids)), seed=None, eos_token_ids=frozenset(),
                   tokenizer=tok, sink=None, continues_prompt=continues_prompt)
    assert _feed(seq, ids) == seq.result().text == text
    if not continues_prompt:
        assert text == tok.decode(ids, skip_special_tokens=True)
