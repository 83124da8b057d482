"""Parity with real PEFT: a mixed batch of tasks (different n, prompt lengths, arrival steps, one bare
request) gives each request what PEFT gives it alone: greedy tokens identical, logits within 1e-4 in
float32; in float64, where only the algorithm can differ, within 1e-9. Checked for the default engine, with
prefix caching on and off (blocks of 4 and of 16), with prefill chunks that end inside the virtual tokens,
inside blocks and inside the text, with the compiled step, and with attention (decode and prefill) in the
native kernels and in SDPA."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from server.engine.paged import prefill_attention
from server.engine.paged.cpu import native_decode, native_prefill
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.types import SamplingParams
from tests.engine.conftest import FAMILIES, held, serve, write_peft_adapters

NUM_VIRTUAL = {"alpha": 1, "beta": 4, "gamma": 7, "delta": 12}
LOGIT_TOL = 1e-4


@dataclass
class Req:
    task_id: str | None
    text: str
    max_new_tokens: int
    wave: int  # submitted once the previous wave has produced tokens


REQUESTS = [
    Req("alpha", "The bread", 9, 0),
    Req("beta", "A long walk by the river, then home for supper and a story.", 12, 0),
    Req("gamma", "Hi", 7, 0),
    Req("delta", "Once upon a time there was a baker", 10, 1),
    Req(None, "The river runs", 8, 1),
    Req("alpha", "Café crème, s'il vous plaît 😀", 11, 1),
    Req("beta", "one", 6, 2),
    Req("gamma", "The kitchen smelled of fresh bread and warm honey.", 9, 2),
    Req("delta", "Stories", 5, 3),
]


async def _engine_outputs(engine: Engine) -> tuple[list[list[int]], dict]:
    taps: dict[tuple[str, int], torch.Tensor] = {}
    engine.logits_tap = lambda rid, k, logits: taps.__setitem__((rid, k), logits)
    streams: dict[int, object] = {}
    running_at_arrival = []
    holding: list[str] = []  # the previous wave's requests
    for wave in range(4):
        if holding:  # that wave has decoded a couple of steps, and the worker waits inside a step of it
            await held(engine, *holding)
        running_at_arrival.append(sum(not s.done for s in streams.values()))
        for i, r in enumerate(REQUESTS):
            if r.wave == wave:
                if wave < 3:  # its second decode step waits until the next wave has arrived
                    engine.fault_injector.hold(f"r{i}", phase="decode", after=1)
                params = SamplingParams(max_new_tokens=r.max_new_tokens)
                streams[i] = await engine.submit(r.text, task_id=r.task_id, params=params, request_id=f"r{i}")
        for request_id in holding:
            engine.fault_injector.release(request_id)
        holding = [f"r{i}" for i, r in enumerate(REQUESTS) if r.wave == wave and wave < 3]
    results = [await streams[i].result() for i in range(len(REQUESTS))]
    return [r.token_ids for r in results], {"taps": taps, "results": results, "running": running_at_arrival}


class PeftReferee:
    """PEFT alone, one request at a time: one base model, adapters swapped with `set_adapter`."""

    def __init__(self, model_dir, adapters: dict, dtype: torch.dtype = torch.float32):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        names = sorted(adapters)
        self.peft = PeftModel.from_pretrained(self.base, adapters[names[0]], adapter_name=names[0]).eval()
        for name in names[1:]:
            self.peft.load_adapter(adapters[name], adapter_name=name)

    def run(self, task_id: str | None, text: str | list[int],
            max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
        """`generate` (greedy) tokens, and per-step logits from one cache-free `forward` over the whole
        sequence (causal: position k's logits see only what the k-th step saw). `text` may be token ids."""
        model = self.base
        if task_id is not None:
            self.peft.set_adapter(task_id)
            model = self.peft
        ids = torch.tensor([text]) if isinstance(text, list) else self.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            tokens = out[0, ids.shape[1]:].tolist()
            full = torch.cat([ids, torch.tensor([tokens[:-1]], dtype=torch.long)], dim=1)
            every = model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0, -len(tokens):].double()
        return tokens, list(every)


def _check_parity(model_dir, tmp_path, config: EngineConfig, dtype: str = "float32", tol: float = LOGIT_TOL):
    """Run REQUESTS through an engine with `config`; compare each with PEFT alone. Returns the engine."""
    adapters = write_peft_adapters(model_dir, tmp_path / "store", NUM_VIRTUAL)
    engine, (token_lists, extra) = serve(model_dir, tmp_path / "store", config, _engine_outputs, dtype)
    loaded = engine.loaded
    assert all(n > 0 for n in extra["running"][1:]), extra["running"]  # each wave joined a running batch
    referee = PeftReferee(model_dir, adapters, dtype=loaded.dtype)
    for i, req in enumerate(REQUESTS):
        ref_tokens, ref_logits = referee.run(req.task_id, req.text, req.max_new_tokens)
        assert token_lists[i] == ref_tokens, f"request {i} ({req.task_id}) differs from PEFT generate"
        for k, ref in enumerate(ref_logits):
            got = extra["taps"][(f"r{i}", k)].double()
            assert torch.argmax(ref).item() == ref_tokens[k]  # the cache-free loop agrees with generate
            diff = (got - ref).abs().max().item() / ref.abs().max().item()
            assert diff <= tol, f"request {i} step {k}: logits differ by {diff:.3g} (relative)"
        result = extra["results"][i]
        assert result.virtual_tokens == (0 if req.task_id is None else NUM_VIRTUAL[req.task_id])
        assert result.generated_tokens == len(ref_tokens)
        assert result.finish_reason == ("eos_token" if ref_tokens[-1] == loaded.tokenizer.eos_token_id else "length")
    return engine


