"""`<root>/.promptserve/index.json`: a hint that lets a new process list a big store without opening every folder.

It maps each task to the folder signature and TaskInfo last seen. It is only a hint: every entry is
checked against a fresh stat before use, a missing, stale or corrupt file just means folders are read
again, and it is replaced atomically (temp file + rename) so readers never see half of it. It lives in a
sub-folder so that saving it never changes the root folder's mtime, which task_list.py watches.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid

from prompt_store.folder_io import TMP_PREFIX, FileStamp, Signature
from prompt_store.peft_format import Limits
from prompt_store.types import TaskInfo

INDEX_DIR = ".promptserve"  # starts with ".": never a task id, never listed
INDEX_NAME = "index.json"
_STALE_TMP_S = 600.0  # a temp file this old was left by a crashed writer
_FORMAT = 1

Known = dict[str, tuple[Signature, TaskInfo]]


def _header(limits: Limits) -> dict:
    # Validity depends on the limits, so an index made under other limits is not trusted.
    return {"format": _FORMAT, "token_dim": limits.token_dim, "max_virtual_tokens": limits.max_virtual_tokens}


def index_path(root_real: str | os.PathLike) -> str:
    """Where the hint file of a store lives."""
    return os.path.join(root_real, INDEX_DIR, INDEX_NAME)


def load_index(root_real: str, limits: Limits) -> Known:
    """The entries of the hint file; {} if it is absent, unreadable or made under other limits."""
    try:
        with open(index_path(root_real), "rb") as handle:
            data = json.loads(handle.read())
        if {k: data.get(k) for k in _header(limits)} != _header(limits):
            return {}
        known: Known = {}
        for task_id, (ci, cs, cm, wi, ws, wm, name, version, n, task_type, size, created, modified) in \
                data["tasks"].items():
            if not math.isfinite(created) or not math.isfinite(modified):
                continue  # an entry of an older version that trusted a header's time: read again
            signature = Signature(FileStamp(ci, cs, cm), FileStamp(wi, ws, wm), name)
            known[task_id] = (signature, TaskInfo(task_id, version, n, task_type, size, created, modified))
        return known
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def save_index(root_real: str, limits: Limits, known: Known) -> None:
    """Replace the hint file with these entries (broken tasks left out); failures are ignored."""
    tasks = {
        task_id: [*sig.config, *sig.weights, sig.weights_name, info.version, info.num_virtual_tokens,
                  info.task_type, info.num_bytes, info.created, info.modified]
        for task_id, (sig, info) in known.items() if info.error is None
    }
    folder = os.path.join(root_real, INDEX_DIR)
    tmp = os.path.join(folder, f"{TMP_PREFIX}index.{uuid.uuid4().hex}")
    try:
        # Made on the first save: that once changes the root's mtime (one more rescan), later saves do not.
        os.makedirs(folder, exist_ok=True)
        _drop_stale_temps(folder)
        with open(tmp, "w") as handle:
            json.dump({**_header(limits), "tasks": tasks}, handle, separators=(",", ":"))
        os.replace(tmp, index_path(root_real))
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _drop_stale_temps(folder: str) -> None:
    """Remove temp files that crashed writers left (a young one may be another process's save in progress)."""
    now = time.time()
    with os.scandir(folder) as entries:
        stale = [e.path for e in entries
                 if e.name.startswith(TMP_PREFIX) and now - e.stat(follow_symlinks=False).st_mtime > _STALE_TMP_S]
    for path in stale:
        try:
            os.unlink(path)
        except OSError:
            pass
