"""Encoder-decoder models (tiny T5 and BART-family models) serving SEQ_2_SEQ_LM prompt-tuning adapters: a
mixed batch of tasks (different n, arrival steps, one bare request) gives each request what
PeftModelForSeq2SeqLM.generate gives it alone (the bare one: what the base model gives it): the same greedy
tokens in float32, and in float64 the same logits at every step, up to rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prompt_store.errors import InvalidPrompt
from prompt_store.store import PromptStore
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.errors import IncompatibleTask, RequestFailed
from server.engine.hf_cache.batch import EncoderState
from server.engine.model_loader import load_model
from server.engine.types import SamplingParams
from tests.engine.conftest import SEQ2SEQ_FAMILIES, held, run, write_peft_adapters

NUM_VIRTUAL = {"alpha": 1, "beta": 4, "gamma": 7, "delta": 12}
# Logits are compared in float64 (engine and PEFT), relative to the largest logit (~100 here). Batching
# (pads, other rows, a cache) then changes only the rounding: at most 2.2e-13 measured over the 9 families.
# In float32 that noise depends on the CPU's kernels (5e-5 on one machine, 2.1e-4 on an AVX-512 one), so
# float32 is checked by its greedy tokens only. 1e-9 is far above float64 noise and below float32's
# resolution (6e-8): a single float32 rounding inside the float64 run fails it (1e-8 and up), and an
# algorithmic slip (a mask column, a position, a scale) moves logits by far more.
LOGIT_RTOL = 1e-9
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
                   dtype: torch.dtype = torch.float32) -> list[tuple[list[int], torch.Tensor]]:
    """PeftModelForSeq2SeqLM.generate (greedy), one request alone, the decoder start token stripped; and
    each step's logits [num_tokens, V] from one cache-free PeftModelForSeq2SeqLM.forward over them."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=dtype).eval()
    assert base.dtype == dtype
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
            # Plain greedy: the engine takes decoding choices from the request, not the model's generation
            # config (BART-family configs force EOS at the length limit; Blenderbot bans encoder n-grams).
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 do_sample=False, forced_eos_token_id=None, encoder_no_repeat_ngram_size=0)
            assert out[0, 0].item() == base.config.decoder_start_token_id
            # The decoder is causal: position k of one teacher-forced pass is step k's logits.
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           decoder_input_ids=out[:, :-1]).logits[0]  # [num_tokens, V]
        assert logits.dtype == dtype
        outputs.append((out[0, 1:].tolist(), logits))
    return outputs


async def _engine_outputs(engine: Engine) -> tuple[list, list[int]]:
    """Token ids (or the RequestFailed) of every request; how many were running when each wave arrived."""
    streams: dict[int, object] = {}
    running_at_arrival = []
    holding: list[str] = []  # the previous wave's requests
    for wave in range(3):
        if holding:  # that wave has decoded a couple of steps, and the worker waits inside a step of it
            await held(engine, *holding)
        running_at_arrival.append(sum(not s.done for s in streams.values()))
        for i, (task_id, text, max_new, w) in enumerate(REQUESTS):
            if w == wave:
                if wave < 2:  # its second decode step waits until the next wave has arrived
                    engine.fault_injector.hold(f"r{i}", phase="decode", after=1)
                streams[i] = await engine.submit(text, task_id=task_id, request_id=f"r{i}",
                                                 params=SamplingParams(max_new_tokens=max_new))
        for request_id in holding:
            engine.fault_injector.release(request_id)
        holding = [f"r{i}" for i, (_, _, _, w) in enumerate(REQUESTS) if w == wave and wave < 2]
    outputs: list = []
    for i in range(len(REQUESTS)):
        try:
            outputs.append((await streams[i].result()).token_ids)
        except RequestFailed as exc:
            outputs.append(exc)
    return outputs, running_at_arrival


@pytest.fixture(scope="module")
def family_setup(seq2seq_model_dirs, tmp_path_factory):
    """`family_setup("bart")` -> (model folder, store root with the PEFT adapters, adapter folders)."""
    built: dict[str, tuple] = {}

    def make(family: str) -> tuple:
        if family not in built:
            model_dir = seq2seq_model_dirs(family)
            root = tmp_path_factory.mktemp(f"seq2seq-store-{family}")
            built[family] = model_dir, root, write_seq2seq_adapters(model_dir, root, NUM_VIRTUAL)
        return built[family]

    return make


@pytest.fixture(scope="module")
def reference_for(family_setup):
    """`reference_for("bart", torch.float64)` -> peft_reference of that family's requests, computed once."""
    done: dict[tuple[str, torch.dtype], list] = {}

    def make(family: str, dtype: torch.dtype = torch.float32) -> list:
        if (family, dtype) not in done:
            model_dir, _, adapters = family_setup(family)
            done[(family, dtype)] = peft_reference(model_dir, adapters, dtype)
        return done[(family, dtype)]

    return make


@pytest.fixture(scope="module")
def t5_setup(family_setup):
    return family_setup("t5")


class ModelLogits:
    """Logits tap: each row's next-token logits as the runner hands them to the sampler (in the model's
    dtype when it is float64; rows whose logits the runner set itself, a forced token, are skipped)."""

    def __init__(self):
        self.rows: dict[tuple[str, int], torch.Tensor] = {}  # (request id, token index) -> [V]

    def tap(self, request_id: str, k: int, logits: torch.Tensor) -> None:
        """Runs on the worker thread: records, never raises (the test asserts)."""
        self.rows[(request_id, k)] = logits


