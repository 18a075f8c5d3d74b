"""Students (a-KD, EAF-KD) on the whole tiny chain: teachers -> stores -> SL adaptor -> targets -> students."""
from __future__ import annotations

import dataclasses
import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import KD_alone
import KD_CEL
from backbones import build_backbone
from config.config import ETHNICITIES, load_config, merge_overrides
from eval.rfw.during_training import epoch_evaluator
from helpers import run_torchrun, tiny_overrides
from utils.core.distributed import init_distributed
from utils.stages.cli import run_stage
from utils.stages.common import make_header, train_options
from utils.stages.student import akd_loss, build_kd_dataset, build_student_task, eafkd_loss, kd_term
from utils.train.loop import train
from utils.train.sampling import seed_everything
from utils.train.task import Batch
from utils.workdir import artifacts
from utils.workdir.artifacts import target_files

# Students learn faster than the teachers' default lr allows in a dozen steps.
STUDENT = {"lr": 1.0, "batch_size": 16}


@pytest.fixture(scope="module")
def chain(tiny_synthetic, tmp_path_factory) -> list[str]:
    """Overrides of a work folder holding real SL targets (with flipped rows) from four trained teachers."""
    import extract_all
    import fc_EArc
    import train as train_script

    overrides = tiny_overrides(tiny_synthetic, tmp_path_factory.mktemp("chain") / "work")
    for ethnicity in ETHNICITIES:
        run_stage(train_script.main, merge_overrides(overrides, [f"ethnicity={ethnicity!r}", "num_epoch=1"]))
    run_stage(extract_all.main, merge_overrides(overrides, ["ethnicity='all'", "extract_flipped=True"]))
    run_stage(fc_EArc.main, merge_overrides(overrides, ["num_epoch_fc=1"]), adaptor="SL")
    return overrides


def fresh_work(chain: list[str], dest: Path, **extra) -> list[str]:
    """The chain's targets in a new work folder, so each student run has its own run directory."""
    shutil.copytree(artifacts.work_root(load_config(chain)), dest, ignore=shutil.ignore_patterns("students"))
    return merge_overrides(chain, [f"{key}={value!r}" for key, value in {"output_root": str(dest), **STUDENT,
                                                                           **extra}.items()])


def student(script, overrides: list[str]):
    return run_stage(script.main, overrides, kd="aKD" if script is KD_alone else "EAFKD")


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def epoch_losses(run_dir: Path) -> list[dict[str, float]]:
    return [e["losses"] for e in json.loads((run_dir / "history.json").read_text())["epochs"]]


@pytest.fixture(scope="module")
def akd_run(chain, tmp_path_factory):
    """An uninterrupted two-epoch a-KD run (the reference of the resume and garbage-label tests)."""
    return student(KD_alone, fresh_work(chain, tmp_path_factory.mktemp("akd") / "work"))


@pytest.mark.float_sensitive
def test_akd_run_learns_and_writes_release_files(akd_run):
    run_dir = akd_run.run_dir
    assert akd_run.complete
    assert run_dir.parts[-3:] == ("students", "specialized_iresnet18", "SL_aKD_iresnet18")
    losses = epoch_losses(run_dir)
    assert [set(e) for e in losses] == [{"loss", "kd"}] * 2
    assert losses[1]["kd"] < losses[0]["kd"], losses
    steps = [e["global_step"] for e in json.loads((run_dir / "history.json").read_text())["epochs"]]
    for name in [f"{s}backbone.pth" for s in steps] + ["best_backbone.pth", "checkpoint_last.pt"]:
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("*header.pth")), "a-KD must not train a header"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["kd"] == "aKD" and saved["derived"]["stage"] == "student"


