"""Runs know their configuration: a folder holding a run of other settings is refused with the diff (or moved
aside with replace=True), resuming under changed keys that matter is refused, run_name keeps runs apart; user
mistakes end in one line with exit code 2, everything else keeps its traceback."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from config.config import load_config
from helpers import ROOT, tiny_overrides
from utils.core.errors import InvalidInputError, ProvenanceError
from utils.stages.cli import run_stage
from utils.train.checkpoint import claim_run_folder
from utils.workdir import artifacts
from utils.core.digests import file_sha256
from utils.workdir.provenance import describe_changes


def _train(data: Path, out: Path, **extra):
    return run_stage(train.main, tiny_overrides(data, out, **{"ethnicity": "Asian", "num_epoch": 1, **extra}))


def test_rerun_into_a_finished_folder_with_other_settings_is_refused_or_replaced(tiny_synthetic, tmp_path):
    first = _train(tiny_synthetic, tmp_path)
    weights = (first.run_dir / "best_backbone.pth").read_bytes()
    with pytest.raises(ProvenanceError) as error:
        _train(tiny_synthetic, tmp_path, width=4, loss="ArcFace")
    message = str(error.value)
    assert str(first.run_dir) in message and "key width: 8 -> 4" in message
    assert "key loss: ElasticArcFace -> ArcFace" in message and "replace=True" in message
    assert (first.run_dir / "best_backbone.pth").read_bytes() == weights  # nothing was touched
    assert json.loads((first.run_dir / "config.json").read_text())["width"] == 8

    second = _train(tiny_synthetic, tmp_path, width=4, loss="ArcFace", replace=True)
    assert second.complete and json.loads((second.run_dir / "config.json").read_text())["width"] == 4
    aside = list(first.run_dir.parent.glob(f"{first.run_dir.name}.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "best_backbone.pth").read_bytes() == weights
    # Keys that do not change the outputs never trigger the check.
    _train(tiny_synthetic, tmp_path, width=4, loss="ArcFace", log_every=1, num_workers=1, keep_epoch_weights=False)


def test_resume_under_changed_keys_is_refused_but_not_under_keys_that_do_not_matter(tiny_synthetic, tmp_path):
    first = _train(tiny_synthetic, tmp_path, num_epoch=2, stop_after_epoch=1)
    assert not first.complete
    for key, value, change in (("lr", 0.05, "key lr: 0.1 -> 0.05"), ("seed", 1, "key seed: 0 -> 1"),
                               ("milestones", [1], "key milestones: [2] -> [1]"), ("m", 0.4, "key m: null -> 0.4")):
        with pytest.raises(ProvenanceError, match=change.replace("[", r"\[").replace("]", r"\]")):
            _train(tiny_synthetic, tmp_path, num_epoch=2, resume=True, **{key: value})
    resumed = _train(tiny_synthetic, tmp_path, num_epoch=2, resume=True, log_every=1, num_workers=1)
    assert resumed.complete and "resumed from" in (first.run_dir / "train.log").read_text()
    assert [e["epoch"] for e in json.loads((first.run_dir / "history.json").read_text())["epochs"]] == [1, 2]


def test_run_name_keeps_two_ablations_apart(tiny_synthetic, tmp_path):
    base = _train(tiny_synthetic, tmp_path)
    ablation = _train(tiny_synthetic, tmp_path, lr=0.05, run_name="lr005")
    assert ablation.run_dir == base.run_dir.with_name(base.run_dir.name + "-lr005")
    assert json.loads((base.run_dir / "provenance.json").read_text())["keys"]["lr"] == 0.1
    assert json.loads((ablation.run_dir / "provenance.json").read_text())["keys"]["lr"] == 0.05
    cfg = load_config({"output_root": str(tmp_path), "run_name": "lr005"})
    named = [artifacts.teacher_dir(cfg), artifacts.store_dir(cfg), artifacts.adaptor_dir(cfg).parent,
             artifacts.student_dir(cfg).parent, artifacts.report_dir(cfg), artifacts.split_manifest(cfg)]
    assert all("lr005" in path.name for path in named)
    with pytest.raises(ValueError, match="run_name"):
        load_config({"run_name": "../elsewhere"})


def test_changes_are_listed_readably():
    old = {"stage": "teacher", "keys": {"lr": 0.1, "loss": "ElasticArcFace"}, "inputs": {"data": "a" * 64}}
    new = {"stage": "teacher", "keys": {"lr": 0.05, "loss": "ElasticArcFace", "width": 4}, "inputs": {"data": "b" * 64}}
    assert describe_changes(old, new) == ["input data: aaaaaaaaaaaa... -> bbbbbbbbbbbb...", "key lr: 0.1 -> 0.05",
                                          "key width: (none) -> 4"]


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)


def test_only_rank_0_computes_the_record_and_every_rank_gets_its_verdict(tmp_path):
    """The record holds the data fingerprint, which reads every training image on a first run: the other ranks
    must not compute it too. A rank-0 failure to compute it is the verdict every rank raises."""
    def never() -> dict:
        raise AssertionError("a non-main rank computed the run's record")

    claim_run_folder(tmp_path / "other_rank", never, replace=False, is_main=False)
    assert not (tmp_path / "other_rank" / "provenance.json").exists()

    claim_run_folder(tmp_path / "main_rank", lambda: {"stage": "teacher"}, replace=False, is_main=True)
    assert json.loads(artifacts.provenance_file(tmp_path / "main_rank").read_text()) == {"stage": "teacher"}

    def missing_image() -> dict:
        raise InvalidInputError("data_root: image a/b.jpg is missing")

    with pytest.raises(InvalidInputError, match="a/b.jpg is missing"):
        claim_run_folder(tmp_path / "failing", missing_image, replace=False, is_main=True)


def test_stages_hand_the_loop_their_record_uncomputed(tiny_synthetic, tmp_path, monkeypatch):
    """Building a teacher task reads no image for the data fingerprint: the loop's rank 0 does, once."""
    from config.config import load_config as load
    from utils.stages import teacher

    def fingerprint(*_):
        raise AssertionError("fingerprint computed while building the task")

    monkeypatch.setattr(teacher, "data_fingerprint", fingerprint)
    task = teacher.build_teacher_task(load(tiny_overrides(tiny_synthetic, tmp_path, ethnicity="Asian")), None)
    with pytest.raises(AssertionError, match="while building"):
        task.provenance()


