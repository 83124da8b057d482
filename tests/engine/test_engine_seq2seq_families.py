"""Encoder-decoder families: which load, how their start token is chosen, each family's per-row position
lookup against the model's own, their position-table limits (encoder input and decoder output each up
to max_position_embeddings, refused before they can fail a step), sampling, repetition penalty and stop
sequences on a BART model as for causal LMs, and output text decoded as HF decodes it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from prompt_store.store import PromptStore
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.errors import InputTooLong
from server.engine.hf_cache.runner_seq2seq import decoder_start_token_id
from server.engine.hf_cache.seq2seq_families import is_padding_aware, lookup_positions
from server.engine.model_loader import load_model
from server.engine.types import SamplingParams
from tests.engine.conftest import SEQ2SEQ_FAMILIES, SEQ2SEQ_MAX_POSITIONS, run, seq2seq_config
from tests.engine.test_engine_seq2seq import write_seq2seq_adapters


def test_unknown_encoder_decoder_family_refused_at_load(tmp_path):
    # ProphetNet predicts n-grams with its own relative positions: not checked, so refused by name.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "prophetnet", "is_encoder_decoder": True}))
    with pytest.raises(ValueError, match=r"'prophetnet' is not supported; supported: \[.*'bart'.*'t5'"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize(("generation", "config", "start"), [
    ({"decoder_start_token_id": 5, "bos_token_id": 0}, {"decoder_start_token_id": 7}, 5),
    ({"decoder_start_token_id": None, "bos_token_id": 0}, {"decoder_start_token_id": None}, 0),  # mBART-style
    ({}, {"decoder_start_token_id": 7}, 7),
])
def test_decoder_start_token_as_hf_generate_picks_it(generation, config, start):
    model = SimpleNamespace(generation_config=SimpleNamespace(**generation), config=SimpleNamespace(**config))
    assert decoder_start_token_id(model) == start


def test_no_decoder_start_token_is_a_load_error():
    model = SimpleNamespace(generation_config=SimpleNamespace(), config=SimpleNamespace())
    with pytest.raises(ValueError, match="neither decoder_start_token_id nor bos_token_id"):
        decoder_start_token_id(model)


@pytest.mark.parametrize("family", [f for f in SEQ2SEQ_FAMILIES if f != "t5"])
def test_per_row_lookup_reads_what_the_model_reads_for_one_request(family, seq2seq_model_dirs):
    """Decoding one request token by token, the model's own table lookup at past length k equals ours at
    position k, for every position table (decoder and encoder), pad token ids included (M2M100 zeroes them)."""
    import inspect

    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(seq2seq_model_dirs(family))
    pad = model.config.pad_token_id
    for table in (model.get_decoder().embed_positions, model.get_encoder().embed_positions):
        takes_shape = "input_ids_shape" in inspect.signature(table.forward).parameters
        for k, token in enumerate([5, pad, 7, 9, pad, 11]):
            ids = torch.tensor([[token]])
            if is_padding_aware(table):
                theirs = table(ids, None, k)
            else:
                theirs = table(ids.shape if takes_shape else ids, k)
            ours = lookup_positions(table, torch.tensor([[k]]), ids)
            assert torch.equal(ours, theirs.expand_as(ours)), (family, k, token)


@pytest.fixture(scope="module")
def bart_engine(seq2seq_model_dirs, tmp_path_factory):
    model_dir = seq2seq_model_dirs("bart")
    root = tmp_path_factory.mktemp("bart-limits")
    write_seq2seq_adapters(model_dir, root, {"four": 4, "nine": 9})
    loaded = load_model(str(model_dir), device="cpu")
    engine = Engine(loaded, PromptStore(root, token_dim=loaded.hidden_size), EngineConfig(max_batch_size=4))
    engine.start()
    yield engine
    engine.stop(grace_s=5)


def _ids_text(engine: Engine, num_tokens: int) -> str:
    """A text that encodes to exactly `num_tokens` tokens (BOS included)."""
    text = ""
    while len(engine.tokenizer(text)["input_ids"]) < num_tokens:
        text += " a"
    assert len(engine.tokenizer(text)["input_ids"]) == num_tokens
    return text


def _submit(engine: Engine, text: str, max_new: int) -> list[int]:
    return run(_result(engine, text, "four", SamplingParams(max_new_tokens=max_new))).token_ids


async def _result(engine: Engine, text: str, task_id: str | None, params: SamplingParams):
    return await (await engine.submit(text, task_id=task_id, params=params)).result()


def test_bart_limits_are_per_side(bart_engine):
    assert bart_engine.loaded.max_positions == SEQ2SEQ_MAX_POSITIONS
    full = _ids_text(bart_engine, SEQ2SEQ_MAX_POSITIONS - 4)  # 4 virtual + 60 input = the whole table
    # Both sides full at once: n + L + new = 128 is more than one table, and still fine.
    assert len(_submit(bart_engine, full, SEQ2SEQ_MAX_POSITIONS)) == SEQ2SEQ_MAX_POSITIONS
    with pytest.raises(InputTooLong, match="4 virtual \\+ 61 input tokens = 65 exceed the encoder's 64 positions"):
        _submit(bart_engine, full + " a", 1)
    with pytest.raises(InputTooLong, match="max_new_tokens 65 exceeds the decoder's 64 positions"):
        _submit(bart_engine, "Hi", SEQ2SEQ_MAX_POSITIONS + 1)


# The tiny model's logits are peaked (wide init): a high temperature makes the draws matter.
SAMPLED = SamplingParams(max_new_tokens=12, do_sample=True, temperature=4.0, top_k=40, top_p=0.95, seed=11,
                         repetition_penalty=1.1)


def test_seeded_sampling_is_independent_of_batch_mates(bart_engine):
    async def crowded():
        mate = await bart_engine.submit("The bread", task_id="nine", params=SamplingParams(max_new_tokens=20))
        await mate.__anext__()
        others = [await bart_engine.submit("One two", task_id=None,
                                           params=SamplingParams(max_new_tokens=15, do_sample=True, seed=3))]
        target = await bart_engine.submit("A story", task_id="four", params=SAMPLED)
        others.append(await bart_engine.submit("x", task_id="nine", params=SamplingParams(
            max_new_tokens=9, do_sample=True, temperature=1.3)))
        tokens = (await target.result()).token_ids
        for stream in [mate, *others]:
            await stream.result()
        return tokens

    alone = run(_result(bart_engine, "A story", "four", SAMPLED)).token_ids
    assert run(crowded()) == alone
    other_seed = SamplingParams(**{**SAMPLED.__dict__, "seed": 12})
    assert run(_result(bart_engine, "A story", "four", other_seed)).token_ids != alone


def test_repetition_penalty_matches_peft(bart_engine, seq2seq_model_dirs):
    """The penalty sees the decoder's ids (start token included), as in HF generate."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    model_dir = seq2seq_model_dirs("bart")
    store_root = bart_engine.store.root
    text, penalty = "Once upon a time there was a baker", 1.5
    base = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    peft = PeftModel.from_pretrained(base, store_root / "nine").eval()
    ids = bart_engine.tokenizer(text, return_tensors="pt")["input_ids"]
    expected = {}
    with torch.inference_mode():
        for p in (1.0, penalty):
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                do_sample=False, repetition_penalty=p, forced_eos_token_id=None)
            expected[p] = out[0, 1:].tolist()
    assert expected[penalty] != expected[1.0]  # the penalty changes this output
    got = run(_result(bart_engine, text, "nine", SamplingParams(max_new_tokens=16, repetition_penalty=penalty)))
    assert got.token_ids == expected[penalty]


