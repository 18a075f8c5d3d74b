"""Stops a cluster sends: SIGTERM to one torchrun rank, to the pipeline's pid only, to the whole process group while
a stage starts up, and during an extraction. Each ends with exit 75 (torchrun: its workers' 75), nothing marked
complete, and a rerun that continues exactly."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import extract_all
import fc_EArc
import train as train_py
from config.config import format_override, load_config
from eval.rfw import during_training
from helpers import (
    ROOT, catches_sigterm, child_pids, fake_teacher_set, pipeline_command, tiny_overrides, torchrun, wait_for,
    write_fake_teacher
)
from utils.core.distributed import DistInfo
from utils.core.signals import INTERRUPTED_EXIT_CODE, TrainingInterrupted
from utils.pipeline.launch import StageFailed
from utils.pipeline.plan import PRESETS
from utils.stages import adaptor, extract
from utils.stages.cli import run_stage
from utils.stages.common import train_options
from utils.train.loop import train
from utils.train.stopping import LAG_STEPS
from utils.train.task import TrainingTask
from utils.workdir import artifacts
from utils.workdir.artifacts import member_files
from utils.workdir.store import read_manifest


def history(run_dir: Path) -> dict:
    path = artifacts.history_file(run_dir)
    return json.loads(path.read_text()) if path.is_file() else {}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_run(run_dir: Path, straight_dir: Path) -> None:
    """Same weights, bit for bit, and the same per-epoch losses as an uninterrupted run."""
    a, b = (weights(artifacts.best_weights(d, "teacher")) for d in (run_dir, straight_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["loss_sum"] for e in history(run_dir)["epochs"]] == [e["loss_sum"] for e in history(straight_dir)["epochs"]]


# ---- under torchrun: a signal to one rank ------------------------------------------------------------------

SIGNAL_STEP = 9  # the first step of epoch 2 (8 steps per epoch): the agreed stop falls inside the same epoch


def test_a_signal_to_one_torchrun_rank_stops_both_within_the_lag_and_the_resume_is_exact(tmp_path):
    run_dir, straight_dir = tmp_path / "run", tmp_path / "straight"
    # log_every far above the run's length: the stop must not wait for a logging step.
    stopped = torchrun("tests/stop_one_rank.py", [str(run_dir), "--signal-rank", "1", "--signal-step",
                                                  str(SIGNAL_STEP), "log_every=1000"])
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0 and "interrupted (rank 0)" in output and "interrupted (rank 1)" in output, output
    checkpoint = torch.load(run_dir / artifacts.CHECKPOINT_FILE, weights_only=True)
    assert SIGNAL_STEP < checkpoint["global_step"] <= SIGNAL_STEP + LAG_STEPS + 1 and checkpoint["mid_epoch"]
    record = history(run_dir)
    assert not record["complete"] and len(record["epochs"]) == 1
    # Rank 0 writes it; torchrun may have passed it SIGTERM by then, when rank 1 exited first.
    assert re.match(rf"(a stop signal on another rank|SIGTERM): teacher stopped after step "
                    rf"{checkpoint['global_step']} \(\d of 8 in epoch 2\)", record["stopped"]), record["stopped"]
    assert "to continue, run: torchrun --nproc-per-node=2 " in record["stopped"] and "resume=True" in record["stopped"]
    assert record["stopped"] in artifacts.log_file(run_dir).read_text()

    resumed = torchrun("tests/stop_one_rank.py", [str(run_dir), "--straight", str(straight_dir), "log_every=1000"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert history(run_dir)["complete"] and "stopped" not in history(run_dir)
    assert_same_run(run_dir, straight_dir)


# ---- the pipeline: SIGTERM to its pid only, then to its whole group while a stage starts up ---------------

def start_pipeline(out: Path, args: list[str], log: Path) -> subprocess.Popen:
    """``run_pipeline.py --preset tiny`` in its own process group (a group signal reaches it, not pytest)."""
    with open(log, "a") as handle:
        return subprocess.Popen(pipeline_command(out, *args), cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def ended(process: subprocess.Popen, log: Path, timeout: float = 60) -> int:
    try:
        return process.wait(timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(log.read_text()[-4000:])


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except FileNotFoundError:
        return ""


def stage_command(log: Path, member: str) -> list[str]:
    """The command line the pipeline printed for ``member``'s teacher."""
    line = next(line for line in log.read_text().splitlines() if line.startswith("$ ") and f"ethnicity={member}" in line)
    return shlex.split(line[2:])


