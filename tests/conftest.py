"""Shared fixtures: tiny models built from config, saved and loaded like a user's model folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from server.demo import build_model_folder

# Servers started by tests (in process or as subprocesses, which inherit this) run the model step
# eagerly: compiling costs tens of seconds per server. The compiled step has its own tests.
os.environ.setdefault("PROMPTSERVE_COMPILE", "false")


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
