"""utils.data.index: folder scanning, label stability, protocols, decoding, RecordIO datasets."""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from config.config import ETHNICITIES, load_config
from helpers import IDS, colour_of, make_tree, write_jpeg
from utils.data import datasets
from utils.data import index as ds
from utils.data.image import draw_flips, flip_images, normalize_images
from utils.data.splits import make_baseline_split, save_split_manifest
from utils.workdir import artifacts, inputs

FIXTURES = Path(__file__).parent / "fixtures"
def config(tmp_path: Path, **overrides) -> object:
    return load_config({"data_root": str(tmp_path / "data"), "output_root": str(tmp_path / "work"), "input_size": 8,
                        **overrides})


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data")


def test_index_is_sorted_with_contiguous_labels(tree):
    index = ds.scan_image_folder(tree)
    assert len(index) == 2 * sum(IDS.values())
    assert index.num_classes == sum(IDS.values())
    assert index.paths == sorted(index.paths)
    assert index.identities == sorted(index.identities, key=lambda p: (ETHNICITIES.index(p[0]), p[1]))
    assert np.all(np.diff(index.labels) >= 0) and index.labels.max() == index.num_classes - 1
    for path, label, eth in zip(index.paths, index.labels, index.ethnicity):
        eth_name, identity, _ = path.split("/")
        assert index.identities[label] == (eth_name, identity)
        assert ETHNICITIES[eth] == eth_name


def test_labels_do_not_depend_on_directory_listing_order(tree, monkeypatch):
    reference = ds.scan_image_folder(tree)
    real_scandir = os.scandir
    shuffler = random.Random(0)

    class Shuffled:
        def __init__(self, path):
            with real_scandir(path) as entries:
                self.entries = list(entries)
            shuffler.shuffle(self.entries)

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(ds.os, "scandir", Shuffled)
    for _ in range(3):
        shuffled = ds.scan_image_folder(tree)
        assert shuffled.paths == reference.paths
        assert np.array_equal(shuffled.labels, reference.labels)
        assert shuffled.digest() == reference.digest()


def test_missing_and_empty_ethnicity_folders_are_named(tree):
    shutil.rmtree(tree / "Asian")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tree / "Asian"))):
        ds.scan_image_folder(tree)
    (tree / "Asian").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{tree / 'Asian'} is empty")):
        ds.scan_image_folder(tree)


def test_layout_mismatch_names_the_offender(tree):
    stray = tree / "Indian" / "stray.jpg"
    write_jpeg(stray, (1, 2, 3))
    with pytest.raises(ValueError, match=re.escape(str(stray))):
        ds.scan_image_folder(tree)
    stray.unlink()
    (tree / "Indian" / "in99").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(tree / "Indian" / "in99"))):
        ds.scan_image_folder(tree)


def test_missing_data_root_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        inputs.load_index(load_config({"data_root": str(tmp_path / "nowhere")}))


def test_index_save_load_round_trip_and_digest(tree, tmp_path):
    index = ds.scan_image_folder(tree)
    index.save(tmp_path / "index.tsv")
    loaded = ds.ImageIndex.load(tmp_path / "index.tsv")
    assert loaded.paths == index.paths and loaded.identities == index.identities
    assert np.array_equal(loaded.labels, index.labels) and np.array_equal(loaded.ethnicity, index.ethnicity)
    assert loaded.root == index.root.resolve() and loaded.digest() == index.digest()
    relabelled = ds.ImageIndex(index.root, index.paths, index.labels[::-1].copy(), index.ethnicity, index.identities)
    assert relabelled.digest() != index.digest()


