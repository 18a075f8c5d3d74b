"""Issue 25, inputs: the data fingerprint reads content, images are measured from their header before decoding,
RFW pair lists stay inside the RFW tree, a one-identity softmax is refused, replace=True validates before it moves
a run aside, and the ONNX check refuses a model whose embeddings overflow."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from config.config import load_config
from helpers import make_tree, tiny_overrides, write_jpeg
from utils.core.errors import InvalidInputError, UserError
from utils.data.index import scan_image_folder
from utils.workdir import artifacts
from utils.workdir.provenance import data_fingerprint


# ---- item 5: the data fingerprint reads content ------------------------------------------------------------

def test_an_image_replaced_by_other_bytes_of_the_same_size_and_times_changes_the_data_fingerprint(tmp_path):
    index = scan_image_folder(make_tree(tmp_path / "train"))
    index.digest_cache = tmp_path / "digests.npz"
    before = data_fingerprint(index)
    victim = tmp_path / "train" / index.paths[3]
    stat = victim.stat()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # touch -r: size and mtime as before
    assert victim.stat().st_size == stat.st_size and victim.stat().st_mtime_ns == stat.st_mtime_ns
    assert data_fingerprint(index) != before


def test_file_digests_are_kept_between_processes_and_only_changed_files_are_read_again(tmp_path, monkeypatch):
    import utils.core.digests as digests

    root = make_tree(tmp_path / "train")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    cache = tmp_path / "digests.npz"
    read = []
    original = digests._hash_file
    monkeypatch.setattr(digests, "_hash_file", lambda path: read.append(path) or original(path))
    monkeypatch.setattr(digests, "SETTLED_NS", -1)  # the files were just written; treat them as settled
    first = digests.files_sha256(root, paths, cache)
    assert len(read) == len(paths) and bytes(first[0]) == bytes.fromhex(digests.file_sha256(root / paths[0]))
    read.clear()
    np.testing.assert_array_equal(digests.files_sha256(root, paths, cache), first)  # a new process: the cache file
    assert read == []
    (root / paths[5]).write_bytes((root / paths[6]).read_bytes())
    again = digests.files_sha256(root, paths, cache)
    assert [Path(p).name for p in read] == [Path(paths[5]).name] and bytes(again[5]) == bytes(first[6])


def test_a_file_written_just_before_it_is_hashed_is_not_kept(tmp_path, monkeypatch):
    import utils.core.digests as digests

    monkeypatch.setattr(digests, "SETTLED_NS", 10**15)  # every file counts as just written, however slow the machine
    root = make_tree(tmp_path / "train")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    digests.files_sha256(root, paths, tmp_path / "digests.npz")
    read = []
    original = digests._hash_file
    monkeypatch.setattr(digests, "_hash_file", lambda path: read.append(path) or original(path))
    digests.files_sha256(root, paths, tmp_path / "digests.npz")
    assert len(read) == len(paths)  # written within a second of the first hashing: read again


# ---- item 6: decompression bombs ------------------------------------------------------------------------------

def _claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose start-of-frame header claims width x height (the data stay those of the small image)."""
    pos = jpeg.index(b"\xff\xc0")
    return jpeg[:pos + 5] + struct.pack(">HH", height, width) + jpeg[pos + 9:]


def _bomb(path: Path, width: int = 9000, height: int = 9000) -> Path:
    write_jpeg(path, (90, 120, 30), size=32)
    path.write_bytes(_claiming(path.read_bytes(), width, height))
    return path


def test_header_size_reads_jpeg_png_and_bmp_without_decoding():
    import cv2

    from utils.data.image_header import header_size

    image = np.zeros((21, 34, 3), dtype=np.uint8)
    for ext in (".jpg", ".png", ".bmp"):
        assert header_size(cv2.imencode(ext, image)[1].tobytes()) == (34, 21), ext
    progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert header_size(_claiming(progressive.replace(b"\xff\xc2", b"\xff\xc0"), 30000, 30000)) == (30000, 30000)
    assert header_size(b"GIF89a....") is None


