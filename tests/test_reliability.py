"""Issue 14: one writer per folder, restarts that finish, no non-finite numbers written, damaged stores and bad
config values refused by name, OS errors in one line, graceful SIGTERM, no leftovers, standard JSON."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from config.config import load_config
from helpers import ROOT, tiny_overrides
from utils.core.distributed import DistInfo
from utils.core.io import atomic_torch_save, atomic_write_json
from utils.core.locks import LOCK_NAME, FolderLocked, acquire, is_locked, release
from utils.core.numerics import NonFiniteError
from utils.core.signals import INTERRUPTED_EXIT_CODE, TrainingInterrupted
from utils.stages.common import train_options
from utils.train.loop import train
from utils.train.task import TrainingTask
from utils.workdir import artifacts
from utils.workdir.artifacts import CHECKPOINT_FILE as CHECKPOINT_NAME
from utils.workdir.artifacts import HISTORY_FILE as HISTORY_NAME
from utils.workdir.artifacts import is_run_complete, member_files, target_files
from utils.workdir.store import (
    array_file_problem, checked_rows, manifest_problem, open_targets, read_manifest, write_rows_sharded
)

ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


# ---- a seconds-free training task for the engine ---------------------------------------------------------

class Points(Dataset):
    def __init__(self, n: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=generator)
        self.labels = np.arange(n) % 2

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.labels[i]), i


def regression_loss(model, header, batch):
    return {"loss": ((model(batch.inputs)[:, 0] - batch.labels.float()) ** 2).mean()}


def tiny_task(run_dir: Path, loss_fn=regression_loss, epochs: int = 2) -> TrainingTask:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    return TrainingTask(stage="teacher", run_dir=run_dir, config={}, provenance=lambda: {"stage": "teacher"}, model=model,
                        model_name="backbone", dataset=Points(),
                        loss_fn=loss_fn, lr=0.05, num_epochs=epochs, milestones=[], batch_size=8, flip=False)


def tiny_cfg(tmp_path: Path, **extra):
    return load_config({"output_root": str(tmp_path), "log_every": 2, "num_workers": 0, "resume": True, **extra})


def fit(tmp_path: Path, run_dir: Path, loss_fn=regression_loss, epochs: int = 2):
    """The engine on the tiny task (resume=True, a log line every 2 steps), on this process."""
    return train(tiny_task(run_dir, loss_fn, epochs), train_options(tiny_cfg(tmp_path)), ONE_PROCESS)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- 1. concurrent writers --------------------------------------------------------------------------------

GATED = """
import runpy, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import utils.core.locks as locks
gate, script = Path(sys.argv[1]), sys.argv[2]
original = locks.acquire
def gated(folder, what="folder"):
    original(folder, what)
    print("LOCKED", flush=True)
    while not gate.exists():
        time.sleep(0.02)
