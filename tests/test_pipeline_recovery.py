"""A pipeline killed in the middle of a teacher: the rerun resumes it and redoes nothing that finished."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from helpers import ROOT, pipeline_command, tiny_pipeline

TEACHERS = [f"teachers/specialized/iresnet18_{eth}" for eth in ("African", "Asian", "Caucasian", "Indian")]


@pytest.mark.slow
def test_killed_pipeline_resumes_without_redoing_finished_jobs(tmp_path):
    out = tmp_path / "work"
    options = ["num_epoch=3", "milestones=[3]", "--teacher-sets", "specialized"]
    process = subprocess.Popen(pipeline_command(out, *options), cwd=ROOT, env=dict(os.environ),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first_teacher, second_teacher = out / TEACHERS[0], out / TEACHERS[1]
    try:
        deadline = time.monotonic() + 300
        # Kill once the second teacher has a resumable checkpoint but has not finished: its history.json, written
        # just after the epoch's checkpoint (a kill between the two is the repair case at the end).
        while not (second_teacher / "history.json").exists():
            assert process.poll() is None, "pipeline ended before it could be interrupted"
            assert time.monotonic() < deadline, "pipeline never reached the second teacher"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finished_mtime = (first_teacher / "best_backbone.pth").stat().st_mtime_ns
    history = json.loads((second_teacher / "history.json").read_text())
    assert not history["complete"]
    result = tiny_pipeline(out, *options, "--only", "teachers", "--jobs", "2")
    african = [line for line in result.stdout.splitlines() if "ethnicity=African" in line]
    assert len(african) == 1 and " -- skip: complete" in african[0]
    assert any("ethnicity=Asian -- run: interrupted" in line for line in result.stdout.splitlines())
    assert (first_teacher / "best_backbone.pth").stat().st_mtime_ns == finished_mtime
    resumed = (second_teacher / "train.log").read_text()
    assert "resumed from" in resumed
    for run in TEACHERS:
        assert json.loads((out / run / "history.json").read_text())["complete"]
    # A kill between a run's last checkpoint and its history.json (here: history.json lost): the rerun rewrites it
    # from the checkpoint, trains nothing, and the pipeline ends with exit code 0 (issue 14).
    (out / TEACHERS[-1] / "history.json").unlink()
    repaired = tiny_pipeline(out, *options, "--only", "teachers")
    assert repaired.stdout.count(" -- skip: ") == 3 and "rewritten from the checkpoint" in repaired.stdout
    assert json.loads((out / TEACHERS[-1] / "history.json").read_text())["complete"]
