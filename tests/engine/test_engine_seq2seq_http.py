"""A real uvicorn server on a tiny T5 and a tiny BART: SEQ_2_SEQ_LM adapters uploaded over HTTP give, through
/generate, streaming and /v1/completions, what PeftModelForSeq2SeqLM.generate gives each request alone; a
task made by TEXT init over HTTP is SEQ_2_SEQ_LM and gives what PEFT's TEXT init gives; a CAUSAL_LM
adapter is refused with 422 naming the type that fits."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.config import Settings
from tests.engine.conftest import write_peft_adapters
from tests.engine.test_engine_seq2seq import (
    NUM_VIRTUAL,
    REQUESTS,
    peft_reference,
    write_seq2seq_adapters,
)
from tests.live_server_util import assert_error, run_server, sse_events


def _upload(client, task_id: str, folder) -> None:
    files = {"config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
             "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())}
    r = client.put(f"/v1/tasks/{task_id}", files=files)
    assert r.status_code == 201, r.text


def _generate(client, index: int) -> list[int]:
    task_id, text, max_new, _ = REQUESTS[index]
    body = {"inputs": text, "parameters": {"max_new_tokens": max_new, "details": True}}
    if task_id is not None:
        body["task_id"] = task_id
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_server_matches_peft_and_refuses_causal_adapter(family, seq2seq_model_dirs, tiny_model_dir,
                                                                tmp_path):
    model_dir = seq2seq_model_dirs(family)
    adapters = write_seq2seq_adapters(model_dir, tmp_path / "peft", NUM_VIRTUAL)
    causal = write_peft_adapters(tiny_model_dir("llama"), tmp_path / "causal", {"causal": 3})
    expected = [tokens for tokens, _ in peft_reference(model_dir, adapters)]
    settings = Settings(model=str(model_dir), store=tmp_path / "store", served_model_name=family,
                        device="cpu", max_batch_size=16, max_new_tokens=64, shutdown_grace_s=2)
    with run_server(settings) as live, live.client() as c:
        info = c.get("/info").json()
        assert (info["model_type"], info["task_type"]) == (family, "SEQ_2_SEQ_LM"), info
        for task_id, folder in adapters.items():
            _upload(c, task_id, folder)
        body = assert_error(c.put("/v1/tasks/causal", files={
            "config": ("adapter_config.json", (causal["causal"] / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (causal["causal"] / "adapter_model.safetensors").read_bytes())}),
            422)
        assert "SEQ_2_SEQ_LM" in body["error"], body
        assert_error(c.get("/v1/tasks/causal"), 404)
        _check_text_init(c, model_dir)
        # All requests at once: the engine batches them across tasks.
        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            got = list(pool.map(lambda i: _generate(c, i), range(len(REQUESTS))))
        assert got == expected
        _check_stream_and_completions(c, live.runtime.tokenizer, expected)


def _check_text_init(c, model_dir) -> None:
    """A task made over HTTP by TEXT init is a SEQ_2_SEQ_LM prompt and gives what PEFT's own TEXT init gives."""
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    init_text, n, text = "Tell the story of the river", 6, "Once upon a time"
    r = c.put("/v1/tasks/from-text", json={"init": "text", "text": init_text, "num_virtual_tokens": n})
    assert r.status_code == 201 and r.json()["task_type"] == "SEQ_2_SEQ_LM", r.text
    peft = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(model_dir), PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=init_text, tokenizer_name_or_path=str(model_dir))).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        want = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             forced_eos_token_id=None)[0, 1:].tolist()
    r = c.post("/generate", json={"task_id": "from-text", "inputs": text,
                                  "parameters": {"max_new_tokens": 8, "details": True}})
    assert r.status_code == 200, r.text
    assert [t["id"] for t in r.json()["details"]["tokens"]] == want


def _check_stream_and_completions(c, tokenizer, expected: list[list[int]]) -> None:
    task_id, text, max_new, _ = REQUESTS[3]
    with c.stream("POST", "/generate_stream", json={"task_id": task_id, "inputs": text,
                                                    "parameters": {"max_new_tokens": max_new}}) as r:
        assert r.status_code == 200
        events = [e for e in sse_events(r) if e != "[DONE]"]
    assert [e["token"]["id"] for e in events] == expected[3]
    r = c.post("/v1/completions", json={"model": task_id, "prompt": text, "max_tokens": max_new,
                                        "temperature": 0})
    assert r.status_code == 200, r.text
    want = tokenizer.decode(expected[3], skip_special_tokens=True)
    assert r.json()["choices"][0]["text"] == want, json.dumps(r.json())
