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


async def held(engine, *request_ids: str) -> str:
    """Until the engine's worker waits inside a step that the fault injector holds for one of `request_ids`
    (each armed with `engine.fault_injector.hold`); returns which one."""
    request_id = await asyncio.to_thread(engine.fault_injector.wait_any_held, list(request_ids))
    assert request_id is not None, f"no step of {request_ids} was ever held"
    return request_id


def serve(model_dir: Path, store_dir: Path, config, client, dtype: str = "float32"):
    """Load the model, warm up and start an engine on the store, run `await client(engine)`, stop it;
    returns (engine, what the client returned)."""
    from prompt_store.store import PromptStore
    from server.engine.engine import Engine
    from server.engine.model_loader import load_model

    loaded = load_model(str(model_dir), device="cpu", dtype=dtype)
    engine = Engine(loaded, PromptStore(store_dir, token_dim=loaded.hidden_size, dtype=loaded.dtype), config)
    engine.warm_up()
    engine.start()
    try:
        return engine, run(client(engine))
    finally:
        engine.stop(grace_s=5)


SEQ2SEQ_FAMILIES = ("t5", "bart", "mbart", "plbart", "pegasus", "marian", "blenderbot", "blenderbot-small",
                    "m2m_100")
SEQ2SEQ_MAX_POSITIONS = 64  # BART-like tables: small, so the limit tests stay cheap


def seq2seq_config(family: str, tokenizer):
    """The tiny test config of an encoder-decoder family: varied, peaked greedy choices."""
    config = model_config(family, tokenizer, hidden_size=64, num_layers=2, num_heads=4,
                          max_positions=SEQ2SEQ_MAX_POSITIONS)
    if family == "t5":
        # The demo T5 (initializer_factor 1, ReLU) answers its start token for every input; a gated-GELU
        # feed-forward and a wider init give varied, peaked greedy choices, so a wrong cache or mask shows.
        # (Untied embeddings are avoided: transformers 5 then unties the encoder's embedding from `shared`.)
        config.initializer_factor = 8.0
        config.feed_forward_proj, config.dense_act_fn, config.is_gated_act = "gated-gelu", "gelu_new", True
    else:
        config.init_std = 1.0  # varied greedy choices, as for T5
        config.scale_embedding = True  # as in mBART, Pegasus, Marian, Blenderbot checkpoints
    return config


@pytest.fixture(scope="session")
def seq2seq_model_dirs(tmp_path_factory) -> Callable[[str], Path]:
    """`seq2seq_model_dirs("bart")` -> a 2-layer encoder-decoder of that family with the demo tokenizer.

    The BART model also forces BOS as its first decoder token, as facebook/bart-large's config does.
    """
    built: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in built:
            import transformers as tf

            folder = tmp_path_factory.mktemp(f"engine-{family}")
            tokenizer = train_tokenizer(demo_corpus(), vocab_size=512)
            torch.manual_seed(0)
            model = tf.AutoModelForSeq2SeqLM.from_config(seq2seq_config(family, tokenizer))
            if family == "bart":
                model.generation_config.forced_bos_token_id = tokenizer.bos_token_id
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            built[family] = folder
        return built[family]

    return make


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    """A Unigram tokenizer with SentencePiece's Metaspace ('▁' marks a word start), as T5, mBART, Marian,
    Pegasus and NLLB use: unlike byte-level BPE, a decode drops the space of the first word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    tok.train_from_iterator(demo_corpus().splitlines(), trainer=trainers.UnigramTrainer(
        vocab_size=400, special_tokens=list(special.values()), unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)
