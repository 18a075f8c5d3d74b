"""Loaders for verification pairs: insightface ``.bin`` files and RFW as its authors distribute it.

``.bin`` files (format in ``utils/data/binfile.py``) hold aligned crops: RFW's ``<Race>_test.bin`` and
insightface's lfw, cfp_fp, agedb_30, ... benchmarks.

RFW as distributed (``rfw_root`` = the archive root, or its ``test/`` folder)::

    test/data/<Race>/<id>/<id>_<n:04d>.jpg    unaligned photos
    test/txts/<Race>/<Race>_pairs.txt         one pair per line, tab separated, folds of 600 pairs:
                                              ``id n1 n2`` genuine, ``id1 n1 id2 n2`` impostor
    test/txts/<Race>/<Race>_lmk.txt           one line per image: its path (``/test/data/<Race>/<id>/<file>``),
                                              a label, then 5 landmarks as 10 numbers x1 y1 ... x5 y5

Images are aligned from their landmarks to the ArcFace template (``utils.data.align``); an image without
landmarks must already be an ``input_size`` square (or ``allow_resize``). An LFW-style first line of two
integers (folds, pairs per fold) in a pair list is skipped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from config.config import ETHNICITIES, MAX_IMAGE_PIXELS
from utils.core.errors import InvalidInputError, MissingInputError
from utils.core.logs import LOGGER_NAME
from utils.data.align import align_face, as_landmarks
from utils.data.binfile import read_bin
from utils.data.image import decode_bgr, decode_image

# A child of the project logger, so the format found reaches the run's train.log.
logger = logging.getLogger(f"{LOGGER_NAME}.rfw")


def _as_buffer(item: object, path: Path, i: int) -> bytes | np.ndarray:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim <= 2:
        return item.reshape(-1)
    raise InvalidInputError(f"{path}: image {i} is a {type(item).__name__}, expected encoded image bytes")


def _as_bool(item: object, path: Path, i: int) -> bool:
    if isinstance(item, (bool, np.bool_)):
        return bool(item)
    raise InvalidInputError(f"{path}: issame[{i}] is a {type(item).__name__}, expected a bool")


def _decode(buffer: bytes | np.ndarray, name: str, input_size: int, landmarks: np.ndarray | None,
            allow_resize: bool, max_pixels: int) -> np.ndarray:
    """One verification image as RGB uint8 [S, S, 3]: aligned from its landmarks when it has them."""
    if landmarks is None:
        return decode_image(buffer, input_size, name, allow_resize, max_pixels)
    return cv2.cvtColor(align_face(decode_bgr(buffer, name, max_pixels), landmarks, input_size), cv2.COLOR_BGR2RGB)


def _stack(buffers: Sequence[bytes | np.ndarray], names: Sequence[str], input_size: int,
           landmarks: Sequence[np.ndarray | None] | None = None, allow_resize: bool = False,
           max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    # Filled in numpy and converted once: a per-image torch copy goes through the intra-op thread pool,
    # which costs milliseconds per image on a busy machine.
    landmarks = landmarks if landmarks is not None else [None] * len(buffers)
    out = np.empty((len(buffers), 3, input_size, input_size), dtype=np.uint8)
    for i, (buffer, name, points) in enumerate(zip(buffers, names, landmarks)):
        out[i] = _decode(buffer, name, input_size, points, allow_resize, max_pixels).transpose(2, 0, 1)
    return torch.from_numpy(out)


def load_bin(path: str | Path, input_size: int, allow_resize: bool = False,
             max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, np.ndarray]:
    """Images uint8 RGB [2N, 3, S, S] and issame bool [N] from an insightface ``.bin`` file of aligned crops."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"verification file not found: {path}")
    images, issame = read_bin(path)
    if len(images) != 2 * len(issame):
        raise InvalidInputError(f"{path}: {len(images)} images for {len(issame)} pairs (expected two per pair)")
    buffers = [_as_buffer(item, path, i) for i, item in enumerate(images)]
    flags = np.array([_as_bool(item, path, i) for i, item in enumerate(issame)], dtype=bool)
    names = [f"{path}[{i}]" for i in range(len(buffers))]
    return _stack(buffers, names, input_size, allow_resize=allow_resize, max_pixels=max_pixels), flags


