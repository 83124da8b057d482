"""Encoder-decoder (tiny T5) serving SEQ_2_SEQ_LM prompt-tuning adapters: a mixed batch of tasks (different
n, arrival steps, one bare request) gives each request what PeftModelForSeq2SeqLM.generate gives it alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from prompt_store.errors import InvalidPrompt
from prompt_store.store import PromptStore
from server.engine.batch import EncoderState
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.errors import IncompatibleTask, RequestFailed
from server.engine.model_loader import load_model
from server.engine.types import SamplingParams
from tests.engine.conftest import run, write_peft_adapters

NUM_VIRTUAL = {"alpha": 1, "beta": 4, "gamma": 7, "delta": 12}
# Logits here are large (wide init, |logit| up to ~100) and float32 noise grows with them: judged relative
# to the largest logit. Measured 5e-5 in float32; the same comparison in float64 agrees to 2e-13.
LOGIT_RTOL = 2e-4
# (task, text, max_new_tokens, wave): each wave is submitted while the previous ones are decoding.
REQUESTS = [
    ("alpha", "The bread", 9, 0),
    ("beta", "A long walk by the river, then home for supper and a story.", 12, 0),
    ("gamma", "Hi", 7, 0),
    ("delta", "Once upon a time there was a baker", 10, 1),
    (None, "The river runs", 8, 1),
    ("alpha", "Café crème, s'il vous plaît 😀", 11, 1),
    ("beta", "one", 6, 2),
    ("delta", "Stories", 5, 2),
]


def write_seq2seq_adapters(model_dir: Path, root: Path, num_virtual: dict[str, int]) -> dict[str, Path]:
    """One SEQ_2_SEQ_LM adapter per task (num_transformer_submodules=2, PEFT's default), by real PEFT."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    folders = {}
    for i, (task_id, n) in enumerate(sorted(num_virtual.items())):
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(model_dir),
                                    PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n))
        assert peft_model.peft_config["default"].num_transformer_submodules == 2
        folders[task_id] = root / task_id
        peft_model.save_pretrained(folders[task_id])
    return folders