def test_user_mistakes_end_in_one_line_other_errors_keep_their_traceback(tmp_path):
    missing = _python("train.py", f"data_root={str(tmp_path / 'nowhere')!r}")
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip().splitlines() == [f"error (rank 0): data_root {tmp_path / 'nowhere'} is not a folder"]

    bug = _python("-c", "import sys; from utils.stages.cli import run_stage\n"
                        "def main(cfg, info):\n    raise RuntimeError('injected bug')\n"
                        "sys.argv = ['stage.py']; run_stage(main)")
    assert bug.returncode == 1
    assert "Traceback (most recent call last)" in bug.stderr and "RuntimeError: injected bug" in bug.stderr


def test_a_file_digest_is_reused_only_while_the_file_is_unchanged(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"a" * 100)
    time.sleep(1.1)  # settled: its digest is kept
    assert file_sha256(path) == hashlib.sha256(b"a" * 100).hexdigest()
    # Rewritten in place with the same size and the old mtime put back: the ctime tells the rewrite apart.
    stamp = path.stat()
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert file_sha256(path) == hashlib.sha256(b"b" * 100).hexdigest()
    # Rewritten again at once, within the same tick of the file clock: a fresh file's digest is never kept.
    path.write_bytes(b"c" * 100)
    assert file_sha256(path) == hashlib.sha256(b"c" * 100).hexdigest()
    path.write_bytes(b"d" * 100)
    assert file_sha256(path) == hashlib.sha256(b"d" * 100).hexdigest()
    copy = tmp_path / "copy.pth"
    copy.write_bytes(b"e" * 100)
    os.replace(copy, path)  # replaced by another file (how weights are written)
    assert file_sha256(path) == hashlib.sha256(b"e" * 100).hexdigest()
