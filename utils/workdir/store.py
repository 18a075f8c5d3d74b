"""The embedding store: per-teacher embeddings (stage 3) and adaptor KD targets (stage 4), one row per image.

A teacher store (``artifacts.store_dir``) holds the image index the rows follow, and per teacher an [N, E]
float32 array of L2-normalised embeddings of the unflipped images, optionally one of the flipped images, and a
manifest; the adaptor's target store (in its run folder) has the same shape. File names: ``utils/workdir/artifacts.py``.

A manifest holds N, dim, the index hash (``ImageIndex.digest()``), the checkpoint the rows came from
(absolute path, size and the sha256 of the whole file: a few hundred ms for an iResNet, and unlike an mtime it
survives copying ``work_dirs`` to another machine), ``flipped``, ``complete`` and ``provenance`` (the record
of what determines the rows, ``utils/workdir/provenance.py``). Writers mark a manifest incomplete before touching the
arrays and complete only after every rank flushed its rows, so a crash never leaves a store that reads as
complete. A store whose record differs from the one asked for is rewritten as a whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from numpy.lib.format import open_memmap

from config.config import Config, teacher_members
from utils.core.distributed import DistInfo, barrier, shard_range
from utils.core.errors import IncompatibleInputError, InvalidInputError, MissingInputError, ProvenanceError
from utils.core.io import atomic_write_json, create_array
from utils.core.numerics import NonFiniteError, first_nonfinite_row
from utils.data.index import ImageIndex
from utils.workdir import artifacts
from utils.workdir.artifacts import StoreFiles, member_files, target_files
from utils.workdir.provenance import Record, describe_changes, file_fingerprint, record_digest


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest at ``path``, or None when there is none; unreadable JSON is an error naming the file."""
    data = artifacts.read_json(Path(path), "embedding store manifest")
    if data is not None and not isinstance(data, dict):
        raise InvalidInputError(f"embedding store manifest {path} should hold a JSON object")
    return data


def manifest_problem(manifest: dict[str, Any] | None, files: StoreFiles, index_hash: str, *,
                     checkpoint_sha256: str | None = None, flipped: bool = False,
                     record: Record | None = None) -> str | None:
    """Why a store does not serve ``index_hash`` (and ``checkpoint_sha256``, ``flipped``, the provenance
    ``record``); None if it does."""
    if manifest is None:
        return f"no manifest {files.manifest}"
    if not manifest.get("complete"):
        return f"{files.array} is incomplete (interrupted write; {files.manifest} has complete=false)"
    if record is not None and manifest.get("provenance") != record:
        changes = describe_changes(manifest.get("provenance") or {}, record)
        return f"{files.array} was made from other settings or inputs ({'; '.join(changes)})"
    if manifest.get("index_hash") != index_hash:
        return (f"{files.array} was built from another image index (index hash {manifest.get('index_hash')}, "
                f"expected {index_hash})")
    recorded = manifest.get("checkpoint", {})
    if checkpoint_sha256 is not None and recorded.get("sha256") != checkpoint_sha256:
        return (f"{files.array} was written from checkpoint {recorded.get('path')} (sha256 {recorded.get('sha256')}), "
                f"not the current one (sha256 {checkpoint_sha256})")
    if flipped and not manifest.get("flipped"):
        return f"{files.array} has no flipped-image rows ({files.flipped}; extract with extract_flipped=True)"
    for path in (files.array, files.flipped) if flipped else (files.array,):
        problem = array_file_problem(path, manifest)
        if problem is not None:
            return f"{problem} although {files.manifest} says complete"
    return None


def array_file_problem(path: Path, manifest: dict[str, Any]) -> str | None:
    """Why the ``.npy`` at ``path`` cannot hold the manifest's rows (missing, unreadable header, other shape or
    dtype, truncated, trailing bytes); None if it can. Reads the header only, so it costs microseconds."""
    try:
        expected = (int(manifest["N"]), int(manifest["dim"]))
    except (KeyError, TypeError, ValueError):
        return f"the manifest of {path} has no valid N and dim"
    if not path.is_file():
        return f"{path} is missing"
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
    except (ValueError, OSError, EOFError) as exc:
        return f"{path} is not a readable .npy file ({exc})"
    if dtype != np.float32 or shape != expected or fortran:
        return f"{path} holds {dtype} {shape}, its manifest says float32 {expected}"
    size, needed = path.stat().st_size, offset + expected[0] * expected[1] * 4
    if size != needed:
        return f"{path} has {size} bytes, {needed} expected for float32 {expected} (truncated or damaged file)"
    return None