def test_a_decompression_bomb_is_refused_before_decoding_even_with_allow_resize(tmp_path, monkeypatch):
    from utils.data import image
    from utils.workdir.inputs import dataset_for

    root = make_tree(tmp_path / "train", size=32)
    index = scan_image_folder(root)
    _bomb(root / index.paths[0])
    cfg = load_config(tiny_overrides(tmp_path, tmp_path / "work", allow_resize=True))
    with monkeypatch.context() as patched:
        patched.setattr(image.cv2, "imdecode", lambda *args: pytest.fail("the bomb was decoded"))
        with pytest.raises(InvalidInputError, match=r"claims 9000x9000 = 81,000,000 pixels, more than max_image_"):
            dataset_for(cfg, index)[0]
    assert dataset_for(cfg, index)[1][0].shape == (3, 32, 32)
    # The key raises the limit: then the image is decoded (and resized, as allow_resize says).
    bigger = load_config(tiny_overrides(tmp_path, tmp_path / "work", allow_resize=True, max_image_pixels=10**8))
    assert dataset_for(bigger, index)[0][0].shape == (3, 32, 32)


def test_bombs_are_refused_by_the_export_check_and_in_rfw_files(tmp_path):
    from eval.export import load_images
    from eval.rfw.pairs import load_bin
    from utils.data.binfile import write_bin

    bomb = _bomb(tmp_path / "bomb.jpg", 30000, 30000)
    with pytest.raises(InvalidInputError, match="claims 30000x30000"):
        load_images([bomb], 32)
    write_bin(tmp_path / "lfw.bin", [bomb.read_bytes()] * 2, [True])
    with pytest.raises(InvalidInputError, match=r"lfw\.bin\[0\] claims 30000x30000"):
        load_bin(tmp_path / "lfw.bin", 32, allow_resize=True)


# ---- item 7: RFW pair lists stay inside the RFW tree ----------------------------------------------------------

def test_a_pair_list_line_cannot_reach_outside_the_rfw_tree(tmp_path):
    from eval.rfw.pairs import load_pair_list

    image_root = tmp_path / "a" / "b" / "rfw" / "data"
    image_root.mkdir(parents=True)
    (tmp_path / "a" / "b" / "o").mkdir()
    write_jpeg(tmp_path / "a" / "o_0001.jpg", (10, 20, 30), size=32)  # what ../../o/../../o_0001.jpg reaches
    assert (image_root / "../../o/../../o_0001.jpg").is_file()
    pairs = tmp_path / "a" / "b" / "rfw" / "pairs.txt"
    pairs.write_text("../../o\t1\t1\n")
    with pytest.raises(InvalidInputError, match=rf"{pairs}:1: identity names must be plain folder names"):
        load_pair_list(image_root, pairs, 32)


# ---- item 8: a softmax over one identity ---------------------------------------------------------------------

def test_a_teacher_of_one_identity_is_refused_before_training(tmp_path):
    import train as train_script
    from utils.stages.cli import run_stage

    root = make_tree(tmp_path / "data" / "train", ids={"African": 1, "Asian": 2, "Caucasian": 2, "Indian": 2},
                     size=32)
    args = tiny_overrides(root.parent, tmp_path / "work", ethnicity="African", batch_size=2)
    with pytest.raises(InvalidInputError, match="holds 1 identity; a margin-softmax stage needs at least 2"):
        run_stage(train_script.main, args)
    assert not artifacts.has_run_files(artifacts.teacher_dir(load_config(args)))


# ---- item 9: replace=True validates first --------------------------------------------------------------------

def test_replace_refuses_a_run_that_cannot_start_and_leaves_the_old_run_in_place(tmp_path):
    import train as train_script
    from utils.stages.cli import run_stage

    root = make_tree(tmp_path / "data" / "train", size=32)
    args = tiny_overrides(root.parent, tmp_path / "work", ethnicity="Asian")
    run_dir = artifacts.teacher_dir(load_config(args))
    run_dir.mkdir(parents=True)
    old = {"stage": "teacher", "keys": {"lr": 0.05}, "inputs": {}}
    (run_dir / artifacts.PROVENANCE_FILE).write_text(json.dumps(old))
    artifacts.history_file(run_dir).write_text(json.dumps({"epochs": [], "complete": True}))
    with pytest.raises(InvalidInputError, match="give no full batch of 1000"):
        run_stage(train_script.main, tiny_overrides(root.parent, tmp_path / "work", ethnicity="Asian", replace=True,
                                                    batch_size=1000))
    assert json.loads((run_dir / artifacts.PROVENANCE_FILE).read_text()) == old
    assert artifacts.history_file(run_dir).is_file()
    assert not list(run_dir.parent.glob(f"{run_dir.name}.replaced-*"))


# ---- item 13: the export check in float64 ---------------------------------------------------------------------

