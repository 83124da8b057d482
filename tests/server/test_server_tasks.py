"""Task admin API: real PEFT adapter uploads, JSON init, list/show/delete, validation before writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from live_server_util import assert_error


def peft_adapter(model_dir: Path, out: Path, num_virtual_tokens: int, *, safe: bool = True, seed: int = 0):
    """A PROMPT_TUNING adapter saved by the real peft package, plus the PeftModel for reference."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                    num_virtual_tokens=num_virtual_tokens))
    model.save_pretrained(out, safe_serialization=safe)
    return model.eval()


def peft_greedy(model, tokenizer, text: str, num_tokens: int) -> list[int]:
    """PEFT's own output for one request alone: a cache-free greedy loop over PeftModel.forward."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    out = []
    with torch.inference_mode():
        for _ in range(num_tokens):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def upload(client, task_id: str, folder: Path, **kw):
    weights = next(p for p in folder.iterdir() if p.name.startswith("adapter_model"))
    files = {"config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
             "weights": (weights.name, weights.read_bytes())}
    return client.put(f"/v1/tasks/{task_id}", files=files, **kw)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_upload_real_peft_adapter_gives_pefts_output(server, model_dir, tmp_path, safe):
    from transformers import AutoTokenizer

    model = peft_adapter(model_dir, tmp_path / "a", 6, safe=safe, seed=int(safe))
    task_id = f"peft-{'st' if safe else 'bin'}"
    with server.client() as c:
        r = upload(c, task_id, tmp_path / "a")
        assert r.status_code == 201, r.text
        assert r.json()["num_virtual_tokens"] == 6 and r.json()["id"] == task_id
        out = c.post("/generate", json={"task_id": task_id, "inputs": "Once upon a time", "parameters": {
            "max_new_tokens": 6, "details": True, "ignore_eos_token": True}}).json()
        assert upload(c, task_id, tmp_path / "a").status_code == 200  # replace: 200, not 201
    expected = peft_greedy(model, AutoTokenizer.from_pretrained(model_dir), "Once upon a time", 6)
    assert [t["id"] for t in out["details"]["tokens"]] == expected


def test_invalid_upload_422_and_nothing_written(server, model_dir, tmp_path):
    peft_adapter(model_dir, tmp_path / "a", 4)
    folder = tmp_path / "a"
    config = json.loads((folder / "adapter_config.json").read_text())
    with server.client() as c:
        bad_dim = dict(config, token_dim=config["token_dim"] + 1)
        files = {"config": ("adapter_config.json", json.dumps(bad_dim).encode()),
                 "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())}
        assert_error(c.put("/v1/tasks/bad-1", files=files), 422, "invalid_adapter")
        files["config"] = ("adapter_config.json", b"{not json")
        assert_error(c.put("/v1/tasks/bad-1", files=files), 422, "invalid_adapter")
        files = {"config": ("adapter_config.json", json.dumps(config).encode()),
                 "weights": ("adapter_model.safetensors", b"\x00" * 64)}
        assert_error(c.put("/v1/tasks/bad-1", files=files), 422, "invalid_adapter")
        assert_error(c.put("/v1/tasks/bad-1", files={"config": files["config"]}), 422, "validation")
        assert_error(c.get("/v1/tasks/bad-1"), 404)
    assert not (server.store_dir / "bad-1").exists()


def test_upload_size_limit_413(tight_server, model_dir, tmp_path):
    with tight_server.client() as c:
        files = {"config": ("adapter_config.json", b"{}"), "weights": ("adapter_model.safetensors", b"0" * 100_000)}
        assert_error(c.put("/v1/tasks/big", files=files), 413, "payload_too_large")
        assert_error(c.get("/v1/tasks/big"), 404)


def test_json_init_modes_list_show_delete(server):
    with server.client() as c:
        r = c.put("/v1/tasks/init-text", json={"init": "text", "text": "Summarise this.", "num_virtual_tokens": 5})
        assert r.status_code == 201 and r.json()["num_virtual_tokens"] == 5
        r1 = c.put("/v1/tasks/init-rand", json={"init": "random", "num_virtual_tokens": 3, "seed": 1})
        r2 = c.put("/v1/tasks/init-rand", json={"init": "random", "num_virtual_tokens": 3, "seed": 1})
        assert (r1.status_code, r2.status_code) == (201, 200) and r1.json()["version"] == r2.json()["version"]
        r = c.put("/v1/tasks/init-vocab", json={"init": "sample_vocab", "num_virtual_tokens": 7})
        assert r.status_code == 201 and r.json()["task_type"] == "CAUSAL_LM"
        listed = c.get("/v1/tasks", params={"prefix": "init-"}).json()
        assert [t["id"] for t in listed["tasks"]] == ["init-rand", "init-text", "init-vocab"]
        assert listed["total"] == 3
        page = c.get("/v1/tasks", params={"prefix": "init-", "limit": 1, "offset": 1}).json()
        assert [t["id"] for t in page["tasks"]] == ["init-text"] and page["total"] == 3
        shown = c.get("/v1/tasks/init-text").json()
        assert shown["num_virtual_tokens"] == 5 and shown["version"] and shown["num_bytes"] > 0
        gen = c.post("/generate", json={"task_id": "init-text", "inputs": "x", "parameters": {"max_new_tokens": 2}})
        assert gen.status_code == 200
        for task_id in ("init-text", "init-rand", "init-vocab"):
            assert c.delete(f"/v1/tasks/{task_id}").status_code == 204
        assert_error(c.get("/v1/tasks/init-text"), 404)
        assert_error(c.post("/generate", json={"task_id": "init-text", "inputs": "x"}), 404)
        assert c.get("/v1/tasks", params={"prefix": "init-"}).json()["total"] == 0
