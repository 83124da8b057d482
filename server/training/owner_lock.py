"""OwnerLock: which of the servers sharing a training folder runs its jobs. Exactly one holds the lock;
the others keep trying, and one of them takes it when the holder stops or dies (the operating system
releases a dead process's lock).

It is `flock` on `<training folder>/owner.lock`. A lock belongs to an open file, so two servers in one
process exclude each other too (tests run them so). On NFS, Linux carries `flock` as a POSIX lock through
the server's lock manager (NFSv4, or v3 with lockd): the shared store must be mounted with locking on.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class OwnerLock:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; never waits. True when this object holds it, False when
        another does; OSError when the file system cannot lock (NFS mounted without locking: ENOLCK)."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases its lock
            self._fd = None
