"""The paper's whole pipeline as a list of jobs: which script, which overrides, what it depends on, and
whether it has to run.

A job is done only when its outputs are complete *and* their provenance record (``utils/workdir/provenance.py``)
matches the one the current config and the current upstream outputs call for; a job whose upstream job runs
runs too. :func:`plan` decides every job before anything runs and says why; each job then runs as its own
process (``utils.pipeline.launch``). The pipeline reads artifacts only; it imports no training code.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from config.config import (
    ADAPTOR_SCRIPTS, ADAPTORS, ETHNICITIES, KD_KINDS, KD_SCRIPTS, TEACHER_SETS, Config, load_config, teacher_members
)
from utils.core.digests import file_sha256
from utils.core.errors import InvalidInputError
from utils.data.index import ImageIndex
from utils.workdir import artifacts
from utils.workdir.inputs import load_index, training_rows
from utils.workdir.provenance import (
    Record, adaptor_record, data_fingerprint, describe_changes, identities_fingerprint, read_record,
    record_digest, split_record, store_record, student_record, targets_record, teacher_record
)

REPO = Path(__file__).resolve().parents[2]
STAGES = ("split", "teachers", "extract", "adaptors", "students", "report")
# --teacher-sets of run_pipeline.py: which teacher sets (and everything built on them) to run.
TEACHER_SET_CHOICES = {"specialized": ("specialized",), "baseline": ("baseline",), "both": TEACHER_SETS}


@dataclass(frozen=True)
class Preset:
    """A named configuration of the whole pipeline; ``synthetic`` sizes mean "generate the data first"."""

    overrides: dict[str, Any]
    synthetic: dict[str, float] | None = None
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
        synthetic={"ids_per_ethnicity": 6, "images_per_id": 4, "pairs_per_ethnicity": 100, "image_size": 32},
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
    script: str
    overrides: list[str]
    key: str  # unique name, used for the dependencies
    upstream: list[str]  # keys of the jobs whose outputs this job reads
    check: Callable[[], "Verdict"]  # is it done, given the current outputs of its upstream jobs?
    distributed: bool = True  # launched under torchrun when more than one process is asked for
    # Weights that come from elsewhere (imported or put there by hand): never retrained, whatever runs upstream.
    kept: Callable[[], bool] = lambda: False

    def describe(self) -> str:
        return f"{self.script} {' '.join(self.overrides)}".strip()

    def line(self, number: int, total: int) -> str:
        """How the plan and the progress lines name the job: ``[n/N] stage: script overrides``."""
        return f"[{number}/{total}] {self.stage}: {self.describe()}"


@dataclass(frozen=True)
class Verdict:
    done: bool
    reason: str


@dataclass(frozen=True)
class Step:
    job: Job
    run: bool
    reason: str


def _cfg(base: Sequence[str], extra: Sequence[str]) -> Config:
    return load_config(list(base) + list(extra))


def _changed(what: str, recorded: Record, wanted: Record) -> Verdict:
    return Verdict(False, f"{what} made with other settings or inputs ({'; '.join(describe_changes(recorded, wanted))})")


def _imported(run_dir: Path) -> Verdict | None:
    """Weights imported by utils/stages/release_import.py are a finished run, whatever the settings and inputs."""
    if artifacts.is_imported(run_dir) and artifacts.is_run_complete(run_dir):
        return Verdict(True, f"imported weights ({artifacts.IMPORTED_FILE}): used as they are")
    return None


def _run_verdict(run_dir: Path, wanted: Record) -> Verdict:
    """A training run is done when it finished with the wanted record, or holds imported weights."""
    imported = _imported(run_dir)
    if imported is not None:
        return imported
    recorded = read_record(run_dir)
    if recorded is None:
        if not artifacts.has_run_files(run_dir):
            return Verdict(False, "not trained yet")
        return Verdict(False, "run without a provenance record (older version): kept aside, trained anew")
    if recorded != wanted:
        return _changed("run", recorded, wanted)
    if not artifacts.is_run_complete(run_dir):
        return Verdict(False, "interrupted: resumes from its last epoch")
    return Verdict(True, "complete, same settings and inputs")


def _store_verdict(manifest_path: Path, wanted: Record, what: str) -> Verdict:
    manifest = artifacts.read_json(manifest_path, "store manifest")
    if manifest is None:
        return Verdict(False, f"{what} not written yet")
    if manifest.get("provenance") != wanted:
        return _changed(what, manifest.get("provenance") or {}, wanted)
    if not manifest.get("complete"):
        return Verdict(False, f"{what} interrupted")
    return Verdict(True, "complete, same settings and inputs")


class _Inputs:
    """What the checks share, computed once per plan: the image index, its file digests and the data
    fingerprints (weights and RFW digests are reused by :func:`utils.core.digests.file_sha256` itself)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._data: dict[tuple[str, str], str] = {}

    @functools.cached_property
    def index(self) -> ImageIndex:
        return load_index(self.cfg)

    @functools.cached_property
    def digests(self) -> np.ndarray:
        return self.index.file_digests()

    def data(self, cfg: Config, protocol: str) -> str:
        """Fingerprint of the rows a stage of ``cfg`` reads under ``protocol`` (cached per teacher member)."""
        key = (protocol, cfg.teacher_member if protocol != "all" else "")
        if key not in self._data:
            rows, _ = training_rows(cfg, self.index, protocol)
            self._data[key] = data_fingerprint(self.index, rows, self.digests)
        return self._data[key]

    def teacher_weights(self, cfg: Config, member: str) -> str | None:
        """sha256 of a finished (or released) teacher's best weights; None when there are none."""
        run_dir = artifacts.teacher_dir(cfg, member)
        weights = artifacts.best_weights(run_dir, "teacher")
        return file_sha256(weights) if artifacts.teacher_ready(run_dir) and weights.is_file() else None

    def store_records(self, cfg: Config) -> dict[str, Record] | None:
        records = {}
        for member in teacher_members(cfg.teacher_set):
            sha = self.teacher_weights(cfg, member)
            if sha is None:
                return None
            records[member] = store_record(cfg, member, self.data(cfg, "all"), sha)
        return records

    def adaptor_record(self, cfg: Config) -> Record | None:
        stores = self.store_records(cfg)
        return None if stores is None else adaptor_record(cfg, {m: record_digest(r) for m, r in stores.items()})

    def targets_record(self, cfg: Config) -> Record | None:
        record = self.adaptor_record(cfg)
        weights = artifacts.best_weights(artifacts.adaptor_dir(cfg), "adaptor")
        if record is None or not weights.is_file():
            return None
        return targets_record(record, file_sha256(weights))


