"""Shared fixtures: tiny models built from config, saved and loaded like a user's model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from server.demo import build_model_folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., Path]:
    """`tiny_model_dir("llama")` -> a folder with a tiny model and tokenizer, built once per session."""
    built: dict[tuple, Path] = {}

    def make(family: str = "llama", **size) -> Path:
        key = (family, tuple(sorted(size.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp(f"model-{family}")
            built[key] = build_model_folder(folder, family=family, **size)
        return built[key]

    return make
