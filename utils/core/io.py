"""Atomic file writes: a crash never leaves a file that a later stage would take as complete.

Writes go to ``.<name>.<random>.tmp`` next to the target and are renamed onto it; a kill can leave such a temp
file, which the next holder of the folder's lock removes (:func:`remove_temp_files`). JSON is standard JSON:
NaN is written as ``null`` and infinities as the strings ``"inf"`` / ``"-inf"`` (see ``utils.core.numerics.json_safe``).
OS errors of a write (disk full, read-only, not a folder, name too long) become one-line ``OSError`` messages that
name the path.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from utils.core.errors import IncompatibleInputError, MissingInputError, UserError
from utils.core.numerics import json_safe

TEMP_GLOB = ".*.tmp"


def describe_os_error(exc: OSError, path: str | Path) -> str:
    """One line for an OS error on ``path``: what went wrong in words, and the path."""
    reasons = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOTDIR: "a component of the path is a file, not a folder",
        errno.ENAMETOOLONG: "file name too long",
        errno.EEXIST: "exists and is not a folder",
    }
    reason = reasons.get(exc.errno or -1, exc.strerror or str(exc))
    if exc.errno == errno.ENOSPC:
        try:
            reason += f" ({shutil.disk_usage(Path(path).parent).free / 2**20:.0f} MiB free)"
        except OSError:
            pass
    return f"cannot write {path}: {reason}"


@contextmanager
def os_errors_named(path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` in the block into one whose message is :func:`describe_os_error` of ``path``."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, WriteError):
            raise
        raise named_os_error(exc, path) from exc


class WriteError(UserError, OSError):
    """A write failed for a reason of the file system (full, read-only, not a folder, name too long)."""


def named_os_error(exc: OSError, path: str | Path) -> OSError:
    """A :class:`WriteError` with the one-line message of :func:`describe_os_error` and the same ``errno``."""
    error = WriteError(describe_os_error(exc, path))
    error.errno = exc.errno
    return error


def create_array(path: str | Path, shape: tuple[int, ...]) -> np.memmap:
    """A new float32 ``.npy`` at ``path`` as a writable memory map, every block allocated now
    (:func:`reserve_disk_space`); a full disk or a read-only folder is one line naming the file."""
    with os_errors_named(path):
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape).flush()
    reserve_disk_space(path)
    with os_errors_named(path):
        return np.lib.format.open_memmap(path, mode="r+")


def reserve_disk_space(path: str | Path) -> None:
    """Allocate every block of the (sparse) file at ``path`` now: a memory map written later on a full disk
    dies by SIGBUS with no message, while this fails at once with ENOSPC naming the file."""
    with os_errors_named(path), open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # file systems without it
                raise


def _missing_top(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (``None`` when ``folder`` exists)."""
    missing = None
    while not folder.exists() and folder != folder.parent:
        missing, folder = folder, folder.parent
    return missing


def check_writable_folder(folder: str | Path) -> Path:
    """Prove that ``folder`` can be written before hours of work go into its contents, creating nothing: an
    existing folder, or else its nearest existing parent, takes a probe file. A read-only folder, or a file in its
    place, is one line naming it (:class:`WriteError`)."""
    folder = Path(folder)
    missing = _missing_top(folder)
    existing = folder if missing is None else missing.parent
    with os_errors_named(folder):
        if not existing.is_dir():
            raise OSError(errno.EEXIST if missing is None else errno.ENOTDIR, f"{existing} is not a folder")
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    return folder


@contextmanager
def output_folder(folder: str | Path) -> Iterator[Path]:
    """Yield ``folder``, checked by :func:`check_writable_folder` and created only by the writes into it. When the
    block fails, the folders of its path that did not exist before are removed with what was written there, so a
    run that fails on bad input leaves no empty or half-written output folder; an existing folder stays."""
    folder = check_writable_folder(folder)
    missing = _missing_top(folder)
    try:
        yield folder
    except BaseException:
        if missing is not None:
            shutil.rmtree(missing, ignore_errors=True)
        raise


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files that interrupted atomic writes left in ``folder`` (call it only while holding the
    folder's lock: another writer's temp file is in use). Returns what was removed."""
    removed = []
    for path in Path(folder).glob(TEMP_GLOB):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    with os_errors_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the final file the permissions a plain open() would (shared clusters).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        with os_errors_named(path):
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically. Through a file object, so the archive's inner name is fixed and
    identical tensors give byte-identical files (a path would store the random temp name inside the zip)."""
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as handle:
                torch.save(obj, handle)
        except RuntimeError as exc:  # torch's zip writer reports a failed write without its OS error
            full = shutil.disk_usage(tmp.parent).free < 2**20
            raise named_os_error(OSError(errno.ENOSPC if full else errno.EIO, str(exc)), path) from exc


def load_state_dict_file(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """Load a plain state_dict with ``weights_only=True``; errors name the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise IncompatibleInputError(f"cannot read {what} file {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise IncompatibleInputError(f"{what} file {path} is not a plain state_dict of tensors")
    # Checkpoints saved from a DDP-wrapped model carry a `module.` prefix on every key.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
