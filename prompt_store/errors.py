"""Typed errors of the prompt store; the server maps each to one HTTP status."""


class PromptStoreError(Exception):
    """Base class: every message names the task, the file where relevant, and the reason."""


class InvalidTaskId(PromptStoreError):
    """The task id is malformed or would reach outside the store's root."""


class TaskNotFound(PromptStoreError):
    """No adapter is stored under this task id."""


class InvalidPrompt(PromptStoreError):
    """The adapter exists but its files are not a valid prompt-tuning adapter for this model."""
