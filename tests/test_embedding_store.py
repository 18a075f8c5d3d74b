"""The embedding store on hand-made arrays: manifests, crash safety, KD target access and the checks the
adaptor stage relies on (complete stores, one index, the teachers' current checkpoints)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from config.config import CONCAT_ORDER, load_config
from utils.core.distributed import DistInfo
from utils.data.index import ImageIndex
from utils.stages.extract import teacher_store_complete
from utils.workdir import artifacts
from utils.workdir.artifacts import member_files, target_files
from utils.workdir.provenance import file_fingerprint, store_record
from utils.workdir.store import manifest_problem, open_targets, open_teacher_stores, read_manifest, write_rows_sharded

ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
DIM = 8


def tiny_index(root: Path, images_per_id: int = 3) -> ImageIndex:
    identities = [(eth, f"id{k}") for eth in ("African", "Asian", "Caucasian", "Indian") for k in range(2)]
    paths, labels, ethnicity = [], [], []
    for label, (eth, name) in enumerate(identities):
        for n in range(images_per_id):
            paths.append(f"{eth}/{name}/{n}.jpg")
            labels.append(label)
            ethnicity.append(("African", "Asian", "Caucasian", "Indian").index(eth))
    return ImageIndex(root, paths, np.array(labels), np.array(ethnicity), identities)


DATA = "data-fingerprint"


def targets_complete(folder: Path, index_hash: str) -> bool:
    files = target_files(folder)
    return manifest_problem(read_manifest(files.manifest), files, index_hash) is None


def write_store(files, rows: np.ndarray, index_hash: str, checkpoint: dict | None = None,
                flipped: np.ndarray | None = None, provenance: dict | None = None) -> None:
    manifest = {"N": len(rows), "dim": rows.shape[1], "index_hash": index_hash, "checkpoint": checkpoint or {},
                "flipped": flipped is not None, "provenance": provenance}

    def fill(shard, arrays):
        arrays["array"][shard.start:shard.stop] = rows[shard.start:shard.stop]
        if flipped is not None:
            arrays["flipped"][shard.start:shard.stop] = flipped[shard.start:shard.stop]

    write_rows_sharded(files, manifest, ONE_PROCESS, fill)


def unit_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def fake_teacher(cfg, member: str, seed: int) -> Path:
    """A finished teacher run: only the checkpoint's bytes matter to the store checks."""
    run_dir = artifacts.teacher_dir(cfg, member)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.full((4,), float(seed))}, run_dir / "best_backbone.pth")
    (run_dir / "history.json").write_text(json.dumps({"complete": True}))
    return run_dir / "best_backbone.pth"


@pytest.fixture
def store_set(tmp_path):
    """Four complete teacher stores of one index, as extract_all.py leaves them."""
    cfg = load_config({"output_root": str(tmp_path), "embedding_size": DIM})
    index = tiny_index(tmp_path / "data")
    index.save(artifacts.store_dir(cfg) / artifacts.STORE_INDEX_FILE)
    for seed, member in enumerate(CONCAT_ORDER):
        checkpoint = fake_teacher(cfg, member, seed)
        fingerprint = file_fingerprint(checkpoint)
        write_store(member_files(artifacts.store_dir(cfg), member), unit_rows(len(index), seed), index.digest(),
                    fingerprint, provenance=store_record(cfg, member, DATA, fingerprint["sha256"]))
    return cfg, index


def test_stores_open_in_concatenation_order_as_read_only_maps(store_set):
    cfg, index = store_set
    stores = open_teacher_stores(cfg)
    assert stores.members == ["Asian", "African", "Caucasian", "Indian"]
    assert stores.index.digest() == index.digest() and stores.flipped is None
    for seed, array in enumerate(stores.arrays):
        assert isinstance(array, np.memmap) and not array.flags.writeable
        np.testing.assert_array_equal(array, unit_rows(len(index), seed))
    for member in CONCAT_ORDER:
        assert teacher_store_complete(cfg, member, index.digest(), DATA)
        assert not teacher_store_complete(cfg, member, "another-index", DATA)
        assert not teacher_store_complete(cfg, member, index.digest(), "other images")
        assert not teacher_store_complete(load_config({"output_root": str(cfg.output_root), "embedding_size": DIM,
                                                       "width": 16}), member, index.digest(), DATA)


