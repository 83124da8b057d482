"""Runtime: the loaded model, the prompt store and the engine of one app, built from Settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from server.config import Settings

log = logging.getLogger("promptserve")


@dataclass
class Runtime:
    """Everything a request handler needs; lives on `app.state.runtime` while the app is up."""

    settings: Settings
    loaded: Any  # server.engine.model_loader.LoadedModel
    store: Any  # prompt_store.PromptStore
    engine: Any  # server.engine.Engine
    model_name: str  # what the bare model answers to in the OpenAI API

    @property
    def tokenizer(self):
        """The served model's tokenizer."""
        return self.loaded.tokenizer

    @property
    def has_chat_template(self) -> bool:
        """True if /v1/chat/completions can render messages for this model."""
        return bool(getattr(self.loaded.tokenizer, "chat_template", None))

    def word_embeddings(self):
        """The model's input embedding module (TEXT and SAMPLE_VOCAB init read it)."""
        return self.loaded.model.get_input_embeddings()


def build_runtime(settings: Settings) -> Runtime:
    """Load the model, open the store, seed demo tasks, build the engine (not started). Blocking."""
    from prompt_store.store import PromptStore
    from server.engine.engine import Engine
    from server.engine.model_loader import load_model
    from server.model_source import locate, materialize
    from server.tasks_seed import seed_demo_tasks

    source = locate(settings.model)
    path = materialize(source, settings.demo_cache_dir)
    log.info("loading model %s (device=%s, dtype=%s)", path, settings.device, settings.dtype)
    loaded = load_model(path, device=settings.device, dtype=settings.dtype)
    settings.store.mkdir(parents=True, exist_ok=True)
    store = PromptStore(settings.store, token_dim=loaded.hidden_size, device=loaded.device, dtype=loaded.dtype,
                        max_device_bytes=settings.store_device_bytes, max_host_bytes=settings.store_host_bytes,
                        max_virtual_tokens=settings.max_virtual_tokens, check_on_use=settings.shared_store,
                        task_types=(loaded.task_type,))  # adapters of another type: 422 naming what fits
    if source.demo and settings.demo_tasks:
        seed_demo_tasks(store, loaded, source.demo)
    engine = Engine(loaded, store, engine_config(settings, loaded))
    return Runtime(settings=settings, loaded=loaded, store=store, engine=engine,
                   model_name=settings.model_name())


def engine_config(settings: Settings, loaded: Any):
    """The engine's limits from the settings (total tokens default to the model's context)."""
    from server.engine.config import EngineConfig

    table = loaded.max_positions
    if table is not None and loaded.is_encoder_decoder:
        table *= 2  # an encoder input and a decoder output, each up to the table's length
    max_total = settings.max_total_tokens or table or EngineConfig.max_total_tokens
    return EngineConfig(max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                        max_input_tokens=settings.max_input_tokens, max_new_tokens=settings.max_new_tokens,
                        max_total_tokens=max_total, kv_cache_memory=settings.kv_cache_memory,
                        prefill_chunk_tokens=settings.prefill_chunk_tokens,
                        max_stall_ratio=settings.max_stall_ratio, idle_prefill_tokens=settings.idle_prefill_tokens,
                        burst_wait_s=settings.burst_wait_ms / 1e3,
                        kv_block_tokens=settings.kv_block_tokens, prefix_caching=settings.prefix_caching,
                        compile=settings.compile,
                        prepack_weights=settings.prepack_weights, fair_share=settings.fair_share,
                        preempt_after_steps=settings.preempt_after_steps)
