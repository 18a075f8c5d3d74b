"""Bootstrap of the RFW protocol: 1000 resamples of four 6000-pair groups, the 10-fold protocol re-run on each.

Distances are drawn like a ~93 %-accurate model's; the time covers the draws and every resample's 10-fold
threshold search for all four groups (one model). Prints one line and writes benchmarks/results/bootstrap.json.
Run: python benchmarks/bootstrap.py [--pairs 6000] [--resamples 1000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from config.config import ETHNICITIES  # noqa: E402
from eval.metrics.bootstrap import bootstrap_fairness  # noqa: E402
from utils.core.io import atomic_write_text  # noqa: E402


def make_pairs(n_pairs: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """RFW-like groups: each fold half genuine, half impostor; squared distances in [0, 4)."""
    rng = np.random.default_rng(seed)
    per = n_pairs // 20
    issame = np.tile(np.r_[np.ones(per, bool), np.zeros(per, bool)], 10)
    pairs = {}
    for k, group in enumerate(ETHNICITIES):
        spread = 0.30 + 0.03 * k
        genuine, impostor = rng.normal(0.9, spread, issame.size), rng.normal(1.9, spread, issame.size)
        pairs[group] = (np.clip(np.where(issame, genuine, impostor), 0.0, 3.99), issame)
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=6000, help="pairs per group (a multiple of 20)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bootstrap.json")
    args = parser.parse_args()

    pairs = make_pairs(args.pairs, args.seed)
    times, result = [], {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = bootstrap_fairness(pairs, n_resamples=args.resamples, seed=args.seed)
        times.append(time.perf_counter() - start)
    out = {
        "groups": len(pairs),
        "pairs_per_group": args.pairs,
        "resamples": args.resamples,
        "seconds": min(times),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "intervals": {key: [e.value, e.low, e.high] for key, e in result.items()},
    }
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    avg = result["avg"]
    print(f"bootstrap {args.resamples} resamples x {len(pairs)} groups x {args.pairs} pairs (10-fold protocol each): "
          f"{min(times):.2f} s; Avg {avg.value:.2f} [{avg.low:.2f}, {avg.high:.2f}] -> {args.out}")


if __name__ == "__main__":
    main()
