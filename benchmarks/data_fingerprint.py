"""Cost of the content fingerprint of the training data (``utils.workdir.provenance.data_fingerprint``).

    python benchmarks/data_fingerprint.py [--sizes 32 112] [--ids 50] [--images 10] [--repeats 3]

For each image side, writes a synthetic set of the demo's size (4 ethnicities x ``--ids`` identities x
``--images`` images; the demo preset is 32 px, BUPT is 112 px), waits until its files are settled (a digest of a
file written within a second is never kept), and times:

- ``sizes``: the fingerprint of before (path, label and file size: one ``stat`` per image), for comparison;
- ``cold``: the content fingerprint with no digest cache (every image read and hashed; the files are in the page
  cache, as right after writing or reading them, so this is the CPU and system-call cost, not the disk's);
- ``warm``: with the digest cache a first run left (one ``stat`` per image, the cache file, the final hash): what
  every later stage process and plan pays.

Per million images is the per-image cost times 10^6. Prints one line and writes
benchmarks/results/data_fingerprint.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.core.digests import SETTLED_NS  # noqa: E402
from utils.data.index import ImageIndex, scan_image_folder  # noqa: E402
from utils.data.synthetic import generate_synthetic  # noqa: E402
from utils.workdir.provenance import data_fingerprint  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "data_fingerprint.json"


def size_fingerprint(index: ImageIndex) -> str:
    """The fingerprint of before this change: path, label and file size of every row."""
    digest = hashlib.sha256(f"{index.kind}\n".encode())
    for path, label in zip(index.paths, index.labels.tolist()):
        digest.update(f"{path}\t{label}\t{os.stat(os.path.join(index.root, path)).st_size}\n".encode())
    return digest.hexdigest()


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(work: Path, size: int, ids: int, images: int, repeats: int) -> dict:
    data = work / f"data{size}"
    generate_synthetic(data, ids_per_ethnicity=ids, images_per_id=images, pairs_per_ethnicity=20, image_size=size,
                       seed=0)
    index = scan_image_folder(data / "train")
    time.sleep(SETTLED_NS / 1e9 + 0.1)  # past the racy window: the first run's digests are kept
    cache = work / f"digests{size}.npz"
    index.digest_cache = cache

    def cold() -> None:
        cache.unlink(missing_ok=True)
        data_fingerprint(index)

    cold_s = best_of(cold, repeats)
    warm_s = best_of(lambda: data_fingerprint(index), repeats)
    sizes_s = best_of(lambda: size_fingerprint(index), repeats)
    n = len(index)
    total_bytes = sum(os.stat(os.path.join(index.root, p)).st_size for p in index.paths)
    per_million = {name: seconds / n * 1e6 for name, seconds in
                   (("sizes", sizes_s), ("cold", cold_s), ("warm", warm_s))}
    return {"image_side": size, "images": n, "mean_image_bytes": total_bytes / n, "sizes_s": sizes_s,
            "cold_s": cold_s, "warm_s": warm_s, "per_million_s": per_million,
            "cache_bytes_per_million_images": cache.stat().st_size / n * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 112], help="image sides to measure")
    parser.add_argument("--ids", type=int, default=50, help="identities per ethnicity (demo: 50)")
    parser.add_argument("--images", type=int, default=10, help="images per identity (demo: 10)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = [measure(Path(work), size, args.ids, args.images, args.repeats) for size in args.sizes]
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({"results": results, "machine": platform.platform(), "cpus": os.cpu_count(),
                                  "python": platform.python_version()}, indent=2) + "\n")
    print("; ".join(
        f"{r['images']} images of {r['image_side']} px ({r['mean_image_bytes'] / 1024:.1f} KiB): sizes "
        f"{r['sizes_s'] * 1e3:.0f} ms, content cold {r['cold_s'] * 1e3:.0f} ms, warm {r['warm_s'] * 1e3:.0f} ms; per "
        f"million images {r['per_million_s']['sizes']:.1f} / {r['per_million_s']['cold']:.1f} / "
        f"{r['per_million_s']['warm']:.1f} s, cache {r['cache_bytes_per_million_images'] / 2**20:.0f} MiB"
        for r in results))


if __name__ == "__main__":
    main()
