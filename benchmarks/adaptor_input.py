"""Adaptor input pipeline: the embedding store vs one .npy file per image per teacher (the original release).

    python benchmarks/adaptor_input.py [--samples 20000] [--dim 512] [--batch 128] [--epochs 3]

Both layouts hold the same random unit rows of four teachers. The release's layout is read as it was: a
Dataset loading four small .npy files per sample, batched by the default collate. The store is read through
the adaptor stage's own dataset (``utils.stages.adaptor.ConcatStoreDataset``: one gather per store and batch), from
the memory map and from RAM. Every pipeline is a DataLoader over a shuffled epoch with batch 128, no workers,
warm page cache. Also reports the files and bytes of each layout, measured and extrapolated to
BUPT-BalancedFace. Prints one line and writes benchmarks/results/adaptor_input.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from numpy.lib.format import open_memmap  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from config.config import CONCAT_ORDER  # noqa: E402
from utils.stages.adaptor import ConcatStoreDataset, passthrough_collate  # noqa: E402

BUPT_IMAGES = 1_248_932
RESULT = ROOT / "benchmarks" / "results" / "adaptor_input.json"


class PerFileDataset(Dataset):
    """The release's input: ``<teacher>/<row>.npy`` files, four loads and a concatenation per sample."""

    def __init__(self, root: Path, labels: np.ndarray) -> None:
        self.root, self.labels = root, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        rows = [np.load(self.root / teacher / f"{i}.npy") for teacher in CONCAT_ORDER]
        return torch.from_numpy(np.concatenate(rows)), int(self.labels[i]), i


def write_layouts(root: Path, samples: int, dim: int, seed: int) -> tuple[list[Path], Path]:
    rng = np.random.default_rng(seed)
    store_paths = []
    (root / "store").mkdir(parents=True)
    for teacher in CONCAT_ORDER:
        rows = rng.normal(size=(samples, dim)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        store_paths.append(root / "store" / f"{teacher}.npy")
        store = open_memmap(store_paths[-1], mode="w+", dtype=np.float32, shape=rows.shape)
        store[:] = rows
        store.flush()
        del store
        folder = root / "per_file" / teacher
        folder.mkdir(parents=True)
        for i, row in enumerate(rows):
            np.save(folder / f"{i}.npy", row)
    return store_paths, root / "per_file"


def disk_usage(paths: list[Path]) -> dict[str, int]:
    stats = [p.stat() for p in paths]
    return {"files": len(paths), "bytes": sum(s.st_size for s in stats),
            "allocated_bytes": sum(s.st_blocks * 512 for s in stats)}


def samples_per_second(dataset: Dataset, batch: int, epochs: int, collate=None) -> float:
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    seen = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for features, labels, rows in loader:
            seen += len(features)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed for the store (the per-file layout: 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="adaptor_input_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        store_paths, per_file_root = write_layouts(root, args.samples, args.dim, args.seed)
        write_seconds = time.perf_counter() - start
        labels = np.arange(args.samples, dtype=np.int64) % max(1, args.samples // 20)
        per_file = samples_per_second(PerFileDataset(per_file_root, labels), args.batch, 1)
        arrays = [np.load(p, mmap_mode="r") for p in store_paths]
        mapped = samples_per_second(ConcatStoreDataset(arrays, labels, in_memory=False), args.batch, args.epochs,
                                    passthrough_collate)
        in_memory = samples_per_second(ConcatStoreDataset(arrays, labels, in_memory=True), args.batch,
                                       args.epochs, passthrough_collate)
        store_usage = disk_usage(store_paths)
        per_file_usage = disk_usage(sorted(per_file_root.rglob("*.npy")))

    row_bytes = args.dim * 4
    result = {
        "samples": args.samples, "teachers": len(CONCAT_ORDER), "dim": args.dim, "batch": args.batch,
        "samples_per_s": {"per_file": per_file, "store_memmap": mapped, "store_in_memory": in_memory},
        "speedup": {"store_memmap": mapped / per_file, "store_in_memory": in_memory / per_file},
        "disk": {"store": store_usage, "per_file": per_file_usage},
        "bupt_extrapolation": {
            "images": BUPT_IMAGES,
            "store_bytes_per_teacher": BUPT_IMAGES * row_bytes + 128,
            "per_file_files": BUPT_IMAGES * len(CONCAT_ORDER),
            "per_file_bytes_per_teacher": BUPT_IMAGES * (per_file_usage["bytes"] // per_file_usage["files"]),
        },
        "layout_write_seconds": write_seconds,
        "notes": "one process, no DataLoader workers, warm page cache; torch threads "
                 f"{torch.get_num_threads()}",
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"adaptor input, {args.samples} samples x {len(CONCAT_ORDER)} teachers: per-file {per_file:,.0f} samples/s, "
          f"store memmap {mapped:,.0f} ({mapped / per_file:.0f}x), in memory {in_memory:,.0f} "
          f"({in_memory / per_file:.0f}x); disk: store {store_usage['files']} files "
          f"{store_usage['bytes'] / 2**20:.1f} MiB vs per-file {per_file_usage['files']} files "
          f"{per_file_usage['bytes'] / 2**20:.1f} MiB ({per_file_usage['allocated_bytes'] / 2**20:.1f} MiB allocated)")


if __name__ == "__main__":
    main()