def test_stop_sequence_ends_the_text(bart_engine):
    text = "A long walk by the river"
    full = run(_result(bart_engine, text, "nine", SamplingParams(max_new_tokens=16)))
    # A 3-character stop whose first occurrence is in the second half of the text.
    start = next(i for i in range(len(full.text) // 2, len(full.text) - 3)
                 if full.text.find(full.text[i:i + 3]) == i)
    stop = full.text[start:start + 3]
    got = run(_result(bart_engine, text, "nine", SamplingParams(max_new_tokens=16, stop=(stop,))))
    assert got.finish_reason == "stop_sequence"
    assert got.text == full.text[:full.text.index(stop)]


def test_seq2seq_text_is_hf_decode_of_its_tokens(sentencepiece_tokenizer, tmp_path):
    """With a SentencePiece-style tokenizer (T5's kind), the text of an encoder-decoder's output (final
    and streamed) is `tokenizer.decode(tokens)`: no space before the first word, although the input's
    tokens would give one if the output were decoded as their continuation."""
    import transformers as tf

    tok = sentencepiece_tokenizer
    torch.manual_seed(0)
    tf.AutoModelForSeq2SeqLM.from_config(seq2seq_config("t5", tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    loaded = load_model(str(tmp_path / "model"), device="cpu")
    engine = Engine(loaded, PromptStore(tmp_path / "store", token_dim=loaded.hidden_size), EngineConfig())
    texts = ["The river", "Once upon a time", "A baker", "Bread and milk", "Hello", "The long road home"]

    async def go():
        results = []
        for text in texts:
            params = SamplingParams(max_new_tokens=8, ignore_eos=True)
            stream = await engine.submit(text, task_id=None, params=params)
            streamed = "".join([event.text async for event in stream])
            results.append((streamed, await stream.result()))
        return results

    engine.start()
    try:
        results = run(go())
    finally:
        engine.stop(grace_s=5)
    starts = [tok.convert_ids_to_tokens(r.token_ids[0]) for _, r in results]
    assert any(s.startswith("▁") and len(s) > 1 for s in starts), starts  # a word start comes first
    for streamed, result in results:
        assert streamed == result.text == tok.decode(result.token_ids, skip_special_tokens=True)
