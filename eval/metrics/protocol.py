"""LFW-style face verification of pairs: the 10-fold threshold protocol and what it measures.

The protocol is the insightface one used by RFW papers: squared Euclidean distance between the
L2-normalised embeddings of each pair; ten folds taken in order; on nine folds the threshold in
``0, 0.01, ..., 3.99`` with the best accuracy is chosen (the first one on ties, as ``np.argmax``) and
applied to the held-out fold. The implementation counts errors for every threshold at once from sorted
distances, which gives exactly the numbers of the plain 400-threshold loop in a fraction of its time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

# The protocol's threshold grid; `np.arange` is kept (not a linspace) so the floats equal the reference ones.
THRESHOLDS = np.arange(0, 4, 0.01)
FARS = (1e-3, 1e-4)


@dataclass
class VerificationResult:
    """Verification metrics of one pair set. Accuracies are fractions in [0, 1]."""

    accuracy: float  # mean held-out accuracy over the folds
    accuracy_std: float  # population std of the fold accuracies
    threshold: float  # mean of the per-fold best thresholds (squared distance)
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray
    # The pairs themselves, for the ROC below, bootstrap intervals and operating-point rates (eval/metrics/bootstrap.py).
    distances: np.ndarray = field(repr=False)
    issame: np.ndarray = field(repr=False)
    # Why the numbers measure nothing ("" when they do): e.g. every pair has the same score, so the accuracy is
    # chance on every group and the groups look "perfectly fair" while the model is broken.
    degenerate: str = ""

    # The ROC is computed on first use: a training run's per-epoch check reads only the accuracy, and the ROC
    # needs scikit-learn, about a second of start-up in every stage process.
    @cached_property
    def _roc(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.metrics import roc_curve

        fpr, tpr, _ = roc_curve(self.issame, -self.distances, drop_intermediate=False)
        return fpr, tpr

    @property
    def fpr(self) -> np.ndarray:
        return self._roc[0]

    @property
    def tpr(self) -> np.ndarray:
        return self._roc[1]

    @cached_property
    def auc(self) -> float:
        from sklearn.metrics import auc

        return float(auc(self.fpr, self.tpr))

    @property
    def num_impostors(self) -> int:
        return int((~self.issame).sum())

    @property
    def min_far(self) -> float:
        """1 / (number of impostor pairs): the smallest FAR these pairs can measure."""
        return 1.0 / self.num_impostors

    @cached_property
    def tar_at_far(self) -> dict[float, float]:
        """TAR at the operating point with the highest TAR whose FAR does not exceed the key; NaN where the key is
        below 1 / (number of impostor pairs): with 3000 impostors (RFW) FAR=1e-4 could only mean "no false
        accept at all", which is not a measurement of FAR 1e-4."""
        return {far: tar_at_far(self.fpr, self.tpr, far, self.num_impostors) for far in FARS}

    def summary(self) -> dict[str, float | None]:
        """JSON-friendly scalars (ROC arrays left out); a TAR that cannot be measured is None."""
        out: dict[str, float | None] = {
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "threshold": self.threshold,
            "auc": self.auc,
            "min_measurable_far": self.min_far,
        }
        out.update({f"tar@far={far:g}": None if np.isnan(tar) else tar for far, tar in self.tar_at_far.items()})
        return out


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, far: float, num_impostors: int) -> float:
    """Highest TAR with FAR <= ``far``, or NaN when ``far`` < 1 / ``num_impostors`` (not measurable)."""
    if far * num_impostors < 1:
        return float("nan")
    return float(tpr[fpr <= far].max())


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance (float64) between rows 2i and 2i+1."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] % 2:
        raise ValueError(f"expected embeddings [2N, E] of N pairs, got shape {embeddings.shape}")
    diff = embeddings[0::2].astype(np.float64) - embeddings[1::2].astype(np.float64)
    return np.einsum("ij,ij->i", diff, diff)