def _teacher_check(cfg: Config, inputs: _Inputs) -> Verdict:
    run_dir = artifacts.teacher_dir(cfg)
    if artifacts.is_weights_only(run_dir, "teacher"):
        return Verdict(True, "weights put there by hand (released teacher): used as they are")
    imported = _imported(run_dir)
    if imported is not None:
        return imported
    protocol = "split" if cfg.teacher_set == "baseline" else "ethnicity"
    if protocol == "split" and not artifacts.split_manifest(cfg).is_file():
        return Verdict(False, "no split manifest yet")
    return _run_verdict(run_dir, teacher_record(cfg, inputs.data(cfg, protocol)))


def _extract_check(cfg: Config, inputs: _Inputs) -> Verdict:
    records = inputs.store_records(cfg)
    if records is None:
        return Verdict(False, "a teacher has no finished weights yet")
    for member, record in records.items():
        verdict = _store_verdict(artifacts.member_files(artifacts.store_dir(cfg), member).manifest, record,
                                 f"{member} store")
        if not verdict.done:
            return verdict
    return Verdict(True, "complete, same teachers and images")


def _adaptor_check(cfg: Config, inputs: _Inputs) -> Verdict:
    record = inputs.adaptor_record(cfg)
    if record is None:
        return Verdict(False, "teacher stores not ready")
    verdict = _run_verdict(artifacts.adaptor_dir(cfg), record)
    if not verdict.done:
        return verdict
    return _store_verdict(artifacts.target_files(artifacts.adaptor_dir(cfg)).manifest,
                          inputs.targets_record(cfg), "KD targets")  # type: ignore[arg-type]


def _student_check(cfg: Config, inputs: _Inputs) -> Verdict:
    imported = _imported(artifacts.student_dir(cfg))
    if imported is not None:
        return imported
    targets = inputs.targets_record(cfg)
    if targets is None:
        return Verdict(False, "KD targets not ready")
    return _run_verdict(artifacts.student_dir(cfg), student_record(cfg, inputs.data(cfg, "all"),
                                                                   record_digest(targets)))


