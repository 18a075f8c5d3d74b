"""Loaders for verification pairs: insightface ``.bin`` files (format in ``utils/binfile.py``) and
RFW-style pair lists.

RFW pair lists (``<Ethnicity>_pairs.txt``) hold one pair per line, fields separated by whitespace:
``name idx1 idx2`` for a genuine pair and ``name1 idx1 name2 idx2`` for an impostor pair, with
images at ``<image_root>/<name>/<name>_<idx:04d>.jpg``. An LFW-style first line of two integers
(folds, pairs per fold) is skipped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from config.config import ETHNICITIES
from utils.binfile import read_bin
from utils.errors import MissingInputError
from utils.image import decode_image


def _as_buffer(item: object, path: Path, i: int) -> bytes | np.ndarray:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim <= 2:
        return item.reshape(-1)
    raise ValueError(f"{path}: image {i} is a {type(item).__name__}, expected encoded image bytes")


def _as_bool(item: object, path: Path, i: int) -> bool:
    if isinstance(item, (bool, np.bool_)):
        return bool(item)
    raise ValueError(f"{path}: issame[{i}] is a {type(item).__name__}, expected a bool")


def _stack(buffers: Sequence[bytes | np.ndarray], names: Sequence[str], input_size: int) -> torch.Tensor:
    # Filled in numpy and converted once: a per-image torch copy goes through the intra-op thread pool,
    # which costs milliseconds per image on a busy machine.
    out = np.empty((len(buffers), 3, input_size, input_size), dtype=np.uint8)
    for i, (buffer, name) in enumerate(zip(buffers, names)):
        out[i] = decode_image(buffer, input_size, name).transpose(2, 0, 1)
    return torch.from_numpy(out)


def load_bin(path: str | Path, input_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Images uint8 RGB [2N, 3, S, S] and issame bool [N] from an insightface ``.bin`` file."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"verification file not found: {path}")
    images, issame = read_bin(path)
    if len(images) != 2 * len(issame):
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs (expected two per pair)")
    buffers = [_as_buffer(item, path, i) for i, item in enumerate(images)]
    flags = np.array([_as_bool(item, path, i) for i, item in enumerate(issame)], dtype=bool)
    names = [f"{path}[{i}]" for i in range(len(buffers))]
    return _stack(buffers, names, input_size), flags


def _parse_pairs(pairs_file: Path) -> list[tuple[str, int, str, int, bool]]:
    pairs = []
    lines = pairs_file.read_text(encoding="utf-8").splitlines()
    for line_no, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if line_no == 1 and len(fields) == 2 and all(f.isdigit() for f in fields):
            continue
        try:
            if len(fields) == 3:
                pairs.append((fields[0], int(fields[1]), fields[0], int(fields[2]), True))
            elif len(fields) == 4:
                pairs.append((fields[0], int(fields[1]), fields[2], int(fields[3]), False))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"{pairs_file}:{line_no}: expected 'name idx1 idx2' or 'name1 idx1 name2 idx2', "
                             f"got {line!r}") from None
    if not pairs:
        raise ValueError(f"{pairs_file} lists no pairs")
    return pairs


def load_pair_list(image_root: str | Path, pairs_file: str | Path, input_size: int,
                   ext: str = ".jpg") -> tuple[torch.Tensor, np.ndarray]:
    """Images uint8 RGB [2N, 3, S, S] and issame bool [N] from an RFW-style pair list (module doc)."""
    image_root, pairs_file = Path(image_root), Path(pairs_file)
    if not pairs_file.is_file():
        raise MissingInputError(f"pair list not found: {pairs_file}")
    buffers, names, issame = [], [], []
    for name1, idx1, name2, idx2, same in _parse_pairs(pairs_file):
        for name, idx in ((name1, idx1), (name2, idx2)):
            image_path = image_root / name / f"{name}_{idx:04d}{ext}"
            if not image_path.is_file():
                raise MissingInputError(f"image {image_path} listed in {pairs_file} not found")
            buffers.append(image_path.read_bytes())
            names.append(str(image_path))
        issame.append(same)
    return _stack(buffers, names, input_size), np.array(issame, dtype=bool)


def rfw_files(rfw_root: str | Path, ethnicity: str) -> tuple[Path, Path, Path]:
    """Where one ethnicity's pairs may live: ``<Eth>_test.bin``, or the RFW release layout
    ``txts/<Eth>/<Eth>_pairs.txt`` with images under ``data/<Eth>/``."""
    rfw_root = Path(rfw_root)
    return (rfw_root / f"{ethnicity}_test.bin", rfw_root / "txts" / ethnicity / f"{ethnicity}_pairs.txt",
            rfw_root / "data" / ethnicity)


def load_rfw(rfw_root: str | Path, input_size: int,
             ethnicities: Sequence[str] = ETHNICITIES) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """Every ethnicity's verification pairs, from its ``.bin`` file or else its RFW pair list."""
    out = {}
    for ethnicity in ethnicities:
        bin_path, pairs_path, image_root = rfw_files(rfw_root, ethnicity)
        if bin_path.is_file():
            out[ethnicity] = load_bin(bin_path, input_size)
        elif pairs_path.is_file():
            out[ethnicity] = load_pair_list(image_root, pairs_path, input_size)
        else:
            raise MissingInputError(f"no {ethnicity} verification data: expected {bin_path} or {pairs_path}")
    return out
