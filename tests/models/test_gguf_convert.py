"""A GGUF file of another architecture than the default model's (Qwen2, with q/k/v biases and untied
output), written here from a tiny model with the gguf package's writer, converts back to that model:
the same weights, the same logits, the same tokens for a text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from server.demo import demo_corpus, train_tokenizer
from server.model_source import locate, materialize

NUM_LAYERS = 2


def _tiny_qwen2(tokenizer):
    import transformers as tf

    config = tf.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def _write_gguf(path: Path, model, tokenizer) -> Path:
    """What llama.cpp's converter writes for a Qwen2 model in float32: hyper-parameters, a byte-level BPE
    tokenizer (tokens in id order, merges), tensors under GGUF's standard names."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        module, suffix = key.rsplit(".", 1)
        writer.add_tensor(f"{names.get_name(module)}.{suffix}", tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_qwen2_gguf_converts_to_the_same_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = train_tokenizer(demo_corpus(), vocab_size=512)
    model = _tiny_qwen2(tokenizer)
    gguf_file = _write_gguf(tmp_path / "tiny-qwen2.gguf", model, tokenizer)
    folder = Path(materialize(locate(str(gguf_file)), tmp_path / "cache"))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(converted).__name__ == "Qwen2ForCausalLM"
    expected, got = model.state_dict(), converted.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    text = "The sea was calm and the wind was soft."
    ids = tokenizer(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == ids[1:]  # the same, without our BOS
    with torch.inference_mode():
        batch = torch.tensor([ids])
        assert torch.equal(converted(batch).logits, model(batch).logits)
