"""extract_all.py on tiny synthetic images with random-init teachers: rows, sharding, skipping and redoing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import extract_all
from backbones import get_backbone
from config.config import CONCAT_ORDER, load_config
from helpers import fake_teacher_set, make_tree, run_torchrun, tiny_overrides, write_fake_teacher
from utils.data.image import normalize_images
from utils.data.index import ImageIndex
from utils.stages.cli import run_stage
from utils.stages.extract import teacher_store_complete
from utils.workdir import artifacts
from utils.workdir.artifacts import member_files
from utils.workdir.inputs import dataset_for
from utils.workdir.provenance import data_fingerprint
from utils.workdir.store import read_manifest


def extract(overrides: list[str], **extra) -> list[str]:
    return run_stage(extract_all.main, overrides + [f"{k}={v!r}" for k, v in extra.items()])


def embed_rows(cfg, member: str, index: ImageIndex, rows: list[int], flip: bool) -> np.ndarray:
    """What the teacher's store rows should hold, computed here image by image."""
    model = get_backbone(cfg.network, input_size=cfg.input_size, width=cfg.width, embedding_size=cfg.embedding_size)
    model.load_state_dict(torch.load(artifacts.teacher_dir(cfg, member) / "best_backbone.pth", weights_only=True))
    dataset = dataset_for(cfg, index)
    images = normalize_images(torch.stack([dataset[r][0] for r in rows]))
    with torch.no_grad():
        return F.normalize(model.eval()(images.flip(3) if flip else images), dim=1).numpy()


