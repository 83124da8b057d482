"""The demo tasks, created in the store when missing: trained ones shipped for the default model, or two
made by TEXT init for the tiny random model (demo-tiny), where nothing can be trained to mean anything."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path

from prompt_store.errors import TaskNotFound
from server.model_source import DEFAULT, TINY

log = logging.getLogger("promptserve")

# PEFT folders trained on the default model by demo_tasks/train_demo_tasks.py (`promptserve train`).
TRAINED_TASKS = ("demo-sentiment", "demo-json")


@dataclass(frozen=True)
class DemoTask:
    """A task made from an init text (PEFT's PromptTuningInit.TEXT)."""

    task_id: str
    text: str
    num_virtual_tokens: int


TINY_TASKS = (
    DemoTask("demo-poet", "Write a short poem about the sea and the wind.", 8),
    DemoTask("demo-support", "You are a polite support agent. Answer the customer briefly.", 12),
)


def trained_task_folder(task_id: str) -> Path:
    """The shipped PEFT folder of a trained demo task (adapter_config.json, adapter_model.safetensors)."""
    return Path(str(resources.files("server").joinpath("data/demo_tasks", task_id)))


def seed_demo_tasks(store, loaded, demo: str) -> list[str]:
    """Create each demo task of `demo` (DEFAULT or TINY) that is missing; existing ones (maybe edited by
    the user) are kept."""
    created = []
    for task_id, make in _makers(store, loaded, demo).items():
        try:
            store.info(task_id)
            continue
        except TaskNotFound:
            make()
        created.append(task_id)
    if created:
        log.info("created demo tasks: %s", ", ".join(created))
    return created


def _makers(store, loaded, demo: str) -> dict[str, Callable[[], object]]:
    if demo == DEFAULT:
        return {task_id: partial(store.import_folder, task_id, trained_task_folder(task_id))
                for task_id in TRAINED_TASKS}
    assert demo == TINY, demo
    embeddings = loaded.model.get_input_embeddings()
    return {t.task_id: partial(store.create_text, t.task_id, t.text, num_virtual_tokens=t.num_virtual_tokens,
                               tokenizer=loaded.tokenizer, word_embeddings=embeddings) for t in TINY_TASKS}