def test_scan_cache_is_reused_and_invalidated(tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "scan.tsv"
    first = ds.scan_image_folder(tree, cache)
    assert cache.is_file()

    def no_scan(*args):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(ds, "_scan_identity", no_scan)
    assert ds.scan_image_folder(tree, cache).digest() == first.digest()
    monkeypatch.undo()
    write_jpeg(tree / "African" / "af00" / "9.jpg", (9, 9, 9))
    assert len(ds.scan_image_folder(tree, cache)) == len(first) + 1


def test_load_index_restricts_identities_deterministically(tree, tmp_path):
    cfg = config(tmp_path, ids_per_ethnicity=2, seed=3)
    index = inputs.load_index(cfg)
    assert index.num_classes == 8 and len(index) == 16
    assert index.labels.tolist() == sorted(index.labels.tolist()) and set(index.labels.tolist()) == set(range(8))
    for eth in ETHNICITIES:
        assert sum(e == eth for e, _ in index.identities) == 2
    assert inputs.load_index(cfg).identities == index.identities
    others = {tuple(inputs.load_index(config(tmp_path, ids_per_ethnicity=2, seed=s)).identities) for s in range(4)}
    assert len(others) > 1
    with pytest.raises(ValueError, match="only 3 Indian identities"):
        inputs.load_index(config(tmp_path, ids_per_ethnicity=4))


def test_select_rows_by_ethnicity_and_identities(tree):
    index = ds.scan_image_folder(tree)
    rows, labels = ds.select_rows(index, ethnicity="Caucasian")
    assert {index.paths[r].split("/")[0] for r in rows} == {"Caucasian"}
    assert len(rows) == 8 and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    rows, labels = ds.select_rows(index, identities={"Asian": ["as01"], "Indian": ["in02", "in00"]})
    assert [index.paths[r].rsplit("/", 1)[0] for r in rows[::2]] == ["Asian/as01", "Indian/in00", "Indian/in02"]
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(KeyError, match="as77"):
        ds.select_rows(index, identities=[("Asian", "as77")])


def test_item_format_normalisation_and_rgb(tree):
    index = ds.scan_image_folder(tree)
    dataset = datasets.FaceDataset(index, input_size=8)
    row = index.paths.index("Caucasian/ca01/1.jpg")
    raw, label, returned_row = dataset[row]
    # Items stay uint8 (the device normalises them).
    assert raw.shape == (3, 8, 8) and raw.dtype == torch.uint8 and torch.equal(raw, dataset.read_uint8(row))
    assert returned_row == row and label == index.labels[row]
    image = normalize_images(raw)
    expected = (torch.tensor(colour_of(2, 1, 1), dtype=torch.float32) / 255 - 0.5) / 0.5
    assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=2 / 127.5)
    assert torch.equal(normalize_images(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([-1.0, 1.0]))


def test_subset_items_point_at_their_files(tree, tmp_path):
    """In a one-ethnicity dataset, item i's row names the file whose pixels item i holds."""
    dataset, classes = inputs.build_training_dataset(config(tmp_path, ethnicity="Caucasian", input_size=8), "ethnicity")
    index = dataset.index
    names = sorted(name for eth, name in index.identities if eth == "Caucasian")
    rows = []
    for i in range(len(dataset)):
        raw, label, row = dataset[i]
        image = normalize_images(raw)
        eth, identity, file_name = index.paths[row].split("/")
        assert eth == "Caucasian" and label == names.index(identity)
        assert image.min() >= -1 and image.max() <= 1
        expected = (torch.tensor(colour_of(2, int(identity[2:]), int(file_name[0])), dtype=torch.float32) / 255
                    - 0.5) / 0.5
        assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=2 / 127.5), index.paths[row]
        rows.append(row)
    assert classes == 4 and rows == sorted(rows) and len(set(rows)) == 8 and rows[0] > 0


def test_images_of_another_size_are_refused_unless_resizing_is_allowed(tmp_path):
    root = make_tree(tmp_path / "data", size=16)
    with pytest.raises(ValueError, match=r"is 16x16, not the 8x8 aligned crop.*align.*allow_resize=True"):
        datasets.FaceDataset(ds.scan_image_folder(root), input_size=8)[0]
    dataset = datasets.FaceDataset(ds.scan_image_folder(root), input_size=8, allow_resize=True)
    assert dataset[0][0].shape == (3, 8, 8)


def test_truncated_and_missing_images_raise_naming_the_file(tree):
    index = ds.scan_image_folder(tree)
    dataset = datasets.FaceDataset(index, input_size=8)
    victim = tree / index.paths[3]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    with pytest.raises(ValueError, match=re.escape(str(victim))):
        dataset[3]
    gone = tree / index.paths[4]
    gone.unlink()
    with pytest.raises(OSError, match=re.escape(str(gone))):
        dataset[4]


