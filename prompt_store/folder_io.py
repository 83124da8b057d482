"""Task folders on disk: consistent reads through one directory handle, crash-safe atomic writes and deletes."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import NamedTuple

from prompt_store.errors import InvalidPrompt, TaskNotFound
from prompt_store.peft_format import CONFIG_NAME, MAX_CONFIG_BYTES, WEIGHTS_NAMES
from prompt_store.task_ids import is_inside, task_path

TMP_PREFIX, OLD_PREFIX, DEL_PREFIX = ".tmp-", ".old-", ".del-"
_READ_ATTEMPTS = 3


class FileStamp(NamedTuple):
    """Identity of one file's content as far as stat can tell (a rename or rewrite changes it)."""

    inode: int
    size: int
    mtime_ns: int

    @staticmethod
    def of(st: os.stat_result) -> "FileStamp":
        return FileStamp(st.st_ino, st.st_size, st.st_mtime_ns)


class Signature(NamedTuple):
    """What a task folder looked like when it was read: compared cheaply to notice outside changes.

    A tuple so that listing 100,000 tasks compares signatures at C speed.
    """

    config: FileStamp
    weights: FileStamp
    weights_name: str


@dataclass(frozen=True)
class RawAdapter:
    """The bytes of one task folder, read consistently (both files from the same folder instance)."""

    config_bytes: bytes
    weights_name: str
    weights_bytes: bytes
    signature: Signature


def _read_bounded(task_id: str, name: str, fd: int, limit: int) -> tuple[bytes, FileStamp]:
    st = os.fstat(fd)
    if st.st_size > limit:
        raise InvalidPrompt(f"task {task_id!r}: {name}: file is {st.st_size} bytes, more than the limit {limit}")
    with os.fdopen(os.dup(fd), "rb") as handle:
        return handle.read(limit + 1), FileStamp.of(st)


def _open_in(task_id: str, dir_fd: int, dir_real: str, root_real: str, name: str) -> int | None:
    """Open `name` inside the folder handle; None if absent; refuses symlinks leading out of the store."""
    try:
        if os.path.islink(os.path.join(dir_real, name)) and not is_inside(root_real, os.path.join(dir_real, name)):
            raise InvalidPrompt(f"task {task_id!r}: {name}: symlink points outside the store")
        return os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _read_once(root_real: str, task_id: str, max_file_bytes: int) -> RawAdapter:
    folder = task_path(root_real, task_id)
    try:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        raise TaskNotFound(f"task {task_id!r}: not found in the store") from None
    try:
        dir_real = os.path.realpath(folder)
        fd = _open_in(task_id, dir_fd, dir_real, root_real, CONFIG_NAME)
        if fd is None:
            raise InvalidPrompt(f"task {task_id!r}: {CONFIG_NAME}: missing")
        with os.fdopen(fd, "rb", closefd=True) as handle:
            config_bytes, config_stamp = _read_bounded(task_id, CONFIG_NAME, handle.fileno(), MAX_CONFIG_BYTES)
        for name in WEIGHTS_NAMES:
            fd = _open_in(task_id, dir_fd, dir_real, root_real, name)
            if fd is not None:
                with os.fdopen(fd, "rb", closefd=True) as handle:
                    data, stamp = _read_bounded(task_id, name, handle.fileno(), max_file_bytes)
                return RawAdapter(config_bytes, name, data, Signature(config_stamp, stamp, name))
        raise InvalidPrompt(f"task {task_id!r}: {' / '.join(WEIGHTS_NAMES)}: missing (no weights file)")
    finally:
        os.close(dir_fd)


def read_folder(root_real: str, task_id: str, max_file_bytes: int) -> RawAdapter:
    """Read a task folder; a concurrent replace makes it retry, so the result is all old or all new."""
    for attempt in range(_READ_ATTEMPTS):
        try:
            return _read_once(root_real, task_id, max_file_bytes)
        except InvalidPrompt:
            # A missing file may only mean the folder was swapped out under us: retry, then believe it.
            if attempt == _READ_ATTEMPTS - 1:
                raise
            time.sleep(0.001 * (attempt + 1))
    raise AssertionError("unreachable")


