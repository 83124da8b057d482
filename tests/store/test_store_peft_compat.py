"""Both directions with the real peft package: PEFT-saved folders are served as-is; store-written ones load in PEFT."""

from __future__ import annotations

import shutil

import pytest
import torch


CASES = [("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM")]


@pytest.mark.parametrize("family,task_type", CASES)
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_folder_saved_by_peft_is_served_as_is(tiny_model_dir, make_store, peft_saved_adapter, family, task_type,
                                              safe):
    store = make_store()
    saved = peft_saved_adapter(tiny_model_dir(family), store.root / "task-a", task_type=task_type,
                               num_virtual_tokens=5, safe=safe)
    prompt = store.get("task-a")
    # seq2seq files hold one block per transformer submodule (2 by default); only the first is served
    assert saved.shape[0] == (10 if task_type == "SEQ_2_SEQ_LM" else 5)
    assert prompt.task_type == task_type
    assert prompt.num_virtual_tokens == 5
    assert torch.equal(prompt.embeddings, saved[:5])
    assert [info.task_id for info in store.list()] == ["task-a"]
    assert store.list()[0].version == prompt.version


@pytest.mark.parametrize("family,task_type", CASES)
def test_folder_written_by_store_loads_in_peft(tiny_model_dir, store, family, task_type, load_base):
    from peft import PeftModel

    embeddings = torch.randn(6, 64)
    store.put("task-b", embeddings, task_type=task_type, base_model_name_or_path="tiny")
    base = load_base(tiny_model_dir(family), seq2seq=task_type == "SEQ_2_SEQ_LM")
    model = PeftModel.from_pretrained(base, store.root / "task-b")
    assert model.peft_config["default"].task_type == task_type
    loaded = model.get_prompt_embedding_to_save("default")
    assert torch.equal(loaded, embeddings)
    # and PEFT's forward really uses it: same logits as feeding cat(P, E(ids)) to the base model
    if task_type == "CAUSAL_LM":
        ids = torch.tensor([[1, 5, 9, 12]])
        with torch.no_grad():
            peft_logits = model(input_ids=ids).logits[:, 6:]
            embeds = torch.cat([embeddings[None], base.get_input_embeddings()(ids)], dim=1)
            ref = base(inputs_embeds=embeds).logits[:, 6:]
        torch.testing.assert_close(peft_logits, ref)


def test_store_round_trip_keeps_version(tiny_model_dir, make_store, tmp_path, peft_saved_adapter):
    store = make_store()
    peft_saved_adapter(tiny_model_dir("llama"), tmp_path / "trained", task_type="CAUSAL_LM", num_virtual_tokens=4)
    imported = store.import_folder("imported", tmp_path / "trained")
    copied = shutil.copytree(tmp_path / "trained", store.root / "copied")
    assert copied.exists()
    assert store.get("copied").version == imported.version == store.get("imported").version
    other = make_store()  # a second store on the same root reads the same version from disk
    assert other.get("imported").version == imported.version


def test_random_init_matches_peft(store):
    from peft import PromptTuningConfig
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7, token_dim=64,
                                num_transformer_submodules=1)
    words = torch.nn.Embedding(10, 64)
    torch.manual_seed(1234)
    expected = PromptEmbedding(config, words).embedding.weight
    prompt = store.create_random("r", num_virtual_tokens=7, seed=1234)
    assert torch.equal(prompt.embeddings, expected)
    assert store.create_random("r2", num_virtual_tokens=7).version != prompt.version  # unseeded: fresh


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", "SEQ_2_SEQ_LM"])
def test_sample_vocab_init_matches_peft(tiny_model_dir, store, task_type, load_base):
    from peft import PromptTuningConfig
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    base = load_base(tiny_model_dir("t5" if task_type == "SEQ_2_SEQ_LM" else "llama"),
                     seq2seq=task_type == "SEQ_2_SEQ_LM")
    words = base.get_input_embeddings()
    config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=9, token_dim=64,
                                num_transformer_submodules=1, prompt_tuning_init="SAMPLE_VOCAB")
    torch.manual_seed(99)
    expected = PromptEmbedding(config, words).embedding.weight
    prompt = store.create_sample_vocab("s", num_virtual_tokens=9, word_embeddings=words, seed=99,
                                       task_type=task_type)
    assert torch.equal(prompt.embeddings, expected)
    assert prompt.task_type == task_type


@pytest.mark.parametrize("text,n", [("Classify the sentiment of this review", 3), ("Hi", 11)],
                         ids=["truncated", "tiled"])
def test_text_init_matches_peft(tiny_model_dir, store, text, n, load_base):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoTokenizer

    folder = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = load_base(folder)
    prompt = store.create_text("t", text, num_virtual_tokens=n, tokenizer=tokenizer,
                               word_embeddings=base.get_input_embeddings())
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text=text, tokenizer_name_or_path=str(folder))
    expected = get_peft_model(base, config).get_prompt_embedding_to_save("default")
    assert torch.equal(prompt.embeddings, expected)
    assert len(tokenizer(text)["input_ids"]) != n  # the case really truncates or tiles