locks.acquire = gated
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def start_gated(script: str, args: list[str], gate: Path) -> subprocess.Popen:
    """A real stage process that takes its lock, then waits for ``gate`` before doing its work."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", GATED.format(root=str(ROOT)), str(gate), str(ROOT / script),
                             *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_locked(process: subprocess.Popen) -> None:
    line = process.stdout.readline()
    assert line.strip() == "LOCKED", line + process.stderr.read()


def fake_teachers(cfg) -> None:
    from backbones import build_backbone
    from config.config import teacher_members

    for seed, member in enumerate(teacher_members(cfg.teacher_set)):
        torch.manual_seed(seed)
        run_dir = artifacts.teacher_dir(cfg, member)
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(build_backbone(cfg).state_dict(), run_dir / "best_backbone.pth")


def test_second_training_and_second_extraction_refuse_at_once_and_the_first_ones_finish(tiny_synthetic, tmp_path):
    import extract_all
    import train as train_script
    from utils.stages.cli import run_stage

    train_args = tiny_overrides(tiny_synthetic, tmp_path / "training", ethnicity="Asian", num_epoch=1)
    extract_args = tiny_overrides(tiny_synthetic, tmp_path, ethnicity="all")
    cfg = load_config(extract_args)
    fake_teachers(cfg)
    gate = tmp_path / "gate"
    first_train = start_gated("train.py", train_args, gate)
    first_extract = start_gated("extract_all.py", extract_args, gate)
    try:
        wait_locked(first_train)
        wait_locked(first_extract)
        for main, args, folder in ((train_script.main, train_args, artifacts.teacher_dir(load_config(train_args))),
                                   (extract_all.main, extract_args, artifacts.store_dir(cfg))):
            started = time.perf_counter()
            with pytest.raises(FolderLocked) as refused:
                run_stage(main, args)
            assert time.perf_counter() - started < 5
            message = str(refused.value)
            assert str(folder) in message and "pid " in message and "host " in message
        gate.touch()
        for process in (first_train, first_extract):
            assert process.wait(timeout=120) == 0, process.stderr.read()
    finally:
        for process in (first_train, first_extract):
            process.kill()
    run_dir = artifacts.teacher_dir(load_config(train_args))
    history = json.loads((run_dir / HISTORY_NAME).read_text())
    assert history["complete"] and len(history["epochs"]) == 1
    best = weights(run_dir / "best_backbone.pth")
    last = weights(run_dir / f"{history['best']['global_step']}backbone.pth")
    assert all(torch.equal(best[k], last[k]) for k in best)
    assert (run_dir / "train.log").read_text().count("teacher run in") == 1
    for member in ("Asian", "African", "Caucasian", "Indian"):
        assert read_manifest(member_files(artifacts.store_dir(cfg), member).manifest)["complete"]
        rows = np.load(member_files(artifacts.store_dir(cfg), member).array)
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)  # no zeroed rows


def test_lock_of_a_dead_process_is_taken_over_and_locks_nest(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                               f"from utils.core.locks import acquire; acquire({str(tmp_path)!r}); print('x', flush=True); "
                               "import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "x"
    assert is_locked(tmp_path) and f"pid={holder.pid}" in (tmp_path / LOCK_NAME).read_text()
    with pytest.raises(FolderLocked, match=f"pid {holder.pid}"):
        acquire(tmp_path)
    import run_pipeline  # a second pipeline on one output_root stops before it writes anything

    with pytest.raises(FolderLocked, match=f"pipeline output_root {tmp_path} is being written .*pid {holder.pid}"):
        run_pipeline.run(["--preset", "tiny", f"output_root={str(tmp_path)!r}"])
    assert not (tmp_path / "data").exists()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    acquire(tmp_path)  # the dead holder's lock file is still there, its lock is not
    acquire(tmp_path)  # re-entrant: a stage holding its folder calls the loop, which locks it again
    release(tmp_path)
    assert is_locked(tmp_path)
    release(tmp_path)
    assert not is_locked(tmp_path)


# ---- 2. a restart that finds every epoch done ------------------------------------------------------------

@pytest.mark.parametrize("damage", ["missing", "garbage", "incomplete"])
def test_resume_after_the_last_checkpoint_rewrites_history_and_completes(tmp_path, damage):
    run_dir = tmp_path / "run"
    result = fit(tmp_path, run_dir)
    original = json.loads((run_dir / HISTORY_NAME).read_text())
    assert result.complete and original["complete"]
    # A kill between checkpoint_last.pt and history.json of the last epoch leaves the previous history.
    history = run_dir / HISTORY_NAME
    if damage == "missing":
        history.unlink()
    elif damage == "garbage":
        history.write_text("{")
    else:
        history.write_text(json.dumps({**original, "epochs": original["epochs"][:1], "complete": False}))
    assert not is_run_complete(run_dir)
    again = fit(tmp_path, run_dir)
    assert again.complete and is_run_complete(run_dir)
    assert json.loads(history.read_text()) == original


# ---- 3. non-finite numbers --------------------------------------------------------------------------------

def test_nan_loss_stops_naming_epoch_step_and_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"

    def nan_in_second_epoch(model, header, batch):
        losses = regression_loss(model, header, batch)
        if model.training and (run_dir / CHECKPOINT_NAME).is_file():
            return {"loss": losses["loss"] * float("nan")}
        return losses

    with pytest.raises(NonFiniteError) as stopped:
        fit(tmp_path, run_dir, nan_in_second_epoch, epochs=3)
    message = str(stopped.value)
    assert "epoch 2" in message and "by step 6" in message
    assert f"{run_dir / CHECKPOINT_NAME} (end of epoch 1)" in message
    best = weights(run_dir / "best_backbone.pth")
    assert all(torch.isfinite(t).all() for t in best.values())
    assert json.loads((run_dir / HISTORY_NAME).read_text())["epochs"][-1]["epoch"] == 1


def test_non_finite_batchnorm_statistics_are_never_saved(tmp_path):
    run_dir = tmp_path / "run"

    def corrupt_running_var(model, header, batch):
        if (run_dir / CHECKPOINT_NAME).is_file():
            model[1].running_var.fill_(float("inf"))  # what lr=1e6 does to BatchNorm, sooner
        return regression_loss(model, header, batch)

    with pytest.raises(NonFiniteError, match=r"1\.running_var.*after epoch 2"):
        fit(tmp_path, run_dir, corrupt_running_var)
    assert torch.isfinite(weights(run_dir / "best_backbone.pth")["1.running_var"]).all()
    assert not (run_dir / "8backbone.pth").exists()


def test_nan_teacher_leaves_its_store_incomplete(tiny_synthetic, tmp_path):
    import extract_all
    from utils.stages.cli import run_stage

    args = tiny_overrides(tiny_synthetic, tmp_path, ethnicity="Asian")
    cfg = load_config(args)
    fake_teachers(cfg)
    path = artifacts.teacher_dir(cfg, "Asian") / "best_backbone.pth"
    torch.save({k: v * float("nan") if v.is_floating_point() else v for k, v in weights(path).items()}, path)
    with pytest.raises(NonFiniteError, match=r"non-finite embedding for row 0 of .*Asian\.npy"):
        run_stage(extract_all.main, args)
    assert read_manifest(member_files(artifacts.store_dir(cfg), "Asian").manifest)["complete"] is False


def test_target_rows_are_checked_before_they_are_written(tmp_path):
    rows = np.ones((3, 2), dtype=np.float32)
    assert checked_rows(rows, np.arange(3), tmp_path / "targets.npy", tmp_path / "best_adaptor.pth") is rows
    rows[1, 0] = np.nan
    with pytest.raises(NonFiniteError, match=r"adaptor\.pth gives a non-finite embedding for row 11 of .*targets\.npy"):
        checked_rows(rows, np.arange(10, 13), tmp_path / "targets.npy", tmp_path / "best_adaptor.pth")


@pytest.mark.parametrize("embeddings", ["constant", "nan"])
def test_degenerate_evaluation_is_reported_as_such_not_as_fair(tmp_path, embeddings):
    from eval.evaluate import result_row
    from eval.metrics.protocol import verify
    from eval.report.tables import results_table, write_report

    issame = np.tile([True, False], 20)
    value = 0.5 if embeddings == "constant" else np.nan
    results = {eth: verify(np.full((80, 8), value, dtype=np.float32), issame)
               for eth in ("African", "Asian", "Caucasian", "Indian")}
    assert all(r.degenerate and r.accuracy == 0.5 for r in results.values())
    row = result_row("broken teacher", results)
    table = results_table([row])
    assert "DEGENERATE evaluation of broken teacher" in table and "1.000" not in table
    write_report([row], tmp_path, stem="results")
    assert "degenerate" in (tmp_path / "results.md").read_text()
    saved = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert saved["extra"]["degenerate"].startswith("African: ")


def test_summary_leaves_degenerate_students_out_by_name():
    from eval.report.stats import StatsSettings
    from eval.report.tables import ResultRow, summary_line

    rng = np.random.default_rng(0)
    issame = np.tile(np.r_[np.ones(10, bool), np.zeros(10, bool)], 10)

    def student(name, teacher_set, genuine_mean, degenerate=""):
        pairs = {eth: (np.where(issame, rng.normal(genuine_mean, 0.3, 200), rng.normal(1.9, 0.3, 200)), issame)
                 for eth in ("African", "Asian", "Caucasian", "Indian")}
        extra = {"stage": "student", "teacher_set": teacher_set, "adaptor": "SL", "kd": "aKD",
                 "degenerate": degenerate}
        return ResultRow(name, {eth: 90.0 for eth in pairs}, extra, pairs=pairs)

    healthy = [student("s1", "specialized", 0.9), student("b1", "baseline", 1.0)]
    broken = student("s2", "specialized", 1.9, "African: all pair scores equal (constant embeddings)")
    settings = StatsSettings(n_resamples=50, seed=0)
    # The degenerate student comes last, so a summary that kept it would compare it instead of s1.
    assert summary_line(healthy + [broken], settings).replace("\nLeft out as degenerate: s2.", "") == \
        summary_line(healthy, settings)
    assert "Left out as degenerate: s2." in summary_line(healthy + [broken], settings)


def test_report_json_is_standard_json_with_infinite_ser(tmp_path):
    from eval.report.tables import ResultRow, write_report

    row = ResultRow("perfect on one group", {"African": 100.0, "Asian": 90.0, "Caucasian": 95.0, "Indian": 99.0})
    assert math.isinf(row.metrics()["ser"])
    write_report([row], tmp_path, stem="results")
    text = (tmp_path / "results.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["rows"][0]["ser"] == "inf"
    atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("-inf")]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": ["-inf"]}


# ---- 4. damaged stores --------------------------------------------------------------------------------------

def _targets(tmp_path: Path) -> tuple:
    files = target_files(tmp_path)
    manifest = {"N": 6, "dim": 4, "index_hash": "h", "flipped": False}
    write_rows_sharded(files, manifest, ONE_PROCESS, lambda rows, arrays: arrays["array"].__setitem__(
        slice(rows.start, rows.stop), 0.5))
    return files, read_manifest(files.manifest)


@pytest.mark.parametrize("damage", ["truncated", "empty", "object", "shape", "trailing"])
def test_damaged_store_array_is_refused_naming_the_file(tmp_path, damage):
    files, manifest = _targets(tmp_path)
    assert array_file_problem(files.array, manifest) is None and open_targets(tmp_path, "h").shape == (6, 4)
    data = files.array.read_bytes()
    if damage == "truncated":
        files.array.write_bytes(data[:-20])
    elif damage == "empty":
        files.array.write_bytes(b"")
    elif damage == "object":
        np.save(files.array, np.array([[None] * 4] * 6, dtype=object))
    elif damage == "shape":
        np.save(files.array, np.zeros((5, 4), dtype=np.float32))
    else:
        files.array.write_bytes(data + b"\0" * 16)
    problem = array_file_problem(files.array, manifest)
    assert problem is not None and str(files.array) in problem
    assert manifest_problem(manifest, files, "h") is not None  # what the pipeline's completion check asks
    with pytest.raises(RuntimeError, match=str(files.array).replace(".", r"\.")):
        open_targets(tmp_path, "h")


# ---- 5. config values -------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("lr=nan", "lr"), ("lr=inf", "lr"), ("lr=0", "lr"), ("milestones=5", "milestones"),
    ("milestones=abc", "milestones"),
    ("milestones=[0, 3]", "milestones"), ("grad_clip=-1", "grad_clip"), ("momentum=2.0", "momentum"),
    ("seed=-1", "seed"), ("batch_size=2.5", "batch_size"), ("resume=1", "resume"), ("dropout=1.5", "dropout"),
    ("num_workers=-1", "num_workers"), ("output_root=7", "output_root"), ("lr_decay=0", "lr_decay"),
])
def test_bad_config_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ValueError, match=rf"config key {key}="):
        load_config([override])


# ---- 6. OS errors in one line naming the path ---------------------------------------------------------------

def test_os_errors_name_the_path(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=rf"cannot write {blocker}/run: .*not a folder") as error:
        fit(tmp_path, blocker / "run")
    assert "\n" not in str(error.value)
    long_name = tmp_path / ("n" * 300) / "history.json"
    with pytest.raises(OSError, match="file name too long"):
        atomic_write_json(long_name, {})

    def disk_full(obj, handle):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=0))
    with pytest.raises(OSError, match=r"cannot write .*checkpoint_last\.pt: no space left") as error:
        atomic_torch_save({}, tmp_path / "checkpoint_last.pt")
    assert error.value.errno == errno.ENOSPC and not list(tmp_path.glob(".*.tmp"))


# ---- 7. SIGTERM, leftovers, byte-identical weights ---------------------------------------------------------

def noisy_loss(model, header, batch):
    """Draws from the global random stream every step, like the elastic margins: resume must restore it."""
    losses = regression_loss(model, header, batch)
    return {"loss": losses["loss"] * (1 + 0.1 * torch.rand(()))}


def test_sigterm_saves_mid_epoch_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    run_dir = tmp_path / "run"

    def terminated_at_step_6(model, header, batch):
        losses = noisy_loss(model, header, batch)
        terminated_at_step_6.calls += 1
        if terminated_at_step_6.calls == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return losses

    terminated_at_step_6.calls = 0
    with pytest.raises(TrainingInterrupted,
                       match=r"SIGTERM: teacher stopped after step 6 \(2 of 4 in epoch 2\) and saved .*resume=True"):
        fit(tmp_path, run_dir, terminated_at_step_6, epochs=3)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and not is_locked(run_dir)
    checkpoint = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)
    assert checkpoint["global_step"] == 6 and checkpoint["mid_epoch"]["step"] == 2
    resumed = fit(tmp_path, run_dir, noisy_loss, epochs=3)
    straight_dir = tmp_path / "straight" / "run"
    fit(tmp_path / "straight", straight_dir, noisy_loss, epochs=3)
    assert resumed.complete and INTERRUPTED_EXIT_CODE == 75
    a, b = weights(run_dir / "best_backbone.pth"), weights(straight_dir / "best_backbone.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads((d / HISTORY_NAME).read_text())["epochs"] for d in (run_dir, straight_dir)]
    assert [e["loss_sum"] for e in history[0]] == [e["loss_sum"] for e in history[1]]


def test_interrupted_temp_files_are_removed_and_identical_weights_are_identical_files(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    leftover = run_dir / ".checkpoint_last.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    fit(tmp_path, run_dir)
    assert not leftover.exists()
    state = {"w": torch.arange(6.0)}
    atomic_torch_save(state, tmp_path / "a.pth")
    atomic_torch_save(state, tmp_path / "b.pth")
    digest = [hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in ("a.pth", "b.pth")]
    assert digest[0] == digest[1]


# ---- 6. inputs that fail early, by name -------------------------------------------------------------------

@pytest.fixture
def train_tree(tiny_synthetic, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_synthetic / "train", tmp_path / "train"))


@pytest.mark.parametrize("damage, message", [
    ("tab", "tab or line break"), ("newline", "tab or line break"), ("undecodable", "not a valid UTF-8 name"),
    ("broken_link", "broken symbolic link"),
])
def test_unusable_names_are_refused_by_name(train_tree, damage, message):
    from utils.data.index import scan_image_folder

    identity = next((train_tree / "Asian").iterdir())
    if damage == "tab":
        identity.rename(identity.with_name("first\tlast"))
    elif damage == "newline":
        (identity / "a\nb.jpg").write_bytes((next(identity.iterdir())).read_bytes())
    elif damage == "undecodable":
        os.rename(identity, os.fsencode(identity.parent) + b"/caf\xe9")
    else:
        (identity / "gone.jpg").symlink_to(identity / "missing.jpg")
    with pytest.raises(ValueError, match=message) as refused:
        scan_image_folder(train_tree)
    assert str(train_tree / "Asian") in str(refused.value) or "Asian" in str(refused.value)


def test_unknown_data_folder_is_warned_about_by_name(train_tree, caplog):
    from utils.data.index import scan_image_folder

    (train_tree / "Martian" / "x").mkdir(parents=True)
    with caplog.at_level("WARNING"):
        scan_image_folder(train_tree)
    assert "Martian" in caplog.text


def test_corrupt_image_fails_before_training_by_name(train_tree, tmp_path):
    import train as train_script
    from utils.stages.cli import run_stage

    victim = next((train_tree / "Indian").glob("*/*.jpg"))
    victim.write_bytes(b"not a jpeg")
    args = tiny_overrides(train_tree.parent, tmp_path / "out", ethnicity="Indian", check_images=-1)
    with pytest.raises(ValueError, match=f"cannot decode image {victim}"):
        run_stage(train_script.main, args)
    assert not (artifacts.teacher_dir(load_config(args)) / CHECKPOINT_NAME).exists()


@pytest.mark.parametrize("issame, message", [
    ([], "holds 0 pairs"), ([True, False] * 4, "holds 8 pairs, fewer than the 10 folds"),
    ([True] * 20 + [False] * 20, "fold 1 of 10 .* only genuine pairs"),
])
def test_unusable_rfw_pair_sets_name_file_and_ethnicity(tiny_synthetic, tmp_path, issame, message):
    import shutil

    from eval.rfw.embedding import RFWEvaluator
    from utils.data.binfile import write_bin

    root = Path(shutil.copytree(tiny_synthetic / "rfw", tmp_path / "rfw"))
    image = next((tiny_synthetic / "train" / "Asian").glob("*/*.jpg")).read_bytes()
    write_bin(root / "Indian_test.bin", [image] * (2 * len(issame)), issame)
    with pytest.raises(ValueError, match=rf"Indian_test\.bin \(Indian\): {message}"):
        RFWEvaluator(root, 32)


def test_malicious_bin_is_refused_in_one_line_by_the_cli(tiny_synthetic, tmp_path, capsys):
    import shutil

    from eval.evaluate import main as evaluate_main

    root = Path(shutil.copytree(tiny_synthetic / "rfw", tmp_path / "rfw"))
    (root / "Asian_test.bin").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")
    weights_path = tmp_path / "w.pth"
    weights_path.write_bytes(b"")
    with pytest.raises(SystemExit) as refused:
        evaluate_main(["--rfw-root", str(root), "--backbone", str(weights_path), "--network", "iresnet18",
                       "--input-size", "32", "--out", str(tmp_path / "out")])
    assert refused.value.code == 2
    assert re.search(r"error: .*Asian_test\.bin references os\.system.*refused", capsys.readouterr().err)
    assert not Path("pwned").exists()
