"""Provenance: what determines a stage's outputs, recorded next to them and compared before they are reused.

A record is ``{"stage": ..., "keys": {config keys that change the outputs}, "inputs": {name: fingerprint}}``.
Keys that do not change the outputs (log_every, num_workers, verify_every without RFW, resume, stop_after_epoch,
keep_epoch_weights, paths, run_name, the world size the lr follows) are left out, so changing them never
invalidates a run. Inputs are fingerprinted by content: the training data (image index rows and image sha256s),
the RFW files (best-epoch selection and the report), the split manifest, teacher weights (sha256), the teacher
stores and the adaptor targets (the digests of their own records) and init_weights.

A training run keeps its record in ``provenance.json``; stores and targets keep it in their manifest. A run
folder whose record differs from the one asked for is refused with the list of changed entries, unless the
user says ``replace=True``: then the old folder is moved aside (``<name>.replaced-<time>``), never mixed.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from config.config import Config, teacher_members
from utils.core.digests import file_sha256
from utils.core.errors import ProvenanceError
from utils.core.io import atomic_write_json
from utils.core.locks import relock
from utils.data.index import ImageIndex
from utils.workdir import artifacts

Record = dict[str, Any]

_MODEL_KEYS = ("use_se", "dropout", "width", "embedding_size", "input_size")
# amp_init_scale decides which early fp16 steps the GradScaler skips, so it changes the weights too.
_OPTIMISER_KEYS = ("momentum", "weight_decay", "lr_decay", "grad_clip", "seed", "amp", "amp_init_scale")
_MARGIN_KEYS = ("loss", "s", "m", "std")
_DATA_KEYS = ("ids_per_ethnicity",)


# ---- fingerprints of inputs ----------------------------------------------------------------------------------

def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Absolute path, size and sha256 of a weights file (the sha256 is what identifies it; a copy of
    ``work_dirs`` on another machine keeps it)."""
    path = Path(path).resolve()
    return {"path": str(path), "size": path.stat().st_size, "sha256": file_sha256(path)}


def data_fingerprint(index: ImageIndex, rows: np.ndarray | None = None, digests: np.ndarray | None = None) -> str:
    """The training images a run reads: ``rows`` of the index (all by default) as (path, label, sha256 of the
    file's contents). A replaced image changes it even when its size and times are kept; the digests of unchanged
    files come from the index's digest cache, so only a first run reads every image. RecordIO rows carry the
    digest of the record file. ``digests``: ``index.file_digests()`` when the caller already holds them (a plan
    fingerprints several row sets of one index; each call would stat every image again)."""
    rows = np.arange(len(index)) if rows is None else np.asarray(rows)
    digests = index.file_digests() if digests is None else digests
    digest = hashlib.sha256(f"{index.kind}\n".encode())
    for row in rows.tolist():
        digest.update(f"{index.paths[row]}\t{index.labels[row]}\t{digests[row].tobytes().hex()}\n".encode())
    return digest.hexdigest()


def identities_fingerprint(index: ImageIndex) -> str:
    """The identities of the data (ethnicity and name), what the balanced split is drawn from."""
    return hashlib.sha256("".join(f"{eth}\t{name}\n" for eth, name in index.identities).encode()).hexdigest()


def tree_fingerprint(root: str | Path) -> str:
    """Every file under ``root``: relative path, size and sha256 (the RFW files, a few hundred MB)."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\t{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def record_digest(record: Mapping[str, Any]) -> str:
    """sha256 of a record's canonical JSON: the fingerprint a later stage records for this output."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


# ---- records of each stage ---------------------------------------------------------------------------------

def _keys(cfg: Config, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in names}


def _init_weights(cfg: Config, inputs: dict[str, str]) -> dict[str, str]:
    """Weights a run starts from decide its outputs as much as its data."""
    if cfg.init_weights:
        inputs["init_weights"] = file_sha256(cfg.init_weights)
    return inputs


def _rfw_selection(cfg: Config, keys: dict[str, Any], inputs: dict[str, str]) -> None:
    """With RFW configured, the best epoch is chosen on it: its files and verify_every decide the weights."""
    if cfg.rfw_root is not None:
        inputs["rfw"] = tree_fingerprint(cfg.rfw_root)
        keys["verify_every"] = cfg.verify_every


def split_record(cfg: Config, identities: str) -> Record:
    """The balanced baseline split: the identities of the data (:func:`identities_fingerprint`) and the seed."""
    return {"stage": "split", "keys": _keys(cfg, ("seed", *_DATA_KEYS)), "inputs": {"identities": identities}}


def teacher_record(cfg: Config, data: str) -> Record:
    """A teacher run: network, optimisation, margin head, its member's data (and split manifest), RFW."""
    keys = _keys(cfg, ("teacher_set", "network", *_MODEL_KEYS, *_OPTIMISER_KEYS, *_MARGIN_KEYS, *_DATA_KEYS,
                       "batch_size", "lr", "num_epoch", "milestones"))
    keys["member"] = cfg.teacher_member
    inputs = _init_weights(cfg, {"data": data})
    if cfg.teacher_set == "baseline":
        manifest = artifacts.split_manifest(cfg)
        inputs["split"] = file_sha256(manifest) if manifest.is_file() else "missing"
    _rfw_selection(cfg, keys, inputs)
    return {"stage": "teacher", "keys": keys, "inputs": inputs}


