"""The training folder's owner lock: one holder at a time, in one process or across processes, and a
holder that dies (SIGKILL, nothing cleaned up) lets another take it."""

from __future__ import annotations

import subprocess
import sys
import time

from server.training.owner_lock import OwnerLock

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


def test_one_holder_at_a_time_in_one_process(tmp_path):
    first, second = OwnerLock(tmp_path / "owner.lock"), OwnerLock(tmp_path / "owner.lock")
    assert first.try_acquire() and first.try_acquire()  # taking it again is a no-op
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    assert not first.try_acquire()
    second.release()


def test_a_killed_holder_in_another_process_lets_go(tmp_path):
    path = tmp_path / "owner.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = OwnerLock(path)
        assert not lock.try_acquire()
        holder.kill()  # no release, no cleanup: the kernel drops the lock with the process
        holder.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not lock.try_acquire():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        lock.release()
    finally:
        holder.kill()
        holder.wait(timeout=30)


class _Runner:
    """What JobWatcher asks of the runner."""

    def __init__(self):
        self.is_owner = False

    def take_ownership(self):
        self.is_owner = True

    def save_unsaved(self):
        pass

    def adopt_from_disk(self):
        pass


def test_a_file_system_that_cannot_lock_is_reported_not_raised(tmp_path, monkeypatch):
    import errno
    import fcntl

    from server.training.job_watcher import JobWatcher
    from server.training.state import TrainingState

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    state, runner = TrainingState(tmp_path), _Runner()
    watcher = JobWatcher(state, runner, poll_s=0.05)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    watcher.start()  # the server still starts
    try:
        assert not runner.is_owner and "No locks available" in watcher.lock_error
        monkeypatch.undo()  # locking works again (lockd came up): the next poll takes the lock
        deadline = time.monotonic() + 10
        while not runner.is_owner:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert watcher.lock_error is None
    finally:
        watcher.close()
