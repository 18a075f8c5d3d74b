"""Every name and marker of the work directory (``output_root``); no other module spells a file name of it.

    <output_root>/
      index/<hash of data_root>.tsv                       cache of the scan of a data root
      splits/baseline_split<-run_name>.json               balanced baseline splits (+ .config.json, .provenance.json)
      teachers/<teacher_set>/<network>_<member><-run_name>/          a training run (teacher)
      embeddings/<teacher_set>_<network><-run_name>/      index.tsv, <member>.npy, <member>_flip.npy, <member>.json
      adaptors/<teacher_set>_<network><-run_name>/<adaptor>/         a training run + targets.npy/_flip.npy/.json
      students/<teacher_set>_<network><-run_name>/<adaptor>_<kd>_<student_network>/   a training run
      report<-run_name>/                                  the RFW report of the runs of one run_name

A training run folder holds ``config.json`` (the resolved config), ``provenance.json`` (what determines its
outputs, see ``utils/workdir/provenance.py``), ``history.json`` (per-epoch records, ``best``, ``complete``),
``checkpoint_last.pt`` (resumable state), ``{step}{model}.pth`` per epoch, ``best_{model}.pth``, ``train.log``
and ``tensorboard/``. ``model`` is ``backbone``, ``adaptor`` or ``header`` (the release's naming). A run made by
importing released weights holds ``config.json``, a complete ``history.json``, ``best_{model}.pth`` and
``imported.json`` (source file, size, sha256, role) instead.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.config import Config
from utils.core.errors import InvalidInputError

CONFIG_FILE = "config.json"
PROVENANCE_FILE = "provenance.json"
IMPORTED_FILE = "imported.json"
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint_last.pt"
LOG_FILE = "train.log"
TENSORBOARD_DIR = "tensorboard"
STORE_INDEX_FILE = "index.tsv"
TARGETS_NAME = "targets"
REPORT_STEM = "results"
REPORT_SOURCES_FILE = "sources.json"
PIPELINE_LOGS_DIR = "pipeline_logs"
_ASIDE_MARK = ".replaced-"
# The weights a later stage uses of each kind of run.
BEST_WEIGHTS = {"teacher": "best_backbone.pth", "student": "best_backbone.pth", "adaptor": "best_adaptor.pth"}


# ---- folders ----------------------------------------------------------------------------------------------

def _named(name: str, cfg: Config) -> str:
    """``name`` with the config's run_name appended, so ablations live side by side."""
    return f"{name}-{cfg.run_name}" if cfg.run_name else name


def work_root(cfg: Config) -> Path:
    return Path(cfg.output_root)


def index_cache_file(cfg: Config) -> Path:
    """Where the scan of cfg.data_root is cached (one file per data root, shared by every run_name)."""
    key = hashlib.sha256(str(Path(cfg.data_root).resolve()).encode()).hexdigest()[:16]  # type: ignore[arg-type]
    return work_root(cfg) / "index" / f"{key}.tsv"


def digest_cache_file(cfg: Config) -> Path:
    """Where the sha256 of every training image of cfg.data_root is kept between processes (beside its scan)."""
    index = index_cache_file(cfg)
    return index.with_name(index.stem + ".digests.npz")


def splits_dir(cfg: Config) -> Path:
    return work_root(cfg) / "splits"


def split_manifest(cfg: Config) -> Path:
    return splits_dir(cfg) / f"{_named('baseline_split', cfg)}.json"


def split_config_file(cfg: Config) -> Path:
    return split_manifest(cfg).with_suffix(".config.json")


def split_provenance_file(cfg: Config) -> Path:
    return split_manifest(cfg).with_suffix(".provenance.json")


def teacher_dir(cfg: Config, member: str | None = None) -> Path:
    name = f"{cfg.network}_{member or cfg.teacher_member}"
    return work_root(cfg) / "teachers" / cfg.teacher_set / _named(name, cfg)


def _teachers_name(cfg: Config) -> str:
    return _named(f"{cfg.teacher_set}_{cfg.network}", cfg)


def store_dir(cfg: Config) -> Path:
    return work_root(cfg) / "embeddings" / _teachers_name(cfg)


def adaptor_dir(cfg: Config) -> Path:
    return work_root(cfg) / "adaptors" / _teachers_name(cfg) / cfg.adaptor


def student_dir(cfg: Config) -> Path:
    return work_root(cfg) / "students" / _teachers_name(cfg) / f"{cfg.adaptor}_{cfg.kd}_{cfg.student_network}"


def report_dir(cfg: Config) -> Path:
    return report_folder(work_root(cfg), cfg.run_name)