def _plain_name(name: str) -> bool:
    """One folder name: a pair list line must not reach outside the RFW image tree."""
    return name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _parse_pairs(pairs_file: Path) -> list[tuple[str, int, str, int, bool]]:
    pairs = []
    lines = pairs_file.read_text(encoding="utf-8").splitlines()
    for line_no, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if line_no == 1 and len(fields) == 2 and all(f.isdigit() for f in fields):
            continue
        names = (fields[0], fields[2]) if len(fields) == 4 else fields[:1]
        if not all(map(_plain_name, names)):
            raise InvalidInputError(f"{pairs_file}:{line_no}: identity names must be plain folder names inside the "
                                    f"RFW tree (no '/', '\\', '.' or '..'), got {line!r}")
        try:
            if len(fields) == 3:
                pairs.append((fields[0], int(fields[1]), fields[0], int(fields[2]), True))
            elif len(fields) == 4:
                pairs.append((fields[0], int(fields[1]), fields[2], int(fields[3]), False))
            else:
                raise ValueError
        except ValueError:
            raise InvalidInputError(f"{pairs_file}:{line_no}: expected 'name idx1 idx2' or 'name1 idx1 name2 idx2', "
                             f"got {line!r}") from None
    if not pairs:
        raise InvalidInputError(f"{pairs_file} lists no pairs")
    return pairs


