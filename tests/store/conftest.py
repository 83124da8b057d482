"""Fixtures for the prompt store tests: a store on a temp root, tiny models, PEFT adapters saved by PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prompt_store import PromptStore

TOKEN_DIM = 64  # hidden size of the tiny models from tests/conftest.py


@pytest.fixture
def make_store(tmp_path):
    """`make_store(**kwargs)` -> a PromptStore on a fresh root (token_dim 64 unless given)."""

    def make(root: Path | None = None, **kwargs) -> PromptStore:
        kwargs.setdefault("token_dim", TOKEN_DIM)
        return PromptStore(root or tmp_path / "store", **kwargs)

    return make


@pytest.fixture
def store(make_store) -> PromptStore:
    """A store with default limits on a fresh root."""
    return make_store()


def _load_base(folder: Path, *, seq2seq: bool = False) -> torch.nn.Module:
    """A fresh copy of a tiny model (PEFT wraps models in place, so each use loads its own)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    return cls.from_pretrained(folder).eval()


def _peft_saved_adapter(base_dir: Path, out: Path, *, task_type: str, num_virtual_tokens: int, seed: int = 0,
                        safe: bool = True, **config) -> torch.Tensor:
    """Save a PROMPT_TUNING adapter with PEFT itself; return the full saved prompt tensor."""
    from peft import PromptTuningConfig, get_peft_model

    base = _load_base(base_dir, seq2seq=task_type == "SEQ_2_SEQ_LM")
    torch.manual_seed(seed)
    peft_config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens, **config)
    model = get_peft_model(base, peft_config)
    model.save_pretrained(out, safe_serialization=safe)
    return model.get_prompt_embedding_to_save("default").detach().clone()


@pytest.fixture
def load_base():
    """`load_base(model_dir, seq2seq=False)` -> a fresh tiny base model."""
    return _load_base


@pytest.fixture
def peft_saved_adapter():
    """`peft_saved_adapter(model_dir, out, task_type=..., num_virtual_tokens=...)`: PEFT's own save_pretrained."""
    return _peft_saved_adapter
