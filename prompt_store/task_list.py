"""The task list kept in memory: a warm `list()` costs one stat of the root folder, whatever the store's size.

When the disk is looked at again (a *rescan*: the stat-based incremental scan of listing.py, two stats per task,
files read only for new or changed folders):
- the root folder's own mtime, inode or device differs from the last scan's. Adding, removing or renaming a
  task folder changes it, whoever does it; every PromptStore write replaces the whole folder by rename, so
  it counts too. A rescan then also notices in-place edits that happened meanwhile in any folder. (The
  store's own hint file lives in `.promptserve/` so that saving it leaves the root's mtime alone.)
- the root's mtime was within `RACY_NS` of the clock when the last scan stamped it: a change made in the
  same timestamp tick would leave the mtime equal, so such a stamp is not trusted (as git does for its index).
- `invalidate()` was called (PromptStore.refresh() does, and every write through this store).
- `rescan_interval_s` passed since the last rescan started: the only way a file edited or replaced IN
  PLACE inside a task folder (root mtime unchanged) is noticed without refresh().
Otherwise the result is built from memory (the last scan's sorted list, sliced with bisect for paging).
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from prompt_store.folder_io import Signature
from prompt_store.listing import TaskIndex
from prompt_store.types import TaskInfo

RACY_NS = 2_000_000_000  # covers coarse (jiffy, 1 s) file-system timestamps and a little clock skew
_AFTER_ALL = "\U0010ffff"  # sorts after every character a task id may hold


class RootStamp(NamedTuple):
    """Identity of the root folder's entry list as far as one stat can tell."""

    device: int
    inode: int
    mtime_ns: int


@dataclass(frozen=True)
class _View:
    """One scan's result, never changed after it is built (readers slice it without a lock)."""

    ids: list[str] = field(default_factory=list)  # sorted
    infos: list[TaskInfo] = field(default_factory=list)  # infos[i].task_id == ids[i]
    stamp: RootStamp | None = None  # None: do not trust (no scan yet, or racy)
    started_at: float = float("-inf")  # time.monotonic() when the scan began
    generation: int = -1  # invalidate() count when the scan began


class TaskList:
    """Sorted TaskInfo of every task folder, rescanned only when the root changed, on demand, or now and then."""

    def __init__(self, root_real: str, index: TaskIndex, rescan_interval_s: float,
                 on_rescan: Callable[[list[TaskInfo], dict[str, Signature]], list[TaskInfo]]) -> None:
        if not rescan_interval_s >= 0:
            raise ValueError("rescan_interval_s must be >= 0 (math.inf: only on a root change or refresh)")
        self._root = root_real
        self._index = index
        self._interval_s = rescan_interval_s
        # Gets every task's info and current signature, returns the infos to list (the store drops stale cache
        # entries and marks task types the model cannot serve).
        self._on_rescan = on_rescan
        self._view = _View()
        self._generation = 0
        self._scan_lock = threading.Lock()  # one rescan at a time; concurrent callers then share its result

    def invalidate(self) -> None:
        """Make the next call rescan (a change this stat cannot see, or one made by this process)."""
        self._generation += 1  # a plain int bump: a rescan already running does not count as seeing it

    def page(self, prefix: str | None = None, after: str | None = None, limit: int | None = None) -> list[TaskInfo]:
        """Tasks sorted by id: those starting with `prefix`, with id > `after`, at most `limit` of them."""
        _check_page_args(prefix, after, limit)
        view = self._current()
        lo, hi = 0, len(view.ids)
        if prefix:
            lo = bisect.bisect_left(view.ids, prefix)
            hi = bisect.bisect_left(view.ids, prefix + _AFTER_ALL, lo)
        if after is not None:
            lo = max(lo, bisect.bisect_right(view.ids, after))
        if limit is not None:
            hi = min(hi, lo + limit)
        return view.infos[lo:hi] if lo < hi else []

    def _current(self) -> _View:
        view = self._view
        if not self._is_stale(view, self._stat_root()):
            return view
        with self._scan_lock:
            view = self._view
            stamp = self._stat_root()  # again: another thread may have rescanned while we waited
            if self._is_stale(view, stamp):
                view = self._view = self._rescan(stamp)
        return view

    def _is_stale(self, view: _View, stamp: RootStamp | None) -> bool:
        return (view.stamp is None or stamp != view.stamp or view.generation != self._generation
                or time.monotonic() - view.started_at >= self._interval_s)

    def _stat_root(self) -> RootStamp | None:
        try:
            st = os.stat(self._root)
        except OSError:
            return None
        return RootStamp(st.st_dev, st.st_ino, st.st_mtime_ns)

    def _rescan(self, stamp: RootStamp | None) -> _View:
        # Everything that decides staleness is taken BEFORE the scan: a change during it makes the next call rescan.
        generation, started_at = self._generation, time.monotonic()
        if stamp is not None and time.time_ns() - stamp.mtime_ns < RACY_NS:
            stamp = None
        infos, signatures = self._index.scan()
        infos = self._on_rescan(infos, signatures)
        return _View([info.task_id for info in infos], infos, stamp, started_at, generation)


def _check_page_args(prefix: str | None, after: str | None, limit: int | None) -> None:
    if prefix is not None and not isinstance(prefix, str) or after is not None and not isinstance(after, str):
        raise TypeError("prefix and after must be strings or None")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError("limit must be a non-negative integer or None")