def read_landmarks(lmk_file: str | Path) -> dict[str, np.ndarray]:
    """RFW ``<Race>_lmk.txt``: ``{"<id>/<file>": [5, 2] landmarks}`` (keyed by the last two path parts, so
    the archive's ``/test/data/<Race>/`` prefix, or none, both match)."""
    lmk_file = Path(lmk_file)
    out: dict[str, np.ndarray] = {}
    for line_no, line in enumerate(lmk_file.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 12:
            raise InvalidInputError(f"{lmk_file}:{line_no}: expected '<image path> <label> x1 y1 ... x5 y5' "
                                    f"(12 fields), got {len(fields)}")
        try:
            points = as_landmarks([float(value) for value in fields[2:]], f"{lmk_file}:{line_no}")
        except ValueError as exc:
            raise InvalidInputError(f"{lmk_file}:{line_no}: landmarks are not 10 numbers: {exc}") from None
        out["/".join(Path(fields[0]).parts[-2:])] = points
    if not out:
        raise InvalidInputError(f"{lmk_file} lists no landmarks")
    return out


def load_pair_list(image_root: str | Path, pairs_file: str | Path, input_size: int, ext: str = ".jpg",
                   landmarks_file: str | Path | None = None,
                   allow_resize: bool = False, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, np.ndarray]:
    """Images uint8 RGB [2N, 3, S, S] and issame bool [N] from an RFW-style pair list (module doc).

    With ``landmarks_file`` (RFW's ``<Race>_lmk.txt``) every image is aligned from its landmarks, and an
    image the file does not list is an error; without it the images must already be aligned crops.
    """
    image_root, pairs_file = Path(image_root), Path(pairs_file)
    if not pairs_file.is_file():
        raise MissingInputError(f"pair list not found: {pairs_file}")
    landmarks = read_landmarks(landmarks_file) if landmarks_file is not None else None
    buffers, names, points, issame = [], [], [], []
    for name1, idx1, name2, idx2, same in _parse_pairs(pairs_file):
        for name, idx in ((name1, idx1), (name2, idx2)):
            key = f"{name}/{name}_{idx:04d}{ext}"
            image_path = image_root / key
            if not image_path.is_file():
                raise MissingInputError(f"image {image_path} listed in {pairs_file} not found")
            if landmarks is not None and key not in landmarks:
                raise InvalidInputError(f"{landmarks_file} has no landmarks for {image_path} (listed in {pairs_file})")
            buffers.append(image_path.read_bytes())
            names.append(str(image_path))
            points.append(landmarks[key] if landmarks is not None else None)
        issame.append(same)
    return _stack(buffers, names, input_size, points, allow_resize, max_pixels), np.array(issame, dtype=bool)


@dataclass(frozen=True)
class RFWSource:
    """Where one ethnicity's pairs are: a ``.bin``, or a pair list with its image folder and landmarks."""

    ethnicity: str
    kind: str  # "bin" | "distributed" (pair list + image tree, aligned from landmarks when present)
    path: Path  # the .bin or the pair list
    image_root: Path | None = None
    landmarks: Path | None = None

    def describe(self) -> str:
        if self.kind == "bin":
            return f"RFW {self.ethnicity}: aligned crops from {self.path}"
        how = f"aligned from {self.landmarks}" if self.landmarks else "no landmark file: images must be aligned crops"
        return f"RFW {self.ethnicity}: distributed layout, pairs {self.path}, images {self.image_root}, {how}"


def find_rfw_source(rfw_root: str | Path, ethnicity: str) -> RFWSource:
    """One ethnicity's pairs under ``rfw_root``: ``<Eth>_test.bin``, or the distributed layout found at
    ``rfw_root`` or ``rfw_root/test`` (``txts/<Eth>/<Eth>_pairs.txt``, ``data/<Eth>/``, ``<Eth>_lmk.txt``)."""
    rfw_root = Path(rfw_root)
    bin_path = rfw_root / f"{ethnicity}_test.bin"
    if bin_path.is_file():
        return RFWSource(ethnicity, "bin", bin_path)
    tried = [bin_path]
    for base in (rfw_root, rfw_root / "test"):
        txts = base / "txts" / ethnicity
        pairs = txts / f"{ethnicity}_pairs.txt"
        tried.append(pairs)
        if pairs.is_file():
            landmarks = txts / f"{ethnicity}_lmk.txt"
            return RFWSource(ethnicity, "distributed", pairs, base / "data" / ethnicity,
                             landmarks if landmarks.is_file() else None)
    raise MissingInputError(f"no {ethnicity} verification data under {rfw_root}: expected one of "
                            f"{', '.join(map(str, tried))} (rfw_root may be a folder of <Ethnicity>_test.bin files, "
                            "the RFW archive root or its test/ folder)")


def load_source(source: RFWSource, input_size: int, allow_resize: bool = False,
                max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, np.ndarray]:
    """The images and labels of one :class:`RFWSource`."""
    if source.kind == "bin":
        return load_bin(source.path, input_size, allow_resize, max_pixels)
    return load_pair_list(source.image_root, source.path, input_size, landmarks_file=source.landmarks,
                          allow_resize=allow_resize, max_pixels=max_pixels)


def load_rfw(rfw_root: str | Path, input_size: int, ethnicities: Sequence[str] = ETHNICITIES,
             allow_resize: bool = False,
             max_pixels: int = MAX_IMAGE_PIXELS) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """Every ethnicity's verification pairs (see :func:`find_rfw_source`); the format found is logged."""
    out = {}
    for ethnicity in ethnicities:
        source = find_rfw_source(rfw_root, ethnicity)
        logger.info(source.describe())
        out[ethnicity] = load_source(source, input_size, allow_resize, max_pixels)
    return out


def find_benchmark(val_root: str | Path, name: str) -> Path:
    """``<val_root>/<name>.bin`` of a ``val_targets`` name (insightface naming: lfw, cfp_fp, agedb_30, ...)."""
    path = Path(val_root) / f"{name}.bin"
    if not path.is_file():
        found = sorted(p.stem for p in Path(val_root).glob("*.bin")) if Path(val_root).is_dir() else []
        raise MissingInputError(f"val_targets name {name!r}: {path} not found (val_root={val_root} holds "
                                f"{', '.join(found) or 'no .bin files'})")
    return path


def load_benchmarks(val_root: str | Path | None, names: Sequence[str], input_size: int, allow_resize: bool = False,
                    max_pixels: int = MAX_IMAGE_PIXELS) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """The pairs of every ``val_targets`` benchmark, by name (empty when ``names`` is)."""
    if names and val_root is None:
        raise InvalidInputError(f"val_targets {list(names)} need val_root=<folder with {names[0]}.bin ...>")
    out = {}
    for name in names:
        path = find_benchmark(val_root, name)  # type: ignore[arg-type]
        logger.info(f"benchmark {name}: aligned crops from {path}")
        out[name] = load_bin(path, input_size, allow_resize, max_pixels)
    return out