def store_record(cfg: Config, member: str, data: str, teacher_sha256: str) -> Record:
    """One teacher's stored embeddings: the teacher's architecture and weights, the images, flipped rows, and the
    precision of the forward (extraction autocasts in the run's ``amp``)."""
    keys = _keys(cfg, ("teacher_set", "network", *_MODEL_KEYS, *_DATA_KEYS, "extract_flipped", "amp"))
    keys["member"] = member
    return {"stage": "store", "keys": keys, "inputs": {"data": data, "teacher": teacher_sha256}}


def adaptor_record(cfg: Config, stores: Mapping[str, str]) -> Record:
    """An adaptor run: its architecture and optimisation, and the four teacher stores (their record digests)."""
    names = ["teacher_set", "network", "adaptor", "embedding_size", *_OPTIMISER_KEYS, "adaptor_loss",
             "adaptor_std", "lr_fc", "num_epoch_fc", "milestones_fc", "batch_size_fc"]
    if cfg.adaptor != "SL":
        names += ["middle_layer_size", "adaptor_negative_slope"]
    if cfg.adaptor == "DLDPO":
        names.append("adaptor_dropout")
    inputs = _init_weights(cfg, {f"store/{member}": stores[member] for member in teacher_members(cfg.teacher_set)})
    return {"stage": "adaptor", "keys": _keys(cfg, tuple(names)), "inputs": inputs}


def targets_record(adaptor: Mapping[str, Any], adaptor_sha256: str) -> Record:
    """The KD targets: the adaptor run's record and the best weights they were computed with."""
    return {"stage": "targets", "keys": {}, "inputs": {"adaptor_run": record_digest(adaptor),
                                                       "adaptor_weights": adaptor_sha256}}


def student_record(cfg: Config, data: str, targets: str) -> Record:
    """A student run: network, optimisation, KD settings (margin head for EAF-KD), data, targets, RFW."""
    names = ["teacher_set", "network", "adaptor", "kd", "student_network", *_MODEL_KEYS, *_OPTIMISER_KEYS,
             *_DATA_KEYS, "batch_size", "lr", "num_epoch", "milestones", "loss_lambda", "kd_flip_consistent"]
    if cfg.kd == "EAFKD":
        names += list(_MARGIN_KEYS)
    keys = _keys(cfg, tuple(names))
    inputs = _init_weights(cfg, {"data": data})
    inputs["targets"] = targets
    _rfw_selection(cfg, keys, inputs)
    return {"stage": "student", "keys": keys, "inputs": inputs}


# ---- comparing and claiming --------------------------------------------------------------------------------

def _flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    flat = {"stage": record.get("stage")}
    for section in ("keys", "inputs"):
        for name, value in (record.get(section) or {}).items():
            flat[f"{section[:-1]} {name}"] = value
    return flat


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:12] + "..." if isinstance(value, str) and len(value) == 64 else text


def describe_changes(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``name: recorded -> wanted`` for every entry that differs (absent entries read ``(none)``)."""
    old, new = _flatten(recorded), _flatten(wanted)
    lines = []
    for name in sorted(old.keys() | new.keys()):
        if old.get(name, "(none)") != new.get(name, "(none)"):
            before = _short(old[name]) if name in old else "(none)"
            after = _short(new[name]) if name in new else "(none)"
            lines.append(f"{name}: {before} -> {after}")
    return lines


def read_record(run_dir: Path) -> Record | None:
    return artifacts.read_json(artifacts.provenance_file(run_dir), "provenance record")


def claim_run_dir(run_dir: Path, record: Record, *, replace: bool) -> Path | None:
    """Make ``run_dir`` the folder of a run with ``record`` (rank 0, before anything is written).

    A folder holding a run with another record (or one without a record) is refused with the changed
    entries; with ``replace`` it is moved aside first. Returns where the old run went, if it was moved.
    """
    run_dir = Path(run_dir)
    recorded = read_record(run_dir)
    if recorded == record or (recorded is None and not artifacts.has_run_files(run_dir)):
        atomic_write_json(artifacts.provenance_file(run_dir), record)
        return None
    changes = (describe_changes(recorded, record) if recorded is not None
               else [f"{run_dir} holds a run without a {artifacts.PROVENANCE_FILE} (made by an older version)"])
    if not replace:
        raise ProvenanceError(
            f"{run_dir} holds a {record['stage']} run made with other settings or inputs:\n  "
            + "\n  ".join(changes)
            + "\npass replace=True to move the old run aside and start anew, set run_name=... to keep both "
              "side by side, or go back to the recorded settings")
    aside = artifacts.aside_dir(run_dir)
    shutil.move(str(run_dir), str(aside))
    relock(run_dir)  # the lock file moved with the old run; a writer holding run_dir keeps holding it
    atomic_write_json(artifacts.provenance_file(run_dir), record)
    return aside


def run_matches(run_dir: Path, record: Record) -> bool:
    """True when ``run_dir`` finished and was made with ``record``."""
    return artifacts.is_run_complete(run_dir) and read_record(run_dir) == record