class GarbageLabels(Dataset):
    """The KD dataset with every identity label replaced by a value no header could accept."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.labels = -7 - np.arange(len(base)) * 1_000_003

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, _, row, *targets = self.base[i]
        return (image, int(self.labels[i]), row, *targets)


def test_akd_never_uses_identity_labels(chain, akd_run, tmp_path):
    cfg = load_config(fresh_work(chain, tmp_path / "work", stop_after_epoch=1))
    info = init_distributed()
    seed_everything(cfg.seed)  # what utils.stages.cli.run_stage does before every stage
    task = build_student_task(cfg, epoch_evaluator(cfg, info.device))
    result = train(dataclasses.replace(task, dataset=GarbageLabels(task.dataset)), train_options(cfg), info)
    step = result.history[0]["global_step"]
    # Same seed, same first epoch: garbage labels give bit-identical weights to the real-label run.
    assert same_weights(load(result.run_dir / f"{step}backbone.pth"), load(akd_run.run_dir / f"{step}backbone.pth"))


def test_eafkd_student_draws_its_backbone_then_its_header_from_the_stage_seed(chain, tmp_path):
    """The release builds the student before its margin header; the order decides both initialisations, so a
    reordering would change every EAF-KD number without failing any other test."""
    cfg = load_config(fresh_work(chain, tmp_path / "work", kd="EAFKD"))
    seed_everything(cfg.seed)
    task = build_student_task(cfg, None)
    seed_everything(cfg.seed)
    model = build_backbone(cfg, student=True)
    header = make_header(cfg, int(task.header.kernel.shape[1]))
    assert same_weights(task.model.state_dict(), model.state_dict())
    assert torch.equal(task.header.kernel, header.kernel)


def test_akd_resume_matches_uninterrupted_run(chain, akd_run, tmp_path):
    overrides = fresh_work(chain, tmp_path / "work")
    first = student(KD_alone, merge_overrides(overrides, ["stop_after_epoch=1"]))
    assert not first.complete
    resumed = student(KD_alone, merge_overrides(overrides, ["resume=True"]))
    assert resumed.complete
    assert same_weights(load(resumed.run_dir / "best_backbone.pth"), load(akd_run.run_dir / "best_backbone.pth"))


@pytest.mark.float_sensitive
def test_eafkd_logs_both_terms_saves_the_header_and_verifies(chain, tiny_synthetic, tmp_path):
    result = student(KD_CEL, fresh_work(chain, tmp_path / "work", rfw_root=str(tiny_synthetic / "rfw")))
    run_dir = result.run_dir
    assert result.complete and run_dir.name == "SL_EAFKD_iresnet18"
    losses = epoch_losses(run_dir)
    for epoch in losses:
        assert set(epoch) == {"loss", "ce", "kd"}
        assert epoch["loss"] == pytest.approx(epoch["ce"] + epoch["kd"], rel=1e-5)
    assert losses[1]["kd"] < losses[0]["kd"], losses
    history = json.loads((run_dir / "history.json").read_text())
    assert all(set(e["rfw"]) >= {*ETHNICITIES, "avg", "std", "ser"} for e in history["epochs"])
    for step in (e["global_step"] for e in history["epochs"]):
        assert (run_dir / f"{step}header.pth").is_file()
    # The head covers every identity of the index (6 per ethnicity in tiny_synthetic).
    assert load(run_dir / "best_header.pth")["kernel"].shape == (64, 24)


def test_losses_follow_their_formulas():
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 6)
    header = torch.nn.Linear(6, 3)
    inputs, target = torch.randn(4, 10), F.normalize(torch.randn(4, 6), dim=1)
    batch = Batch(inputs, torch.tensor([0, 2, 1, 2]), torch.arange(4), torch.zeros(4, dtype=torch.bool), (target,))
    expected = 3.0 * ((F.normalize(model(inputs), dim=1) - target) ** 2).mean()
    akd = akd_loss(model, None, batch, loss_lambda=3.0)
    assert set(akd) == {"loss", "kd"} and torch.allclose(akd["loss"], expected)

    def head(embeddings, labels):
        return header(embeddings)

    eaf = eafkd_loss(model, head, batch, loss_lambda=3.0)
    ce = F.cross_entropy(header(model(inputs)), batch.labels)
    assert torch.allclose(eaf["kd"], expected) and torch.allclose(eaf["ce"], ce)
    assert torch.allclose(eaf["loss"], ce + expected)
    with pytest.raises(ValueError, match="no margin header"):
        akd_loss(model, head, batch, loss_lambda=3.0)


def test_flip_consistent_pairs_flipped_images_with_flipped_targets(chain, tmp_path):
    cfg = load_config(merge_overrides(chain, ["kd_flip_consistent=True"]))
    dataset, _ = build_kd_dataset(cfg)
    targets = np.load(target_files(artifacts.adaptor_dir(cfg)).array)
    flipped_targets = np.load(target_files(artifacts.adaptor_dir(cfg)).flipped)
    rows = [3, 40, 71, 90]
    items = [dataset[r] for r in rows]
    assert all(len(item) == 5 for item in items)
    target = torch.stack([item[3] for item in items])
    target_flip = torch.stack([item[4] for item in items])
    np.testing.assert_array_equal(target.numpy(), targets[rows])
    np.testing.assert_array_equal(target_flip.numpy(), flipped_targets[rows])
    assert not np.allclose(targets[rows], flipped_targets[rows], atol=1e-3), "flipped targets should differ"
    # Data-loader workers that receive a pickled dataset reopen the stores instead of copying them.
    shipped = pickle.loads(pickle.dumps(dataset))
    assert shipped._targets is None
    assert all(torch.equal(a, b) for a, b in zip(shipped[40][3:], items[1][3:]))

    embeddings = torch.randn(4, cfg.embedding_size)
    flipped = torch.tensor([True, False, True, False])
    batch = Batch(torch.empty(4), torch.zeros(4), torch.tensor(rows), flipped, (target, target_flip))
    picked = torch.where(flipped[:, None], target_flip, target)
    normalized = F.normalize(embeddings, dim=1)
    consistent = kd_term(embeddings, batch, 1.0, flip_consistent=True)
    released = kd_term(embeddings, batch, 1.0, flip_consistent=False)
    assert torch.allclose(consistent, ((normalized - picked) ** 2).mean())
    assert torch.allclose(released, ((normalized - target) ** 2).mean())
    assert not torch.allclose(consistent, released)

    # The option runs through the engine end to end.
    result = student(KD_alone, fresh_work(chain, tmp_path / "work", kd_flip_consistent=True, num_epoch=1))
    assert result.complete and set(epoch_losses(result.run_dir)[0]) == {"loss", "kd"}


def test_flip_consistent_needs_flipped_targets(chain, tmp_path):
    overrides = fresh_work(chain, tmp_path / "work", kd_flip_consistent=True)
    files = target_files(artifacts.adaptor_dir(load_config(overrides)))
    manifest = json.loads(files.manifest.read_text())
    files.manifest.write_text(json.dumps({**manifest, "flipped": False}))
    files.flipped.unlink()
    with pytest.raises(RuntimeError, match="extract_flipped=True"):
        student(KD_alone, overrides)


def test_target_store_problems_are_named(chain, tmp_path):
    missing = merge_overrides(chain, [f"output_root={str(tmp_path / 'empty')!r}"])
    with pytest.raises(FileNotFoundError, match=r"targets\.json.*fc_EArc\.py"):
        student(KD_alone, missing)

    wrong_size = fresh_work(chain, tmp_path / "size", embedding_size=32)
    with pytest.raises(ValueError, match="64-D.*embedding_size=32"):
        student(KD_CEL, wrong_size)

    other_index = fresh_work(chain, tmp_path / "index", ids_per_ethnicity=3)
    with pytest.raises(RuntimeError, match="another image index"):
        student(KD_alone, other_index)

    incomplete = fresh_work(chain, tmp_path / "incomplete")
    files = target_files(artifacts.adaptor_dir(load_config(incomplete)))
    files.manifest.write_text(json.dumps({**json.loads(files.manifest.read_text()), "complete": False}))
    with pytest.raises(RuntimeError, match="incomplete"):
        student(KD_alone, incomplete)

    with pytest.raises(ValueError, match="KD_CEL.py"):
        run_stage(KD_alone.main, fresh_work(chain, tmp_path / "kind", kd="EAFKD"))


def test_two_rank_student_ends_with_identical_weights(chain, tmp_path):
    dump = tmp_path / "ranks"
    args = fresh_work(chain, tmp_path / "work", num_epoch=1, batch_size=8)
    run_torchrun("tests/rank_dump.py", ["KD_alone.py", str(dump), *args])
    rank0, rank1 = load(dump / "rank0.pt"), load(dump / "rank1.pt")
    assert same_weights(rank0, rank1)
    cfg = load_config(args)
    assert same_weights(load(artifacts.student_dir(cfg) / "best_backbone.pth"), rank0)
    assert json.loads((artifacts.student_dir(cfg) / "config.json").read_text())["derived"]["world_size"] == 2


@pytest.mark.parametrize(("script", "amp"), [(KD_alone, "bf16"), (KD_CEL, "fp16")])
def test_students_train_under_cpu_autocast(chain, tmp_path, script, amp):
    # fp16 from a loss scale of 1: lambda=1e4 makes the KD gradients large enough to overflow a bigger one.
    result = student(script, fresh_work(chain, tmp_path / "work", amp=amp, amp_init_scale=1.0, num_epoch=1,
                                        batch_size=8))
    assert result.complete
    assert f"precision {amp} autocast on cpu" in (result.run_dir / "train.log").read_text()
    assert all(math.isfinite(value) for epoch in epoch_losses(result.run_dir) for value in epoch.values())
    scaler = load(result.run_dir / "checkpoint_last.pt")["scaler"]
    assert (scaler["scale"] > 0) if amp == "fp16" else scaler == {}
