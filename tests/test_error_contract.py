"""Issue 25 item 10: every user mistake ends in one line naming the file or key and exit code 2, in the stage
scripts (as run from the command line) and in every ``python -m eval.*`` tool; a duplicated key is refused."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_tree, tiny_overrides, write_jpeg


def _stage_exit(script_main, argv: list[str], monkeypatch, capsys) -> str:
    """Run a stage the way its ``__main__`` does (argv from the command line): the exit code must be 2 and the
    message one line; returns it."""
    from utils.stages.cli import run_stage

    monkeypatch.setattr(sys, "argv", ["stage.py", *argv])
    with pytest.raises(SystemExit) as ended:
        run_stage(script_main)
    return _one_line(ended.value.code, capsys)


def _tool_exit(tool_main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as ended:
        tool_main(argv)
    return _one_line(ended.value.code, capsys)


def _one_line(code, capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error"), err
    return err


@pytest.fixture
def train_root(tmp_path) -> Path:
    return make_tree(tmp_path / "data" / "train", size=32)


def _train(root: Path, tmp_path: Path, **extra) -> list[str]:
    return tiny_overrides(root.parent, tmp_path / "work", ethnicity="Asian", **extra)


@pytest.mark.parametrize("damage, message", [
    ("non_utf8_name", "is not a valid UTF-8 name"),
    ("empty_identity", "holds no images"),
    ("empty_ethnicity", "is empty: expected identity folders"),
    ("truncated_jpeg", "cannot decode image"),
    ("symlink_loop", "symbolic link loop at"),
])
def test_bad_training_data_is_one_line_and_exit_2(train_root, tmp_path, monkeypatch, capsys, damage, message):
    import train as train_script

    identity = next((train_root / "Asian").iterdir())
    if damage == "non_utf8_name":
        os.rename(identity / "0.jpg", os.fsencode(identity) + b"/caf\xe9.jpg")
    elif damage == "empty_identity":
        (train_root / "Asian" / "nobody").mkdir()
    elif damage == "empty_ethnicity":
        for folder in (train_root / "Indian").iterdir():
            for image in folder.iterdir():
                image.unlink()
            folder.rmdir()
    elif damage == "truncated_jpeg":
        image = identity / "0.jpg"
        image.write_bytes(image.read_bytes()[:200])
    else:
        os.symlink("loop_b", identity / "loop_a.jpg")
        os.symlink("loop_a.jpg", identity / "loop_b")
    err = _stage_exit(train_script.main, _train(train_root, tmp_path, check_images=-1), monkeypatch, capsys)
    assert message in err and str(train_root) in err


@pytest.mark.parametrize("words, message", [
    (["network='../../x'"], "config key network='../../x' is not one of"),
    (["student_network=resnet"], "config key student_network='resnet' is not one of"),
    (["iresnet34"], "'iresnet34' is not of the form key=value"),
    (["seed=1", "seed=2"], "config key seed is given twice (seed=1 and seed=2)"),
])
def test_bad_words_are_refused_before_the_data_is_read(tmp_path, monkeypatch, capsys, words, message):
    import train as train_script

    missing = tmp_path / "nowhere"  # the data scan would fail on it: the word is refused first
    err = _stage_exit(train_script.main, [f"data_root={str(missing)!r}", "ethnicity=Asian", *words], monkeypatch,
                      capsys)
    assert message in err and "nowhere" not in err


def test_the_pipeline_refuses_a_duplicated_key_and_merges_its_own_layers(tmp_path, capsys):
    import run_pipeline
    from config.config import merge_overrides

    assert run_pipeline.main(["--preset", "tiny", "--plan-only", f"output_root={str(tmp_path)!r}", "seed=1",
                              "seed=2"]) == 2
    assert "config key seed is given twice" in capsys.readouterr().err
    assert merge_overrides(["seed=1", "lr=0.1"], ["seed=2"], ["resume=True"]) == ["lr=0.1", "seed=2", "resume=True"]


def test_a_full_disk_inside_the_store_memory_map_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import numpy.lib.format

    from utils.core.distributed import DistInfo
    from utils.core.errors import UserError
    from utils.workdir.artifacts import member_files
    from utils.workdir.store import write_rows_sharded

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(numpy.lib.format.open_memmap.__globals__, "_write_array_header", full_disk)
    files = member_files(tmp_path / "store", "Asian")
    with pytest.raises(UserError, match=rf"cannot write {files.array}: no space left on the device"):
        write_rows_sharded(files, {"N": 8, "dim": 4, "flipped": False}, DistInfo(0, 0, 1, torch.device("cpu")),
                           lambda rows, arrays: None)


def _weights(tmp_path: Path) -> Path:
    from backbones import get_backbone

    torch.save(get_backbone("iresnet18", input_size=32, embedding_size=16, width=8).state_dict(), tmp_path / "w.pth")
    return tmp_path / "w.pth"


EMBED = ["--network", "iresnet18", "--input-size", "32", "--embedding-size", "16", "--width", "8", "--device", "cpu"]


def _refuse_writes_in(folder: Path, monkeypatch) -> None:
    """A read-only ``folder`` (tests may run as root, for whom permissions do not refuse)."""
    import tempfile

    original = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied")
        return original(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_embed_out_that_is_a_file_or_read_only_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from eval.embed import main as embed_main

    images = make_tree(tmp_path / "images", size=32)
    (tmp_path / "taken").write_text("a file")
    err = _tool_exit(embed_main, ["--backbone", str(tmp_path / "missing.pth"), "--images", str(images),
                                  "--out", str(tmp_path / "taken"), *EMBED], capsys)
    assert f"cannot write {tmp_path / 'taken'}: exists and is not a folder" in err
    (tmp_path / "ro").mkdir()
    _refuse_writes_in(tmp_path / "ro", monkeypatch)
    err = _tool_exit(embed_main, ["--backbone", str(tmp_path / "missing.pth"), "--images", str(images),
                                  "--out", str(tmp_path / "ro"), *EMBED], capsys)
    assert f"cannot write {tmp_path / 'ro'}: permission denied" in err


def test_embed_batch_size_0_and_export_tolerance_below_0_are_refused(tmp_path, capsys):
    from eval.embed import main as embed_main
    from eval.export import main as export_main

    weights = _weights(tmp_path)
    images = make_tree(tmp_path / "images", size=32)
    err = _tool_exit(embed_main, ["--backbone", str(weights), "--images", str(images), "--out", str(tmp_path / "e"),
                                  "--batch-size", "0", *EMBED], capsys)
    assert "--batch-size 0" in err
    err = _tool_exit(export_main, ["--weights", str(weights), "--network", "iresnet18", "--input-size", "32",
                                   "--embedding-size", "16", "--width", "8", "--images", str(images),
                                   "--tolerance", "-1", "--out", str(tmp_path / "m.onnx")], capsys)
    assert "--tolerance -1" in err and not (tmp_path / "m.onnx").exists()


def test_evaluate_out_read_only_is_refused_before_the_evaluation(tmp_path, capsys, monkeypatch):
    import eval.evaluate as evaluate

    monkeypatch.setattr(evaluate, "RFWEvaluator", lambda *args, **kwargs: pytest.fail("evaluated first"))
    (tmp_path / "ro").mkdir()
    _refuse_writes_in(tmp_path / "ro", monkeypatch)
    err = _tool_exit(evaluate.main, ["--backbone", str(_weights(tmp_path)), "--network", "iresnet18",
                                     "--rfw-root", str(tmp_path), "--out", str(tmp_path / "ro")], capsys)
    assert f"cannot write {tmp_path / 'ro'}: permission denied" in err


def test_kd_targets_tool_follows_the_same_contract(tmp_path, capsys):
    from eval.kd_targets import main as kd_targets_main

    err = _tool_exit(kd_targets_main, [str(tmp_path / "no_work_dir")], capsys)
    assert "no_work_dir" in err


def test_a_truncated_image_in_rfw_files_is_one_line(tmp_path, capsys):
    from eval.evaluate import main as evaluate_main
    from utils.data.binfile import write_bin

    write_jpeg(tmp_path / "a.jpg", (10, 20, 30), size=32)
    for eth in ("African", "Asian", "Caucasian", "Indian"):
        write_bin(tmp_path / "rfw" / f"{eth}_test.bin", [(tmp_path / "a.jpg").read_bytes()[:100]] * 40,
                  [True, False] * 10)
    err = _tool_exit(evaluate_main, ["--backbone", str(_weights(tmp_path)), "--network", "iresnet18",
                                     "--input-size", "32", "--rfw-root", str(tmp_path / "rfw"),
                                     "--out", str(tmp_path / "out")], capsys)
    assert "African_test.bin[0]" in err and "cannot decode image" in err


def test_a_bad_image_met_in_a_data_loader_worker_is_one_line(train_root, tmp_path, monkeypatch, capsys):
    """check_images=0 leaves the damaged image to a DataLoader worker, which wraps the error in its traceback."""
    import train as train_script

    image = next((train_root / "Asian").iterdir()) / "0.jpg"
    image.write_bytes(image.read_bytes()[:200])
    err = _stage_exit(train_script.main, _train(train_root, tmp_path, check_images=0, num_workers=1), monkeypatch,
                      capsys)
    assert err == f"error (rank 0): cannot decode image {image}: corrupt, truncated or not an image"


# ---- nothing half-written: a tool that fails on bad input leaves no output folder behind ------------------------

def _rfw_of_one_image(tmp_path: Path) -> Path:
    from utils.data.binfile import write_bin

    write_jpeg(tmp_path / "a.jpg", (10, 20, 30), size=32)
    for eth in ("African", "Asian", "Caucasian", "Indian"):
        write_bin(tmp_path / "rfw" / f"{eth}_test.bin", [(tmp_path / "a.jpg").read_bytes()] * 40, [True, False] * 10)
    return tmp_path / "rfw"


def test_a_failing_evaluation_leaves_no_out_folder(tmp_path, capsys):
    from config.config import load_config
    from eval.evaluate import main as evaluate_main
    from utils.core.io import atomic_write_json
    from utils.workdir import artifacts

    rfw = _rfw_of_one_image(tmp_path)
    small = ["--network", "iresnet18", "--input-size", "32", "--embedding-size", "16", "--width", "8",
             "--device", "cpu"]
    out = tmp_path / "new" / "report"
    err = _tool_exit(evaluate_main, ["--backbone", str(tmp_path / "missing.pth"), "--rfw-root", str(rfw),
                                     "--out", str(out), *small], capsys)
    assert "missing.pth" in err and not (tmp_path / "new").exists()
    err = _tool_exit(evaluate_main, ["--backbone", str(_weights(tmp_path)), "--rfw-root", str(tmp_path / "images"),
                                     "--out", str(out), *small], capsys)
    assert "images" in err and not (tmp_path / "new").exists()
    # A work directory whose run has no weights yet: the report folder is not created either.
    cfg = load_config({"output_root": str(tmp_path / "work"), "network": "iresnet18", "width": 8, "input_size": 32})
    config = cfg.to_dict()
    config["derived"]["stage"] = "teacher"
    atomic_write_json(artifacts.config_file(artifacts.teacher_dir(cfg)), config)
    for report in (out, None):
        err = _tool_exit(evaluate_main, ["--work-dir", str(tmp_path / "work"), "--rfw-root", str(rfw),
                                         *(["--out", str(report)] if report else []), "--device", "cpu"], capsys)
        assert "training not finished" in err
    assert not (tmp_path / "new").exists() and not artifacts.report_folder(tmp_path / "work", "").exists()


def test_failing_embed_and_export_leave_no_out_folder(tmp_path, capsys):
    from eval.embed import main as embed_main
    from eval.export import main as export_main

    images = make_tree(tmp_path / "images", size=32)
    err = _tool_exit(embed_main, ["--backbone", str(tmp_path / "missing.pth"), "--images", str(images),
                                  "--out", str(tmp_path / "new" / "embeddings"), *EMBED], capsys)
    assert "missing.pth" in err and not (tmp_path / "new").exists()
    damaged = sorted(images.rglob("*.jpg"))[-1]
    damaged.write_bytes(damaged.read_bytes()[:100])  # met after the first batches are embedded
    err = _tool_exit(embed_main, ["--backbone", str(_weights(tmp_path)), "--images", str(images), "--batch-size", "4",
                                  "--out", str(tmp_path / "new" / "embeddings"), *EMBED], capsys)
    assert "cannot decode image" in err and not (tmp_path / "new").exists()
    err = _tool_exit(export_main, ["--weights", str(tmp_path / "missing.pth"), "--network", "iresnet18",
                                   "--input-size", "32", "--embedding-size", "16", "--width", "8",
                                   "--images", str(sorted(images.rglob("*.jpg"))[0]),
                                   "--out", str(tmp_path / "new" / "m.onnx")], capsys)
    assert "missing.pth" in err and not (tmp_path / "new").exists()
