"""Task ids: the one pattern a task id must match, and the only way an id becomes a path."""

from __future__ import annotations

import os
import re

from prompt_store.errors import InvalidTaskId

# No '/', no leading '.', no NUL: an id is always exactly one ordinary entry directly under the root.
TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_task_id(task_id: object) -> str:
    """Return `task_id` if it is a valid id, else raise InvalidTaskId (the message never echoes control bytes)."""
    if not isinstance(task_id, str) or TASK_ID_PATTERN.fullmatch(task_id) is None:
        shown = ascii(task_id)[:80]
        raise InvalidTaskId(
            f"task {shown}: invalid task id (must match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}$)"
        )
    return task_id


def is_inside(root_real: str, path: str) -> bool:
    """Whether `path`, with every symlink resolved, lies inside the (already resolved) root."""
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real + os.sep)


def task_path(root_real: str, task_id: str) -> str:
    """The folder of a (valid) task id; raises InvalidTaskId if a symlink leads it outside the root."""
    check_task_id(task_id)
    path = f"{root_real}/{task_id}"
    if os.path.islink(path) and not is_inside(root_real, path):
        raise InvalidTaskId(f"task {task_id!r}: the task folder is a symlink that points outside the store")
    return path
