"""Bootstrap confidence intervals and paired comparisons for the RFW 10-fold verification protocol.

The resampled unit is the pair. Every resample draws pairs with replacement inside each cell of the design,
one cell per (group, fold, genuine/impostor): fold sizes and the genuine/impostor balance of every fold stay
as in the data, and the whole 10-fold protocol (threshold picked on nine folds, applied to the tenth) re-runs
on each resample. Intervals are percentile intervals (Efron & Tibshirani, *An Introduction to the Bootstrap*,
1993, ch. 13); the lower end takes the sample just below the quantile and the upper end the one just above,
so an infinite SER in some resamples gives an honest infinite bound instead of an interpolated NaN.

Applying the same draws to two models evaluated on the same pairs is the paired bootstrap: the difference of
any metric is computed within each resample. Draws depend only on (seed, group name, pair labels), so every
model of a report shares them and results are reproducible.

Avg, STD and SER are computed per resample from the four resampled accuracies. STD and SER are biased upward
by sampling noise (equal true accuracies still give STD > 0), so read their intervals as the spread of what
this evaluation could have printed, not as intervals around a noise-free fairness value.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from eval.metrics.protocol import THRESHOLDS, fold_bounds, fold_sizes, kfold_accuracy

# Resamples handled at once by bootstrap_accuracies: bounds memory to about 200 x pairs x 8 bytes per array.
_CHUNK = 200

Pairs = Mapping[str, tuple[np.ndarray, np.ndarray]]  # group -> (squared distances [n], issame [n])


def _group_rng(seed: int, group: str) -> np.random.Generator:
    """One generator per (seed, group): a group's draws do not depend on which other groups are evaluated."""
    return np.random.default_rng([seed, zlib.crc32(group.encode())])


# Fewer genuine (or impostor) pairs than this in one fold and resampling barely moves the cell: the intervals would
# be falsely narrow, so no intervals or comparisons are computed (RFW has 300 of each per fold, the demo 15).
MIN_CELL_PAIRS = 5


def _cells(issame: np.ndarray, nfolds: int) -> Iterator[np.ndarray]:
    """Pair indices of every (fold, genuine/impostor) cell of the in-order k-fold split."""
    bounds = fold_bounds(issame.size, nfolds)
    for f in range(nfolds):
        for label in (False, True):
            yield bounds[f] + np.flatnonzero(issame[bounds[f]:bounds[f + 1]] == label)


def smallest_cell(issame: np.ndarray, nfolds: int = 10) -> int:
    """The fewest genuine or impostor pairs of any fold."""
    return min(cell.size for cell in _cells(np.asarray(issame, dtype=bool), nfolds))


def draw_resamples(issame: np.ndarray, n_resamples: int, rng: np.random.Generator, nfolds: int = 10) -> np.ndarray:
    """Pair indices ``[n_resamples, n]`` of a stratified bootstrap: position ``p`` of every resample holds a pair
    drawn from the same (fold, genuine/impostor) cell as pair ``p``."""
    issame = np.asarray(issame, dtype=bool)
    n = issame.size
    if n_resamples <= 0:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    if n < nfolds:
        raise ValueError(f"{n} pairs cannot be split into {nfolds} folds")
    indices = np.empty((n_resamples, n), dtype=np.int64)
    for cell in _cells(issame, nfolds):
        if cell.size:
            indices[:, cell] = cell[rng.integers(0, cell.size, size=(n_resamples, cell.size))]
    return indices


