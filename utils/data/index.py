"""Training images: the BUPT folder layout or an insightface RecordIO file, indexed in one sorted order.

Every stage works on an :class:`ImageIndex`: the run's universe of training images in a fixed order
(ethnicity in ``ETHNICITIES`` order, then identity name, then file name), with global labels 0..K-1
numbered in the same order. The row of an image in the index is its row in the embedding store.

Folder layout: ``ROOT/<Ethnicity>/<identity>/<image>`` with the four ``ETHNICITIES`` folders.

RecordIO layout: ``ROOT/train.rec`` + ``ROOT/train.idx`` (insightface; used whenever ``train.rec``
exists, even next to ethnicity folders). Identity labels come from
the records; their ethnicity from an optional ``ROOT/ethnicity.tsv`` with one line per record label,
``<label><TAB><Ethnicity>[<TAB><identity name>]``. Without that file every identity's ethnicity is
unknown (-1) and only the ``all`` protocol works. Index paths of records read ``train.rec#<key>``.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from config.config import ETHNICITIES
from utils.core.digests import files_sha256
from utils.core.errors import InvalidInputError, MissingInputError
from utils.core.io import atomic_write_text
from utils.core.logs import LOGGER_NAME
from utils.data import recordio

# A child of the project logger, so data warnings reach the run's train.log.
logger = logging.getLogger(f"{LOGGER_NAME}.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
UNKNOWN_ETHNICITY = "unknown"
REC_NAME, IDX_NAME, ETHNICITY_MAP_NAME = "train.rec", "train.idx", "ethnicity.tsv"
_INDEX_HEADER = "# mst-kd image index v1"
REC_SEPARATOR = "#"


def _ethnicity_code(name: str) -> int:
    return ETHNICITIES.index(name) if name in ETHNICITIES else -1


@dataclass
class ImageIndex:
    """The sorted list of training images with global labels and ethnicities.

    ``kind`` is ``folder`` (paths are relative image paths under ``root``) or ``recordio`` (paths are
    ``train.rec#<key>`` records of ``root/train.rec``).
    """

    root: Path
    paths: list[str]
    labels: np.ndarray
    ethnicity: np.ndarray
    identities: list[tuple[str, str]]
    kind: str = "folder"
    digest_cache: Path | None = None  # where the file digests of this data are kept between processes

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.ethnicity = np.asarray(self.ethnicity, dtype=np.int8)
        if not len(self.paths) == len(self.labels) == len(self.ethnicity):
            raise InvalidInputError(f"image index of {self.root}: paths, labels and ethnicity differ in length")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.identities)):
            raise InvalidInputError(f"image index of {self.root}: labels outside [0, {len(self.identities)})")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def file_digests(self) -> np.ndarray:
        """Raw sha256 [N, 32] of every row's image file (RecordIO rows: of the record file), reusing the digests
        of unchanged files kept in ``digest_cache`` (:func:`utils.core.digests.files_sha256`)."""
        if self.kind == "recordio":
            return np.repeat(files_sha256(self.root, [REC_NAME], self.digest_cache), len(self.paths), axis=0)
        return files_sha256(self.root, self.paths, self.digest_cache)

    def digest(self) -> str:
        """sha256 of the (path, label) rows: the identity of this index for the embedding store."""
        text = "".join(f"{path}\t{label}\n" for path, label in zip(self.paths, self.labels.tolist()))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> None:
        """Write a TSV (``path, label, ethnicity, identity`` per row) atomically."""
        lines = [f"{_INDEX_HEADER}\tkind={self.kind}\troot={self.root.resolve()}"]
        lines.extend(
            f"{p}\t{label}\t{self.identities[label][0]}\t{self.identities[label][1]}"
            for p, label in zip(self.paths, self.labels.tolist())
        )
        atomic_write_text(path, "\n".join(lines) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ImageIndex":
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"image index file not found: {path}")
        with open(path, encoding="utf-8") as handle:
            header = handle.readline().rstrip("\n").split("\t")
            if header[0] != _INDEX_HEADER:
                raise InvalidInputError(f"{path} is not an image index (first line should start with {_INDEX_HEADER!r})")
            meta = dict(field.split("=", 1) for field in header[1:])
            rows = [line.rstrip("\n").split("\t") for line in handle]
        paths, labels, ethnicity = [], [], []
        identities: dict[int, tuple[str, str]] = {}
        for line_no, row in enumerate(rows, 2):
            if len(row) != 4:
                raise InvalidInputError(f"{path}:{line_no}: expected 4 tab-separated fields, got {len(row)}")
            label = int(row[1])
            paths.append(row[0])
            labels.append(label)
            ethnicity.append(_ethnicity_code(row[2]))
            identities.setdefault(label, (row[2], row[3]))
        if sorted(identities) != list(range(len(identities))):
            raise InvalidInputError(f"{path}: labels are not the contiguous range 0..{len(identities) - 1}")
        return cls(Path(meta["root"]), paths, np.array(labels), np.array(ethnicity),
                   [identities[k] for k in range(len(identities))], meta.get("kind", "folder"))


def _build_index(root: Path, items: list[tuple[str, str, str, str]], kind: str) -> ImageIndex:
    """Index from (ethnicity, identity, sort key, path) items: sorted, labels in identity order."""
    items.sort(key=lambda item: (_ethnicity_order(item[0]), item[1], item[2]))
    identities: list[tuple[str, str]] = []
    labels = np.empty(len(items), dtype=np.int64)
    for row, (eth, identity, _, _) in enumerate(items):
        if not identities or identities[-1] != (eth, identity):
            identities.append((eth, identity))
        labels[row] = len(identities) - 1
    ethnicity = np.array([_ethnicity_code(item[0]) for item in items], dtype=np.int8)
    return ImageIndex(root, [item[3] for item in items], labels, ethnicity, identities, kind)


def _ethnicity_order(name: str) -> int:
    return ETHNICITIES.index(name) if name in ETHNICITIES else len(ETHNICITIES)


# ---- folder layout ---------------------------------------------------------------------------------


def _folder_fingerprint(root: Path) -> str:
    """Cheap change detector: every identity folder's name and mtime (adding or removing an image
    changes its folder's mtime), without listing the images themselves."""
    digest = hashlib.sha256(str(root.resolve()).encode())
    for eth in ETHNICITIES:
        eth_dir = root / eth
        if not eth_dir.is_dir():
            digest.update(f"missing {eth}".encode())
            continue
        with os.scandir(eth_dir) as entries:
            stamps = sorted((e.name, e.stat().st_mtime_ns) for e in entries)
        digest.update(repr((eth, stamps)).encode())
    return digest.hexdigest()


def _check_entry_name(entry: os.DirEntry) -> None:
    """Refuse names the index cannot hold: tab/newline (its field and line separators) and bytes that are not
    UTF-8 (the index and every log are text); a broken symbolic link is named as such."""
    try:
        entry.name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(f"{os.fsencode(entry.path)!r} is not a valid UTF-8 name; rename it") from None
    if any(char in entry.name for char in "\t\n\r"):
        raise InvalidInputError(f"{entry.path!r} has a tab or line break in its name; rename it")
    if entry.is_symlink() and not os.path.exists(entry.path):
        try:
            os.stat(entry.path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidInputError(f"symbolic link loop at {entry.path} -> {os.readlink(entry.path)}") from None
        raise InvalidInputError(f"broken symbolic link {entry.path} -> {os.readlink(entry.path)}")


def _scan_identity(eth_dir: str, identity: str, eth: str) -> list[tuple[str, str, str, str]]:
    id_dir = os.path.join(eth_dir, identity)
    items = []
    with os.scandir(id_dir) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            _check_entry_name(entry)
            if not entry.is_file():
                raise InvalidInputError(
                    f"unexpected folder {entry.path}: expected only images in identity folder {id_dir} "
                    "(layout ROOT/<Ethnicity>/<identity>/<image>)")
            if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                raise InvalidInputError(f"unexpected file {entry.path}: expected images ({', '.join(IMAGE_EXTENSIONS)})")
            items.append((eth, identity, entry.name, f"{eth}/{identity}/{entry.name}"))
    if not items:
        raise InvalidInputError(f"identity folder {id_dir} holds no images (expected ROOT/<Ethnicity>/<identity>/<image>)")
    return items


def scan_image_folder(root: str | Path, cache_path: str | Path | None = None) -> ImageIndex:
    """Index ``root/<Ethnicity>/<identity>/<image>`` (all four ethnicities required).

    With ``cache_path`` the index is saved there and reused while no identity folder changed.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(f"training data folder not found: {root}")
    fingerprint = _folder_fingerprint(root)
    cached = _read_cache(cache_path, fingerprint)
    if cached is not None:
        return cached
    items: list[tuple[str, str, str, str]] = []
    for eth in ETHNICITIES:
        eth_dir = root / eth
        if not eth_dir.is_dir():
            found = sorted(e.name for e in os.scandir(root) if e.is_dir())
            raise MissingInputError(
                f"ethnicity folder {eth_dir} is missing: expected {root}/<Ethnicity>/<identity>/<image> "
                f"with Ethnicity in {', '.join(ETHNICITIES)}; found folders {found[:8]}")
        count = 0
        with os.scandir(eth_dir) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                _check_entry_name(entry)
                if not entry.is_dir():
                    raise InvalidInputError(f"unexpected file {entry.path}: expected only identity folders in {eth_dir}")
                items.extend(_scan_identity(str(eth_dir), entry.name, eth))
                count += 1
        if count == 0:
            raise InvalidInputError(f"ethnicity folder {eth_dir} is empty: expected identity folders with images")
    with os.scandir(root) as entries:
        unknown = sorted(e.name for e in entries
                         if e.is_dir() and not e.name.startswith(".") and e.name not in ETHNICITIES)
    if unknown:
        logger.warning(
            f"{root}: ignoring folders that are not an ethnicity ({', '.join(ETHNICITIES)}): {', '.join(unknown)}")
    index = _build_index(root, items, "folder")
    _write_cache(cache_path, fingerprint, index)
    return index


def _read_cache(cache_path: str | Path | None, fingerprint: str) -> ImageIndex | None:
    if cache_path is None:
        return None
    cache_path = Path(cache_path)
    stamp = cache_path.with_name(cache_path.name + ".fingerprint")
    if cache_path.is_file() and stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return ImageIndex.load(cache_path)
    return None


def _write_cache(cache_path: str | Path | None, fingerprint: str, index: ImageIndex) -> None:
    if cache_path is None:
        return
    cache_path = Path(cache_path)
    index.save(cache_path)
    atomic_write_text(cache_path.with_name(cache_path.name + ".fingerprint"), fingerprint + "\n")


# ---- RecordIO layout -------------------------------------------------------------------------------


def _read_ethnicity_map(path: Path) -> dict[int, tuple[str, str]]:
    mapping: dict[int, tuple[str, str]] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) not in (2, 3) or fields[1] not in ETHNICITIES:
            raise InvalidInputError(f"{path}:{line_no}: expected '<label>\\t<Ethnicity>[\\t<identity>]' "
                             f"with Ethnicity in {', '.join(ETHNICITIES)}, got {line!r}")
        label = int(fields[0])
        mapping[label] = (fields[1], fields[2] if len(fields) == 3 else f"{label:07d}")
    return mapping


def _rec_fingerprint(root: Path) -> str:
    parts = [str(root.resolve())]
    for name in (REC_NAME, IDX_NAME, ETHNICITY_MAP_NAME):
        path = root / name
        parts.append(f"{name}:{path.stat().st_size}:{path.stat().st_mtime_ns}" if path.exists() else f"{name}:-")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def scan_recordio(root: str | Path, cache_path: str | Path | None = None) -> ImageIndex:
    """Index the image records of ``root/train.rec`` (labels and ethnicities as in the module doc)."""
    root = Path(root)
    fingerprint = _rec_fingerprint(root)
    cached = _read_cache(cache_path, fingerprint)
    if cached is not None:
        return cached
    reader = recordio.IndexedRecordReader(root / IDX_NAME, root / REC_NAME)
    map_path = root / ETHNICITY_MAP_NAME
    mapping = _read_ethnicity_map(map_path) if map_path.is_file() else None
    items: list[tuple[str, str, str, str]] = []
    for key in recordio.image_keys(reader):
        label = int(recordio.header_label(reader.read_header(key)))
        if mapping is None:
            eth, identity = UNKNOWN_ETHNICITY, f"{label:07d}"
        elif label in mapping:
            eth, identity = mapping[label]
        else:
            raise InvalidInputError(f"{map_path} has no line for label {label} (record {key} of {root / REC_NAME})")
        items.append((eth, identity, f"{key:012d}", f"{REC_NAME}{REC_SEPARATOR}{key}"))
    reader.close()
    if not items:
        raise InvalidInputError(f"{root / REC_NAME} holds no image records")
    index = _build_index(root, items, "recordio")
    _write_cache(cache_path, fingerprint, index)
    return index


# ---- subsets ------------------------------------------------------------------------------------------


def restrict_identities(index: ImageIndex, ids_per_ethnicity: int, seed: int) -> ImageIndex:
    """Keep a seeded random subset of ``ids_per_ethnicity`` identities of every ethnicity."""
    if ids_per_ethnicity <= 0:
        raise InvalidInputError(f"ids_per_ethnicity must be positive, got {ids_per_ethnicity}")
    keep: list[tuple[str, str]] = []
    for code, eth in enumerate(ETHNICITIES):
        names = sorted(identity for e, identity in index.identities if e == eth)
        if len(names) < ids_per_ethnicity:
            raise InvalidInputError(f"ids_per_ethnicity={ids_per_ethnicity} but {index.root} has only {len(names)} "
                             f"{eth} identities (RecordIO data needs {ETHNICITY_MAP_NAME} for ethnicities)")
        rng = np.random.default_rng([seed, code])
        chosen = rng.choice(len(names), size=ids_per_ethnicity, replace=False)
        keep.extend((eth, names[i]) for i in chosen)
    rows, labels = select_rows(index, identities=keep)
    kept_ids = sorted(set(index.labels[rows].tolist()))
    return ImageIndex(index.root, [index.paths[r] for r in rows], labels, index.ethnicity[rows],
                      [index.identities[k] for k in kept_ids], index.kind)


def select_rows(
    index: ImageIndex,
    *,
    ethnicity: str | None = None,
    identities: Iterable[tuple[str, str]] | Mapping[str, Iterable[str]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one ethnicity and/or a set of identities, with labels renumbered 0..k-1 in index order.

    ``identities`` is a collection of (ethnicity, identity) pairs or a mapping ethnicity -> identities
    (the shape of one baseline split); every listed identity must exist in the index.
    """
    mask = np.ones(len(index), dtype=bool)
    if ethnicity is not None:
        if ethnicity not in ETHNICITIES:
            raise InvalidInputError(f"ethnicity {ethnicity!r} is not one of {', '.join(ETHNICITIES)}")
        mask &= index.ethnicity == ETHNICITIES.index(ethnicity)
        if not mask.any():
            hint = f" (RecordIO data needs {ETHNICITY_MAP_NAME} for ethnicities)" if index.kind == "recordio" else ""
            raise InvalidInputError(f"no {ethnicity} images in the index of {index.root}{hint}")
    if identities is not None:
        if isinstance(identities, Mapping):
            wanted = {(eth, name) for eth, names in identities.items() for name in names}
        else:
            wanted = {tuple(pair) for pair in identities}
        label_of = {identity: label for label, identity in enumerate(index.identities)}
        missing = sorted(wanted - label_of.keys())
        if missing:
            raise KeyError(f"{len(missing)} identities are not in the index of {index.root}, e.g. {missing[:3]}")
        keep = np.zeros(len(index.identities), dtype=bool)
        keep[[label_of[identity] for identity in wanted]] = True
        mask &= keep[index.labels]
    rows = np.flatnonzero(mask)
    _, labels = np.unique(index.labels[rows], return_inverse=True)
    return rows, labels.astype(np.int64).reshape(-1)
