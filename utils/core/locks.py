"""One writer per folder: an exclusive lock on a run folder, a store folder or a pipeline's output root.

The lock is ``flock`` on ``<folder>/.lock``: the kernel releases it when the holding process ends in any way
(exception, SIGKILL, OOM), so a lock left by a dead process is never in the way, and only the holder's pid and
host written in the file remain (shown to the next writer while the holder lives). Locks are re-entrant within a
process: a stage that holds its folder can call the training loop, which takes the same lock again.
``flock`` is local to a machine on some network file systems; a run split across nodes takes the lock on rank 0
only, so one node is enough.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from utils.core.errors import UserError
from utils.core.io import os_errors_named, remove_temp_files

LOCK_NAME = ".lock"

# folder (resolved) -> (open lock file descriptor, depth of nesting in this process)
_held: dict[Path, list[int]] = {}


class FolderLocked(UserError, RuntimeError):
    """Another process writes into the folder."""


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    if "pid" not in fields:
        return "a process that has not written its pid yet"
    return f"pid {fields['pid']} on host {fields.get('host', '?')}"


def acquire(folder: str | Path, what: str = "folder") -> None:
    """Take the lock of ``folder`` (created if needed) or raise :class:`FolderLocked` naming the holder."""
    folder = Path(folder)
    with os_errors_named(folder):
        folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _held:
        _held[key][1] += 1
        return
    lock_path = folder / LOCK_NAME
    with os_errors_named(lock_path):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise FolderLocked(f"{what} {folder} is being written by another process ({_holder(lock_path)}, "
                               f"lock file {lock_path}); wait for it to end, or use another output folder") from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode())
    _held[key] = [fd, 1]
    # The holder owns the folder's temp files: those left now are from writes a kill interrupted.
    remove_temp_files(folder)


def relock(folder: str | Path) -> None:
    """Take the lock of ``folder`` again after the folder was moved aside with the lock file in it (a run of
    other settings replaced with replace=True): the new, empty folder at the same path gets its own lock."""
    key = Path(folder).resolve()
    entry = _held.pop(key, None)
    if entry is None:
        return
    os.close(entry[0])
    acquire(folder)
    _held[key][1] = entry[1]


def release(folder: str | Path) -> None:
    """Give back one level of the lock of ``folder``; the last level unlocks it."""
    key = Path(folder).resolve()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        # The file stays (removing it would race with a process that just opened it); the unlock is what counts.
        os.close(entry[0])


@contextmanager
def folder_lock(folder: str | Path, what: str = "folder", *, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of ``folder`` for the block (``enabled=False``: a no-op, for ranks other than 0)."""
    if not enabled:
        yield
        return
    acquire(folder, what)
    try:
        yield
    finally:
        release(folder)


def is_locked(folder: str | Path) -> bool:
    """True when some process (this one included) holds the lock of ``folder``."""
    folder = Path(folder)
    if folder.resolve() in _held:
        return True
    lock_path = folder / LOCK_NAME
    if not lock_path.is_file():
        return False
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


@contextmanager
def rank0_folder_lock(folder: str | Path, is_main: bool, what: str = "folder") -> Iterator[None]:
    """:func:`folder_lock` taken by rank 0 for every rank of a process group: all ranks raise if it is held."""
    from utils.core.distributed import broadcast_object

    error = None
    if is_main:
        try:
            acquire(folder, what)
        except FolderLocked as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error:
        raise FolderLocked(error)
    try:
        yield
    finally:
        if is_main:
            release(folder)
