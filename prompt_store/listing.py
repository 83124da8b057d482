"""Scanning a store at scale: one scandir plus two stats per task; files are read only for new or changed folders.

The index remembers, per task, the folder signature (inode, size, mtime of both files) and the TaskInfo
built from it. A folder whose signature is unchanged is not opened again, so a scan at 100,000 tasks
costs about 200,000 stat calls (task_list.py runs one only when something may have changed). Store-written
weights carry their version in the safetensors header, so a new folder costs two small reads; a folder
written by PEFT is hashed in full once. What is known is saved now and then to `<root>/.promptserve/index.json`
(index_file.py), so a new process's first list() also needs only the stats.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import time

from prompt_store.errors import PromptStoreError, TaskNotFound
from prompt_store.folder_io import Signature, read_folder, stat_signature
from prompt_store.index_file import load_index, save_index
from prompt_store.peft_format import (
    CONFIG_NAME, CREATED_META_KEY, SAFETENSORS_NAME, VERSION_META_KEY, WEIGHTS_KEY, Limits, parse_config,
    parse_weights, version_of,
)
from prompt_store.task_ids import TASK_ID_PATTERN, is_inside
from prompt_store.types import TaskInfo

_MAX_HEADER_BYTES = 1 << 20
_SAVE_AFTER_READS = 1000
_SAVE_EVERY_S = 30.0


def read_safetensors_metadata(path: str) -> dict:
    """The `__metadata__` of a safetensors file's header (no tensor data is read); {} if absent or unreadable."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(8)
            (size,) = struct.unpack("<Q", start)
            return metadata_from_bytes(start + handle.read(min(size, _MAX_HEADER_BYTES)))
    except (OSError, struct.error):
        return {}


