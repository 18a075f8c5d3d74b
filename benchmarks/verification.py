"""10-fold RFW-size verification: vectorised thresholds vs the plain 400-threshold loop.

6000 pairs of 512-D embeddings (genuine pairs correlated, as from a real model). Asserts identical fold
accuracies and thresholds, prints one line and writes benchmarks/results/verification.json.
Run: python benchmarks/verification.py [--pairs 6000] [--repeats 20]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from eval.metrics.protocol import kfold_accuracy, pair_distances, verify  # noqa: E402
from eval.metrics.reference_protocol import reference_verify  # noqa: E402
from utils.core.io import atomic_write_text  # noqa: E402


def make_embeddings(n_pairs: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings whose pair cosines look like a real model's on RFW (overlapping, ~95% accuracy)."""
    rng = np.random.default_rng(seed)
    issame = np.arange(n_pairs) % 2 == 0  # RFW: half genuine
    rng.shuffle(issame)
    cosine = np.clip(np.where(issame, rng.normal(0.5, 0.15, n_pairs), rng.normal(0.05, 0.08, n_pairs)), -1, 1)
    first = rng.standard_normal((n_pairs, dim))
    first /= np.linalg.norm(first, axis=1, keepdims=True)
    other = rng.standard_normal((n_pairs, dim))
    other -= np.sum(other * first, axis=1, keepdims=True) * first  # orthogonal to the partner
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    emb = np.empty((2 * n_pairs, dim), dtype=np.float32)
    emb[0::2] = first
    emb[1::2] = cosine[:, None] * first + np.sqrt(1 - cosine[:, None] ** 2) * other
    return emb, issame


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "verification.json")
    args = parser.parse_args()

    emb, issame = make_embeddings(args.pairs, args.dim, args.seed)
    dist = pair_distances(emb)
    acc, thr = kfold_accuracy(dist, issame)
    ref_acc, ref_thr = reference_verify(dist, issame)
    assert np.array_equal(acc, ref_acc) and np.array_equal(thr, ref_thr), "vectorised differs from the loop"

    vectorised_s = best_time(lambda: kfold_accuracy(dist, issame), args.repeats)
    loop_s = best_time(lambda: reference_verify(dist, issame), max(1, args.repeats // 10))
    full_s = best_time(lambda: verify(emb, issame), args.repeats)  # distances + 10-fold + ROC/TAR/AUC
    result = {
        "pairs": args.pairs,
        "dim": args.dim,
        "accuracy": float(acc.mean()),
        "mean_threshold": float(thr.mean()),
        "loop_kfold_s": loop_s,
        "vectorised_kfold_s": vectorised_s,
        "speedup": loop_s / vectorised_s,
        "full_verify_s": full_s,
        "identical": True,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"verification {args.pairs} pairs: loop {loop_s * 1e3:.1f} ms, vectorised {vectorised_s * 1e3:.2f} ms "
          f"({result['speedup']:.0f}x, identical accuracy {100 * result['accuracy']:.2f}%), "
          f"full verify incl. ROC {full_s * 1e3:.1f} ms -> {args.out}")


if __name__ == "__main__":
    main()
