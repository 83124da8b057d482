"""Every validation rule of the store, each with a failing input: ids, paths, config, tensor, file formats."""

from __future__ import annotations

import io
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from prompt_store import InvalidPrompt, InvalidTaskId, TaskNotFound


def write_adapter(folder, tensor, **config_overrides):
    """A hand-made PEFT folder (config + safetensors) so every field can be broken on purpose."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": tensor.shape[0],
              "token_dim": 64, "num_transformer_submodules": 1}
    config.update(config_overrides)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(st_save({"prompt_embeddings": tensor}))


BAD_IDS = ["", "..", ".", "../x", "a/b", "/etc", "/abs/path", "%2e%2e", "a\x00b", ".hidden", "-lead",
           "x" * 129, "sp ace", "ü", "a\\b", "a\nb", 5, None]


@pytest.mark.parametrize("task_id", BAD_IDS, ids=[ascii(t)[:20] for t in BAD_IDS])
def test_bad_task_ids_are_refused_everywhere(store, task_id):
    for call in (store.get, store.acquire, store.delete, store.info,
                 lambda t: store.put(t, torch.zeros(2, 64)),
                 lambda t: store.put_adapter_files(t, b"{}", b"")):
        with pytest.raises(InvalidTaskId) as err:
            call(task_id)
        assert "\x00" not in str(err.value)
    assert os.listdir(store.root) == []


def test_decoded_dot_dot_is_refused(store):
    from urllib.parse import unquote
    with pytest.raises(InvalidTaskId):
        store.get(unquote("%2e%2e"))


def test_good_ids_are_accepted(store):
    for task_id in ("a", "A9", "x" * 128, "with.dots_and-dash", "a..b"):
        assert store.put(task_id, torch.ones(1, 64)).task_id == task_id


def test_symlinked_task_folder_outside_root_is_refused(store, tmp_path):
    outside = tmp_path / "outside"
    write_adapter(outside, torch.ones(2, 64))
    (store.root / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidTaskId, match="outside"):
        store.get("evil")
    assert [info.task_id for info in store.list()] == []


def test_symlinked_file_outside_root_is_refused(store, tmp_path):
    write_adapter(tmp_path / "outside", torch.ones(2, 64))
    folder = store.root / "evil"
    write_adapter(folder, torch.ones(2, 64))
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").symlink_to(tmp_path / "outside" / "adapter_model.safetensors")
    with pytest.raises(InvalidPrompt, match="outside"):
        store.get("evil")


def test_symlink_inside_root_is_served(store):
    store.put("real", torch.ones(2, 64))
    (store.root / "alias").symlink_to(store.root / "real", target_is_directory=True)
    assert torch.equal(store.get("alias").embeddings, torch.ones(2, 64))


def test_missing_task_and_missing_files(store):
    with pytest.raises(TaskNotFound, match="'nope'"):
        store.get("nope")
    (store.root / "empty").mkdir()
    with pytest.raises(InvalidPrompt, match="adapter_config.json: missing"):
        store.get("empty")
    (store.root / "empty" / "adapter_config.json").write_text("{}")
    with pytest.raises(InvalidPrompt, match="no weights file"):
        store.get("empty")


CONFIG_CASES = {
    "peft_type": ({"peft_type": "LORA"}, "peft_type"),
    "task_type": ({"task_type": "SEQ_CLS"}, "task_type"),
    "n_not_int": ({"num_virtual_tokens": "3"}, "num_virtual_tokens"),
    "token_dim": ({"token_dim": 32}, "token_dim 32"),
    "submodules": ({"num_transformer_submodules": 3}, "num_transformer_submodules"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_fields(store, case):
    overrides, reason = CONFIG_CASES[case]
    write_adapter(store.root / "t", torch.ones(3, 64), **overrides)
    with pytest.raises(InvalidPrompt, match=reason) as err:
        store.get("t")
    assert "'t'" in str(err.value) and "adapter_config.json" in str(err.value)
    assert str(store.root) not in str(err.value)  # no server paths in messages


TENSOR_CASES = {
    "three_dims": (torch.ones(3, 64, 1), {}, "3 dimensions"),
    "columns": (torch.ones(3, 32), {}, "32 columns"),
    "rows": (torch.ones(4, 64), {"num_virtual_tokens": 3}, "4 rows"),
    "seq2seq_rows": (torch.ones(3, 64), {"task_type": "SEQ_2_SEQ_LM", "num_transformer_submodules": None},
                     "expected num_virtual_tokens"),
    "nan": (torch.tensor([[float("nan")] * 64]), {}, "NaN or infinite"),
    "inf": (torch.tensor([[float("inf")] * 64]), {}, "NaN or infinite"),
    "integer": (torch.ones(3, 64, dtype=torch.int32), {}, "floating-point"),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_bad_tensors(store, case):
    tensor, overrides, reason = TENSOR_CASES[case]
    overrides.setdefault("num_virtual_tokens", 3 if tensor.dim() != 2 else tensor.shape[0])
    write_adapter(store.root / "t", tensor, **overrides)
    with pytest.raises(InvalidPrompt, match=reason) as err:
        store.get("t")
    assert "adapter_model.safetensors" in str(err.value)


def test_missing_key(store):
    write_adapter(store.root / "t", torch.ones(2, 64))
    (store.root / "t" / "adapter_model.safetensors").write_bytes(st_save({"other": torch.ones(2, 64)}))
    with pytest.raises(InvalidPrompt, match="prompt_embeddings"):
        store.get("t")


def test_too_many_virtual_tokens_and_too_large_file(make_store):
    store = make_store(max_virtual_tokens=4, max_file_bytes=2000)
    write_adapter(store.root / "long", torch.ones(5, 64))
    with pytest.raises(InvalidPrompt, match="more than the limit 4"):
        store.get("long")
    with pytest.raises(InvalidPrompt, match="virtual tokens"):
        store.put("long2", torch.ones(5, 64))
    write_adapter(store.root / "big", torch.ones(4, 64, dtype=torch.float64))  # ~2.1 kB > 2000 bytes
    with pytest.raises(InvalidPrompt, match="more than the limit 2000"):
        store.get("big")


def test_invalid_json_and_broken_safetensors(store):
    write_adapter(store.root / "j", torch.ones(2, 64))
    (store.root / "j" / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidPrompt, match="not valid JSON"):
        store.get("j")
    write_adapter(store.root / "cut", torch.ones(2, 64))
    path = store.root / "cut" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InvalidPrompt, match="cannot be read"):
        store.get("cut")
    write_adapter(store.root / "junk", torch.ones(2, 64))
    (store.root / "junk" / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidPrompt, match="cannot be read"):
        store.get("junk")
    assert store.stats().load_errors == 3


class _Exploit:
    """Unpickling this would run code: weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_bin_with_code_is_refused_and_never_runs(store, tmp_path):
    marker = str(tmp_path / "pwned")
    write_adapter(store.root / "evil", torch.ones(2, 64))
    (store.root / "evil" / "adapter_model.safetensors").unlink()
    payload = io.BytesIO()
    torch.save({"prompt_embeddings": torch.ones(2, 64), "x": _Exploit(marker)}, payload)
    (store.root / "evil" / "adapter_model.bin").write_bytes(payload.getvalue())
    with pytest.raises(InvalidPrompt, match="adapter_model.bin: cannot be read"):
        store.get("evil")
    raw_pickle = pickle.dumps(_Exploit(marker))
    with pytest.raises(InvalidPrompt, match="adapter_model.bin"):
        store.put_adapter_files("evil2", (store.root / "evil" / "adapter_config.json").read_bytes(),
                                raw_pickle, "adapter_model.bin")
    assert not os.path.exists(marker)
    assert not (store.root / "evil2").exists()