def report_folder(work_dir: Path, run_name: str) -> Path:
    """The report of the runs of ``run_name`` in ``work_dir``."""
    return Path(work_dir) / (f"report-{run_name}" if run_name else "report")


def job_log_file(work_dir: Path, job_key: str) -> Path:
    """Where the pipeline keeps the output of a job it runs beside others (``--jobs``)."""
    return Path(work_dir) / PIPELINE_LOGS_DIR / f"{job_key.replace('/', '_')}.log"


def report_sources_file(report: Path) -> Path:
    return report / REPORT_SOURCES_FILE


def aside_dir(folder: Path) -> Path:
    """A free name next to ``folder`` for keeping a replaced run: ``<name>.replaced-<UTC time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    candidate = folder.with_name(f"{folder.name}{_ASIDE_MARK}{stamp}")
    number = 1
    while candidate.exists():
        number += 1
        candidate = folder.with_name(f"{folder.name}{_ASIDE_MARK}{stamp}-{number}")
    return candidate


def is_aside(path: Path) -> bool:
    """True for a path inside a run folder moved aside by replace=True."""
    return any(_ASIDE_MARK in part for part in Path(path).parts)


# ---- files of a run folder ---------------------------------------------------------------------------------

def config_file(run_dir: Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


def provenance_file(run_dir: Path) -> Path:
    return Path(run_dir) / PROVENANCE_FILE


def history_file(run_dir: Path) -> Path:
    return Path(run_dir) / HISTORY_FILE


def checkpoint_file(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_FILE


def log_file(run_dir: Path) -> Path:
    return Path(run_dir) / LOG_FILE


def tensorboard_dir(run_dir: Path) -> Path:
    return Path(run_dir) / TENSORBOARD_DIR


def weights_file(run_dir: Path, epoch_step: int | str, model_name: str) -> Path:
    """``{step}{model}.pth`` of one epoch, or ``best_{model}.pth`` for ``epoch_step="best"``."""
    prefix = f"{epoch_step}_" if isinstance(epoch_step, str) else str(epoch_step)
    return Path(run_dir) / f"{prefix}{model_name}.pth"


def best_weights(run_dir: Path, stage: str) -> Path:
    """The weights a later stage (or the report) uses of a ``teacher``/``adaptor``/``student`` run."""
    return Path(run_dir) / BEST_WEIGHTS[stage]


def read_json(path: Path, what: str) -> Any:
    """JSON at ``path``, or None when there is none; unreadable JSON is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{what} {path} is not valid JSON ({exc}); delete it and rerun the stage that "
                                "writes it") from exc


def read_history(run_dir: Path) -> dict[str, Any] | None:
    return read_json(history_file(run_dir), "training history")


def is_run_complete(run_dir: Path) -> bool:
    """True when a run finished every epoch (its history says so)."""
    try:
        history = read_history(run_dir)
    except InvalidInputError:
        return False
    return bool(history and history.get("complete"))


def imported_file(run_dir: Path) -> Path:
    """The provenance record of weights imported by ``utils/stages/release_import.py`` (source file, sha256, role)."""
    return Path(run_dir) / IMPORTED_FILE


def is_imported(run_dir: Path) -> bool:
    """A run folder whose weights were imported (the authors' release), not trained here."""
    return imported_file(run_dir).is_file()


def has_run_files(run_dir: Path) -> bool:
    """A training run was started here: it left a history or a resumable checkpoint."""
    return history_file(run_dir).exists() or checkpoint_file(run_dir).exists()


def is_weights_only(run_dir: Path, stage: str) -> bool:
    """A folder holding best weights put there by hand (the authors' released teachers): no history, and no
    training checkpoint (a trained run whose history.json was lost is repaired by its resume, issue 14)."""
    return best_weights(run_dir, stage).is_file() and not has_run_files(run_dir)


def teacher_ready(run_dir: Path) -> bool:
    """A teacher folder is usable when its training finished, or when it holds weights put there by hand
    (the authors' released teachers come without a training history)."""
    return is_weights_only(run_dir, "teacher") or is_run_complete(run_dir)


# ---- stores ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoreFiles:
    """The files of one stored array: rows, flipped-image rows and manifest."""

    array: Path
    flipped: Path
    manifest: Path

    @classmethod
    def named(cls, folder: str | Path, name: str) -> "StoreFiles":
        folder = Path(folder)
        return cls(folder / f"{name}.npy", folder / f"{name}_flip.npy", folder / f"{name}.json")


def store_index_file(store: Path) -> Path:
    return Path(store) / STORE_INDEX_FILE


def member_files(store: str | Path, member: str) -> StoreFiles:
    return StoreFiles.named(store, member)


def target_files(adaptor_run: str | Path) -> StoreFiles:
    return StoreFiles.named(adaptor_run, TARGETS_NAME)