def expected_hit_tokens(tokenizer, block_tokens: int) -> int:
    """Context tokens the prefix cache should serve REQUESTS: each later request of a task shares, with the
    task's earlier ones, the full blocks of their common leading context (virtual tokens, then token ids),
    never its own last position."""
    seen: dict[str | None, list[list[int]]] = {}
    hits = 0
    for req in REQUESTS:
        names = [-(i + 1) for i in range(NUM_VIRTUAL.get(req.task_id, 0))] + tokenizer(req.text)["input_ids"]
        common = 0
        for earlier in seen.get(req.task_id, []):
            same = next((i for i, (a, b) in enumerate(zip(names, earlier)) if a != b), min(len(names), len(earlier)))
            common = max(common, same)
        hits += min(common, len(names) - 1) // block_tokens * block_tokens
        seen.setdefault(req.task_id, []).append(names)
    return hits


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_matches_peft_alone(family, engine_model_dir, tmp_path):
    """Blocks of 4: the tasks' virtual tokens (n = 4, 7, 12) fill blocks that their later requests share."""
    engine = _check_parity(engine_model_dir(family), tmp_path, EngineConfig(max_batch_size=16, kv_block_tokens=4))
    assert (engine.memory is None) == (family == "bloom")  # BLOOM (ALiBi) keeps the legacy path
    if engine.memory is not None:  # attention in the native kernels wherever they build and cover the model
        assert engine.memory.has_native_decode == (native_decode.load() is not None)
        prefill = native_prefill.load()
        geometry = engine.memory.geometry
        assert engine.memory.has_native_prefill == (prefill is not None and prefill.covers(
            geometry.dtype, geometry.device, geometry.head_dim))
        kv = engine.stats().kv  # later requests of a task started from its cached blocks
        assert kv.num_prefix_hit_tokens == expected_hit_tokens(engine.tokenizer, 4) > 0


PAGED_FAMILIES = [f for f in FAMILIES if f != "bloom"]


@pytest.mark.parametrize("family", PAGED_FAMILIES)
@pytest.mark.parametrize("chunk,caching,native", [(3, True, True), (5, False, False)],
                         ids=["chunk3-prefix-native", "chunk5-noprefix-sdpa"])
def test_chunked_prefill_and_prefix_cache_match_peft(family, chunk, caching, native, engine_model_dir, tmp_path,
                                                     monkeypatch):
    """Chunks of 3 or 5 tokens end inside the virtual tokens (n = 4, 7, 12), inside blocks of 4 and inside
    the text: read in place by the native prefill kernel, or, through SDPA, every chunk after the first in two
    halves merged by log-sum-exp (the split that long prompts take where the kernel does not serve; other
    tests keep the single masked call that short chunks take)."""
    monkeypatch.setattr(prefill_attention, "MIN_SPLIT_PAIRS", 0)
    config = EngineConfig(max_batch_size=16, prefill_chunk_tokens=chunk, prefix_caching=caching, kv_block_tokens=4,
                          native_attention=native)
    engine = _check_parity(engine_model_dir(family), tmp_path, config)
    assert engine.stats().kv.num_prefix_hit_tokens == (expected_hit_tokens(engine.tokenizer, 4) if caching else 0)
    assert engine.memory.has_native_prefill == (native and native_prefill.load() is not None
                                                and engine.memory.geometry.head_dim % 16 == 0)


@pytest.mark.parametrize("family", PAGED_FAMILIES)
def test_sdpa_decode_matches_peft(family, engine_model_dir, tmp_path):
    """Attention through SDPA: the path where the native kernels are not built (no compiler, float16, GPUs)."""
    engine = _check_parity(engine_model_dir(family), tmp_path, EngineConfig(max_batch_size=16, native_attention=False))
    assert not engine.memory.has_native_decode and not engine.memory.has_native_prefill


@pytest.mark.parametrize("native", [True, False], ids=["native", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_float64_logits_match_peft_to_1e9(family, native, engine_model_dir, tmp_path, monkeypatch):
    """In float64 rounding is out of the way: what is left would be a different computation (prefill chunks
    split in two halves with the native kernel, one masked call without)."""
    monkeypatch.setattr(prefill_attention, "MIN_SPLIT_PAIRS", 0 if native else 2 ** 62)
    config = EngineConfig(max_batch_size=16, prefill_chunk_tokens=5, native_attention=native)
    _check_parity(engine_model_dir(family), tmp_path, config, dtype="float64", tol=1e-9)


def test_compiled_step_matches_peft(engine_model_dir, tmp_path):
    """Chunks of 2: the first steps compute prompt chunks that sample no row (a compiled graph once
    dropped those steps' attention calls, and with them the keys and values)."""
    config = EngineConfig(max_batch_size=16, prefill_chunk_tokens=2, compile=True)
    _check_parity(engine_model_dir("llama"), tmp_path, config)
