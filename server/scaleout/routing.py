"""Which task a request is for, read the way each API names it: the multiplexed model id that sends it to
a replica already holding the task. No task (bare model, health, listings): any replica. And which
requests may be sent again when their replica dies before taking them up."""

from __future__ import annotations

import json

_BODY_FIELDS = {"/generate": ("task_id", "adapter_id"), "/generate_stream": ("task_id", "adapter_id"),
                "/v1/completions": ("model",), "/v1/chat/completions": ("model",)}
_TASKS_PREFIX = "/v1/tasks/"


def task_of(method: str, path: str, body: bytes) -> str:
    """The task id a request names, or "" (malformed bodies too: the replica answers them with a 4xx)."""
    if path.startswith(_TASKS_PREFIX) and "/" not in path[len(_TASKS_PREFIX):]:
        return path[len(_TASKS_PREFIX):]
    fields = _BODY_FIELDS.get(path)
    if method != "POST" or fields is None or not body:
        return ""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return ""
    if not isinstance(payload, dict):
        return ""
    parameters = payload.get("parameters") if isinstance(payload.get("parameters"), dict) else {}
    for name in fields:
        value = payload.get(name) or parameters.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


def is_retry_safe(method: str, path: str) -> bool:
    """Reads, and generation requests the engine has not admitted yet, change nothing: sending them to
    another replica is safe. Writes to the store may have happened."""
    return method in ("GET", "HEAD") or (method == "POST" and path in _BODY_FIELDS)
