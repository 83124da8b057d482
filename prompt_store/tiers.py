"""One cache tier: an LRU of soft prompts bounded in bytes, that never evicts a pinned entry."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from prompt_store.folder_io import Signature
from prompt_store.soft_prompt import SoftPrompt
from prompt_store.types import TierStats


@dataclass(frozen=True)
class CacheEntry:
    """A cached prompt and the folder signature it was read from (for change detection)."""

    prompt: SoftPrompt
    signature: Signature | None


class LruTier:
    """Bytes-bounded LRU keyed by task id; not thread-safe (the store's lock guards it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._entries

    def get(self, task_id: str) -> CacheEntry | None:
        """The entry, marked most recently used; None if absent. O(1)."""
        entry = self._entries.get(task_id)
        if entry is not None:
            self._entries.move_to_end(task_id)
        return entry

    def peek(self, task_id: str) -> CacheEntry | None:
        """The entry without marking it used; None if absent."""
        return self._entries.get(task_id)

    def add(self, entry: CacheEntry) -> None:
        """Insert or replace as most recently used (call `evict` afterwards to restore the bound)."""
        self.pop(entry.prompt.task_id)
        self._entries[entry.prompt.task_id] = entry
        self.num_bytes += entry.prompt.num_bytes

    def pop(self, task_id: str) -> CacheEntry | None:
        """Remove and return the entry, if any."""
        entry = self._entries.pop(task_id, None)
        if entry is not None:
            self.num_bytes -= entry.prompt.num_bytes
        return entry

    def evict(self, is_pinned: Callable[[SoftPrompt], bool]) -> list[CacheEntry]:
        """Drop least recently used unpinned entries until within the bound; return them."""
        excess = self.num_bytes - self.max_bytes
        victims: list[CacheEntry] = []
        for entry in self._entries.values():  # oldest first; stops as soon as enough is freed
            if excess <= 0:
                break
            if not is_pinned(entry.prompt):
                victims.append(entry)
                excess -= entry.prompt.num_bytes
        for entry in victims:
            self.pop(entry.prompt.task_id)
        return victims

    def items(self) -> list[CacheEntry]:
        """A snapshot of the entries, oldest first."""
        return list(self._entries.values())

    def stats(self) -> TierStats:
        """Current fill."""
        return TierStats(len(self._entries), self.num_bytes, self.max_bytes)