def load_array(path: str | Path, manifest: dict[str, Any], *, in_memory: bool = False) -> np.ndarray:
    """The [N, dim] rows at ``path`` (read-only memory map unless ``in_memory``), checked against the manifest."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"embedding array not found: {path}")
    problem = array_file_problem(path, manifest)
    if problem is not None:
        raise IncompatibleInputError(f"{problem}; rerun the stage that writes it")
    return np.load(path, mmap_mode=None if in_memory else "r")


def checked_rows(values: np.ndarray, rows: np.ndarray, path: Path, source: Path) -> np.ndarray:
    """``values`` (to be written as ``rows`` of ``path``), or NonFiniteError naming the first bad row: a store
    must never hold NaN/inf rows (its manifest stays incomplete)."""
    bad = first_nonfinite_row(values)
    if bad is not None:
        raise NonFiniteError(f"{source} gives a non-finite embedding for row {int(rows[bad])} of {path}; the store "
                             "is left incomplete (was the model trained to NaN weights?)")
    return values


RowWriter = Callable[[range, dict[str, np.ndarray]], None]


def write_rows_sharded(files: StoreFiles, manifest: dict[str, Any], info: DistInfo, fill: RowWriter) -> None:
    """Write a store with every rank filling its own contiguous rows of shared memory-mapped arrays.

    ``manifest`` needs ``N``, ``dim`` and ``flipped``; ``fill(rows, arrays)`` writes ``arrays["array"][rows]``
    (and ``arrays["flipped"][rows]`` when flipped). Every rank must call this together.
    """
    n, dim, flipped = int(manifest["N"]), int(manifest["dim"]), bool(manifest["flipped"])
    names = ["array", "flipped"] if flipped else ["array"]
    if info.is_main:
        atomic_write_json(files.manifest, {**manifest, "complete": False})
        if not flipped:
            files.flipped.unlink(missing_ok=True)
        for name in names:
            create_array(getattr(files, name), (n, dim)).flush()
    barrier()
    arrays = {name: open_memmap(getattr(files, name), mode="r+") for name in names}
    fill(shard_range(n, info.rank, info.world_size), arrays)
    for array in arrays.values():
        array.flush()
    del arrays
    barrier()
    if info.is_main:
        atomic_write_json(files.manifest, {**manifest, "complete": True})
    barrier()


# ---- teacher stores (what the adaptors read) ------------------------------------------------------------


@dataclass
class TeacherStores:
    """The four teachers' stores of one teacher set, validated together, in concatenation order."""

    index: ImageIndex
    members: list[str]
    arrays: list[np.ndarray]  # read-only memory maps [N, E]
    flipped: list[np.ndarray] | None  # flipped-image rows, when every store has them
    checkpoints: dict[str, str]  # member -> sha256 of the teacher checkpoint the rows came from
    records: dict[str, str]  # member -> digest of the store's provenance record (what the adaptor records)


def open_teacher_stores(cfg: Config) -> TeacherStores:
    """Open the stores of ``cfg.teacher_set`` in ``artifacts.store_dir(cfg)`` for the adaptor stage.

    Every teacher must have its checkpoint, and a complete store built from ``index.tsv`` of the store folder
    and from that very checkpoint; otherwise one ProvenanceError lists every problem.
    """
    store_dir = artifacts.store_dir(cfg)
    index_path = artifacts.store_index_file(store_dir)
    if not index_path.is_file():
        raise MissingInputError(f"image index of the teacher stores not found: {index_path} (run extract_all.py "
                                f"teacher_set={cfg.teacher_set} ethnicity=all first)")
    index = ImageIndex.load(index_path)
    index_hash = index.digest()
    members = teacher_members(cfg.teacher_set)
    problems: list[str] = []
    manifests: dict[str, dict[str, Any]] = {}
    checkpoints: dict[str, str] = {}
    for member in members:
        checkpoint = artifacts.best_weights(artifacts.teacher_dir(cfg, member), "teacher")
        if not checkpoint.is_file():
            problems.append(f"{member}: teacher checkpoint {checkpoint} is missing")
            continue
        checkpoints[member] = file_fingerprint(checkpoint)["sha256"]
        files = member_files(store_dir, member)
        manifest = read_manifest(files.manifest)
        problem = manifest_problem(manifest, files, index_hash, checkpoint_sha256=checkpoints[member])
        if problem is None and manifest is not None and int(manifest["dim"]) != cfg.embedding_size:
            problem = f"{files.array} has {manifest['dim']}-D rows, config embedding_size={cfg.embedding_size}"
        if problem is not None:
            problems.append(f"{member}: {problem}")
        else:
            manifests[member] = manifest  # type: ignore[assignment]
    if problems:
        raise ProvenanceError(
            f"the adaptor needs {len(members)} complete teacher stores in {store_dir} (index {index_path}), "
            f"{len(manifests)} are usable:\n  " + "\n  ".join(problems)
            + f"\nrerun extract_all.py teacher_set={cfg.teacher_set} ethnicity=all network={cfg.network}")
    arrays = [load_array(member_files(store_dir, m).array, manifests[m]) for m in members]
    flipped = None
    if all(manifests[m].get("flipped") for m in members):
        flipped = [load_array(member_files(store_dir, m).flipped, manifests[m]) for m in members]
    records = {m: record_digest(manifests[m].get("provenance") or {}) for m in members}
    return TeacherStores(index, members, arrays, flipped, checkpoints, records)


# ---- KD targets (what the students read) ----------------------------------------------------------------


def open_targets(adaptor_dir: Path, index_hash: str, *, flipped: bool = False,
                 in_memory: bool = False) -> np.ndarray:
    """The adaptor's KD targets ``[N, E]`` in index order (``flipped``: those of the flipped images).

    A read-only memory map unless ``in_memory``. Raises FileNotFoundError naming the missing file, and
    ProvenanceError naming the store when it is incomplete, built from another index, or lacks flipped rows.
    """
    files = target_files(adaptor_dir)
    manifest = read_manifest(files.manifest)
    if manifest is None:
        raise MissingInputError(f"KD target manifest not found: {files.manifest} (train the adaptor with "
                                "fc_EArc.py or dual_layer_EAF-Fusion.py first)")
    problem = manifest_problem(manifest, files, index_hash, flipped=flipped)
    if problem is not None:
        raise ProvenanceError(f"KD targets unusable: {problem}")
    return load_array(files.flipped if flipped else files.array, manifest, in_memory=in_memory)