def peft_reference(model_dir: Path, adapters: dict[str, Path],
                   dtype: torch.dtype = torch.float32) -> list[tuple[list[int], list[torch.Tensor]]]:
    """PeftModelForSeq2SeqLM.generate (greedy), one request alone, the decoder start token stripped; and
    each step's logits from a cache-free loop over PeftModelForSeq2SeqLM.forward."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=dtype).eval()
    names = sorted(adapters)
    peft = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0]).eval()
    for name in names[1:]:
        peft.load_adapter(adapters[name], adapter_name=name)
    outputs = []
    for task_id, text, max_new, _ in REQUESTS:
        model = base
        if task_id is not None:
            peft.set_adapter(task_id)
            model = peft
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 do_sample=False)
            assert out[0, 0].item() == base.config.decoder_start_token_id
            logits = [model(input_ids=ids, attention_mask=torch.ones_like(ids),
                            decoder_input_ids=out[:, :k + 1]).logits[0, -1] for k in range(out.shape[1] - 1)]
        outputs.append((out[0, 1:].tolist(), logits))
    return outputs


async def _engine_outputs(engine: Engine) -> tuple[list, list[int]]:
    """Token ids (or the RequestFailed) of every request; how many were running when each wave arrived."""
    streams: dict[int, object] = {}
    running_at_arrival = []
    for wave in range(3):
        running_at_arrival.append(sum(not s.done for s in streams.values()))
        for i, (task_id, text, max_new, w) in enumerate(REQUESTS):
            if w == wave:
                streams[i] = await engine.submit(text, task_id=task_id, request_id=f"r{i}",
                                                 params=SamplingParams(max_new_tokens=max_new))
        first_running = next(iter(s for s in streams.values() if not s.done), None)
        if first_running is not None:  # let the running rows decode a couple of steps first
            await asyncio.wait_for(first_running.__anext__(), 30)
            await asyncio.wait_for(first_running.__anext__(), 30)
    outputs: list = []
    for i in range(len(REQUESTS)):
        try:
            outputs.append((await streams[i].result()).token_ids)
        except RequestFailed as exc:
            outputs.append(exc)
    return outputs, running_at_arrival


@pytest.fixture(scope="module")
def t5_setup(seq2seq_model_dir, tmp_path_factory):
    model_dir = seq2seq_model_dir
    root = tmp_path_factory.mktemp("seq2seq-store")
    adapters = write_seq2seq_adapters(model_dir, root, NUM_VIRTUAL)
    return model_dir, root, adapters


@pytest.fixture(scope="module")
def reference(t5_setup):
    model_dir, _, adapters = t5_setup
    return peft_reference(model_dir, adapters)


def _t5_engine(t5_setup) -> Engine:
    model_dir, root, _ = t5_setup
    loaded = load_model(str(model_dir), device="cpu")
    store = PromptStore(root, token_dim=loaded.hidden_size, task_types=("SEQ_2_SEQ_LM",))
    return Engine(loaded, store, EngineConfig(max_batch_size=16))


def test_mixed_batch_matches_peft_seq2seq_alone(t5_setup, reference):
    engine = _t5_engine(t5_setup)
    assert engine.loaded.is_encoder_decoder and engine.loaded.task_type == "SEQ_2_SEQ_LM"
    taps: dict[tuple[str, int], torch.Tensor] = {}
    engine.logits_tap = lambda rid, k, logits: taps.__setitem__((rid, k), logits)
    engine.start()
    try:
        token_lists, running = run(_engine_outputs(engine))
    finally:
        engine.stop(grace_s=5)
    assert all(n > 0 for n in running[1:]), running  # every later wave joined a running batch
    expected = reference
    assert len({tuple(t[:4]) for t, _ in expected}) >= 6  # tasks and inputs really lead to different outputs
    for i, (got, (want, ref_logits)) in enumerate(zip(token_lists, expected)):
        assert got == want, f"request {i} ({REQUESTS[i][0]}) differs from PeftModelForSeq2SeqLM.generate"
        for k, ref in enumerate(ref_logits):
            diff = (taps[(f"r{i}", k)] - ref.float()).abs().max().item() / ref.abs().max().item()
            assert diff <= LOGIT_RTOL, f"request {i} step {k}: logits differ by {diff} (relative)"


def test_decode_failure_fails_one_request_only(t5_setup, reference):
    """Fault isolation on encoder-decoder batches: halving rows cuts the self-attention cache, the
    cross-attention cache and the encoder state alike; the others' tokens stay PEFT's."""
    engine = _t5_engine(t5_setup)
    engine.fault_injector.fail_request("r1", phase="decode")
    engine.start()
    try:
        outputs, _ = run(_engine_outputs(engine))
    finally:
        engine.stop(grace_s=5)
    assert isinstance(outputs[1], RequestFailed) and engine.stats().num_failed == 1
    assert [o for i, o in enumerate(outputs) if i != 1] == [t for i, (t, _) in enumerate(reference) if i != 1]
    assert engine.fault_injector.num_raised >= 1


def test_causal_adapter_refused(t5_setup, tmp_path, tiny_model_dir):
    model_dir = t5_setup[0]
    write_peft_adapters(tiny_model_dir("llama"), tmp_path, {"causal": 3})
    loaded = load_model(str(model_dir), device="cpu")
    strict = PromptStore(tmp_path, token_dim=loaded.hidden_size, task_types=("SEQ_2_SEQ_LM",))
    with pytest.raises(InvalidPrompt, match="SEQ_2_SEQ_LM"):
        strict.acquire("causal")
    # Even with a store that accepts every type, the engine refuses the misfit before queuing.
    engine = Engine(loaded, PromptStore(tmp_path, token_dim=loaded.hidden_size), EngineConfig())
    engine.start()
    try:
        with pytest.raises(IncompatibleTask, match="SEQ_2_SEQ_LM adapters fit"):
            run(engine.submit("hi", task_id="causal", params=SamplingParams(max_new_tokens=2)))
    finally:
        engine.stop(grace_s=5)


def test_encoder_state_merge_and_select_pad_left():
    a = EncoderState(torch.ones(1, 2, 3), torch.ones(1, 2, dtype=torch.long))
    b = EncoderState(torch.full((2, 4, 3), 2.0), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    merged = a.merge(b)
    assert merged.attention_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]
    assert merged.hidden_states[0, :2].abs().sum() == 0 and merged.hidden_states[0, 2:].eq(1).all()
    kept, cut = merged.select(torch.tensor([0, 1]))
    assert cut == 1 and kept.attention_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert kept.hidden_states.shape == (2, 3, 3)
