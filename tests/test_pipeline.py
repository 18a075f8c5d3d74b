"""The whole pipeline on the tiny preset: every stage, the report, skipping, and recovery after a kill."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import ROOT
from utils.pipeline import STAGES, plan_jobs, select_jobs

TEACHER_RUNS = [f"teachers/specialized/iresnet18_{eth}" for eth in ("African", "Asian", "Caucasian", "Indian")] + [
    f"teachers/baseline/iresnet18_split{k}" for k in range(4)]


def _pipeline(out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "run_pipeline.py"), "--preset", "tiny", f"output_root={str(out)!r}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    return completed


def test_plan_covers_the_paper():
    jobs = plan_jobs(["data_root='/data'", "output_root='/tmp/x'"])
    scripts = [job.script for job in jobs]
    assert scripts.count("train.py") == 8 and scripts.count("extract_all.py") == 2
    assert scripts.count("fc_EArc.py") == 2 and scripts.count("dual_layer_EAF-Fusion.py") == 4
    assert scripts.count("KD_alone.py") == 6 and scripts.count("KD_CEL.py") == 6
    assert [job.stage for job in select_jobs(jobs, ["extract"], None)] == ["extract", "extract"]
    assert {job.stage for job in select_jobs(jobs, None, "students")} == {"students"}
    with pytest.raises(ValueError, match="stages are"):
        select_jobs(jobs, ["teacher"], None)
    assert STAGES[-1] == "report"


def test_tiny_pipeline_end_to_end_then_skips_everything(tmp_path):
    out = tmp_path / "work"
    first = _pipeline(out)
    assert "Summary (mean over 6 students per teacher set" in first.stdout
    report = out / "report"
    rows = json.loads((report / "results.json").read_text())
    text = json.dumps(rows)
    for name in ("teacher specialized Asian", "teacher balanced split3", "SL-EAF-Fusion specialized",
                 "DLDPO-EAF-Fusion balanced", "student a-KD DuL specialized", "student EAF-KD SL balanced"):
        assert name in text, name
    markdown = (report / "results.md").read_text()
    assert all(column in markdown for column in ("African", "Asian", "Caucasian", "Indian", "Avg", "STD", "SER"))
    assert markdown.count("student ") == 12
    for png in ("results_accuracy.png", "results_roc.png"):
        with Image.open(report / png) as image:
            assert image.size[0] > 100
    for run in TEACHER_RUNS:
        assert json.loads((out / run / "history.json").read_text())["complete"]
    for adaptor in ("SL", "DuL", "DLDPO"):
        assert json.loads((out / "adaptors/specialized_iresnet18" / adaptor / "targets.json").read_text())["complete"]

    report_mtime = (report / "results.json").stat().st_mtime_ns
    again = _pipeline(out)
    assert again.stdout.count("complete, skipped") == 29
    # Nothing changed, so the report is reused, not recomputed, and prints the same table.
    assert (report / "results.json").stat().st_mtime_ns == report_mtime
    assert first.stdout[first.stdout.index("Model"):first.stdout.index("Summary")] in again.stdout


def test_pipeline_from_released_teacher_weights(tmp_path):
    """Teacher folders holding only weights (as the authors released them) feed extraction, adaptors, students."""
    trained = tmp_path / "trained"
    _pipeline(trained, "--only", "split", "teachers")
    released = tmp_path / "released"
    for run in TEACHER_RUNS:
        (released / run).mkdir(parents=True)
        shutil.copy(trained / run / "best_backbone.pth", released / run / "best_backbone.pth")
    result = _pipeline(released, "--from", "extract")
    rows = json.loads((released / "report" / "results.json").read_text())["rows"]
    assert len(rows) == 6 + 12  # adaptor spaces (over the released teachers) and students; no teacher runs
    assert "Summary (mean over 6 students per teacher set" in result.stdout


def test_killed_pipeline_resumes_without_redoing_finished_jobs(tmp_path):
    out = tmp_path / "work"
    command = [sys.executable, str(ROOT / "run_pipeline.py"), "--preset", "tiny", f"output_root={str(out)!r}",
               "num_epoch=3", "milestones=[3]"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    first_teacher = out / TEACHER_RUNS[0]
    second_teacher = out / TEACHER_RUNS[1]
    try:
        deadline = time.monotonic() + 300
        # Kill once the second teacher has a resumable checkpoint but has not finished.
        while not (second_teacher / "checkpoint_last.pt").exists():
            assert process.poll() is None, "pipeline ended before it could be interrupted"
            assert time.monotonic() < deadline, "pipeline never reached the second teacher"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finished_mtime = (first_teacher / "best_backbone.pth").stat().st_mtime_ns
    history = json.loads((second_teacher / "history.json").read_text())
    assert not history["complete"]
    result = _pipeline(out, "num_epoch=3", "milestones=[3]", "--only", "split", "teachers")
    african = [line for line in result.stdout.splitlines() if "ethnicity=African" in line]
    assert len(african) == 1 and african[0].endswith("complete, skipped")
    assert (first_teacher / "best_backbone.pth").stat().st_mtime_ns == finished_mtime
    resumed = (second_teacher / "train.log").read_text()
    assert "resumed from" in resumed
    for run in TEACHER_RUNS:
        assert json.loads((out / run / "history.json").read_text())["complete"]
    # A kill between a run's last checkpoint and its history.json (here: history.json lost): the rerun rewrites it
    # from the checkpoint, trains nothing, and the pipeline ends with exit code 0 (issue 14).
    (out / TEACHER_RUNS[-1] / "history.json").unlink()
    repaired = _pipeline(out, "num_epoch=3", "milestones=[2]", "--only", "split", "teachers")
    assert repaired.stdout.count("complete, skipped") == 8 and "rewritten from the checkpoint" in repaired.stdout
    assert json.loads((out / TEACHER_RUNS[-1] / "history.json").read_text())["complete"]