def test_sigterm_to_the_pipeline_pid_reaches_its_stage_which_saves_and_the_rerun_resumes_exactly(tmp_path):
    out, log = tmp_path / "out", tmp_path / "pipeline.log"
    args = ["num_epoch=5", "milestones=[6]", "--teacher-sets", "specialized", "--only", "teachers"]
    cfg = load_config([format_override(k, v) for k, v in PRESETS["tiny"].overrides.items()]
                      + [format_override("output_root", str(out)), "teacher_set='specialized'"])
    african, asian = artifacts.teacher_dir(cfg, "African"), artifacts.teacher_dir(cfg, "Asian")

    # As a scheduler that signals only the main process: the foreground stage must get it and save.
    pipeline = start_pipeline(out, args, log)
    wait_for(lambda: len(history(african).get("epochs", [])) >= 2, "epoch 2 of the African teacher")
    os.kill(pipeline.pid, signal.SIGTERM)
    signalled = time.monotonic()
    assert ended(pipeline, log) == INTERRUPTED_EXIT_CODE, log.read_text()[-4000:]
    assert time.monotonic() - signalled < 20
    record = history(african)
    assert not record["complete"] and record["stopped"].startswith("SIGTERM: teacher stopped after step")
    assert "pipeline stopped" in log.read_text()

    # An uninterrupted run of the same command into another folder, beside the rerun.
    command = [arg if not arg.startswith("output_root=") else format_override("output_root", str(tmp_path / "ref"))
               for arg in stage_command(log, "African")]
    straight = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # The rerun continues the African teacher; SIGTERM to the whole group while the Asian one starts up.
    pipeline = start_pipeline(out, args, log)
    wait_for(lambda: history(african).get("complete"), "the African teacher to finish", timeout=180)
    asian_stage = wait_for(lambda: [pid for pid in child_pids(pipeline.pid) if "ethnicity=Asian" in command_line(pid)
                                    and catches_sigterm(pid)], "the Asian teacher's process")[0]
    os.killpg(pipeline.pid, signal.SIGTERM)
    assert ended(pipeline, log) == INTERRUPTED_EXIT_CODE, log.read_text()[-4000:]
    assert "exit code 75" in log.read_text().splitlines()[-1] and "SIGTERM during start-up" in log.read_text()
    assert not history(asian) and not Path(f"/proc/{asian_stage}").exists()

    assert straight.wait(timeout=180) == 0, straight.stderr.read()[-4000:]
    assert_same_run(african, artifacts.teacher_dir(load_config(command[2:]), "African"))


# ---- start-up and extraction ------------------------------------------------------------------------------

def test_a_signal_during_a_stage_start_up_exits_75_at_once_with_nothing_done(tiny_synthetic, tmp_path):
    overrides = tiny_overrides(tiny_synthetic, tmp_path, ethnicity="Asian")
    cfg = load_config(overrides)
    stages = [subprocess.Popen([sys.executable, str(ROOT / script), *overrides], cwd=ROOT, stderr=subprocess.PIPE,
                               text=True) for script in ("train.py", "extract_all.py")]
    for stage in stages:
        wait_for(lambda: catches_sigterm(stage.pid) or stage.poll() is not None, "the stop recorder", timeout=30)
        stage.send_signal(signal.SIGTERM)
    for stage in stages:
        _, error = stage.communicate(timeout=60)
        assert stage.returncode == INTERRUPTED_EXIT_CODE and "SIGTERM during start-up" in error, error
    assert not artifacts.teacher_dir(cfg, "Asian").exists() and not artifacts.store_dir(cfg).exists()


