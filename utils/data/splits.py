"""Balanced baseline splits: part k of every ethnicity's identities forms baseline teacher k.

The manifest (JSON) lists the identities of each split per ethnicity; training reads it through
``utils.data.index.select_rows`` so no image is copied. ``materialize_split`` optionally builds the
per-split folder trees with hard links (symlinks where hard links are impossible).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from config.config import ETHNICITIES
from utils.core.errors import ExistingOutputError, InvalidInputError, MissingInputError
from utils.core.io import atomic_write_json
from utils.core.logs import get_logger

MANIFEST_VERSION = 1
Split = dict[str, list[str]]


def make_baseline_split(identities_by_ethnicity: Mapping[str, Sequence[str]], seed: int, parts: int = 4) -> list[Split]:
    """Shuffle each ethnicity's sorted identities with ``seed`` and cut them into ``parts`` near-equal
    parts, larger ones first (7000 -> 1750 x 4; 6997 -> 1750, 1749, 1749, 1749).

    The shuffle of an ethnicity depends only on the seed, its name and its identities, so adding or
    removing another ethnicity leaves it unchanged. Identities inside a part are listed sorted.
    """
    if parts < 1:
        raise InvalidInputError(f"parts must be >= 1, got {parts}")
    splits: list[Split] = [{} for _ in range(parts)]
    for eth in sorted(identities_by_ethnicity, key=_ethnicity_order):
        names = sorted(identities_by_ethnicity[eth])
        if len(set(names)) != len(names):
            raise InvalidInputError(f"{eth} lists an identity more than once")
        if len(names) < parts:
            raise InvalidInputError(f"{eth} has {len(names)} identities, fewer than the {parts} split parts")
        rng = np.random.default_rng([seed, *eth.encode("utf-8")])
        order = rng.permutation(len(names))
        for k, chunk in enumerate(np.array_split(order, parts)):
            splits[k][eth] = sorted(names[i] for i in chunk)
    return splits


def _ethnicity_order(name: str) -> tuple[int, str]:
    return (ETHNICITIES.index(name) if name in ETHNICITIES else len(ETHNICITIES), name)


def save_split_manifest(path: str | Path, splits: Sequence[Mapping[str, Sequence[str]]], *, seed: int,
                        source: str | None = None) -> None:
    """Write the manifest atomically: version, seed, data source and the identities of each split."""
    _check_splits(splits, str(path))
    data = {
        "version": MANIFEST_VERSION,
        "seed": seed,
        "source": source,
        "parts": len(splits),
        "splits": [{eth: list(names) for eth, names in split.items()} for split in splits],
    }
    atomic_write_json(path, data)


def load_split_manifest(path: str | Path) -> list[Split]:
    """The splits of a manifest; errors name the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"baseline split manifest not found: {path} (run baseline_data_split.py first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"baseline split manifest {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION or not isinstance(data.get("splits"), list):
        raise InvalidInputError(f"baseline split manifest {path}: expected a version {MANIFEST_VERSION} object with 'splits'")
    splits = data["splits"]
    _check_splits(splits, str(path))
    return [{eth: list(names) for eth, names in split.items()} for split in splits]


def _check_splits(splits: Sequence[Mapping[str, Sequence[str]]], where: str) -> None:
    seen: dict[tuple[str, str], int] = {}
    for k, split in enumerate(splits):
        if not isinstance(split, Mapping):
            raise InvalidInputError(f"{where}: split {k} is not a mapping ethnicity -> identities")
        for eth, names in split.items():
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
                raise InvalidInputError(f"{where}: split {k} {eth} is not a list of identity names")
            for name in names:
                if (eth, name) in seen:
                    raise InvalidInputError(f"{where}: identity {eth}/{name} is in splits {seen[(eth, name)]} and {k}")
                seen[(eth, name)] = k


def materialize_split(index, splits: Sequence[Mapping[str, Sequence[str]]], out_root: str | Path) -> int:
    """Build ``out_root/split<k>/<Ethnicity>/<identity>/<image>`` as links to the original images.

    Hard links where the file system allows, else symlinks; never a copy. An existing link to the
    same image is kept; any other existing file is an error. Returns the number of links made.
    """
    if index.kind != "folder":
        raise InvalidInputError(f"materializing splits needs the folder layout; {index.root} is {index.kind}")
    rows_of: dict[tuple[str, str], list[int]] = {}
    for row, label in enumerate(index.labels.tolist()):
        rows_of.setdefault(index.identities[label], []).append(row)
    made, warned = 0, False
    for k, split in enumerate(splits):
        for eth, names in split.items():
            for name in names:
                if (eth, name) not in rows_of:
                    raise KeyError(f"split {k} lists {eth}/{name}, which is not in the index of {index.root}")
                for row in rows_of[(eth, name)]:
                    rel = index.paths[row]
                    src, dst = index.root / rel, Path(out_root) / f"split{k}" / rel
                    if dst.exists() or dst.is_symlink():
                        if not (dst.exists() and os.path.samefile(src, dst)):
                            raise ExistingOutputError(f"{dst} exists and is not a link to {src}")
                        continue
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(src, dst)
                    except OSError as exc:
                        if not warned:
                            get_logger().warning("hard links impossible under %s (%s); making symlinks", out_root, exc)
                            warned = True
                        os.symlink(src.resolve(), dst)
                    made += 1
    return made