def test_upload_is_validated_before_anything_is_written(store):
    good_config = json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                              "num_virtual_tokens": 2, "token_dim": 64}).encode()
    good_weights = st_save({"prompt_embeddings": torch.ones(2, 64)})
    with pytest.raises(InvalidPrompt, match="adapter_config.json"):
        store.put_adapter_files("up", b"[]", good_weights)
    with pytest.raises(InvalidPrompt, match="weights file must be named"):
        store.put_adapter_files("up", good_config, good_weights, "model.pt")
    with pytest.raises(InvalidPrompt, match="3 rows"):
        store.put_adapter_files("up", good_config, st_save({"prompt_embeddings": torch.ones(3, 64)}))
    assert os.listdir(store.root) == []
    prompt = store.put_adapter_files("up", good_config, st_save({"prompt_embeddings": torch.ones(2, 64)},
                                                                metadata={"promptserve_version": "forged", "a": "b"}))
    stored = (store.root / "up" / "adapter_model.safetensors").read_bytes()
    assert stored.endswith(torch.ones(2, 64).numpy().tobytes())  # the tensor bytes as uploaded
    with safe_open(store.root / "up" / "adapter_model.safetensors", "pt") as f:  # the header's version is the store's
        assert f.metadata()["promptserve_version"] == prompt.version != "forged" and f.metadata()["a"] == "b"
        assert torch.equal(f.get_tensor("prompt_embeddings"), torch.ones(2, 64))
    assert store.get("up").version == prompt.version


def test_put_validates_the_tensor(store):
    for bad, reason in [(torch.ones(2, 32), "shape"), (torch.ones(64), "shape"), (torch.zeros(0, 64), "0 virtual"),
                        (torch.full((1, 64), float("nan")), "NaN"), ([[1.0] * 64], "tensor"),
                        (torch.ones(1, 64, dtype=torch.long), "floating")]:
        with pytest.raises(InvalidPrompt, match=reason):
            store.put("p", bad)
    with pytest.raises(InvalidPrompt, match="task_type"):
        store.put("p", torch.ones(1, 64), task_type="SEQ_CLS")
    assert os.listdir(store.root) == []


def test_fp16_store_refuses_values_that_overflow(make_store):
    store = make_store(dtype=torch.float16)
    with pytest.raises(InvalidPrompt, match="overflow"):
        store.put("big", torch.full((1, 64), 1e6))
    prompt = store.put("ok", torch.ones(1, 64))
    assert prompt.embeddings.dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_store_dtype_cast_matches_torch(make_store, dtype):
    writer = make_store()
    values = torch.randn(16, 64) * 100
    writer.put("a", values)
    prompt = make_store(dtype=dtype).get("a")
    assert prompt.embeddings.dtype == dtype
    assert torch.equal(prompt.embeddings, values.to(dtype))


def test_import_folder_checks_before_reading(make_store, tmp_path):
    store = make_store(max_file_bytes=2000)
    write_adapter(tmp_path / "big", torch.ones(4, 64, dtype=torch.float64))
    with pytest.raises(InvalidPrompt, match="more than the limit 2000"):
        store.import_folder("big", tmp_path / "big")
    with pytest.raises(InvalidPrompt, match="needed"):
        store.import_folder("none", tmp_path / "missing")
    write_adapter(tmp_path / "ok", torch.ones(2, 64))
    assert store.import_folder("ok", tmp_path / "ok").num_virtual_tokens == 2
    assert os.listdir(store.root) == ["ok"]