def signalled(function):
    """``function`` that sends this process SIGTERM first: the next batch must not be written."""
    def wrapper(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return function(*args)
    return wrapper


def test_a_stop_during_extraction_leaves_the_store_incomplete(tiny_synthetic, tmp_path, monkeypatch):
    overrides = tiny_overrides(tiny_synthetic, tmp_path, ethnicity="Asian", extract_batch_size=8)
    cfg = load_config(overrides)
    write_fake_teacher(cfg, "Asian", seed=0)
    monkeypatch.setattr(extract, "checked_rows", signalled(extract.checked_rows))
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM: the extraction of Asian into .* stopped before it "
                                                  r"completed; nothing of it is marked complete"):
        run_stage(extract_all.main, overrides)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert not read_manifest(member_files(artifacts.store_dir(cfg), "Asian").manifest)["complete"]


def test_a_stop_while_the_kd_targets_are_written_leaves_them_incomplete(tiny_synthetic, tmp_path, monkeypatch):
    overrides = tiny_overrides(tiny_synthetic, tmp_path, extract_batch_size=8)
    fake_teacher_set(overrides)
    run_stage(extract_all.main, overrides + ["ethnicity='all'"])
    monkeypatch.setattr(adaptor, "checked_rows", signalled(adaptor.checked_rows))
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM: the writing of the KD targets .* stopped before it "
                                                  r"completed"):
        run_stage(fc_EArc.main, overrides)
    run_dir = artifacts.adaptor_dir(load_config(overrides))
    assert history(run_dir)["complete"] and not read_manifest(artifacts.target_files(run_dir).manifest)["complete"]


def test_a_stage_killed_by_a_signal_gives_the_shell_exit_code():
    assert StageFailed("train.py", -signal.SIGKILL).exit_code == 128 + signal.SIGKILL
    assert StageFailed("train.py", INTERRUPTED_EXIT_CODE).exit_code == INTERRUPTED_EXIT_CODE


# ---- stops during the per-epoch verification and the extraction's image check ------------------------------------

def _verified_task(run_dir: Path, verify) -> TrainingTask:
    """A seconds-free task whose per-epoch verification embeds 6 batches and scores each epoch by its outputs."""
    torch.manual_seed(0)
    points = TensorDataset(torch.randn(32, 4), torch.arange(32) % 2, torch.arange(32))
    return TrainingTask(stage="teacher", run_dir=run_dir, config={}, provenance=lambda: {"stage": "teacher"},
                        model=nn.Linear(4, 2), model_name="backbone", dataset=points, lr=0.05, num_epochs=3,
                        milestones=[2], batch_size=8, flip=False, evaluate=verify, selection="verification",
                        loss_fn=lambda model, header, batch: {
                            "loss": ((model(batch.inputs)[:, 0] - batch.labels.float()) ** 2).mean()})


def _verification(signal_at: int | None = None):
    """``evaluate`` of :func:`_verified_task`: 6 forwards on fixed inputs; SIGTERM to this process before forward
    number ``signal_at`` (counted over the run). ``calls`` counts the forwards."""
    probe = torch.randn(6, 8, 4, generator=torch.Generator().manual_seed(1))

    def verify(model):
        outputs = []
        for batch in probe:
            verify.calls += 1
            if verify.calls == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
            with torch.no_grad():
                outputs.append(model(batch))
        return {"avg": float(torch.cat(outputs).abs().mean())}
    verify.calls = 0
    return verify


