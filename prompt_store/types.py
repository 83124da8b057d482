"""Named results the store hands across its boundary: TaskInfo (one listed task) and StoreStats."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """One task as listed from disk (no tensor loaded)."""

    task_id: str
    version: str  # same content hash as SoftPrompt.version; "" when `error` is set
    num_virtual_tokens: int
    task_type: str
    num_bytes: int  # bytes on disk: config + weights file
    created: float  # epoch seconds (the weights file's ctime on first sight; see notes)
    modified: float  # epoch seconds, the newest mtime of the two files
    error: str | None = None  # why the folder is not a servable adapter, if it is not


@dataclass(frozen=True)
class TierStats:
    """Fill of one cache tier."""

    num_entries: int
    num_bytes: int
    max_bytes: int


@dataclass
class StoreCounters:
    """What the store has counted since it was opened (the cache counts under its lock)."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_errors: int = 0
    not_found: int = 0
    evictions: int = 0  # entries that left memory altogether (host tier full)


@dataclass(kw_only=True)
class StoreStats(StoreCounters):
    """A snapshot: the counters since the store was opened, and the current fill of each tier."""

    device: TierStats
    host: TierStats
    pinned: int  # distinct (task, version) pairs held by in-flight requests
    pinned_bytes: int
