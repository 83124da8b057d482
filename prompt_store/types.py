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


@dataclass(frozen=True)
class StoreStats:
    """Counters since the store was opened, and the current fill of each tier."""

    hits: int
    misses: int
    loads: int
    load_errors: int
    not_found: int
    evictions: int
    device: TierStats
    host: TierStats
    pinned: int  # distinct (task, version) pairs held by in-flight requests
    pinned_bytes: int

    @property
    def device_bytes(self) -> int:
        """Bytes held by the device tier."""
        return self.device.num_bytes

    @property
    def device_entries(self) -> int:
        """Prompts held by the device tier."""
        return self.device.num_entries

    @property
    def host_bytes(self) -> int:
        """Bytes held by the host tier."""
        return self.host.num_bytes

    @property
    def host_entries(self) -> int:
        """Prompts held by the host tier."""
        return self.host.num_entries
