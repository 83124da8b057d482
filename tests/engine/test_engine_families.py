"""Every causal family the engine accepts, on the path it takes: a mixed batch of tasks against PEFT alone
(greedy tokens identical, logits within 1e-4), each a tiny random model built from its config. The path
each family takes is pinned here, so the README's table of them stays true."""

from __future__ import annotations

import pytest
import torch

from server.demo import demo_corpus, train_tokenizer
from server.engine.config import EngineConfig
from tests.engine.model_families import FAMILIES, family_config
from tests.engine.test_engine_parity import _check_parity

# The families the paged path cannot express, served exactly by the legacy DynamicCache path (transformers
# 5.23): BLOOM's, Falcon's and GPT-J's attention modules compute attention themselves (ALiBi for BLOOM and
# Falcon-ALiBi) and never call transformers' AttentionInterface; StableLM's does, but its decoder layer drops
# the forward keywords (the glue's marker among them) instead of passing them on to it. Sliding windows
# (Mistral, Qwen2) and soft-capping with alternating windows (Gemma 2) take the paged path.
LEGACY = {"bloom": "ALiBi, no AttentionInterface", "falcon_alibi": "ALiBi, no AttentionInterface",
          "gptj": "no AttentionInterface", "falcon": "no AttentionInterface",
          "stablelm": "decoder layer drops the attention keywords"}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(demo_corpus(), vocab_size=512)


def _model_dir(name: str, tokenizer, folder, **overrides):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(family_config(name, tokenizer, **overrides))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_matches_peft_alone(name, tokenizer, tmp_path):
    engine = _check_parity(_model_dir(name, tokenizer, tmp_path / "model"), tmp_path, EngineConfig(max_batch_size=16))
    assert engine.describe()["engine"] == ("legacy" if name in LEGACY else "paged"), engine.describe()