def test_one_and_two_ranks_write_identical_stores(tiny_synthetic, tmp_path):
    single = tiny_overrides(tiny_synthetic, tmp_path / "single", extract_batch_size=16)
    double = tiny_overrides(tiny_synthetic, tmp_path / "double", extract_batch_size=16)
    fake_teacher_set(single)
    fake_teacher_set(double)
    assert extract(single, ethnicity="all", extract_flipped=True) == list(CONCAT_ORDER)
    run_torchrun("extract_all.py", double + ["ethnicity='all'", "extract_flipped=True"])

    cfg_1, cfg_2 = load_config(single), load_config(double)
    assert (artifacts.store_dir(cfg_1) / artifacts.STORE_INDEX_FILE).read_text() == (artifacts.store_dir(cfg_2) / artifacts.STORE_INDEX_FILE).read_text()
    index = ImageIndex.load(artifacts.store_dir(cfg_1) / artifacts.STORE_INDEX_FILE)
    for member in CONCAT_ORDER:
        one, two = member_files(artifacts.store_dir(cfg_1), member), member_files(artifacts.store_dir(cfg_2), member)
        manifest_1, manifest_2 = read_manifest(one.manifest), read_manifest(two.manifest)
        assert manifest_1["complete"] and manifest_2["complete"] and manifest_1["flipped"]
        assert manifest_1["N"] == len(index) and manifest_1["dim"] == cfg_1.embedding_size
        assert manifest_1["index_hash"] == manifest_2["index_hash"] == index.digest()
        assert manifest_1["checkpoint"]["sha256"] == manifest_2["checkpoint"]["sha256"]
        assert manifest_1["checkpoint"]["path"] == str((artifacts.teacher_dir(cfg_1, member) / "best_backbone.pth").resolve())
        for path_1, path_2 in ((one.array, two.array), (one.flipped, two.flipped)):
            rows_1, rows_2 = np.load(path_1), np.load(path_2)
            assert rows_1.shape == (len(index), cfg_1.embedding_size) and rows_1.dtype == np.float32
            np.testing.assert_array_equal(rows_1, rows_2)
            np.testing.assert_allclose(np.linalg.norm(rows_1, axis=1), 1.0, atol=1e-5)
        # Rows are the teacher's eval-mode embeddings of the unflipped (and flipped) images, in index order.
        probe = [0, len(index) // 2, len(index) - 1]
        for flip, path in ((False, one.array), (True, one.flipped)):
            np.testing.assert_allclose(np.load(path)[probe], embed_rows(cfg_1, member, index, probe, flip), atol=1e-5)


def test_complete_store_is_skipped_and_interrupted_or_stale_one_redone(tiny_synthetic, tmp_path):
    overrides = tiny_overrides(tiny_synthetic, tmp_path, ethnicity="Asian")
    cfg = load_config(overrides)
    write_fake_teacher(cfg, "Asian", seed=0)
    assert extract(overrides) == ["Asian"]
    files = member_files(artifacts.store_dir(cfg), "Asian")
    original = np.load(files.array)
    index = ImageIndex.load(artifacts.store_dir(cfg) / artifacts.STORE_INDEX_FILE)
    index_hash, data = index.digest(), data_fingerprint(index)
    stamp = files.array.stat().st_mtime_ns
    assert extract(overrides) == [] and files.array.stat().st_mtime_ns == stamp

    # An extraction killed half-way: rows partly written, manifest still incomplete.
    rows = np.load(files.array, mmap_mode="r+")
    rows[: len(rows) // 2] = 0.0
    rows.flush()
    del rows
    files.manifest.write_text(json.dumps({**read_manifest(files.manifest), "complete": False}))
    assert not teacher_store_complete(cfg, "Asian", index_hash, data)
    assert extract(overrides) == ["Asian"]
    assert teacher_store_complete(cfg, "Asian", index_hash, data)
    np.testing.assert_array_equal(np.load(files.array), original)

    assert not teacher_store_complete(load_config(overrides + ["extract_flipped=True"]), "Asian", index_hash, data)
    assert extract(overrides, extract_flipped=True) == ["Asian"]  # flipped rows asked for: redone with them
    assert files.flipped.is_file()

    write_fake_teacher(cfg, "Asian", seed=1)  # the teacher was retrained: its store is stale
    assert extract(overrides) == ["Asian"]
    assert not np.allclose(np.load(files.array), original)


def test_allow_resize_extracts_images_that_are_not_input_size_squares(tmp_path):
    """With allow_resize=True extraction reads 40x40 images at input_size 32 as training does, the image check
    before it included; without, they are refused by name."""
    make_tree(tmp_path / "data" / "train", size=40)
    refused = tiny_overrides(tmp_path / "data", tmp_path / "refused", ethnicity="Asian")
    write_fake_teacher(load_config(refused), "Asian", seed=0)
    with pytest.raises(ValueError, match=r"is 40x40, not the 32x32 aligned crop.*allow_resize=True"):
        extract(refused)
    overrides = tiny_overrides(tmp_path / "data", tmp_path / "work", ethnicity="Asian", allow_resize=True)
    cfg = load_config(overrides)
    write_fake_teacher(cfg, "Asian", seed=0)
    assert extract(overrides) == ["Asian"]
    index = ImageIndex.load(artifacts.store_index_file(artifacts.store_dir(cfg)))
    rows = np.load(member_files(artifacts.store_dir(cfg), "Asian").array)
    np.testing.assert_allclose(rows, embed_rows(cfg, "Asian", index, list(range(len(index))), flip=False), atol=1e-5)


def test_image_check_runs_only_when_a_store_is_written(tmp_path, monkeypatch):
    """Every image is decoded before a store is written, not when every store is complete and skipped; an image
    replaced by bytes of the same size changes the data fingerprint, so its store is written (and checked) again."""
    import utils.stages.extract as extract_stage

    damaged = sorted(make_tree(tmp_path / "data" / "train", size=32).rglob("*.jpg"))[0]
    overrides = tiny_overrides(tmp_path / "data", tmp_path / "work", ethnicity="Asian")
    cfg = load_config(overrides)
    write_fake_teacher(cfg, "Asian", seed=0)
    assert extract(overrides) == ["Asian"]
    checked = []
    monkeypatch.setattr(extract_stage, "check_images", lambda *args, **kwargs: checked.append(args))
    assert extract(overrides) == [] and checked == []
    monkeypatch.undo()
    damaged.write_bytes(bytes(damaged.stat().st_size))
    with pytest.raises(ValueError, match=f"cannot decode image {damaged}"):
        extract(overrides)


def test_baseline_split_goes_to_its_own_store(tiny_synthetic, tmp_path):
    overrides = tiny_overrides(tiny_synthetic, tmp_path, teacher_set="baseline", split=2)
    cfg = load_config(overrides)
    write_fake_teacher(cfg, "split2", seed=0)
    assert extract(overrides) == ["split2"]
    assert artifacts.store_dir(cfg).name == "baseline_iresnet18"
    assert sorted(p.name for p in artifacts.store_dir(cfg).glob("*.npy")) == ["split2.npy"]


def test_missing_or_unfinished_teacher_stops_before_any_work(tiny_synthetic, tmp_path):
    overrides = tiny_overrides(tiny_synthetic, tmp_path, ethnicity="all")
    cfg = load_config(overrides)
    write_fake_teacher(cfg, "Asian", seed=0)
    write_fake_teacher(cfg, "African", seed=1)
    write_fake_teacher(cfg, "Caucasian", seed=2, complete=False)
    with pytest.raises(RuntimeError, match=f"teacher run {artifacts.teacher_dir(cfg, 'Caucasian')} is not finished"):
        extract(overrides)
    write_fake_teacher(cfg, "Caucasian", seed=2)
    with pytest.raises(FileNotFoundError, match=str(artifacts.teacher_dir(cfg, "Indian") / "best_backbone.pth")):
        extract(overrides)
    assert not artifacts.store_dir(cfg).exists()
