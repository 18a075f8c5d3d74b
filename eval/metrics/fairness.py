"""Fairness summary of per-ethnicity verification accuracies (in %): average, STD and SER.

- avg: mean accuracy.
- std: population standard deviation (ddof=0) of the accuracies; lower is fairer.
- ser: skewed error ratio, the worst group's error over the best group's error,
  ``(100 - min acc) / (100 - max acc)``; 1 is perfectly fair. When the best group makes no error at all
  the ratio is unbounded: ``inf`` if another group errs, ``nan`` if no group errs (0/0, undefined).
"""
from __future__ import annotations

import math
from typing import Mapping


def fairness_metrics(acc: Mapping[str, float]) -> dict[str, float]:
    """``{"avg", "std", "ser"}`` from ``{group: accuracy in %}``."""
    if not acc:
        raise ValueError("fairness_metrics needs at least one accuracy")
    values = [float(v) for v in acc.values()]
    for name, value in zip(acc, values):
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"accuracy of {name!r} must be a percentage in [0, 100], got {value}")
    avg = sum(values) / len(values)
    std = math.sqrt(sum((v - avg) ** 2 for v in values) / len(values))
    worst_error, best_error = 100.0 - min(values), 100.0 - max(values)
    if best_error > 0:
        ser = worst_error / best_error
    else:
        ser = math.inf if worst_error > 0 else math.nan
    return {"avg": avg, "std": std, "ser": ser}