def test_random_horizontal_flip_flips_the_flagged_samples():
    images = torch.arange(64 * 3 * 2 * 4, dtype=torch.float32).reshape(64, 3, 2, 4)
    flags = draw_flips(64, torch.Generator().manual_seed(0))
    out = flip_images(images, flags)
    assert flags.dtype == torch.bool and 16 < int(flags.sum()) < 48
    assert torch.equal(out[flags], images[flags].flip(3)) and torch.equal(out[~flags], images[~flags])
    assert torch.equal(flags, draw_flips(64, torch.Generator().manual_seed(0)))


def test_training_protocols(tree, tmp_path):
    dataset, classes = inputs.build_training_dataset(config(tmp_path, ethnicity="Indian"), "ethnicity")
    assert classes == 3 and len(dataset) == 6
    assert {dataset.index.paths[r].split("/")[0] for r in dataset.rows} == {"Indian"}
    dataset, classes = inputs.build_training_dataset(config(tmp_path), "all")
    assert classes == 15 and len(dataset) == 30 and sorted(set(dataset.labels.tolist())) == list(range(15))

    cfg = config(tmp_path, split=1)
    with pytest.raises(FileNotFoundError, match=re.escape(str(artifacts.split_manifest(cfg)))):
        inputs.build_training_dataset(cfg, "split")
    index = inputs.load_index(cfg)
    by_eth = {eth: [name for e, name in index.identities if e == eth] for eth in ETHNICITIES}
    splits = make_baseline_split(by_eth, seed=0, parts=3)
    save_split_manifest(artifacts.split_manifest(cfg), splits, seed=0)
    dataset, classes = inputs.build_training_dataset(cfg, "split")
    assert classes == sum(len(v) for v in splits[1].values())
    assert {tuple(dataset.index.paths[r].split("/")[:2]) for r in dataset.rows} == {
        (eth, name) for eth, names in splits[1].items() for name in names}
    with pytest.raises(ValueError, match="num_classes=99"):
        inputs.build_training_dataset(config(tmp_path, num_classes=99), "all")


# ---- RecordIO data -----------------------------------------------------------------------------------


def rec_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(FIXTURES / "mxnet_faces.rec", root / "train.rec")
    shutil.copy(FIXTURES / "mxnet_faces.idx", root / "train.idx")
    return root


def test_recordio_index_and_items_match_mxnet(tmp_path):
    rec_root(tmp_path)
    index = inputs.load_index(config(tmp_path))
    assert index.kind == "recordio" and len(index) == 6 and index.num_classes == 3
    assert index.paths == [f"train.rec#{key}" for key in range(1, 7)]
    assert index.labels.tolist() == [0, 0, 1, 1, 2, 2] and set(index.ethnicity.tolist()) == {-1}
    with np.load(FIXTURES / "mxnet_expected.npz") as expected:
        pixels = expected["images_bgr"][..., ::-1]
    dataset, classes = inputs.build_training_dataset(config(tmp_path, input_size=12), "all")
    assert isinstance(dataset, datasets.RecordDataset) and classes == 3
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1)
    images = torch.cat([batch[0] for batch in loader])
    assert torch.equal(images, torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="ethnicity.tsv"):
        inputs.build_training_dataset(config(tmp_path, ethnicity="Asian"), "ethnicity")
    with pytest.raises(ValueError, match="ethnicity.tsv"):
        inputs.load_index(config(tmp_path, ids_per_ethnicity=1))


def test_recordio_ethnicity_map_enables_ethnicity_protocols(tmp_path):
    root = rec_root(tmp_path)
    (root / "ethnicity.tsv").write_text("0\tIndian\tm.zz\n1\tAfrican\n2\tIndian\tm.aa\n")
    index = inputs.load_index(config(tmp_path))
    assert index.identities == [("African", "0000001"), ("Indian", "m.aa"), ("Indian", "m.zz")]
    assert index.paths == ["train.rec#3", "train.rec#4", "train.rec#5", "train.rec#6", "train.rec#1", "train.rec#2"]
    dataset, classes = inputs.build_training_dataset(config(tmp_path, ethnicity="Indian", input_size=12), "ethnicity")
    assert classes == 2 and [dataset[i][1] for i in range(len(dataset))] == [0, 0, 1, 1]
    assert [dataset[i][2] for i in range(len(dataset))] == [2, 3, 4, 5]
    (root / "ethnicity.tsv").write_text("0\tIndian\n1\tMartian\n")
    with pytest.raises(ValueError, match="ethnicity.tsv:2"):
        inputs.load_index(config(tmp_path))