def _split_check(cfg: Config, inputs: _Inputs) -> Verdict:
    if not artifacts.split_manifest(cfg).is_file():
        return Verdict(False, "no split yet")
    wanted = split_record(cfg, identities_fingerprint(inputs.index))
    recorded = artifacts.read_json(artifacts.split_provenance_file(cfg), "split provenance record")
    if recorded != wanted:
        return _changed("split", recorded or {}, wanted)
    return Verdict(True, "complete, same seed and data")


def plan_jobs(base: Sequence[str], teacher_sets: Sequence[str] = TEACHER_SETS) -> list[Job]:
    """Every job of the paper, in order, for the config ``base`` (a list of ``key=value`` overrides), for the
    given teacher sets (the split only serves the baseline teachers)."""
    unknown = sorted(set(teacher_sets) - set(TEACHER_SETS))
    if unknown:
        raise InvalidInputError(f"unknown teacher sets {unknown}; they are {', '.join(TEACHER_SETS)}")
    teacher_sets = [name for name in TEACHER_SETS if name in teacher_sets]
    cfg = _cfg(base, [])
    inputs = _Inputs(cfg)
    jobs: list[Job] = []
    if "baseline" in teacher_sets:
        jobs.append(Job("split", "baseline_data_split.py", [], "split", [], lambda: _split_check(cfg, inputs),
                        distributed=False))

    def add(stage: str, script: str, extra: list[str], key: str, upstream: list[str],
            check: Callable[[Config, _Inputs], Verdict], kept: Callable[[Config], bool] = lambda _: False) -> None:
        job_cfg = _cfg(base, extra)
        jobs.append(Job(stage, script, extra, key, upstream, lambda: check(job_cfg, inputs),
                        kept=lambda: kept(job_cfg)))

    def teacher_kept(job_cfg: Config) -> bool:
        run_dir = artifacts.teacher_dir(job_cfg)
        return artifacts.is_imported(run_dir) or artifacts.is_weights_only(run_dir, "teacher")

    for ethnicity in ETHNICITIES if "specialized" in teacher_sets else ():
        add("teachers", "train.py", ["teacher_set=specialized", f"ethnicity={ethnicity}"],
            f"teacher/specialized/{ethnicity}", [], _teacher_check, teacher_kept)
    for split in range(4) if "baseline" in teacher_sets else ():
        add("teachers", "train.py", ["teacher_set=baseline", f"split={split}"], f"teacher/baseline/split{split}",
            ["split"], _teacher_check, teacher_kept)
    for teacher_set in teacher_sets:
        members = teacher_members(teacher_set)
        add("extract", "extract_all.py", [f"teacher_set={teacher_set}", "ethnicity=all"], f"extract/{teacher_set}",
            [f"teacher/{teacher_set}/{member}" for member in members], _extract_check)
    for teacher_set in teacher_sets:
        for adaptor in ADAPTORS:
            script, flags = ADAPTOR_SCRIPTS[adaptor]
            add("adaptors", script, [f"teacher_set={teacher_set}", f"adaptor={adaptor}", *flags],
                f"adaptor/{teacher_set}/{adaptor}", [f"extract/{teacher_set}"], _adaptor_check)
    for teacher_set in teacher_sets:
        for adaptor in ADAPTORS:
            for kd in KD_KINDS:
                add("students", KD_SCRIPTS[kd], [f"teacher_set={teacher_set}", f"adaptor={adaptor}", f"kd={kd}"],
                    f"student/{teacher_set}/{adaptor}/{kd}", [f"adaptor/{teacher_set}/{adaptor}"], _student_check,
                    lambda job_cfg: artifacts.is_imported(artifacts.student_dir(job_cfg)))
    return jobs


def plan(jobs: Sequence[Job]) -> list[Step]:
    """Decide, before anything runs, which jobs run and why: a job runs when its check fails or when a job it
    reads from runs (jobs not in ``jobs`` are taken as they are on disk)."""
    steps: list[Step] = []
    running: set[str] = set()
    for job in jobs:
        upstream = [key for key in job.upstream if key in running]
        if upstream and not job.kept():
            step = Step(job, True, f"upstream {', '.join(upstream)} runs")
        else:
            verdict = job.check()
            step = Step(job, not verdict.done, verdict.reason)
        if step.run:
            running.add(job.key)
        steps.append(step)
    return steps


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
