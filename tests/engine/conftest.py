"""Engine test fixtures: tiny models with peaked logits, adapters written by real PEFT, a running engine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from server.demo import demo_corpus, model_config, train_tokenizer

FAMILIES = ("gpt2", "llama", "opt", "bloom")
# Random init at the usual 0.02 gives near-uniform logits, where a greedy argmax hangs on 1e-7 ties;
# a wider init makes the greedy choice meaningful (gaps of a unit or more between the top two logits).
INIT_STD = 0.2


def _set_init(config, std: float) -> None:
    for key in ("initializer_range", "init_std"):
        if hasattr(config, key):
            setattr(config, key, std)


@pytest.fixture(scope="session")
def engine_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    """`engine_model_dir("gpt2")` -> folder with a 2-layer model of that family and the demo tokenizer."""
    built: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in built:
            import transformers as tf

            folder = tmp_path_factory.mktemp(f"engine-{family}")
            tokenizer = train_tokenizer(demo_corpus(), vocab_size=512)
            config = model_config(family, tokenizer, hidden_size=64, num_layers=2, num_heads=4)
            _set_init(config, INIT_STD)
            torch.manual_seed(0)
            model = tf.AutoModelForCausalLM.from_config(config)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            built[family] = folder
        return built[family]

    return make


def write_peft_adapters(model_dir: Path, root: Path, num_virtual: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """One adapter folder per task under `root`, written by real PEFT (`PeftModel.save_pretrained`)."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = {}
    for i, (task_id, n) in enumerate(sorted(num_virtual.items())):
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        torch.manual_seed(seed + i)  # PromptTuningInit.RANDOM: N(0, 1) rows
        peft_model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
        folders[task_id] = root / task_id
        peft_model.save_pretrained(folders[task_id])
    return folders


def run(coro):
    """Run a coroutine to completion on a fresh event loop (tests stay plain functions)."""
    return asyncio.run(coro)


@pytest.fixture(scope="session")
def seq2seq_model_dir(tmp_path_factory) -> Path:
    """A 2-layer T5 with the demo tokenizer whose greedy outputs depend on the input and the prompt.

    The demo T5 (initializer_factor 1, ReLU) answers its start token for every input; a gated-GELU
    feed-forward and a wider init give varied, peaked greedy choices, so a wrong cache or mask shows.
    (Untied embeddings are avoided: transformers 5 then unties the encoder's embedding from `shared` too.)
    """
    import transformers as tf

    folder = tmp_path_factory.mktemp("engine-t5")
    tokenizer = train_tokenizer(demo_corpus(), vocab_size=512)
    config = model_config("t5", tokenizer, hidden_size=64, num_layers=2, num_heads=4)
    config.initializer_factor = 8.0
    config.feed_forward_proj, config.dense_act_fn, config.is_gated_act = "gated-gelu", "gelu_new", True
    torch.manual_seed(0)
    tf.AutoModelForSeq2SeqLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