def bootstrap_accuracies(distances: np.ndarray, issame: np.ndarray, indices: np.ndarray, nfolds: int = 10,
                         thresholds: np.ndarray = THRESHOLDS) -> np.ndarray:
    """Held-out 10-fold accuracy (fraction) of each resample ``[B]``, for indices from :func:`draw_resamples`.

    Same protocol and tie-breaking as :func:`eval.metrics.protocol.kfold_accuracy` (identity indices give its
    number exactly). Vectorised: each pair's threshold bin is found once; per resample and cell a weighted
    histogram over bins and a cumulative sum give the counts below every threshold.
    """
    distances = np.asarray(distances, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    n = distances.size
    if issame.shape != (n,) or indices.ndim != 2 or indices.shape[1] != n:
        raise ValueError(f"distances {distances.shape}, issame {issame.shape} and indices {indices.shape} disagree")
    # Pair i is accepted at threshold j (distance < thresholds[j]) exactly when j >= first_bin[i]. Counts only
    # change at j = 0 and at the pairs' first bins, and argmax takes the first of equal values, so those
    # candidate thresholds alone give the same choice: bins are renumbered to candidate ranks.
    first_bin = np.searchsorted(thresholds, distances, side="right")
    candidates = np.union1d([0], first_bin[first_bin < thresholds.size])
    first_bin = np.searchsorted(candidates, first_bin, side="left")  # == candidates.size: never accepted
    n_thr = candidates.size
    sizes = fold_sizes(n, nfolds)
    fold_of = np.repeat(np.arange(nfolds), sizes)
    cell_of = 2 * fold_of + issame  # resampling keeps every position's cell, so this holds for all resamples
    n_cells = 2 * nfolds
    n_imp = np.bincount(fold_of[~issame], minlength=nfolds)
    out = np.empty(indices.shape[0])
    for start in range(0, indices.shape[0], _CHUNK):
        chunk = indices[start:start + _CHUNK]
        b = chunk.shape[0]
        slot = (np.arange(b)[:, None] * n_cells + cell_of[None, :]) * (n_thr + 1) + first_bin[chunk]
        counts = np.bincount(slot.ravel(), minlength=b * n_cells * (n_thr + 1)).reshape(b, nfolds, 2, n_thr + 1)
        below = np.cumsum(counts, axis=3)[..., :n_thr]  # [b, F, impostor/genuine, T]
        fold_correct = below[:, :, 1] + (n_imp[None, :, None] - below[:, :, 0])
        train_correct = fold_correct.sum(axis=1, keepdims=True) - fold_correct
        train_acc = train_correct / (n - sizes)[None, :, None]
        best = np.argmax(train_acc, axis=2)
        fold_acc = np.take_along_axis(fold_correct, best[..., None], axis=2)[..., 0] / sizes
        out[start:start + b] = fold_acc.mean(axis=1)
    return out


def fairness_arrays(accuracies: np.ndarray) -> dict[str, np.ndarray]:
    """Avg, STD (population) and SER of accuracies in % ``[..., groups]``; same conventions as
    :func:`eval.metrics.fairness.fairness_metrics` (SER inf when only the best group makes no error, NaN when none does)."""
    acc = np.asarray(accuracies, dtype=np.float64)
    worst, best = 100.0 - acc.min(axis=-1), 100.0 - acc.max(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ser = np.where(best > 0, worst / np.where(best > 0, best, 1.0), np.where(worst > 0, np.inf, np.nan))
    return {"avg": acc.mean(axis=-1), "std": acc.std(axis=-1), "ser": ser}


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (NaN if any sample is NaN)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1.0 - confidence) / 2.0
    samples = np.asarray(samples, dtype=np.float64)
    if np.isnan(samples).any():
        return (float("nan"), float("nan"))
    return (float(np.quantile(samples, tail, method="lower")), float(np.quantile(samples, 1.0 - tail, method="higher")))


def _two_sided_p(diff: np.ndarray) -> float:
    """Bootstrap p-value of "no difference": twice the smaller share of resamples on either side of zero,
    counting zero on both sides (a difference that is exactly 0 everywhere gives p = 1)."""
    diff = diff[~np.isnan(diff)]
    if diff.size == 0:
        return float("nan")
    return float(min(1.0, 2.0 * min(np.mean(diff <= 0), np.mean(diff >= 0))))


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval (and, for differences, a p-value)."""

    value: float
    low: float
    high: float
    p_value: float | None = None

    def covers_zero(self) -> bool:
        return not (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"value": self.value, "low": self.low, "high": self.high}
        if self.p_value is not None:
            out["p_value"] = self.p_value
        return out


@dataclass
class ModelSamples:
    """One model's per-group accuracies (%) on the original pairs and on every resample."""

    point: dict[str, float]  # group -> accuracy %
    samples: dict[str, np.ndarray]  # group -> [B] accuracy %
    plan: tuple = ()  # Bootstrap.key of the plan that drew the resamples

    def metric_point(self) -> dict[str, float]:
        groups = list(self.point)
        acc = np.array([self.point[g] for g in groups])
        return {**self.point, **{k: float(v) for k, v in fairness_arrays(acc).items()}}

    def metric_samples(self) -> dict[str, np.ndarray]:
        groups = list(self.point)
        acc = np.stack([self.samples[g] for g in groups], axis=1)
        return {**self.samples, **fairness_arrays(acc)}


class Bootstrap:
    """Seeded resampling plan for a set of groups' pairs, shared by every model evaluated on those pairs."""

    def __init__(self, issame: Mapping[str, np.ndarray], n_resamples: int = 1000, seed: int = 0,
                 confidence: float = 0.95, nfolds: int = 10) -> None:
        if not issame:
            raise ValueError("the bootstrap needs at least one group of pairs")
        self.issame = {g: np.asarray(v, dtype=bool) for g, v in issame.items()}
        self.n_resamples, self.seed, self.confidence, self.nfolds = n_resamples, seed, confidence, nfolds
        self.indices = {g: draw_resamples(v, n_resamples, _group_rng(seed, g), nfolds) for g, v in self.issame.items()}

    @property
    def key(self) -> tuple:
        """What makes two plans draw the same resamples (the labels aside)."""
        return (self.n_resamples, self.seed, self.nfolds)

    def describe(self) -> str:
        return (f"{self.confidence:.0%} percentile bootstrap intervals, {self.n_resamples} resamples of the pairs "
                f"within each fold, seed {self.seed}")

    def model(self, distances: Mapping[str, np.ndarray]) -> ModelSamples:
        """Resample one model's pair distances (squared Euclidean) of every group."""
        if set(distances) != set(self.issame):
            raise ValueError(f"distances for groups {sorted(distances)}, bootstrap planned for {sorted(self.issame)}")
        point, samples = {}, {}
        for group, issame in self.issame.items():
            d = np.asarray(distances[group], dtype=np.float64)
            if d.shape != issame.shape:
                raise ValueError(f"group {group!r}: {d.shape[0]} distances for {issame.size} pairs")
            fold_acc, _ = kfold_accuracy(d, issame, self.nfolds)
            point[group] = 100.0 * float(fold_acc.mean())
            samples[group] = 100.0 * bootstrap_accuracies(d, issame, self.indices[group], self.nfolds)
        return ModelSamples(point, samples, self.key)

    def intervals(self, model: ModelSamples) -> dict[str, Estimate]:
        """Per-group accuracy, Avg, STD and SER with their intervals."""
        point, samples = model.metric_point(), model.metric_samples()
        return {key: Estimate(point[key], *percentile_interval(samples[key], self.confidence)) for key in point}

    def compare(self, pairs: Sequence[tuple[ModelSamples, ModelSamples]]) -> dict[str, Estimate]:
        """Paired difference first - second of every metric, averaged over the given model pairs (one pair: a
        plain paired comparison; several: the pooled comparison), with interval and p-value."""
        if not pairs:
            raise ValueError("compare needs at least one pair of models")
        point_diffs = [_diff(a.metric_point(), b.metric_point()) for a, b in pairs]
        sample_diffs = [_diff(a.metric_samples(), b.metric_samples()) for a, b in pairs]
        out = {}
        for key in point_diffs[0]:
            value = float(np.mean([d[key] for d in point_diffs]))
            diff = np.mean([d[key] for d in sample_diffs], axis=0)
            out[key] = Estimate(value, *percentile_interval(diff, self.confidence), p_value=_two_sided_p(diff))
        return out


def _diff(a: Mapping, b: Mapping):
    """a - b per key; equal values (also equal infinities) give exactly 0."""
    out = {}
    for key in a:
        x, y = np.asarray(a[key], dtype=np.float64), np.asarray(b[key], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            out[key] = np.where(x == y, 0.0, x - y)
    return out


def bootstrap_fairness(pairs: Pairs, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
                       nfolds: int = 10) -> dict[str, Estimate]:
    """Per-group accuracy (%), Avg, STD and SER of one model with bootstrap intervals."""
    plan = Bootstrap({g: issame for g, (_, issame) in pairs.items()}, n_resamples, seed, confidence, nfolds)
    return plan.intervals(plan.model({g: d for g, (d, _) in pairs.items()}))


def paired_comparison(pairs_a: Pairs, pairs_b: Pairs, n_resamples: int = 1000, seed: int = 0,
                      confidence: float = 0.95, nfolds: int = 10) -> dict[str, Estimate]:
    """Model a - model b on the same pairs: differences of accuracies, Avg, STD, SER with paired intervals."""
    if set(pairs_a) != set(pairs_b):
        raise ValueError(f"the models were evaluated on different groups: {sorted(pairs_a)} vs {sorted(pairs_b)}")
    for group in pairs_a:
        if not np.array_equal(np.asarray(pairs_a[group][1], bool), np.asarray(pairs_b[group][1], bool)):
            raise ValueError(f"group {group!r}: the two models were not evaluated on the same pairs")
    plan = Bootstrap({g: issame for g, (_, issame) in pairs_a.items()}, n_resamples, seed, confidence, nfolds)
    a = plan.model({g: d for g, (d, _) in pairs_a.items()})
    b = plan.model({g: d for g, (d, _) in pairs_b.items()})
    return plan.compare([(a, b)])
