"""Stand-alone store of PEFT prompt-tuning adapters (soft prompts): load, validate, cache, write."""

from prompt_store.errors import InvalidPrompt, InvalidTaskId, PromptStoreError, TaskNotFound
from prompt_store.soft_prompt import CAUSAL_LM, SEQ_2_SEQ_LM, SoftPrompt

__all__ = [
    "CAUSAL_LM", "SEQ_2_SEQ_LM", "SoftPrompt",
    "InvalidPrompt", "InvalidTaskId", "PromptStoreError", "TaskNotFound",
]
