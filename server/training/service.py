"""The training service of one app: its state on disk, its runner attached to the engine, the watcher that
makes this server the one that runs the folder's jobs (with a shared store, one of several), and what the
API needs beside them: a small pool that checks uploads (never the request pool), a lock for the
per-tenant counts, and the event streams open. A training folder that cannot be made (a read-only store)
turns training off, with the reason logged and sent as 503; serving goes on."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from server.training.job_prep import ModelFacts
from server.training.job_watcher import JobWatcher
from server.training.runner import TrainingRunner
from server.training.state import TrainingState

log = logging.getLogger(__name__)
NUM_CHECK_THREADS = 2  # uploads tokenized at once; more wait their turn, without slowing requests
MAX_STREAMS = 64  # events?stream=true connections open on this server
MAX_STREAMS_PER_TENANT = 4


@dataclass
class Training:
    state: TrainingState | None
    runner: TrainingRunner | None
    watcher: JobWatcher | None
    off_reason: str | None = None  # why this server runs no training at all (clients read it: no paths)
    checker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        NUM_CHECK_THREADS, thread_name_prefix="promptserve-upload-check"))
    tenant_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # count, then save: one request at a time
    streams: Counter = field(default_factory=Counter)  # tenant -> event streams open

    def may_open_stream(self, tenant: str) -> bool:
        """Whether `tenant` may open one more event stream now."""
        return sum(self.streams.values()) < MAX_STREAMS and self.streams[tenant] < MAX_STREAMS_PER_TENANT

    def open_stream(self, tenant: str) -> bool:
        """Count one more event stream of `tenant`; False (nothing counted) over the limits."""
        if not self.may_open_stream(tenant):
            return False
        self.streams[tenant] += 1
        return True

    def close_stream(self, tenant: str) -> None:
        self.streams[tenant] -= 1
        if self.streams[tenant] <= 0:
            del self.streams[tenant]

    def close(self) -> None:
        """Once the engine has stopped: the running job is kept to go on, and another server sharing the
        folder may take the jobs."""
        if self.runner is not None:
            self.runner.pause()
        if self.watcher is not None:
            self.watcher.close()
        self.checker.shutdown(wait=False, cancel_futures=True)


def start_training(runtime) -> Training:
    """Open the training folder, attach the runner to the engine, and own the jobs if no other server
    does (jobs a restart interrupted then go on)."""
    settings = runtime.settings
    root = settings.training_dir or settings.store / ".training"
    try:
        state = TrainingState(root)
    except OSError as exc:
        log.error("training is off: cannot make the training folder %s: %s", root, exc)
        return Training(None, None, None, off_reason=f"the server cannot write its training folder "
                        f"({type(exc).__name__}: {exc.strerror or 'error'}); see its log")
    facts = ModelFacts(runtime.loaded.model, runtime.tokenizer, runtime.loaded.task_type,
                       getattr(runtime.loaded, "max_positions", None))
    runner = TrainingRunner(state, facts=facts, store=runtime.store, engine=runtime.engine,
                            share_under_load=settings.training_share_under_load, max_job_s=settings.training_max_job_s)
    runtime.engine.set_side_work(runner)
    watcher = JobWatcher(state, runner)
    watcher.start()
    return Training(state, runner, watcher)
