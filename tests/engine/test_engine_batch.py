"""Batch building and cache surgery: prefill rows [pads][P][E(ids)], masks, positions; merge (left pad),
select (filter rows, trim all-pad columns) and truncate (undo a failed step)."""

from __future__ import annotations

import pytest
import torch

from server.engine.faults import FaultInjector
from server.engine.hf_cache import kv_cache
from server.engine.hf_cache.batch import prefill_inputs
from server.engine.hf_cache.runner import ModelRunner
from server.engine.model_loader import load_model
from server.engine.request.sequence import Sequence
from server.engine.types import SamplingParams


class _Prompt:
    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings
        self.num_virtual_tokens = embeddings.shape[0]
        self.version = "v"


@pytest.fixture(scope="module")
def loaded(engine_model_dir):
    return load_model(str(engine_model_dir("llama")), device="cpu")


def _seq(name: str, ids: list[int], prompt: _Prompt | None) -> Sequence:
    return Sequence(request_id=name, task_id=None, prompt=prompt, prompt_ids=ids, params=SamplingParams(),
                    seed=None, eos_token_ids=frozenset(), tokenizer=None, sink=None)


def _two_rows(hidden: int) -> list[Sequence]:
    prompt = _Prompt(torch.randn(2, hidden, generator=torch.Generator().manual_seed(0)))
    return [_seq("a", [7, 8, 9], prompt), _seq("b", [4, 5, 6, 7, 8, 9, 10], None)]


def test_prefill_rows_layout(loaded):
    seqs = _two_rows(loaded.hidden_size)
    embed = loaded.model.get_input_embeddings()
    inputs = prefill_inputs(seqs, embed)
    assert inputs.inputs_embeds.shape == (2, 7, loaded.hidden_size)
    assert inputs.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    assert inputs.position_ids.tolist() == [[0, 0, 0, 1, 2, 3, 4], list(range(7))]
    row = inputs.inputs_embeds[0]
    assert torch.equal(row[:2], torch.zeros(2, loaded.hidden_size))  # pads left of the virtual tokens
    assert torch.equal(row[2:4], seqs[0].prompt.embeddings)
    with torch.inference_mode():
        assert torch.equal(row[4:], embed(torch.tensor([7, 8, 9])))


def _prefill(loaded, seqs):
    runner = ModelRunner(loaded.model, FaultInjector())
    with torch.inference_mode():
        return runner.prefill(seqs)


def test_merge_left_pads_and_select_trims(loaded):
    with torch.inference_mode():
        short, _ = _prefill(loaded, [_seq("s", [5, 6], None)])  # width 2
        long, _ = _prefill(loaded, _two_rows(loaded.hidden_size))  # width 7
        merged = short.merge(long)
        assert len(merged) == 3 and merged.width == 7
        assert kv_cache.width(merged.cache) == 7 and kv_cache.batch_size(merged.cache) == 3
        assert merged.attention_mask[0].tolist() == [0, 0, 0, 0, 0, 1, 1]
        k_short, k_merged = short.cache.layers[0].keys, merged.cache.layers[0].keys
        assert torch.equal(k_merged[0, :, 5:], k_short[0])
        assert not k_merged[0, :, :5].any()  # padded slots hold zeros
        assert torch.equal(k_merged[1:], long.cache.layers[0].keys)
        assert merged.positions.tolist() == [2, 5, 7]  # next token at n + L

        kept = merged.select([0, 1])  # drop the widest row: columns padded in every kept row go
        assert kept.width == 5 and kv_cache.width(kept.cache) == 5
        assert kept.attention_mask.tolist() == [[0, 0, 0, 1, 1], [1] * 5]
        assert torch.equal(kept.cache.layers[1].values[1], long.cache.layers[1].values[0, :, 2:])


def test_decode_grows_mask_and_positions_and_truncate_undoes(loaded):
    with torch.inference_mode():
        batch, _ = _prefill(loaded, _two_rows(loaded.hidden_size))
        batch.set_last_tokens([11, 12])
        inputs = batch.decode_inputs()
        assert inputs.position_ids.tolist() == [[5], [7]] and inputs.attention_mask.shape == (2, 8)
        runner = ModelRunner(loaded.model, FaultInjector())
        runner.decode(batch)
        assert batch.width == 8 and kv_cache.width(batch.cache) == 8
        assert batch.positions.tolist() == [6, 8]
        kv_cache.truncate(batch.cache, 7)
        assert kv_cache.width(batch.cache) == 7
