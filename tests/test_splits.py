"""Balanced baseline splits, their manifest, and the baseline_data_split.py stage."""
from __future__ import annotations

import json
import os
import re

import pytest

import baseline_data_split
from config.config import ETHNICITIES, load_config
from helpers import make_tree
from utils.data.splits import load_split_manifest, make_baseline_split, save_split_manifest
from utils.stages.cli import run_stage
from utils.workdir import artifacts

BUPT_SIZES = {"African": 7000, "Asian": 7000, "Caucasian": 7000, "Indian": 6997}


def identities(sizes: dict[str, int]) -> dict[str, list[str]]:
    return {eth: [f"m.{eth[:2]}{i:05d}" for i in range(n)] for eth, n in sizes.items()}


def test_bupt_sized_split_has_ceiling_sizes_and_covers_every_identity():
    ids = identities(BUPT_SIZES)
    splits = make_baseline_split(ids, seed=0)
    assert len(splits) == 4
    for eth in ETHNICITIES:
        sizes = [len(split[eth]) for split in splits]
        assert sizes == ([1750, 1749, 1749, 1749] if eth == "Indian" else [1750] * 4)
        union = [name for split in splits for name in split[eth]]
        assert len(set(union)) == len(union) and set(union) == set(ids[eth])


def test_split_is_seeded_and_shuffled():
    ids = identities({"African": 40, "Indian": 37})
    assert make_baseline_split(ids, seed=5) == make_baseline_split(ids, seed=5)
    assert make_baseline_split(ids, seed=5) != make_baseline_split(ids, seed=6)
    first = make_baseline_split(ids, seed=5)[0]["African"]
    assert first != sorted(ids["African"])[:10]  # not just the first sorted identities


def test_split_of_an_ethnicity_ignores_input_order_and_other_ethnicities():
    ids = identities({"African": 40, "Asian": 12})
    shuffled = {"Asian": ids["Asian"][::-1], "African": ids["African"][::-1]}
    alone = make_baseline_split({"African": ids["African"]}, seed=1)
    both = make_baseline_split(shuffled, seed=1)
    assert [s["African"] for s in both] == [s["African"] for s in alone]


def test_too_few_identities_or_duplicates_are_refused():
    with pytest.raises(ValueError, match="Asian has 3 identities"):
        make_baseline_split({"Asian": ["a", "b", "c"]}, seed=0)
    with pytest.raises(ValueError, match="more than once"):
        make_baseline_split({"Asian": ["a", "a", "b", "c", "d"]}, seed=0)


def test_manifest_round_trip_and_errors(tmp_path):
    splits = make_baseline_split(identities({"African": 9, "Indian": 8}), seed=2)
    path = tmp_path / "m" / "split.json"
    save_split_manifest(path, splits, seed=2, source="somewhere")
    assert load_split_manifest(path) == splits
    assert json.loads(path.read_text())["seed"] == 2
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.json"))):
        load_split_manifest(tmp_path / "none.json")
    path.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_split_manifest(path)
    overlapping = [{"African": ["x", "y"]}, {"African": ["y"]}]
    with pytest.raises(ValueError, match="African/y is in splits 0 and 1"):
        save_split_manifest(path, overlapping, seed=0)


def test_stage_script_writes_refuses_overwrites_and_materializes(tmp_path):
    make_tree(tmp_path / "data", ids={"African": 5, "Asian": 4, "Caucasian": 4, "Indian": 6})
    args = [f"data_root={tmp_path / 'data'}", f"output_root={tmp_path / 'work'}"]

    def stage(*extra: str) -> None:
        run_stage(baseline_data_split.main, args + list(extra))

    stage()
    cfg = load_config(args)
    splits = load_split_manifest(artifacts.split_manifest(cfg))
    assert [len(s["African"]) for s in splits] == [2, 1, 1, 1] and artifacts.split_config_file(cfg).is_file()

    written = artifacts.split_manifest(cfg).read_bytes(), artifacts.split_manifest(cfg).stat().st_mtime_ns
    stage()  # same split: accepted, the file is left alone
    assert (artifacts.split_manifest(cfg).read_bytes(), artifacts.split_manifest(cfg).stat().st_mtime_ns) == written
    with pytest.raises(FileExistsError, match="split_overwrite=True"):
        stage("seed=7")
    assert load_split_manifest(artifacts.split_manifest(cfg)) == splits
    stage("seed=7", "split_overwrite=True", "split_materialize=True")
    splits7 = load_split_manifest(artifacts.split_manifest(cfg))
    assert splits7 == make_baseline_split({e: sorted(n for s in splits for n in s[e]) for e in ETHNICITIES}, seed=7)

    out = tmp_path / "work" / "splits"
    for k, split in enumerate(splits7):
        for eth in ETHNICITIES:
            assert sorted(os.listdir(out / f"split{k}" / eth)) == split[eth]
            for name in split[eth]:
                assert sorted(os.listdir(out / f"split{k}" / eth / name)) == ["0.jpg", "1.jpg"]
                for image in ("0.jpg", "1.jpg"):
                    linked, original = out / f"split{k}" / eth / name / image, tmp_path / "data" / eth / name / image
                    # A hard link, not a symlink or a copy: same inode, and no link to follow.
                    assert not linked.is_symlink() and linked.stat().st_ino == original.stat().st_ino
    stage("seed=7", "split_materialize=True")  # existing links are kept
    foreign = out / "split0" / "African" / splits7[0]["African"][0] / "0.jpg"
    foreign.unlink()
    foreign.write_bytes(b"not the original image")
    with pytest.raises(FileExistsError, match=re.escape(str(foreign))):
        stage("seed=7", "split_materialize=True")
