"""PrefixCache: each task's virtual-token keys and values, computed once and reused (causal models).

The KV of a task's n virtual tokens at positions 0..n-1 does not depend on the text after them, so the
first request of a task (and of each new version of it) computes it and every later request starts from
a copy. Entries are keyed by task id and version: a replaced task misses and its old entry is dropped; a
deleted one is dropped by `forget`. Bounded in bytes, least recently used first out. An entry is only
read while it is copied into a request's slot, so evicting it never affects a running request.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from server.engine.kv_pool import PrefixKV


@dataclass
class PrefixStats:
    """Counters for /metrics."""

    num_hits: int = 0
    num_misses: int = 0
    num_evictions: int = 0
    num_entries: int = 0
    num_bytes: int = 0


class PrefixCache:
    """task id -> (version, PrefixKV), LRU within `max_bytes` (0 disables it)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[str, PrefixKV]] = OrderedDict()
        self._num_bytes = 0
        self._stats = PrefixStats()
        self._lock = threading.Lock()  # `forget` comes from the event loop (task deleted) too
        # When each task was last forgotten: a prefix computed by a request submitted before then (it
        # pinned the old task) must not bring a deleted task back. One float per task ever forgotten.
        self._forgotten_at: dict[str, float] = {}

    def contains(self, task_id: str, version: str) -> bool:
        """Whether this version of the task is cached (not counted as a hit or a miss)."""
        with self._lock:
            entry = self._entries.get(task_id)
            return entry is not None and entry[0] == version

    @property
    def is_enabled(self) -> bool:
        """Whether anything can be cached."""
        return self.max_bytes > 0

    def get(self, task_id: str, version: str) -> PrefixKV | None:
        """The cached prefix of this version of the task (counted as a hit or a miss)."""
        with self._lock:
            return self._get(task_id, version)

    def _get(self, task_id: str, version: str) -> PrefixKV | None:
        entry = self._entries.get(task_id)
        if entry is not None and entry[0] != version:
            self._forget(task_id)
            entry = None
        if entry is None:
            self._stats.num_misses += 1
            return None
        self._entries.move_to_end(task_id)
        self._stats.num_hits += 1
        return entry[1]

    def put(self, task_id: str, version: str, prefix: PrefixKV, computed_since: float | None = None) -> None:
        """Keep `prefix` for this version of the task, evicting the least recently used to fit; not if the
        task was forgotten after `computed_since` (time.monotonic() when its request pinned the task)."""
        with self._lock:
            forgotten = self._forgotten_at.get(task_id)
            if computed_since is not None and forgotten is not None and forgotten >= computed_since:
                return
            self._put(task_id, version, prefix)

    def _put(self, task_id: str, version: str, prefix: PrefixKV) -> None:
        self._forget(task_id)
        if prefix.num_bytes > self.max_bytes:
            return
        while self._num_bytes + prefix.num_bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._num_bytes -= evicted.num_bytes
            self._stats.num_evictions += 1
        self._entries[task_id] = (version, prefix)
        self._num_bytes += prefix.num_bytes

    def forget(self, task_id: str) -> None:
        """Drop the task's entry, if any (task replaced or deleted)."""
        with self._lock:
            self._forgotten_at[task_id] = time.monotonic()
            self._forget(task_id)

    def _forget(self, task_id: str) -> None:
        entry = self._entries.pop(task_id, None)
        if entry is not None:
            self._num_bytes -= entry[1].num_bytes

    def stats(self) -> PrefixStats:
        """A snapshot of the counters."""
        with self._lock:
            return PrefixStats(self._stats.num_hits, self._stats.num_misses, self._stats.num_evictions,
                               len(self._entries), self._num_bytes)
