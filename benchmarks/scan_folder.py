"""Scanning the BUPT folder layout: files indexed per second, without and with the index cache.

    python benchmarks/scan_folder.py [--root DIR] [--ids 560] [--images 45] [--repeats 3]

Builds ``ROOT/<Ethnicity>/<identity>/<n>.jpg`` with 4 x ids x images empty files (scanning never decodes,
so empty files cost the same to list as real images), in a temporary folder that is removed afterwards, or
in ``--root`` (built there once, reused by later runs). Times ``utils.data.index.scan_image_folder``:
the first full scan of the process and the best of ``--repeats`` full scans, both without an index
cache (the operating system's directory cache is warm either way, as it is after building the tree;
dropping it needs privileges a benchmark should not assume), the first scan with a cache path (scan +
writing the index), and cached scans (fingerprint of the identity folders + reading the index).
Prints one line and writes benchmarks/results/scan_folder.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config.config import ETHNICITIES  # noqa: E402
from utils.core.io import atomic_write_text  # noqa: E402
from utils.data.index import scan_image_folder  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "scan_folder.json"
BUPT_IMAGES = 1_248_932


def build_tree(root: Path, ids: int, images: int) -> float:
    """Write the empty-file tree (marked complete by ``.complete`` so a reused --root is trusted)."""
    marker = root / ".complete"
    expected = f"{ids} {images}\n"
    if marker.is_file():
        if marker.read_text() != expected:
            raise SystemExit(f"{root} holds a tree of another size ({marker.read_text().strip()} ids images); "
                             "pass matching --ids/--images or another --root")
        return 0.0
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty and was not built by this benchmark; pass an empty or new --root")
    start = time.perf_counter()
    for eth in ETHNICITIES:
        for i in range(ids):
            folder = root / eth / f"{eth.lower()}_{i:06d}"
            folder.mkdir(parents=True)
            for n in range(images):
                os.close(os.open(folder / f"{n:04d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    marker.write_text(expected)
    return time.perf_counter() - start


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run(root: Path, args: argparse.Namespace) -> dict:
    build_s = build_tree(root, args.ids, args.images)
    files = len(ETHNICITIES) * args.ids * args.images
    start = time.perf_counter()
    scan_image_folder(root)
    first_scan_s = time.perf_counter() - start
    scan_s, index = best_of(lambda: scan_image_folder(root), args.repeats)
    if len(index) != files or index.num_classes != len(ETHNICITIES) * args.ids:
        raise SystemExit(f"scan of {root} found {len(index)} files of {index.num_classes} identities, "
                         f"expected {files} files")
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = Path(cache_dir) / "index.tsv"
        start = time.perf_counter()
        scan_image_folder(root, cache)
        cache_write_s = time.perf_counter() - start
        cached_s, cached = best_of(lambda: scan_image_folder(root, cache), args.repeats)
        cache_bytes = cache.stat().st_size
    if cached.paths != index.paths or not (cached.labels == index.labels).all():
        raise SystemExit("the cached index differs from the scanned one")
    return {
        "files": files,
        "identities": index.num_classes,
        "build_s": build_s,
        "first_scan_s": first_scan_s,
        "scan_s": scan_s,
        "files_per_s": files / scan_s,
        "scan_and_cache_write_s": cache_write_s,
        "cached_scan_s": cached_s,
        "cached_files_per_s": files / cached_s,
        "cache_bytes": cache_bytes,
        "bupt_estimate_scan_s": BUPT_IMAGES / (files / scan_s),
        "repeats": args.repeats,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, help="build the tree here once and reuse it (default: a temp dir)")
    # BUPT-BalancedFace holds about 45 images per identity; 4 x 560 x 45 = 100,800 files.
    parser.add_argument("--ids", type=int, default=560, help="identities per ethnicity")
    parser.add_argument("--images", type=int, default=45, help="files per identity")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    if args.root is not None:
        result = run(args.root, args)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="scan_folder_"))
        try:
            result = run(tmp, args)
        finally:
            shutil.rmtree(tmp)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"scan_image_folder {result['files']} files of {result['identities']} identities: "
          f"first {result['first_scan_s']:.2f} s, best {result['scan_s']:.2f} s "
          f"({result['files_per_s']:,.0f} files/s; BUPT-size ~{result['bupt_estimate_scan_s']:.1f} s); "
          f"cached {result['cached_scan_s'] * 1e3:.0f} ms ({result['cached_files_per_s']:,.0f} files/s) -> {args.out}")


if __name__ == "__main__":
    main()