def metadata_from_bytes(data: bytes) -> dict:
    """The `__metadata__` (plus the prompt tensor's shape as `_shape`) of safetensors bytes; {} if unreadable."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        if size > _MAX_HEADER_BYTES:
            return {}
        header = json.loads(data[8:8 + size])
    except (ValueError, struct.error, RecursionError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    shape = header.get(WEIGHTS_KEY, {}).get("shape") if isinstance(header, dict) else None
    return dict(meta, _shape=shape) if isinstance(meta, dict) else {}


class TaskIndex:
    """Signature-keyed metadata of every task folder seen; thread-safe."""

    def __init__(self, root_real: str, limits: Limits) -> None:
        self._root = root_real
        self._limits = limits
        self._known: dict[str, tuple[Signature, TaskInfo]] = {}
        self._lock = threading.Lock()
        self._is_hint_loaded = False
        self._num_read = 0  # folders read since the hint file was last saved
        self._saved_at = float("-inf")

    def remember(self, task_id: str, signature: Signature | None, info: TaskInfo) -> None:
        """Record what a load or a write learned, so listing need not read the folder again."""
        with self._lock:
            if signature is None:
                self._known.pop(task_id, None)
            else:
                self._known[task_id] = (signature, info)

    def forget(self, task_id: str) -> None:
        """Drop a deleted task."""
        with self._lock:
            self._known.pop(task_id, None)

    def info(self, task_id: str) -> TaskInfo:
        """TaskInfo of one task from disk (stat, and reads only if changed); TaskNotFound if absent."""
        signature = stat_signature(self._root, task_id)
        if signature is None:
            if os.path.isdir(os.path.join(self._root, task_id)):
                return self._broken(task_id, "adapter_config.json or the weights file is missing")
            raise TaskNotFound(f"task {task_id!r}: not found in the store")
        return self._info_for(task_id, signature)

    def scan(self) -> tuple[list[TaskInfo], dict[str, Signature]]:
        """Every task folder's TaskInfo (sorted by id) and current signature."""
        with os.scandir(self._root) as entries:  # d_type answers is_dir/is_symlink without a stat
            found = [(e.name, e.is_symlink()) for e in entries if e.is_dir() and TASK_ID_PATTERN.fullmatch(e.name)]
        found.sort()
        known = self._snapshot()
        infos: list[TaskInfo] = []
        signatures: dict[str, Signature] = {}
        for name, is_link in found:
            if is_link and not is_inside(self._root, f"{self._root}/{name}"):
                continue  # never reported, never served
            signature = stat_signature(self._root, name)
            if signature is None:
                infos.append(self._broken(name, "adapter_config.json or the weights file is missing"))
                continue
            signatures[name] = signature
            entry = known.get(name)
            infos.append(entry[1] if entry is not None and entry[0] == signature else self._info_for(name, signature))
        with self._lock:  # forget folders that are gone, so the index stays as large as the store
            for gone in self._known.keys() - signatures.keys():
                del self._known[gone]
        self._maybe_save()
        return infos, signatures

    def _snapshot(self) -> dict[str, tuple[Signature, TaskInfo]]:
        """A copy of what is known, seeded once from the hint file another process may have left."""
        if not self._is_hint_loaded:
            hint = load_index(self._root, self._limits)
            with self._lock:
                for task_id, entry in hint.items():
                    self._known.setdefault(task_id, entry)
                self._is_hint_loaded = True
        with self._lock:
            return dict(self._known)

    def _maybe_save(self) -> None:
        """Write the hint file after many new reads, or now and then; it costs a second or so at 100k tasks."""
        now = time.monotonic()
        if self._num_read and (self._num_read >= _SAVE_AFTER_READS or now - self._saved_at >= _SAVE_EVERY_S):
            with self._lock:
                known, self._num_read, self._saved_at = dict(self._known), 0, now
            save_index(self._root, self._limits, known)

    def _info_for(self, task_id: str, signature: Signature) -> TaskInfo:
        with self._lock:
            known = self._known.get(task_id)
        if known is not None and known[0] == signature:
            return known[1]
        try:
            info = self._read_info(task_id, signature)
        except PromptStoreError as exc:
            info = self._broken(task_id, str(exc), signature)
        self.remember(task_id, signature, info)
        self._num_read += 1
        return info

    def _read_info(self, task_id: str, signature: Signature) -> TaskInfo:
        folder = os.path.join(self._root, task_id)
        with open(os.path.join(folder, CONFIG_NAME), "rb") as handle:
            config = parse_config(task_id, handle.read(), self._limits)
        meta = {}
        if signature.weights_name == SAFETENSORS_NAME:
            meta = read_safetensors_metadata(os.path.join(folder, SAFETENSORS_NAME))
        version = meta.get(VERSION_META_KEY)
        expected_shape = [config.num_virtual_tokens * config.num_transformer_submodules, self._limits.token_dim]
        if not isinstance(version, str) or meta.get("_shape") != expected_shape:
            raw = read_folder(self._root, task_id, self._limits.max_file_bytes)  # written by PEFT: hash once
            version = version_of(parse_weights(task_id, raw.weights_name, raw.weights_bytes, config, self._limits))
        return make_info(task_id, signature, version, config.task_type, config.num_virtual_tokens, meta)

    def _broken(self, task_id: str, reason: str, signature: Signature | None = None) -> TaskInfo:
        modified = _modified(signature) if signature else 0.0
        size = signature.config.size + signature.weights.size if signature else 0
        return TaskInfo(task_id, "", 0, "", size, modified, modified, error=reason)


def _modified(signature: Signature) -> float:
    return max(signature.config.mtime_ns, signature.weights.mtime_ns) / 1e9


def make_info(task_id: str, signature: Signature, version: str, task_type: str, num_virtual_tokens: int,
              meta: dict) -> TaskInfo:
    """TaskInfo from a signature; `created` comes from the store's header metadata when present."""
    modified = _modified(signature)
    try:
        created = float(meta.get(CREATED_META_KEY, ""))
    except (ValueError, TypeError):
        created = math.nan
    if not 0 <= created:  # NaN too: a header the store did not write (the store rewrites uploaded ones)
        created = min(signature.config.mtime_ns, signature.weights.mtime_ns) / 1e9
    size = signature.config.size + signature.weights.size
    created = min(created, modified)  # file times can be coarser than the clock that stamped `created`
    return TaskInfo(task_id, version, num_virtual_tokens, task_type, size, created, modified)
