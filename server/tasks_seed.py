"""The two demo tasks created by TEXT init when the server runs the embedded demo model."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prompt_store.errors import TaskNotFound

log = logging.getLogger("promptserve")


@dataclass(frozen=True)
class DemoTask:
    """A task made from an init text (PEFT's PromptTuningInit.TEXT)."""

    task_id: str
    text: str
    num_virtual_tokens: int


DEMO_TASKS = (
    DemoTask("demo-poet", "Write a short poem about the sea and the wind.", 8),
    DemoTask("demo-support", "You are a polite support agent. Answer the customer briefly.", 12),
)


def seed_demo_tasks(store, loaded) -> list[str]:
    """Create each demo task that is missing; existing ones (maybe edited by the user) are kept."""
    created = []
    for task in DEMO_TASKS:
        try:
            store.info(task.task_id)
            continue
        except TaskNotFound:
            pass
        store.create_text(task.task_id, task.text, num_virtual_tokens=task.num_virtual_tokens,
                          tokenizer=loaded.tokenizer, word_embeddings=loaded.model.get_input_embeddings())
        created.append(task.task_id)
    if created:
        log.info("created demo tasks: %s", ", ".join(created))
    return created