def test_export_refuses_a_model_whose_embeddings_overflow_when_normalised(tmp_path, capsys):
    from backbones import get_backbone
    from eval import export

    model = get_backbone("iresnet18", input_size=32, embedding_size=16, width=8)
    state = model.state_dict()
    state["features.bias"] = torch.tensor([1e25, -1e25] * 8)  # finite float32 outputs whose squares overflow
    torch.save(state, tmp_path / "w.pth")
    images = make_tree(tmp_path / "images", size=32)
    out = tmp_path / "model.onnx"
    with pytest.raises(SystemExit) as refused:
        export.main(["--weights", str(tmp_path / "w.pth"), "--network", "iresnet18", "--input-size", "32",
                     "--embedding-size", "16", "--width", "8", "--images", str(images), "--num-images", "2",
                     "--out", str(out)])
    assert refused.value.code == 2
    assert "overflow float32 when normalised" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.onnx*"))


def test_user_errors_of_the_data_layer_are_user_errors():
    """The data layer's refusals reach the one-line contract (UserError), not a traceback."""
    from utils.data.image import decode_bgr

    with pytest.raises(UserError, match="cannot decode image x.jpg"):
        decode_bgr(b"\xff\xd8\xff\xe0" + b"\0" * 20, "x.jpg")


def test_the_eval_tools_raise_the_pixel_limit_with_an_option_their_refusal_names(tmp_path, capsys):
    """An image just over the default limit is refused naming --max-image-pixels, and read with the option raised."""
    from config.config import MAX_IMAGE_PIXELS
    from eval.embed import main as embed_main
    from eval.evaluate import main as evaluate_main
    from eval.export import main as export_main
    from utils.data.binfile import write_bin

    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    assert MAX_IMAGE_PIXELS < side * side < MAX_IMAGE_PIXELS * 1.001
    images = tmp_path / "images"
    large = _bomb(images / "large.jpg", side, side)
    write_jpeg(images / "small.jpg", (10, 20, 30), size=32)
    for eth in ("African", "Asian", "Caucasian", "Indian"):  # one large image each: decoding 40 MP takes a while
        write_bin(tmp_path / "rfw" / f"{eth}_test.bin",
                  [large.read_bytes()] + [(images / "small.jpg").read_bytes()] * 39, [True, False] * 10)
    torch.manual_seed(0)
    from backbones import get_backbone

    torch.save(get_backbone("iresnet18", input_size=32, embedding_size=16, width=8).state_dict(), tmp_path / "w.pth")
    small = ["--network", "iresnet18", "--input-size", "32", "--embedding-size", "16", "--width", "8"]
    tools = {
        "embed": (embed_main, ["--backbone", str(tmp_path / "w.pth"), "--images", str(images), "--out",
                               str(tmp_path / "embeddings"), "--device", "cpu", "--allow-resize", *small]),
        "evaluate": (evaluate_main, ["--backbone", str(tmp_path / "w.pth"), "--rfw-root", str(tmp_path / "rfw"),
                                     "--out", str(tmp_path / "report"), "--device", "cpu", "--allow-resize",
                                     "--bootstrap-resamples", "10", *small]),
        "export": (export_main, ["--weights", str(tmp_path / "w.pth"), "--images", str(large), "--out",
                                 str(tmp_path / "m.onnx"), *small]),
    }
    for name, (tool, argv) in tools.items():
        with pytest.raises(SystemExit) as ended:
            tool(argv)
        err = capsys.readouterr().err
        assert ended.value.code == 2 and f"claims {side}x{side}" in err and "--max-image-pixels" in err, (name, err)
    for name in ("embed", "evaluate"):
        tool, argv = tools[name]
        tool([*argv, "--max-image-pixels", str(side * side)])
    assert np.load(tmp_path / "embeddings" / "embeddings.npy").shape == (2, 16)
    assert (tmp_path / "report" / "results.json").is_file()


def test_the_pipeline_report_passes_a_raised_pixel_limit_to_the_evaluation(tmp_path):
    from utils.pipeline.launch import report_command

    default = report_command(load_config({"rfw_root": str(tmp_path), "output_root": str(tmp_path)}))
    raised = report_command(load_config({"rfw_root": str(tmp_path), "output_root": str(tmp_path),
                                         "max_image_pixels": 10**8}))
    assert "--max-image-pixels" not in default and raised[-2:] == ["--max-image-pixels", "100000000"]
