"""The plain insightface verification loop (400 thresholds per training split, one at a time).

Kept as the oracle the vectorised ``eval.metrics.protocol`` is tested and benchmarked against; nothing else uses it.
"""
from __future__ import annotations

import numpy as np
from sklearn.model_selection import KFold


def _reference_accuracy(threshold: float, dist: np.ndarray, actual: np.ndarray) -> float:
    predict = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict, actual))
    tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(actual)))
    return float(tp + tn) / dist.size


def reference_verify(distances: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The plain insightface loop: 400 thresholds per training split. The oracle for the vectorised code."""
    thresholds = np.arange(0, 4, 0.01)
    accuracies, chosen = [], []
    for train, test in KFold(n_splits=nfolds, shuffle=False).split(np.arange(len(distances))):
        acc_train = np.zeros(len(thresholds))
        for i, threshold in enumerate(thresholds):
            acc_train[i] = _reference_accuracy(threshold, distances[train], issame[train])
        best = np.argmax(acc_train)
        accuracies.append(_reference_accuracy(thresholds[best], distances[test], issame[test]))
        chosen.append(thresholds[best])
    return np.array(accuracies), np.array(chosen)