def stat_signature(root_real: str, task_id: str) -> Signature | None:
    """The folder's current signature from stat calls only (no reads); None if it is gone or incomplete."""
    folder = f"{root_real}/{task_id}/"  # plain concatenation: this runs 100,000 times per list()
    try:
        st = os.stat(folder + CONFIG_NAME)
    except OSError:
        return None
    config = FileStamp(st.st_ino, st.st_size, st.st_mtime_ns)
    for name in WEIGHTS_NAMES:
        try:
            st = os.stat(folder + name)
        except OSError:
            continue
        return Signature(config, FileStamp(st.st_ino, st.st_size, st.st_mtime_ns), name)
    return None


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _renameat2():
    """libc's renameat2 (Linux), or None where the C library lacks it."""
    libc = ctypes.CDLL(None, use_errno=True)
    return getattr(libc, "renameat2", None)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directory entries (RENAME_EXCHANGE); False where the system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _remove_tree(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _side_name(root_real: str, prefix: str, task_id: str) -> str:
    return os.path.join(root_real, f"{prefix}{task_id}.{uuid.uuid4().hex}")


def _write_tmp_folder(tmp: str, files: dict[str, bytes]) -> None:
    os.mkdir(tmp)
    for name, data in files.items():
        fd = os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_path(tmp)


def write_folder(root_real: str, task_id: str, files: dict[str, bytes]) -> None:
    """Write a whole task folder so that readers (and a crash) see the old folder or the new one, never a mix."""
    target = task_path(root_real, task_id)
    tmp = _side_name(root_real, TMP_PREFIX, task_id)
    try:
        _write_tmp_folder(tmp, files)
        try:
            os.rename(tmp, target)  # atomic when no folder is there yet
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            if not _exchange(tmp, target):
                _replace_in_two_steps(root_real, task_id, tmp, target)
        _fsync_path(root_real)
    finally:
        if os.path.lexists(tmp):
            _remove_tree(tmp)  # after an exchange this is the old folder


def _replace_in_two_steps(root_real: str, task_id: str, tmp: str, target: str) -> None:
    """Fallback without RENAME_EXCHANGE: a short window with no folder, repaired by `recover` after a crash."""
    old = _side_name(root_real, OLD_PREFIX, task_id)
    os.rename(target, old)
    os.rename(tmp, target)
    _remove_tree(old)


def remove_folder(root_real: str, task_id: str) -> bool:
    """Delete a task folder atomically (renamed aside first); False if there was none."""
    target = task_path(root_real, task_id)
    doomed = _side_name(root_real, DEL_PREFIX, task_id)
    try:
        os.rename(target, doomed)
    except FileNotFoundError:
        return False
    _fsync_path(root_real)
    _remove_tree(doomed)
    return True


def recover(root_real: str, stale_after_s: float) -> None:
    """Tidy what crashed writers left: restore a folder lost mid-replace, drop stale temporaries."""
    now = time.time()
    with os.scandir(root_real) as entries:
        leftovers = [e for e in entries if e.name.startswith((TMP_PREFIX, OLD_PREFIX, DEL_PREFIX))]
    for entry in leftovers:
        task_id = entry.name[len(TMP_PREFIX):].rsplit(".", 1)[0]
        if entry.name.startswith(OLD_PREFIX) and not os.path.lexists(os.path.join(root_real, task_id)):
            os.rename(entry.path, os.path.join(root_real, task_id))
        elif entry.name.startswith(DEL_PREFIX) or now - entry.stat(follow_symlinks=False).st_mtime > stale_after_s:
            _remove_tree(entry.path)  # a young .tmp- may belong to a live writer in another process
