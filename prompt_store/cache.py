"""Two cache tiers above disk (device, then host), pinning of in-use prompts, and single-flight loads."""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable

import torch

from prompt_store.errors import PromptStoreError, TaskNotFound
from prompt_store.folder_io import Signature
from prompt_store.soft_prompt import SoftPrompt
from prompt_store.tiers import CacheEntry, LruTier
from prompt_store.types import StoreCounters, StoreStats


class _Flight:
    """One in-progress load that later callers for the same task wait on."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: SoftPrompt | None = None
        self.error: BaseException | None = None
        self.is_stale = False  # a put/delete/refresh happened meanwhile: hand out, but do not cache


class TieredCache:
    """Device LRU -> host LRU -> loader; every method is thread-safe and a hit is O(1)."""

    def __init__(self, device: torch.device, max_device_bytes: int, max_host_bytes: int) -> None:
        self._device = device
        self._device_tier = LruTier(max_device_bytes)
        self._host_tier = LruTier(max_host_bytes)
        self._pins: dict[tuple[str, str], list[int]] = {}  # (task, version) -> [count, num_bytes]
        self._flights: dict[str, _Flight] = {}
        self._counters = StoreCounters()
        self._lock = threading.Lock()

    def get_or_load(self, task_id: str, load: Callable[[], CacheEntry], *, pin: bool) -> SoftPrompt:
        """The cached prompt, or the result of one `load()` shared by every concurrent caller."""
        with self._lock:
            prompt = self._lookup(task_id)
            if prompt is not None:
                self._counters.hits += 1
                if pin:
                    self._pin(prompt)
                return prompt
            self._counters.misses += 1
            flight = self._flights.get(task_id)
            is_leader = flight is None
            if is_leader:
                flight = self._flights[task_id] = _Flight()
        if is_leader:
            self._lead(task_id, flight, load)
        else:
            flight.done.wait()
        if flight.error is not None:
            error = flight.error
            raise (type(error)(*error.args) if isinstance(error, PromptStoreError) and not is_leader else error)
        with self._lock:
            if pin:
                self._pin(flight.result)
        return flight.result

    def _lead(self, task_id: str, flight: _Flight, load: Callable[[], CacheEntry]) -> None:
        try:
            entry = load()
        except BaseException as exc:  # handed to every waiter, then re-raised by each
            with self._lock:
                self._end_flight(task_id, flight)
                is_missing = isinstance(exc, TaskNotFound)
                self._counters.not_found += is_missing
                self._counters.load_errors += not is_missing
                flight.error = exc
            flight.done.set()
            return
        with self._lock:
            self._counters.loads += 1
            self._end_flight(task_id, flight)
            if not flight.is_stale:
                self._insert(entry)
            flight.result = entry.prompt
        flight.done.set()

    def _end_flight(self, task_id: str, flight: _Flight) -> None:
        if self._flights.get(task_id) is flight:
            del self._flights[task_id]

    def put(self, entry: CacheEntry, *, pin: bool = False) -> None:
        """Replace whatever is cached for the task with this (just written) entry."""
        with self._lock:
            self._invalidate(entry.prompt.task_id)
            self._insert(entry)
            if pin:
                self._pin(entry.prompt)

    def invalidate(self, task_id: str) -> bool:
        """Forget the task's cached prompt and make any load in flight uncacheable; True if one was cached."""
        with self._lock:
            return self._invalidate(task_id)

    def _invalidate(self, task_id: str) -> bool:
        flight = self._flights.pop(task_id, None)
        if flight is not None:
            flight.is_stale = True
        dropped = self._device_tier.pop(task_id), self._host_tier.pop(task_id)
        return any(entry is not None for entry in dropped)

    def release(self, prompt: SoftPrompt) -> bool:
        """Undo one pin of this exact version; False if it was not pinned (a no-op)."""
        with self._lock:
            key = (prompt.task_id, prompt.version)
            pin = self._pins.get(key)
            if pin is None:
                return False
            pin[0] -= 1
            if pin[0] == 0:
                del self._pins[key]
                self._evict()  # pins may have held a tier above its bound
            return True

    def signature_of(self, task_id: str) -> tuple[bool, Signature | None]:
        """(whether the task is cached, the signature it was read from); O(1), no LRU change."""
        with self._lock:
            entry = self._device_tier.peek(task_id) or self._host_tier.peek(task_id)
        return (entry is not None, entry.signature if entry is not None else None)

    def signatures(self) -> dict[str, Signature | None]:
        """Signature of every cached task (to compare with the disk)."""
        with self._lock:
            entries = self._device_tier.items() + self._host_tier.items()
        return {entry.prompt.task_id: entry.signature for entry in entries}

    def stats(self) -> StoreStats:
        """Counters and tier fill, read under the lock (a consistent snapshot)."""
        with self._lock:
            pinned_bytes = sum(num_bytes for _, num_bytes in self._pins.values())
            return StoreStats(**dataclasses.asdict(self._counters), device=self._device_tier.stats(),
                              host=self._host_tier.stats(), pinned=len(self._pins), pinned_bytes=pinned_bytes)

    # ---- under the lock ----
    def _lookup(self, task_id: str) -> SoftPrompt | None:
        entry = self._device_tier.get(task_id)
        if entry is not None:
            return entry.prompt
        entry = self._host_tier.pop(task_id)
        if entry is None:
            return None
        promoted = self._moved(entry, self._device)
        self._insert(promoted)
        return promoted.prompt

    def _insert(self, entry: CacheEntry) -> None:
        self._device_tier.add(entry)
        self._evict()

    def _evict(self) -> None:
        for victim in self._device_tier.evict(self._is_pinned):
            self._host_tier.add(self._moved(victim, torch.device("cpu")))
        self._counters.evictions += len(self._host_tier.evict(self._is_pinned))

    def _moved(self, entry: CacheEntry, device: torch.device) -> CacheEntry:
        embeddings = entry.prompt.embeddings
        if embeddings.device == device:
            return entry
        embeddings = embeddings.to(device)
        if device.type == "cpu" and torch.cuda.is_available():
            embeddings = embeddings.pin_memory()  # page-locked: the copy back to the GPU is faster
        return CacheEntry(dataclasses.replace(entry.prompt, embeddings=embeddings), entry.signature)

    def _pin(self, prompt: SoftPrompt) -> None:
        pin = self._pins.setdefault((prompt.task_id, prompt.version), [0, prompt.num_bytes])
        pin[0] += 1

    def _is_pinned(self, prompt: SoftPrompt) -> bool:
        return (prompt.task_id, prompt.version) in self._pins
