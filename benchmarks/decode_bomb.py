"""A decompression bomb: a JPEG of about a kilobyte whose header claims 30000 x 30000 pixels.

    python benchmarks/decode_bomb.py [--side 30000] [--skip-full]

Each case runs in its own process, so its peak resident memory (``ru_maxrss``) is its own: the refusal of the
training data path (``utils.data.image.decode_image``: the header is read, checked against max_image_pixels and
refused) against a full ``cv2.imdecode`` of the same bytes (what the data path did before the header check).
Prints one line and writes benchmarks/results/decode_bomb.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT = ROOT / "benchmarks" / "results" / "decode_bomb.json"

CASE = """
import resource, sys, time
sys.path.insert(0, {root!r})
import cv2, numpy as np
from utils.data.image import decode_image
from utils.core.errors import UserError
data = open({path!r}, "rb").read()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
outcome = "decoded"
if {full!r}:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    outcome = "decoded " + ("x".join(map(str, image.shape)) if image is not None else "nothing")
else:
    try:
        decode_image(data, 112, "bomb.jpg", allow_resize=True)
    except UserError as exc:
        outcome = "refused: " + str(exc)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(seconds, (peak - base) / 1024, outcome, sep="\\t")
"""


def bomb_bytes(side: int) -> bytes:
    """A 32x32 JPEG whose start-of-frame header is rewritten to claim ``side`` x ``side`` pixels."""
    import cv2
    import numpy as np

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", image)[1].tobytes()
    pos = data.index(b"\xff\xc0")
    return data[:pos + 5] + struct.pack(">HH", side, side) + data[pos + 9:]


def run_case(path: Path, full: bool) -> dict:
    code = CASE.format(root=str(ROOT), path=str(path), full=full)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, peak_gib, outcome = completed.stdout.strip().split("\t", 2)
    return {"seconds": float(seconds), "peak_rss_increase_gib": float(peak_gib) / 1024, "outcome": outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=30000, help="claimed width and height")
    parser.add_argument("--skip-full", action="store_true", help="do not decode the bomb fully (needs ~3 x side^2 B)")
    args = parser.parse_args()
    path = RESULT.parent / "bomb.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bomb_bytes(args.side))
    try:
        result = {"bytes": path.stat().st_size, "claimed": f"{args.side}x{args.side}",
                  "refused": run_case(path, full=False),
                  "full_decode": None if args.skip_full else run_case(path, full=True),
                  "machine": platform.platform(), "python": platform.python_version()}
    finally:
        path.unlink()
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    refused, full = result["refused"], result["full_decode"]
    line = (f"bomb of {result['bytes']} B claiming {result['claimed']}: refused in {refused['seconds'] * 1e3:.2f} ms, "
            f"+{refused['peak_rss_increase_gib'] * 1024:.1f} MiB peak")
    if full is not None:
        line += f"; full decode {full['seconds']:.1f} s, +{full['peak_rss_increase_gib']:.2f} GiB peak"
    print(line)


if __name__ == "__main__":
    main()
