"""JobWatcher: makes this server the owner of the training folder's jobs when it can, and, while it is,
brings in what the other servers sharing the folder wrote.

Any server takes uploads and jobs (they are files on the shared store); one runs them. Every POLL_S
this thread tries to take the owner lock (owner_lock.py) if it does not hold it; once it does, it resumes
the jobs left running and queues the rest. While it owns the folder, it reads the jobs folder again
whenever the folder changed (a new job, a cancel asked for elsewhere). Training itself runs on the
engine's thread (runner.py); this thread reads files, deletes expired uploads, and writes again the job
endings a full disk refused.
"""

from __future__ import annotations

import logging
import threading

from server.training.owner_lock import OwnerLock
from server.training.runner import TrainingRunner
from server.training.state import TrainingState

log = logging.getLogger(__name__)
POLL_S = 1.0
LOOK_ANYWAY_EVERY = 10  # polls: a folder's time stamp can be coarse (a second on some file systems)


class JobWatcher:
    def __init__(self, state: TrainingState, runner: TrainingRunner, poll_s: float = POLL_S):
        self._state, self._runner, self._poll_s = state, runner, poll_s
        self._lock = OwnerLock(state.root / "owner.lock")
        self._stop = threading.Event()
        self._jobs_changed_at: int | None = None
        self._num_polls = 0
        # Why this server cannot take the lock at all (e.g. NFS mounted without locking); None when it can.
        self.lock_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="promptserve-training-jobs", daemon=True)

    def start(self) -> None:
        """The first look happens now: a server alone on its folder owns the jobs before it is ready."""
        self._poll_logged()
        self._thread.start()

    def close(self) -> None:
        """Stop watching and let another server take the jobs (call it once the engine has stopped)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._runner.is_owner = False
        self._lock.release()

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            self._poll_logged()

    def _poll_logged(self) -> None:
        try:
            self._poll()
        except Exception:  # noqa: BLE001 - e.g. the shared folder is briefly unreachable: try again
            log.exception("watching the training jobs failed")

    def _poll(self) -> None:
        self._num_polls += 1
        if self._num_polls % LOOK_ANYWAY_EVERY == 0:
            self._state.delete_expired_files()  # any server may: each delete is one unlink
        if not self._runner.is_owner:
            try:
                is_taken = self._lock.try_acquire()
            except OSError as exc:  # not "held by another": the file system cannot lock (it may later)
                if self.lock_error is None:
                    log.error("cannot lock %s, so this server runs no training jobs: %s", self._lock.path, exc)
                # Without the path: clients read it.
                self.lock_error = f"the training folder's file system cannot lock ({exc})"
                return
            self.lock_error = None
            if not is_taken:
                return
            log.info("this server now runs the training jobs in %s", self._state.root)
            self._jobs_changed_at = self._state.jobs_changed_at()
            self._runner.take_ownership()
            return
        self._runner.save_unsaved()
        changed_at = self._state.jobs_changed_at()
        # A job or a cancel was written (by any server).
        if changed_at != self._jobs_changed_at or self._num_polls % LOOK_ANYWAY_EVERY == 0:
            self._jobs_changed_at = changed_at
            self._runner.adopt_from_disk()
