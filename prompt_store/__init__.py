"""Stand-alone store of PEFT prompt-tuning adapters (soft prompts): load, validate, cache, write."""

from prompt_store.errors import InvalidPrompt, InvalidTaskId, PromptStoreError, TaskNotFound
from prompt_store.soft_prompt import CAUSAL_LM, SEQ_2_SEQ_LM, SoftPrompt
from prompt_store.store import PromptStore
from prompt_store.task_ids import TASK_ID_PATTERN, check_task_id
from prompt_store.types import StoreStats, TaskInfo, TierStats

__all__ = [
    "CAUSAL_LM", "SEQ_2_SEQ_LM", "SoftPrompt", "PromptStore", "TaskInfo", "StoreStats", "TierStats",
    "TASK_ID_PATTERN", "check_task_id",
    "InvalidPrompt", "InvalidTaskId", "PromptStoreError", "TaskNotFound",
]
