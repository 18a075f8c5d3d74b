"""Training images as torch datasets: rows of an :class:`~utils.data.index.ImageIndex`, decoded to the one
normalisation, and the early check that decodes a sample of them."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from config.config import MAX_IMAGE_PIXELS
from utils.data import recordio
from utils.data.image import decode_image, to_tensor
from utils.data.index import IDX_NAME, REC_NAME, REC_SEPARATOR, ImageIndex

CHECK_CHUNK = 256  # images :func:`check_images` decodes between two calls of its ``between_chunks``


class FaceDataset(Dataset):
    """Images of ``rows`` of an index as ``(uint8 RGB image [3, S, S], label, row)``.

    Images stay uint8 (a quarter of float32's bytes to pin and copy); the device normalises them
    (``utils.data.image.network_input``). No augmentation here: the training feed flips whole batches so it
    knows which samples were flipped. Paths are kept in a numpy array so forked DataLoader workers share them instead of
    copying a list of a million Python strings on first touch.
    """

    def __init__(self, index: ImageIndex, rows: np.ndarray | None = None, labels: np.ndarray | None = None,
                 input_size: int = 112, allow_resize: bool = False, max_pixels: int = MAX_IMAGE_PIXELS):
        self.index = index
        self.rows = np.arange(len(index)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.labels = index.labels[self.rows] if labels is None else np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self.rows):
            raise ValueError(f"{len(self.rows)} rows but {len(self.labels)} labels")
        self.input_size = input_size
        self.allow_resize = allow_resize
        self.max_pixels = max_pixels
        self.root = str(index.root)
        self._paths = np.array([index.paths[r].encode("utf-8") for r in self.rows.tolist()], dtype=bytes)
        self._reader: recordio.IndexedRecordReader | None = None
        if index.kind == "recordio":
            self._reader = recordio.IndexedRecordReader(index.root / IDX_NAME, index.root / REC_NAME)

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, i: int) -> tuple[bytes, str]:
        path = self._paths[i].decode("utf-8")
        if self._reader is not None:
            key = int(path.rsplit(REC_SEPARATOR, 1)[1])
            name = f"{self._reader.path}#{key}"
            return recordio.unpack(self._reader.read_idx(key))[1], name
        name = os.path.join(self.root, path)
        try:
            with open(name, "rb") as handle:
                return handle.read(), name
        except OSError as exc:
            raise OSError(f"cannot read image {name}: {exc.strerror}") from exc

    def read_uint8(self, i: int) -> torch.Tensor:
        """The ``i``-th image as uint8 RGB [3, S, S]."""
        data, name = self._read(i)
        return to_tensor(decode_image(data, self.input_size, name, self.allow_resize, self.max_pixels))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.read_uint8(i), int(self.labels[i]), int(self.rows[i])


class RecordDataset(FaceDataset):
    """A FaceDataset over a RecordIO index (``train.rec#<key>`` rows); same item format."""

    def __init__(self, index: ImageIndex, rows: np.ndarray | None = None, labels: np.ndarray | None = None,
                 input_size: int = 112, allow_resize: bool = False, max_pixels: int = MAX_IMAGE_PIXELS):
        if index.kind != "recordio":
            raise ValueError(f"RecordDataset needs a RecordIO index, got a {index.kind} index of {index.root}")
        super().__init__(index, rows, labels, input_size, allow_resize, max_pixels)


def check_images(dataset: FaceDataset, sample: int, *, seed: int = 0, workers: int = 1,
                 between_chunks: Callable[[], None] | None = None) -> int:
    """Decode ``sample`` seeded-random images of ``dataset`` (all of them when ``sample`` < 0 or exceeds its
    size), so a corrupt or unreadable file fails in seconds with its name, not hours into a run. Returns how many
    were decoded. ``between_chunks`` is called before each :data:`CHECK_CHUNK` images (a stop check: a check of
    a million images takes minutes)."""
    from concurrent.futures import ThreadPoolExecutor

    if sample == 0 or len(dataset) == 0:
        return 0
    count = len(dataset) if sample < 0 else min(sample, len(dataset))
    positions = np.random.default_rng(seed).choice(len(dataset), size=count, replace=False)
    # cv2 decodes without the GIL: threads are enough, and errors arrive with their own message. A RecordIO
    # reader is one file handle (seek, then read), so those records are read by one thread.
    threads = 1 if dataset.index.kind == "recordio" else max(1, workers)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, count, CHECK_CHUNK):
            if between_chunks is not None:
                between_chunks()
            for _ in pool.map(dataset.read_uint8, positions[start:start + CHECK_CHUNK].tolist()):
                pass
    return count