def test_missing_teacher_checkpoint_is_named(store_set):
    cfg, _ = store_set
    checkpoint = artifacts.teacher_dir(cfg, "Indian") / "best_backbone.pth"
    checkpoint.unlink()
    with pytest.raises(RuntimeError, match="3 are usable") as error:
        open_teacher_stores(cfg)
    assert f"teacher checkpoint {checkpoint} is missing" in str(error.value)


def test_incomplete_store_is_refused(store_set):
    cfg, _ = store_set
    files = member_files(artifacts.store_dir(cfg), "African")
    manifest = read_manifest(files.manifest)
    files.manifest.write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(RuntimeError, match="3 are usable") as error:
        open_teacher_stores(cfg)
    assert f"African: {files.array} is incomplete" in str(error.value)


def test_store_from_another_index_is_refused(store_set, tmp_path):
    cfg, _ = store_set
    other = tiny_index(tmp_path / "data", images_per_id=2)
    write_store(member_files(artifacts.store_dir(cfg), "Caucasian"), unit_rows(len(other), 7), other.digest(),
                file_fingerprint(artifacts.teacher_dir(cfg, "Caucasian") / "best_backbone.pth"))
    with pytest.raises(RuntimeError, match="Caucasian: .*Caucasian.npy was built from another image index"):
        open_teacher_stores(cfg)


def test_store_of_a_replaced_checkpoint_is_refused(store_set):
    cfg, index = store_set
    fake_teacher(cfg, "Asian", seed=99)  # the teacher was retrained after extraction
    assert not teacher_store_complete(cfg, "Asian", index.digest(), DATA)
    with pytest.raises(RuntimeError, match="Asian: .*Asian.npy was written from checkpoint .*not the current one"):
        open_teacher_stores(cfg)


def test_missing_store_index_is_named(store_set):
    cfg, _ = store_set
    (artifacts.store_dir(cfg) / artifacts.STORE_INDEX_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=str(artifacts.store_dir(cfg) / artifacts.STORE_INDEX_FILE)):
        open_teacher_stores(cfg)


def test_open_targets_checks_manifest_and_returns_rows(tmp_path):
    files = target_files(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(files.manifest)):
        open_targets(tmp_path, "h")
    rows, flipped = unit_rows(10, 0), unit_rows(10, 1)
    write_store(files, rows, "h", flipped=flipped)
    mapped = open_targets(tmp_path, "h")
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, rows)
    loaded = open_targets(tmp_path, "h", flipped=True, in_memory=True)
    assert not isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, flipped)
    assert targets_complete(tmp_path, "h") and not targets_complete(tmp_path, "other")
    with pytest.raises(RuntimeError, match="another image index"):
        open_targets(tmp_path, "other")

    write_store(files, rows, "h")  # rewritten without flipped rows: the stale flip file goes
    assert not files.flipped.exists()
    with pytest.raises(RuntimeError, match="no flipped-image rows"):
        open_targets(tmp_path, "h", flipped=True)


def test_interrupted_write_leaves_an_incomplete_store(tmp_path):
    files = target_files(tmp_path)
    write_store(files, unit_rows(10, 0), "h")
    assert targets_complete(tmp_path, "h")

    def crash(shard, arrays):
        arrays["array"][:5] = 0.0
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_rows_sharded(files, {"N": 10, "dim": DIM, "index_hash": "h", "flipped": False}, ONE_PROCESS, crash)
    assert not targets_complete(tmp_path, "h")
    with pytest.raises(RuntimeError, match="incomplete"):
        open_targets(tmp_path, "h")


def test_array_shape_must_match_manifest(tmp_path):
    files = target_files(tmp_path)
    write_store(files, unit_rows(10, 0), "h")
    np.save(files.array, unit_rows(9, 0))
    with pytest.raises(RuntimeError, match=r"float32 \(10, 8\)"):
        open_targets(tmp_path, "h")