def _engine(setup, dtype: torch.dtype = torch.float32) -> Engine:
    model_dir, root, _ = setup
    loaded = load_model(str(model_dir), device="cpu", dtype=dtype)
    assert loaded.dtype == dtype and loaded.model.dtype == dtype
    store = PromptStore(root, token_dim=loaded.hidden_size, dtype=dtype, task_types=("SEQ_2_SEQ_LM",))
    return Engine(loaded, store, EngineConfig(max_batch_size=16))


def _run_requests(engine: Engine) -> tuple[list, list[int], ModelLogits]:
    """Every request's tokens, the running counts at each wave, and each row's logits before sampling."""
    assert engine.loaded.is_encoder_decoder and engine.loaded.task_type == "SEQ_2_SEQ_LM"
    logits = ModelLogits()
    engine.logits_tap = logits.tap
    engine.start()
    try:
        token_lists, running = run(_engine_outputs(engine))
    finally:
        engine.stop(grace_s=5)
    return token_lists, running, logits


@pytest.mark.parametrize("family", SEQ2SEQ_FAMILIES)
def test_mixed_batch_matches_peft_seq2seq_alone(family, family_setup, reference_for):
    """Served in float32: every request gets PEFT's greedy tokens."""
    setup = family_setup(family)
    expected = reference_for(family)
    token_lists, running, _ = _run_requests(_engine(setup))
    assert all(n > 0 for n in running[1:]), running  # every later wave joined a running batch
    assert len({tuple(t[:5]) for t, _ in expected}) >= 6  # tasks and inputs really lead to different outputs
    for i, (got, (want, _)) in enumerate(zip(token_lists, expected)):
        assert got == want, f"request {i} ({REQUESTS[i][0]}) differs from PeftModelForSeq2SeqLM.generate"


@pytest.mark.parametrize("family", SEQ2SEQ_FAMILIES)
def test_mixed_batch_logits_match_peft_in_float64(family, family_setup, reference_for):
    """Engine and PEFT both in float64: every step's logits agree to LOGIT_RTOL, so batching changes
    nothing but rounding (float32's rounding differs between CPUs; this check does not)."""
    setup = family_setup(family)
    token_lists, running, logits = _run_requests(_engine(setup, torch.float64))
    assert all(n > 0 for n in running[1:]), running
    _check_float64_run(setup, reference_for(family, torch.float64), token_lists, logits)


def test_float64_check_sees_one_float32_rounding(family_setup, reference_for):
    """The float64 check can fail: the engine's encoder output rounded to float32 once leaves every token
    PEFT's, and the logits check catches it (measured 2e-8 here, 1e-8 and up across the families)."""
    setup = family_setup("t5")
    expected = reference_for("t5", torch.float64)
    engine = _engine(setup, torch.float64)
    engine.loaded.model.get_encoder().register_forward_hook(_round_to_float32)
    token_lists, _, logits = _run_requests(engine)
    assert token_lists == [tokens for tokens, _ in expected]
    with pytest.raises(AssertionError, match="logits differ"):
        _check_float64_run(setup, expected, token_lists, logits)


def _round_to_float32(module, args, output):
    output.last_hidden_state = output.last_hidden_state.float().double()
    return output


def _check_float64_run(setup, expected: list, token_lists: list, logits: ModelLogits) -> None:
    """PEFT's tokens, and at every step (bar a forced first token) PEFT's float64 logits."""
    forced_bos = _forced_bos(setup[0])
    for i, (got, (want, ref_logits)) in enumerate(zip(token_lists, expected)):
        assert got == want, f"request {i} ({REQUESTS[i][0]}) differs from PeftModelForSeq2SeqLM.generate"
        for k, ref in enumerate(ref_logits):
            if k == 0 and forced_bos is not None:  # HF forces it too: no model logits to compare
                assert got[0] == forced_bos
                continue
            _check_logits(logits.rows.get((f"r{i}", k)), ref, f"request {i} step {k}")


def _check_logits(got: torch.Tensor | None, ref: torch.Tensor, where: str) -> None:
    # Judged relative to the largest logit: rounding error grows with the logits' size (~100 here).
    assert got is not None, f"{where}: no logits were tapped for this row"
    assert got.dtype == ref.dtype == torch.float64, (where, got.dtype, ref.dtype)
    diff = ((got - ref).abs().max() / ref.abs().max()).item()
    assert diff <= LOGIT_RTOL, f"{where}: logits differ by {diff} (relative)"


def _forced_bos(model_dir: Path) -> int | None:
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(model_dir).forced_bos_token_id


@pytest.mark.parametrize("disabled", ["positions", "bare_scale"])
def test_family_handling_is_what_makes_parity(disabled, family_setup, reference_for, monkeypatch):
    """The parity test can fail: without per-row positions (BART) or the bare-row scale (Marian), the
    same requests no longer give PEFT's tokens."""
    from server.engine.hf_cache import seq2seq_families

    family = "bart" if disabled == "positions" else "marian"
    setup = family_setup(family)
    expected = [tokens for tokens, _ in reference_for(family)]
    name = "ABSOLUTE_POSITION_TYPES" if disabled == "positions" else "SCALES_INPUT_IDS_IN_ENCODER"
    monkeypatch.setattr(seq2seq_families, name, frozenset())
    token_lists, _, _ = _run_requests(_engine(setup))
    wrong = [i for i, (got, want) in enumerate(zip(token_lists, expected)) if got != want]
    if disabled == "positions":
        assert len(wrong) >= 4, wrong
    else:
        assert wrong == [4], wrong  # only the request without a task is run from its ids


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_decode_failure_fails_one_request_only(family, family_setup, reference_for):
    """Fault isolation on encoder-decoder batches: halving rows cuts the self-attention cache, the
    cross-attention cache and the encoder state alike; the others' tokens stay PEFT's."""
    setup = family_setup(family)
    reference = reference_for(family)
    engine = _engine(setup)
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
