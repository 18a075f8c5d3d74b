"""Teacher training through the shared engine: files, loss, lr schedule, DDP, resume, errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import train
from backbones import build_backbone
from config.config import load_config
from eval.rfw import during_training
from helpers import run_torchrun, tiny_overrides
from utils.stages.cli import run_stage
from utils.train.loop import step_decay
from utils.workdir import artifacts
from utils.workdir.artifacts import is_run_complete


def _train(data: Path, out: Path, **extra):
    return run_stage(train.main, tiny_overrides(data, out, **extra))


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _release_lr_func(milestones: list[int]):
    """The authors' ``config.lr_func`` (EduardaCaldeira/MST-KD config/config.py), written out as the reference."""
    return lambda epoch: 0.1 ** len([m for m in milestones if m - 1 <= epoch])


def _epochs_per_level(factors: list[float]) -> list[int]:
    levels = [round(math.log10(f)) for f in factors]
    return [levels.count(level) for level in sorted(set(levels), reverse=True)]


@pytest.mark.parametrize("milestones, num_epochs, per_level", [
    ([16, 28, 40, 50], 52, [15, 12, 12, 10, 3]),  # teachers and students
    ([16], 26, [15, 11]),  # adaptors
    ([8, 14, 20, 25], 26, [7, 6, 6, 5, 2]),  # the release's 26-epoch variant
])
def test_step_decay_is_the_release_lr_func_epoch_by_epoch(milestones, num_epochs, per_level):
    ours, release = step_decay(milestones, 0.1), _release_lr_func(milestones)
    factors = [ours(epoch) for epoch in range(num_epochs)]
    assert factors == pytest.approx([release(epoch) for epoch in range(num_epochs)], rel=1e-12)
    assert _epochs_per_level(factors) == per_level
    # Milestone m counts epochs from 1: the drop is for the m-th epoch, i.e. 0-based index m - 1.
    first = milestones[0]
    assert (ours(first - 2), ours(first - 1)) == pytest.approx((1.0, 0.1))


def test_epoch_verification_intervals_follow_the_bootstrap_keys(tiny_synthetic, tmp_path, monkeypatch):
    settings = []
    monkeypatch.setattr(during_training, "summarize_verification", lambda results, *given: settings.append(given) or {})
    cfg = load_config(tiny_overrides(tiny_synthetic, tmp_path, rfw_root=str(tiny_synthetic / "rfw"),
                                     bootstrap_resamples=50, bootstrap_seed=3, confidence=0.5))
    during_training.epoch_evaluator(cfg, torch.device("cpu"))(build_backbone(cfg).eval())
    assert settings == [(50, 3, 0.5)]


@pytest.mark.float_sensitive
def test_teacher_run_writes_every_file_and_learns(tiny_synthetic, tmp_path):
    result = _train(tiny_synthetic, tmp_path, ethnicity="Asian", num_epoch=3, milestones=[3], lr=0.2,
                    rfw_root=str(tiny_synthetic / "rfw"))
    cfg = load_config(tiny_overrides(tiny_synthetic, tmp_path, ethnicity="Asian"))
    run_dir = artifacts.teacher_dir(cfg)
    assert result.run_dir == run_dir and result.complete and is_run_complete(run_dir)
    history = json.loads((run_dir / "history.json").read_text())
    epochs = history["epochs"]
    steps = [e["global_step"] for e in epochs]
    for step in steps:
        assert (run_dir / f"{step}backbone.pth").is_file()
        assert (run_dir / f"{step}header.pth").is_file()
    for name in ("best_backbone.pth", "best_header.pth", "checkpoint_last.pt", "config.json", "train.log"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["ethnicity"] == "Asian" and saved["derived"]["stage"] == "teacher"
    # lr per epoch: base scaled by batch/512, dropped by 10x from the 3rd epoch on (milestone [3]).
    base = 0.2 / 512 * 8
    assert [e["lr"] for e in epochs] == pytest.approx([base, base, base * 0.1])
    assert epochs[-1]["losses"]["loss"] < epochs[0]["losses"]["loss"]
    # With RFW configured, every epoch is verified and `best` is the epoch with the highest RFW average.
    assert all(set(e["rfw"]) >= {"African", "Asian", "Caucasian", "Indian", "avg", "std", "ser"} for e in epochs)
    best = max(epochs, key=lambda e: e["rfw"]["avg"])
    assert history["best"]["epoch"] == best["epoch"]
    best_weights = _load(run_dir / "best_backbone.pth")
    epoch_weights = _load(run_dir / f"{best['global_step']}backbone.pth")
    assert all(torch.equal(best_weights[k], epoch_weights[k]) for k in best_weights)
    # The header covers exactly the Asian identities of the data.
    assert _load(run_dir / "best_header.pth")["kernel"].shape == (64, 6)


def test_resume_matches_uninterrupted_run(tiny_synthetic, tmp_path):
    # Milestone [2]: the lr drops for the 2nd epoch, so the interruption falls exactly on the milestone.
    straight = _train(tiny_synthetic, tmp_path / "straight", ethnicity="Indian", num_epoch=2, milestones=[2])
    first = _train(tiny_synthetic, tmp_path / "split", ethnicity="Indian", num_epoch=2, milestones=[2],
                   stop_after_epoch=1)
    assert not first.complete and not is_run_complete(first.run_dir)
    resumed = _train(tiny_synthetic, tmp_path / "split", ethnicity="Indian", num_epoch=2, milestones=[2],
                     resume=True)
    assert resumed.complete
    a, b = _load(straight.run_dir / "best_backbone.pth"), _load(resumed.run_dir / "best_backbone.pth")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    history = json.loads((resumed.run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    base = 0.1 / 512 * 8
    assert [e["lr"] for e in history["epochs"]] == pytest.approx([base, base * 0.1])


def test_baseline_teacher_needs_the_split_manifest(tiny_synthetic, tmp_path):
    with pytest.raises(FileNotFoundError, match="baseline_split.json"):
        _train(tiny_synthetic, tmp_path, teacher_set="baseline", split=1)


def test_missing_inputs_are_named(tiny_synthetic, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        run_stage(train.main, tiny_overrides(tmp_path / "no_such_root", tmp_path))
    with pytest.raises(FileNotFoundError, match="missing_rfw"):
        _train(tiny_synthetic, tmp_path, rfw_root=str(tmp_path / "missing_rfw"))
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        _train(tiny_synthetic, tmp_path, init_weights=str(tmp_path / "nothing.pth"))
    with pytest.raises(ValueError, match="num_classes"):
        _train(tiny_synthetic, tmp_path, num_classes=3)


def test_two_rank_training_ends_with_identical_weights(tiny_synthetic, tmp_path):
    dump = tmp_path / "ranks"
    args = tiny_overrides(tiny_synthetic, tmp_path, ethnicity="African", num_epoch=1, batch_size=4)
    run_torchrun("tests/rank_dump.py", ["train.py", str(dump), *args])
    rank0, rank1 = _load(dump / "rank0.pt"), _load(dump / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    cfg = load_config(args)
    saved = _load(artifacts.teacher_dir(cfg) / "best_backbone.pth")
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)
    log = (artifacts.teacher_dir(cfg) / "config.json").read_text()
    assert json.loads(log)["derived"]["world_size"] == 2