def test_a_stop_during_the_verification_ends_it_within_a_batch_and_the_resume_is_exact(tmp_path):
    """The epoch's checkpoint is saved after its verification (the record holds the accuracy that picks the best
    epoch): a stop during the verification saves the trained epoch before its lr step, exits like any stop, and
    the resumed run verifies that epoch again and ends as an uninterrupted run."""
    one_process = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    options = train_options(load_config({"output_root": str(tmp_path), "num_workers": 0, "resume": True}))
    stopped = _verification(signal_at=6 + 2)  # the second forward of epoch 2's verification
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM: teacher stopped after step 8 \(during the RFW "
                                                  r"verification of epoch 2\) and saved .*; run the same command"):
        train(_verified_task(tmp_path / "run", stopped), options, one_process)
    assert stopped.calls == 6 + 2, "the verification went on after the stop"
    state = torch.load(artifacts.checkpoint_file(tmp_path / "run"), weights_only=True)
    assert state["epoch"] == 1 and state["mid_epoch"]["step"] == 4 and "stopped" in history(tmp_path / "run")
    resumed = train(_verified_task(tmp_path / "run", _verification()), options, one_process)
    straight = train(_verified_task(tmp_path / "straight", _verification()), options, one_process)
    assert resumed.complete and straight.complete
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in resumed.history]
    assert strip == [{k: v for k, v in e.items() if k != "seconds"} for e in straight.history]
    assert [e["lr"] for e in resumed.history] == [0.05, 0.05 * 0.1, 0.05 * 0.1]
    a, b = (weights(r.best_weights) for r in (resumed, straight))
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed.best_epoch == straight.best_epoch


def test_a_stop_during_the_extraction_image_check_ends_it_between_chunks(tiny_synthetic, tmp_path, monkeypatch):
    from utils.data import datasets

    overrides = tiny_overrides(tiny_synthetic, tmp_path, ethnicity="Asian", extract_batch_size=8, num_workers=1)
    cfg = load_config(overrides)
    write_fake_teacher(cfg, "Asian", seed=0)
    reads = []
    original = datasets.FaceDataset.read_uint8

    def read_uint8(self, i):
        reads.append(i)
        if len(reads) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, i)

    monkeypatch.setattr(datasets.FaceDataset, "read_uint8", read_uint8)
    monkeypatch.setattr(datasets, "CHECK_CHUNK", 8)
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM: the image check before the extraction stopped before "
                                                  r"it completed"):
        run_stage(extract_all.main, overrides)
    assert len(reads) == 8, "the check went on after the chunk in which the stop arrived"
    assert not member_files(artifacts.store_dir(cfg), "Asian").manifest.exists()


def test_a_stop_during_train_py_s_own_rfw_verification_saves_the_epoch_and_the_rerun_verifies_it(
        tiny_synthetic, tmp_path, monkeypatch):
    """The real path: train.py's RFWEvaluator (flip TTA, every ethnicity, bootstrap summary) gets a SIGTERM during
    its first batch; it ends before another forward, the trained epoch is saved, and the rerun verifies it again."""
    embedded = []
    real_embed_fn = during_training.backbone_embed_fn

    def signalling_embed_fn(model):
        embed = real_embed_fn(model)

        def first_batch_signals(images):
            embedded.append(len(images))
            if len(embedded) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return embed(images)
        return first_batch_signals

    monkeypatch.setattr(during_training, "backbone_embed_fn", signalling_embed_fn)
    overrides = tiny_overrides(tiny_synthetic, tmp_path, ethnicity="Asian", rfw_root=str(tiny_synthetic / "rfw"),
                               extract_batch_size=8, resume=True)
    with pytest.raises(TrainingInterrupted, match=r"stopped after step 3 \(during the RFW verification of epoch 1\)"):
        run_stage(train_py.main, overrides)
    assert embedded == [8], "the verification embedded another batch after the stop"
    run_dir = artifacts.teacher_dir(load_config(overrides))
    assert torch.load(artifacts.checkpoint_file(run_dir), weights_only=True)["mid_epoch"]["step"] == 3
    monkeypatch.setattr(during_training, "backbone_embed_fn", real_embed_fn)
    result = run_stage(train_py.main, overrides)
    record = history(run_dir)
    assert result.complete and record["complete"] and "stopped" not in record
    assert [len(epoch["rfw"]) > 0 for epoch in record["epochs"]] == [True, True]
