"""The paper's whole pipeline as a list of jobs: which script, which overrides, and how to tell it is done.

``run_pipeline.py`` is the command-line front end. Completion checks read the outputs' own markers (history
``complete`` flags and store manifests), so a finished job is skipped without starting Python again and an
interrupted one is rerun with ``resume=True``.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from config.config import (
    ADAPTOR_SCRIPTS, ADAPTORS, ETHNICITIES, KD_KINDS, KD_SCRIPTS, TEACHER_SETS, Config, load_config, teacher_members)
from utils.io import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
STAGES = ("split", "teachers", "extract", "adaptors", "students", "report")


@dataclass(frozen=True)
class Preset:
    """A named configuration of the whole pipeline; ``synthetic`` sizes mean "generate the data first"."""

    overrides: dict[str, Any]
    synthetic: dict[str, int] | None = None
    description: str = ""


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        description="synthetic data, small networks: the whole paper pipeline on 2 CPU cores",
        synthetic={"ids_per_ethnicity": 50, "images_per_id": 10, "pairs_per_ethnicity": 300, "image_size": 32},
        overrides={"network": "iresnet18", "student_network": "iresnet18", "width": 16, "input_size": 32,
                   "batch_size": 64, "batch_size_fc": 64, "lr": 0.8, "num_epoch": 6, "milestones": [5],
                   "num_epoch_fc": 6, "milestones_fc": [5], "num_workers": 0, "log_every": 10,
                   "verify_every": 3},
    ),
    "tiny": Preset(
        description="seconds per stage: the end-to-end test of the pipeline",
        synthetic={"ids_per_ethnicity": 6, "images_per_id": 4, "pairs_per_ethnicity": 20, "image_size": 32},
        overrides={"network": "iresnet18", "student_network": "iresnet18", "width": 8, "input_size": 32,
                   "batch_size": 8, "batch_size_fc": 16, "num_epoch": 1, "milestones": [2],
                   "num_epoch_fc": 2, "milestones_fc": [2], "num_workers": 0, "log_every": 5,
                   "embedding_size": 64},
    ),
    "paper": Preset(description="the paper's configuration; give data_root= and rfw_root=", overrides={}),
}


@dataclass
class Job:
    stage: str
    script: str  # a stage script, or "" for the in-process report
    overrides: list[str]
    done: Callable[[], bool]
    distributed: bool = True  # launched under torchrun when more than one process is asked for
    label: str = field(default="")

    def describe(self) -> str:
        return self.label or f"{self.script} {' '.join(self.overrides)}".strip()


def _cfg(base: Sequence[str], extra: Sequence[str]) -> Config:
    return load_config(list(base) + list(extra))


def _stores_complete(cfg: Config, index_hash: str) -> bool:
    from utils.embedding_store import teacher_store_complete

    return all(teacher_store_complete(cfg, member, index_hash) for member in teacher_members(cfg.teacher_set))


def _adaptor_done(cfg: Config, index_hash: str) -> bool:
    from utils.embedding_store import targets_complete
    from utils.engine import is_run_complete

    return is_run_complete(cfg.adaptor_dir) and targets_complete(cfg.adaptor_dir, index_hash)


def plan_jobs(base: Sequence[str]) -> list[Job]:
    """Every job of the paper, in order, for the config ``base`` (a list of ``key=value`` overrides)."""
    from utils.engine import is_run_complete

    jobs: list[Job] = []
    cfg = _cfg(base, [])

    @functools.cache
    def index_hash() -> str:
        """Every job shares the data, so the (possibly 1.25 M-line) index is read once per pipeline run, and
        only when a check needs it (the data set may not exist before the first job)."""
        from utils.dataset import load_index

        return load_index(cfg).digest()

    jobs.append(Job("split", "baseline_data_split.py", [], lambda: cfg.split_manifest.is_file(), distributed=False))
    for ethnicity in ETHNICITIES:
        extra = ["teacher_set=specialized", f"ethnicity={ethnicity}", "resume=True"]
        run_dir = _cfg(base, extra).teacher_dir()
        jobs.append(Job("teachers", "train.py", extra, lambda d=run_dir: is_run_complete(d)))
    for split in range(4):
        extra = ["teacher_set=baseline", f"split={split}", "resume=True"]
        run_dir = _cfg(base, extra).teacher_dir()
        jobs.append(Job("teachers", "train.py", extra, lambda d=run_dir: is_run_complete(d)))
    for teacher_set in TEACHER_SETS:
        extra = [f"teacher_set={teacher_set}", "ethnicity=all"]
        jobs.append(Job("extract", "extract_all.py", extra, lambda c=_cfg(base, extra): _stores_complete(c, index_hash())))
    for teacher_set in TEACHER_SETS:
        for adaptor in ADAPTORS:
            script, flags = ADAPTOR_SCRIPTS[adaptor]
            extra = [f"teacher_set={teacher_set}", f"adaptor={adaptor}", *flags, "resume=True"]
            jobs.append(Job("adaptors", script, extra, lambda c=_cfg(base, extra): _adaptor_done(c, index_hash())))
    for teacher_set in TEACHER_SETS:
        for adaptor in ADAPTORS:
            for kd in KD_KINDS:
                extra = [f"teacher_set={teacher_set}", f"adaptor={adaptor}", f"kd={kd}", "resume=True"]
                run_dir = _cfg(base, extra).student_dir
                jobs.append(Job("students", KD_SCRIPTS[kd], extra, lambda d=run_dir: is_run_complete(d)))
    return jobs


def select_jobs(jobs: list[Job], only: Sequence[str] | None, start: str | None) -> list[Job]:
    for name in list(only or []) + ([start] if start else []):
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    if only:
        return [job for job in jobs if job.stage in only]
    if start:
        first = STAGES.index(start)
        return [job for job in jobs if STAGES.index(job.stage) >= first]
    return jobs


def launch_command(job: Job, base: Sequence[str], nproc: int, torchrun_args: Sequence[str]) -> list[str]:
    """The command line of a job: plain python, or torchrun when several processes are asked for."""
    script = str(REPO / job.script)
    args = [*base, *job.overrides]
    if nproc > 1 and job.distributed:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *torchrun_args]
        if not any(arg.startswith(("--rdzv", "--nnodes", "--master")) for arg in torchrun_args):
            launcher.append("--standalone")
        return [*launcher, script, *args]
    return [sys.executable, script, *args]


def run_in_process(job: Job, base: Sequence[str]) -> None:
    """Run a stage script's ``main`` in this interpreter: saves the start-up of a process per job."""
    path = REPO / job.script
    spec = importlib.util.spec_from_file_location(f"stage_{path.stem.replace('-', '_')}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from utils.cli import run_stage

    run_stage(module.main, [*base, *job.overrides])


def run_job(job: Job, base: Sequence[str], nproc: int, torchrun_args: Sequence[str]) -> None:
    if nproc > 1 and job.distributed:
        command = launch_command(job, base, nproc, torchrun_args)
        print("$ " + shlex.join(command), flush=True)
        completed = subprocess.run(command, cwd=REPO, env=os.environ.copy())
        if completed.returncode != 0:
            raise RuntimeError(f"{job.describe()} failed with exit code {completed.returncode}")
    else:
        run_in_process(job, base)


# ---- the report -------------------------------------------------------------------------------------------

def display_name(stage: str, cfg: Config) -> str:
    """Paper-style row names: which teacher set, which member / adaptor / KD kind."""
    teachers = "specialized" if cfg.teacher_set == "specialized" else "balanced"
    if stage == "teacher":
        return f"teacher {teachers} {cfg.teacher_member} ({cfg.network})"
    if stage == "adaptor":
        return f"{cfg.adaptor}-EAF-Fusion {teachers} (4x {cfg.network})"
    kd = {"aKD": "a-KD", "EAFKD": "EAF-KD"}[cfg.kd]
    return f"student {kd} {cfg.adaptor} {teachers} ({cfg.student_network})"


def _row_order(stage: str, cfg: Config) -> tuple[int, ...]:
    """Paper order: teachers, adaptor spaces, students; specialized before balanced; SL, DuL, DLDPO; a-KD first."""
    member = 0
    if stage == "teacher":
        member = ETHNICITIES.index(cfg.ethnicity) if cfg.teacher_set == "specialized" else cfg.split
    return (("teacher", "adaptor", "student").index(stage), TEACHER_SETS.index(cfg.teacher_set), member,
            ADAPTORS.index(cfg.adaptor) if stage != "teacher" else 0, KD_KINDS.index(cfg.kd) if stage == "student" else 0)


def _sources(runs: Sequence[tuple[Path, Config, str]]) -> list[list[Any]]:
    """What a report was computed from: each run's evaluated weights file with its size and mtime."""
    from eval.evaluate import WEIGHTS_FILE

    sources = []
    for run_dir, _, stage in runs:
        weights = run_dir / WEIGHTS_FILE[stage]
        stat = weights.stat() if weights.is_file() else None
        sources.append([str(weights), stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
    return sources


def build_report(cfg: Config, out_dir: Path | None = None) -> tuple[str, Path]:
    """Evaluate every run under ``cfg.output_root`` on RFW; write the report; return (text, report dir).

    A report whose runs' weights have not changed since it was written is reused without evaluating again.
    """
    from eval.evaluate import evaluate_run, find_runs
    from eval.report import read_report_rows, results_table, write_report
    from eval.verification import RFWEvaluator

    if cfg.rfw_root is None:
        raise ValueError("the report needs rfw_root=<folder with <Ethnicity>_test.bin>")
    out_dir = out_dir or cfg.work_root / "report"
    runs = sorted(find_runs(cfg.work_root), key=lambda run: _row_order(run[2], run[1]))
    sources, sources_path = _sources(runs), out_dir / "sources.json"
    if sources_path.is_file() and json.loads(sources_path.read_text()) == sources:
        rows = read_report_rows(out_dir / "results.json")
    else:
        evaluator = RFWEvaluator(cfg.rfw_root, cfg.input_size, batch_size=cfg.extract_batch_size)
        rows = []
        for run_dir, run_cfg, stage in tqdm(runs, desc="report: evaluating runs on RFW", file=sys.stdout):
            row = evaluate_run(run_dir, run_cfg, stage, evaluator, name=display_name(stage, run_cfg))
            row.extra.update(run_dir=str(run_dir), teacher_set=run_cfg.teacher_set)
            rows.append(row)
        write_report(rows, out_dir, stem="results")
        atomic_write_json(sources_path, sources)
    text = results_table(rows) + "\n\n" + summary_line(rows)
    return text, out_dir


def summary_line(rows: Sequence[Any]) -> str:
    """Whether students of specialized teachers beat students of balanced teachers, from these numbers only."""
    groups: dict[str, list[dict[str, float]]] = {"specialized": [], "baseline": []}
    # A degenerate evaluation (constant or non-finite embeddings) measures nothing: it is left out, by name.
    degenerate = [row.name for row in rows if row.extra.get("stage") == "student" and row.extra.get("degenerate")]
    left_out = f" Left out as degenerate: {', '.join(degenerate)}." if degenerate else ""
    for row in rows:
        if row.extra.get("stage") == "student" and row.name not in degenerate:
            groups[row.extra["teacher_set"]].append(row.metrics())
    if not groups["specialized"] or not groups["baseline"]:
        return "Summary: students of both teacher sets are needed to compare them." + left_out
    mean = {name: {key: sum(m[key] for m in group) / len(group) for key in ("avg", "std", "ser")}
            for name, group in groups.items()}
    spec, base = mean["specialized"], mean["baseline"]
    verdicts = [
        f"Avg {'higher' if spec['avg'] > base['avg'] else 'not higher'} ({spec['avg']:.2f} vs {base['avg']:.2f})",
        f"STD {'lower' if spec['std'] < base['std'] else 'not lower'} ({spec['std']:.2f} vs {base['std']:.2f})",
        f"SER {'lower' if spec['ser'] < base['ser'] else 'not lower'} ({spec['ser']:.3f} vs {base['ser']:.3f})",
    ]
    wins = sum(("not" not in verdict) for verdict in verdicts)
    return (f"Summary (mean over {len(groups['specialized'])} students per teacher set, this run only): students of "
            f"specialized teachers vs students of balanced teachers: {'; '.join(verdicts)} -> better on "
            f"{wins} of 3.{left_out}")