def fold_sizes(n: int, nfolds: int) -> np.ndarray:
    """Fold sizes of an in-order split (the first ``n % nfolds`` folds get one more, like sklearn KFold)."""
    sizes = np.full(nfolds, n // nfolds, dtype=np.int64)
    sizes[: n % nfolds] += 1
    return sizes


def fold_bounds(n: int, nfolds: int) -> np.ndarray:
    """Where the folds of :func:`fold_sizes` start, then ``n``: fold ``f`` is ``bounds[f]:bounds[f + 1]``."""
    return np.concatenate([[0], np.cumsum(fold_sizes(n, nfolds))])


def pair_set_problem(issame: np.ndarray, nfolds: int) -> str | None:
    """Why a pair set cannot give a meaningful k-fold accuracy (no pairs, fewer pairs than folds, a class
    missing overall or in one fold, where a held-out accuracy of 0 would read as "below chance"); None if it can."""
    issame = np.asarray(issame, dtype=bool)
    n = len(issame)
    if n == 0:
        return "holds 0 pairs"
    if n < nfolds:
        return f"holds {n} pairs, fewer than the {nfolds} folds of the protocol"
    bounds = fold_bounds(n, nfolds)
    for f in range(nfolds):
        fold = issame[bounds[f]:bounds[f + 1]]
        if fold.all() or not fold.any():
            kind = "genuine" if fold.all() else "impostor"
            return (f"fold {f + 1} of {nfolds} (pairs {bounds[f]}..{bounds[f + 1] - 1}) holds only {kind} pairs; "
                    "every fold needs both (folds are taken in file order)")
    return None


def kfold_accuracy(
    distances: np.ndarray, issame: np.ndarray, nfolds: int = 10, thresholds: np.ndarray = THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out accuracy and chosen threshold per fold: ``(fold_accuracies, fold_thresholds)``.

    A pair is predicted genuine when ``distance < threshold``. For every fold and threshold it counts the
    genuine and impostor pairs below the threshold with one ``searchsorted``; training-fold counts are the
    totals minus the fold's own. Accuracies are formed as ``correct / size`` like the reference loop, so
    the argmax (and its tie-breaking) is identical.
    """
    distances = np.asarray(distances, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    n = distances.shape[0]
    if distances.ndim != 1 or issame.shape != (n,):
        raise ValueError(f"distances {distances.shape} and issame {issame.shape} must be 1-D of equal length")
    if n < nfolds:
        raise ValueError(f"{n} pairs cannot be split into {nfolds} folds")
    bounds = fold_bounds(n, nfolds)
    # [F, T] counts of genuine / impostor pairs of each fold with distance < threshold.
    gen_below = np.empty((nfolds, thresholds.size), dtype=np.int64)
    imp_below = np.empty_like(gen_below)
    n_gen = np.empty(nfolds, dtype=np.int64)
    n_imp = np.empty(nfolds, dtype=np.int64)
    for f in range(nfolds):
        d, same = distances[bounds[f]:bounds[f + 1]], issame[bounds[f]:bounds[f + 1]]
        gen, imp = np.sort(d[same]), np.sort(d[~same])
        gen_below[f] = np.searchsorted(gen, thresholds, side="left")
        imp_below[f] = np.searchsorted(imp, thresholds, side="left")
        n_gen[f], n_imp[f] = gen.size, imp.size
    # Correct = true accepts (genuine below) + true rejects (impostors not below).
    fold_correct = gen_below + (n_imp[:, None] - imp_below)
    train_correct = fold_correct.sum(axis=0, keepdims=True) - fold_correct
    sizes = np.diff(bounds)
    train_acc = train_correct / (n - sizes)[:, None]
    best = np.argmax(train_acc, axis=1)
    fold_acc = fold_correct[np.arange(nfolds), best] / sizes
    return fold_acc, thresholds[best]


def verify_distances(distances: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> VerificationResult:
    """All verification metrics from pair distances (squared Euclidean) and genuine/impostor labels."""
    issame = np.asarray(issame, dtype=bool)
    distances = np.asarray(distances, dtype=np.float64)
    if issame.all() or not issame.any():
        raise ValueError("verification needs both genuine and impostor pairs")
    degenerate = ""
    if not np.isfinite(distances).all():
        degenerate = "non-finite embeddings"
        # Scored as "no pair below any threshold": chance accuracy, flagged, never an error in the middle of a run.
        distances = np.where(np.isfinite(distances), distances, THRESHOLDS[-1] + 1)
    if np.ptp(distances) == 0:
        degenerate = degenerate or "all pair scores equal (constant embeddings)"
    fold_acc, fold_thr = kfold_accuracy(distances, issame, nfolds)
    return VerificationResult(
        accuracy=float(fold_acc.mean()),
        accuracy_std=float(fold_acc.std()),
        threshold=float(fold_thr.mean()),
        fold_accuracies=fold_acc,
        fold_thresholds=fold_thr,
        distances=distances,
        issame=issame,
        degenerate=degenerate,
    )


def verify(embeddings: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> VerificationResult:
    """Verification metrics of ``[2N, E]`` embeddings (rows 2i, 2i+1 form pair i) and ``issame [N]``."""
    distances = pair_distances(embeddings)
    if np.asarray(issame).shape != distances.shape:
        raise ValueError(f"issame has {np.asarray(issame).shape} labels for {distances.shape[0]} pairs")
    return verify_distances(distances, issame, nfolds)
