"""The run's inputs from the config: the image index of ``data_root`` (cached in the work directory), the rows a
training protocol reads, and the dataset built from them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from config.config import Config
from utils.core.errors import InvalidInputError, MissingInputError
from utils.data.datasets import FaceDataset, RecordDataset, check_images
from utils.data.index import REC_NAME, ImageIndex, restrict_identities, scan_image_folder, scan_recordio, select_rows
from utils.data.splits import load_split_manifest
from utils.workdir import artifacts


def load_index(cfg: Config) -> ImageIndex:
    """The run's training images: all of cfg.data_root, or cfg.ids_per_ethnicity identities per
    ethnicity drawn with cfg.seed (the same on every call), labels renumbered 0..K-1."""
    if cfg.data_root is None:
        raise InvalidInputError("config key data_root is not set: point it at the training images")
    root = Path(cfg.data_root)
    if not root.is_dir():
        raise MissingInputError(f"data_root {root} is not a folder")
    if (root / REC_NAME).is_file():
        index = scan_recordio(root, artifacts.index_cache_file(cfg))
    else:
        index = scan_image_folder(root, artifacts.index_cache_file(cfg))
    if cfg.ids_per_ethnicity is not None:
        index = restrict_identities(index, cfg.ids_per_ethnicity, cfg.seed)
    index.digest_cache = artifacts.digest_cache_file(cfg)
    return index


def dataset_for(cfg: Config, index: ImageIndex, rows: np.ndarray | None = None,
                labels: np.ndarray | None = None) -> FaceDataset:
    """The dataset of ``rows`` of ``index`` (all by default) decoded as ``cfg`` says (input_size, allow_resize):
    the one place a stage builds it, so training, the image check and extraction read images alike (and refuse
    images above cfg.max_image_pixels before decoding them)."""
    dataset_cls = RecordDataset if index.kind == "recordio" else FaceDataset
    return dataset_cls(index, rows, labels, cfg.input_size, cfg.allow_resize, cfg.max_image_pixels)


PROTOCOLS = ("ethnicity", "all", "split")


def training_rows(cfg: Config, index: ImageIndex, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``index`` a training stage reads, and their labels 0..k-1.

    ``ethnicity``: identities of cfg.ethnicity (``all`` = every identity); ``all``: every identity;
    ``split``: balanced baseline split cfg.split from the split manifest.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if protocol == "ethnicity" and cfg.ethnicity != "all":
        return select_rows(index, ethnicity=cfg.ethnicity)
    if protocol == "split":
        manifest = artifacts.split_manifest(cfg)
        splits = load_split_manifest(manifest)
        if not 0 <= cfg.split < len(splits):
            raise InvalidInputError(f"split={cfg.split} but {manifest} holds {len(splits)} splits")
        return select_rows(index, identities=splits[cfg.split])
    return np.arange(len(index)), index.labels


def build_training_dataset(cfg: Config, protocol: str) -> tuple[FaceDataset, int]:
    """The dataset a training stage uses (rows as in :func:`training_rows`) and its number of classes."""
    index = load_index(cfg)
    rows, labels = training_rows(cfg, index, protocol)
    num_classes = int(labels.max()) + 1
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise InvalidInputError(f"config key num_classes={cfg.num_classes} but the {protocol} data of "
                                f"{cfg.data_root} has {num_classes} identities")
    dataset = dataset_for(cfg, index, rows, labels)
    check_images(dataset, cfg.check_images, seed=cfg.seed, workers=cfg.num_workers)
    return dataset, num_classes
