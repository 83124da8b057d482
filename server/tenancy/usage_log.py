"""Usage metering: one JSON line per request, appended to the day's file; totals by tenant, task and hour.

Files are `<folder>/usage-YYYY-MM-DD.<writer>.jsonl`: one per UTC day and writing process, so a new day
starts a new file (the rotation) and files older than `retention_days` are deleted. A line is one
O_APPEND write, so a crash loses at most the line being written. Every process reads every writer's files
(only bytes it has not read yet, at each query), so replicas sharing the folder see one another's usage,
and a restarted server sees everything that was written before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

log = logging.getLogger("promptserve.usage")

SECONDS_PER_HOUR = 3600
DEFAULT_MAX_TASKS_PER_HOUR = 1000
OTHER_TASKS = "__other__"
_FILE = re.compile(r"^usage-(\d{4}-\d{2}-\d{2})\.[A-Za-z0-9_.-]+\.jsonl$")


@dataclass
class Counts:
    """What a tenant used: requests served, their tokens and queue time; requests refused or failed."""

    requests: int = 0
    input_tokens: int = 0
    virtual_tokens: int = 0
    generated_tokens: int = 0
    queue_seconds: float = 0.0
    rate_limited: int = 0
    failed: int = 0

    def add(self, other: Counts) -> None:
        """Add `other` in place."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def json(self) -> dict:
        """The wire form (queue seconds rounded to the millisecond)."""
        out = asdict(self)
        out["queue_seconds"] = round(self.queue_seconds, 3)
        out["total_tokens"] = self.input_tokens + self.virtual_tokens + self.generated_tokens
        return out


@dataclass(frozen=True)
class UsageRow:
    """The totals of one tenant's task in one hour (`hour`: seconds since the epoch, a multiple of 3600)."""

    tenant: str
    task: str | None
    hour: int
    counts: Counts


class UsageLog:
    """Appends this process's records; reads every writer's; answers totals by tenant, task and hour."""

    def __init__(self, folder: Path, *, retention_days: int = 90, clock: Callable[[], float] = time.time,
                 writer: str | None = None, max_tasks_per_hour: int = DEFAULT_MAX_TASKS_PER_HOUR):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._retention_days = retention_days
        self._clock = clock
        self._writer = writer or f"{re.sub(r'[^A-Za-z0-9_-]', '-', socket.gethostname())}-{os.getpid()}"
        # Appends come from the event loop and only write; queries (from a thread) read every file: apart,
        # so that a long first read after a restart never holds up an append.
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._fd: int | None = None
        self._fd_day: str | None = None
        self._offsets: dict[str, int] = {}  # file name -> bytes read
        self._totals: dict[tuple[str, str | None, int], Counts] = {}
        # A tenant's refusals name any task ids its patterns allow: past this many tasks in an hour, the rest
        # are summed under OTHER_TASKS, so the totals stay bounded whatever ids a client sends.
        self._max_tasks_per_hour = max_tasks_per_hour
        self._num_tasks: dict[tuple[str, int], int] = {}  # (tenant, hour) -> tasks with their own totals
        self._delete_old()

    def append(self, tenant: str, task: str | None, counts: Counts) -> None:
        """Record one request's usage (written at once; a failure to write is logged, never raised)."""
        now = self._clock()
        line = json.dumps({"ts": round(now, 3), "tenant": tenant, "task": task, **asdict(counts)},
                          separators=(",", ":")) + "\n"
        with self._write_lock:
            try:
                os.write(self._file_for(now), line.encode())
            except OSError as e:
                log.error("usage: cannot write %s: %s", self.folder, e)

    def read_new(self) -> None:
        """Take in every writer's lines written since the last read (queries do this first)."""
        with self._read_lock:
            self._read_new()

    def rows(self, tenants: set[str] | None, start: float, end: float) -> list[UsageRow]:
        """Totals per (tenant, task, hour) for hours starting in [start rounded down to the hour, end);
        `tenants` None: every tenant."""
        first_hour = int(start // SECONDS_PER_HOUR) * SECONDS_PER_HOUR
        with self._read_lock:
            self._read_new()
            return [UsageRow(t, task, hour, Counts(**asdict(c))) for (t, task, hour), c in self._totals.items()
                    if (tenants is None or t in tenants) and first_hour <= hour < end]

    def tokens_on_day(self, tenant: str, day: int) -> int:
        """Tokens `tenant` used on UTC day `day` (days since the epoch): the daily quota's starting point."""
        rows = self.rows({tenant}, day * 86_400, (day + 1) * 86_400)
        return sum(r.counts.input_tokens + r.counts.virtual_tokens + r.counts.generated_tokens for r in rows)

    def close(self) -> None:
        """Close this process's file."""
        with self._write_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- internals ------------------------------------------------------------------------------
    def _file_for(self, now: float) -> int:
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        if day != self._fd_day or self._fd is None:
            if self._fd is not None:
                os.close(self._fd)
                self._delete_old()
            path = self.folder / f"usage-{day}.{self._writer}.jsonl"
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._fd_day = day
        return self._fd

    def _read_new(self) -> None:
        for path in sorted(self.folder.glob("usage-*.jsonl")):
            if not _FILE.match(path.name):
                continue
            offset = self._offsets.get(path.name, 0)
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
            self._offsets[path.name] = offset + len(complete)
            self._add_lines(complete.decode(errors="replace").splitlines(), path.name)

    def _add_lines(self, lines: Iterable[str], source: str) -> None:
        names = {f.name for f in fields(Counts)}
        for line in lines:
            try:
                rec = json.loads(line)
                counts = Counts(**{k: v for k, v in rec.items() if k in names})
                key = (str(rec["tenant"]), rec.get("task"), int(rec["ts"] // SECONDS_PER_HOUR) * SECONDS_PER_HOUR)
            except (ValueError, KeyError, TypeError):
                log.warning("usage: skipping a malformed line in %s", source)
                continue
            self._total_of(key).add(counts)

    def _total_of(self, key: tuple[str, str | None, int]) -> Counts:
        if key not in self._totals:
            tenant, _, hour = key
            if self._num_tasks.get((tenant, hour), 0) >= self._max_tasks_per_hour:
                key = (tenant, OTHER_TASKS, hour)
                if key in self._totals:
                    return self._totals[key]
            self._num_tasks[(tenant, hour)] = self._num_tasks.get((tenant, hour), 0) + 1
            self._totals[key] = Counts()
        return self._totals[key]

    def _delete_old(self) -> None:
        oldest = self._clock() - self._retention_days * 86_400
        first_kept = int(oldest // 86_400) * 86_400  # the first hour of the oldest day whose file is kept
        with self._read_lock:  # the totals of deleted days go with their files
            for key in [k for k in self._totals if k[2] < first_kept]:
                del self._totals[key]
            for key in [k for k in self._num_tasks if k[1] < first_kept]:
                del self._num_tasks[key]
        cutoff = time.strftime("%Y-%m-%d", time.gmtime(oldest))
        for path in self.folder.glob("usage-*.jsonl"):
            match = _FILE.match(path.name)
            if match and match.group(1) < cutoff:
                try:
                    path.unlink()
                except OSError as e:
                    log.warning("usage: cannot delete %s: %s", path, e)
