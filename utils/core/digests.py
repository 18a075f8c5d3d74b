"""sha256 digests of files, reused while a file is unchanged: same inode, size, mtime and ctime.

Any write moves the mtime, and any reset of the mtime (``touch -r``) moves the ctime, so a file whose four stamps
are unchanged still holds the bytes that were hashed. A digest of a file written within about a second of being
read is not kept: file times tick coarsely, so it could be written again without moving them (git's "racy" rule).

:func:`file_sha256` keeps its digests for the life of the process (weights and RFW files, asked for many times by
one plan); :func:`files_sha256` hashes many files (the training images) and keeps their digests in a cache file, so
a stage process rehashes only the files that changed since any earlier process hashed them.
"""
from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from utils.core.io import atomic_path

# File times tick coarsely (a few ms on most file systems, seconds on some): a file written within this window
# of being read could be written again without moving them.
SETTLED_NS = 1_000_000_000
_READERS = 8  # threads hashing files: open and read wait on the disk, sha256 of large buffers drops the GIL

_DIGESTS: dict[tuple[Any, ...], str] = {}


def _stamp(info: os.stat_result) -> tuple[int, int, int, int]:
    return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def _settled(stamp: Sequence[int], read_at: int) -> bool:
    return read_at - max(stamp[2], stamp[3]) > SETTLED_NS


def _hash_file(path: str | Path) -> bytes:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").digest()


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's contents, reused within this process while the file is unchanged."""
    info = os.stat(path)
    key = (os.path.realpath(path), info.st_dev, *_stamp(info))
    if key in _DIGESTS:
        return _DIGESTS[key]
    read_at = time.time_ns()
    digest = _hash_file(path).hex()
    if _settled(_stamp(info), read_at):
        _DIGESTS[key] = digest
    return digest


def _load_cache(cache_file: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(paths, stamps [N, 4], digests [N, 32]) of the cache file; None when there is none or it is unreadable
    (a cache is only a shortcut: anything wrong with it means hashing again)."""
    if cache_file is None or not cache_file.is_file():
        return None
    try:
        with np.load(cache_file) as data:
            return data["paths"], data["stamps"], data["digests"]
    except (OSError, ValueError, KeyError):
        return None


def _cached_rows(paths: np.ndarray, stamps: np.ndarray, cache_file: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Digests [N, 32] from the cache where a row's stamps match, and the mask of rows that still need hashing."""
    digests = np.zeros((len(paths), 32), dtype=np.uint8)
    missing = np.ones(len(paths), dtype=bool)
    cached = _load_cache(cache_file)
    if cached is None:
        return digests, missing
    old_paths, old_stamps, old_digests = cached
    if old_paths.shape == paths.shape and np.array_equal(old_paths, paths):
        positions = np.arange(len(paths))  # the usual case: the same images in the same order
    else:
        where = {path: i for i, path in enumerate(old_paths.tolist())}
        positions = np.array([where.get(path, -1) for path in paths.tolist()], dtype=np.int64)
    known = positions >= 0
    hit = known.copy()
    hit[known] = np.all(old_stamps[positions[known]] == stamps[known], axis=1)
    digests[hit] = old_digests[positions[hit]]
    missing[hit] = False
    return digests, missing


def files_sha256(root: str | Path, paths: Sequence[str], cache_file: str | Path | None = None) -> np.ndarray:
    """Raw sha256 digests [N, 32] (uint8) of ``root/<path>`` for every path, reusing the digests kept in
    ``cache_file`` for files whose inode, size, mtime and ctime are unchanged, and updating it."""
    root = str(root)
    cache_file = Path(cache_file) if cache_file is not None else None
    names = np.array([path.encode("utf-8") for path in paths], dtype=bytes)
    stamps = np.array([_stamp(os.stat(os.path.join(root, path))) for path in paths], dtype=np.int64).reshape(-1, 4)
    digests, missing = _cached_rows(names, stamps, cache_file)
    todo = np.flatnonzero(missing)
    if len(todo) == 0:
        return digests
    read_at = time.time_ns()
    with ThreadPoolExecutor(max_workers=_READERS) as pool:
        hashed = pool.map(_hash_file, [os.path.join(root, paths[i]) for i in todo.tolist()], chunksize=64)
        for row, digest in zip(todo.tolist(), hashed):
            digests[row] = np.frombuffer(digest, dtype=np.uint8)
    if cache_file is not None:
        kept = stamps.copy()
        unsettled = todo[[not _settled(stamps[i], read_at) for i in todo.tolist()]]
        kept[unsettled] = -1  # never matches: hashed again next time
        with atomic_path(cache_file) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, paths=names, stamps=kept, digests=digests)
    return digests
