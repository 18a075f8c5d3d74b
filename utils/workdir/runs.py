"""Finished runs in a work directory: their config and stage, their weights and teachers, their paper-style
names and order. What the report and the tools read; nothing here loads a network."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from config.config import ADAPTORS, ETHNICITIES, KD_KINDS, KD_LABELS, TEACHER_SETS, Config, load_config, teacher_members
from utils.core.errors import InvalidInputError, MissingInputError
from utils.workdir import artifacts

STAGE_ORDER = ("teacher", "adaptor", "student")


def read_run_config(run_dir: Path) -> tuple[Config, str | None]:
    """The run's Config and its stage (None when the config.json records no training stage)."""
    path = artifacts.config_file(run_dir)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"cannot read run config {path}: {exc}") from exc
    stage = data.pop("derived", {}).get("stage")
    try:
        cfg = load_config(data)
    except (KeyError, ValueError) as exc:
        raise InvalidInputError(f"run config {path} does not fit config/config.py: {exc}") from exc
    return cfg, stage


def run_weights(run_dir: Path, stage: str, role: str) -> Path:
    path = artifacts.best_weights(run_dir, stage)
    if not path.is_file():
        raise MissingInputError(f"{role} run {run_dir} has no {path.name} (training not finished?)")
    return path


def teacher_dirs(run_dir: Path, cfg: Config) -> list[Path]:
    """Teacher run folders of an adaptor run, looked up in the work directory the adaptor run sits in."""
    recorded = artifacts.adaptor_dir(cfg).relative_to(artifacts.work_root(cfg))
    depth = len(recorded.parts)
    if run_dir.parts[-depth:] == recorded.parts:
        root = run_dir.parents[depth - 1]
    else:  # the run folder was moved out of its work directory: trust the recorded output_root
        root = artifacts.work_root(cfg)
    return [root / artifacts.teacher_dir(cfg, m).relative_to(artifacts.work_root(cfg))
            for m in teacher_members(cfg.teacher_set)]


def display_name(stage: str, cfg: Config) -> str:
    """Paper-style row names: which teacher set, which member / adaptor / KD kind (and the run_name)."""
    teachers = "specialized" if cfg.teacher_set == "specialized" else "balanced"
    if stage == "teacher":
        name = f"teacher {teachers} {cfg.teacher_member} ({cfg.network})"
    elif stage == "adaptor":
        name = f"{cfg.adaptor}-EAF-Fusion {teachers} (4x {cfg.network})"
    else:
        name = f"student {KD_LABELS[cfg.kd]} {cfg.adaptor} {teachers} ({cfg.student_network})"
    return f"{name} [{cfg.run_name}]" if cfg.run_name else name


def _paper_order(run: tuple[Path, Config, str]) -> tuple[Any, ...]:
    """Paper order: teachers, adaptor spaces, students; specialized before balanced; SL, DuL, DLDPO; a-KD first."""
    run_dir, cfg, stage = run
    member = 0
    if stage == "teacher":
        member = ETHNICITIES.index(cfg.ethnicity) if cfg.teacher_set == "specialized" else cfg.split
    return (cfg.run_name, STAGE_ORDER.index(stage), TEACHER_SETS.index(cfg.teacher_set), member,
            ADAPTORS.index(cfg.adaptor) if stage != "teacher" else 0,
            KD_KINDS.index(cfg.kd) if stage == "student" else 0, str(run_dir))


def find_runs(work_dir: str | Path, run_name: str | None = None) -> list[tuple[Path, Config, str]]:
    """Every teacher/adaptor/student run under ``work_dir`` (of ``run_name`` only, if given), in paper order:
    ``(run_dir, config, stage)``. Runs moved aside by ``replace=True`` are not listed."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        raise MissingInputError(f"work directory {work_dir} does not exist")
    runs = []
    for path in sorted(work_dir.rglob(artifacts.CONFIG_FILE)):
        if artifacts.is_aside(path.parent.relative_to(work_dir)):
            continue
        cfg, stage = read_run_config(path.parent)
        if stage in STAGE_ORDER and (run_name is None or cfg.run_name == run_name):
            runs.append((path.parent, cfg, stage))
    return sorted(runs, key=_paper_order)
