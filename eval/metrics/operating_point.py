"""Fairness at one operating point shared by all groups, as deployed systems run.

Following the demographic-differential reports of NIST FRVT (Grother et al., NISTIR 8280, 2019) and the
terms of ISO/IEC 19795-10, one global threshold is set on the pooled impostor scores of all groups for a
target false match rate (FMR); each group's FMR and false non-match rate (FNMR) are then read at that
threshold, with the max/min ratio of each across groups.

The aggregate measure is the Fairness Discrepancy Rate of de Freitas Pereira & Marcel, "Fairness in
Biometrics: a figure of merit to assess biometric verification systems", IEEE T-BIOM 4(1), 2022
(doi:10.1109/TBIOM.2021.3102862, arXiv:2011.02395):

    A(t) = max_ij |FMR_i(t) - FMR_j(t)|,  B(t) = max_ij |FNMR_i(t) - FNMR_j(t)|,
    FDR(t) = 1 - (alpha * A(t) + (1 - alpha) * B(t)),

1 = perfectly fair, 0 = one group always falsely matched and another never (alpha weighs false matches).

Scores are squared Euclidean distances; a pair is a match when ``distance < threshold`` (as in the 10-fold
protocol). The threshold is the k-th smallest pooled impostor distance with ``k = floor(target * N_imp)``, so
the pooled FMR is at most the target (less when distances tie). A target is measurable only when
``target * N_imp >= 1``: with 600 pooled impostors (the demo) FMR=1e-3 cannot be set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

DEFAULT_FMR_TARGETS = (1e-3, 1e-2)


@dataclass(frozen=True)
class OperatingPoint:
    """Per-group error rates (fractions) at one global threshold."""

    target_fmr: float
    threshold: float
    pooled_fmr: float
    fmr: dict[str, float]
    fnmr: dict[str, float]
    impostors: dict[str, int]
    genuines: dict[str, int]
    alpha: float = 0.5

    @property
    def fmr_ratio(self) -> float:
        return max_min_ratio(self.fmr.values())

    @property
    def fnmr_ratio(self) -> float:
        return max_min_ratio(self.fnmr.values())

    @property
    def fdr(self) -> float:
        return fairness_discrepancy_rate(self.fmr.values(), self.fnmr.values(), self.alpha)

    def summary(self) -> dict[str, object]:
        """JSON-friendly record (rates as fractions)."""
        return {"target_fmr": self.target_fmr, "threshold": self.threshold, "pooled_fmr": self.pooled_fmr,
                "fmr": self.fmr, "fnmr": self.fnmr, "fmr_max_min_ratio": self.fmr_ratio,
                "fnmr_max_min_ratio": self.fnmr_ratio, "fdr": self.fdr, "fdr_alpha": self.alpha,
                "impostor_pairs": self.impostors, "genuine_pairs": self.genuines}


def max_min_ratio(values: Sequence[float] | object) -> float:
    """Largest over smallest rate: inf when some group has rate 0 and another not, NaN when all are 0."""
    values = [float(v) for v in values]  # type: ignore[union-attr]
    high, low = max(values), min(values)
    if low > 0:
        return high / low
    return math.inf if high > 0 else math.nan


def fairness_discrepancy_rate(fmr: Sequence[float] | object, fnmr: Sequence[float] | object, alpha: float = 0.5) -> float:
    """FDR = 1 - (alpha * max FMR gap + (1 - alpha) * max FNMR gap), rates as fractions (de Freitas Pereira &
    Marcel, 2022)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"FDR alpha must be in [0, 1], got {alpha}")
    fmr, fnmr = [float(v) for v in fmr], [float(v) for v in fnmr]  # type: ignore[union-attr]
    for rate in fmr + fnmr:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"FDR needs error rates as fractions in [0, 1], got {rate}")
    return 1.0 - (alpha * (max(fmr) - min(fmr)) + (1.0 - alpha) * (max(fnmr) - min(fnmr)))


def global_threshold(impostor_distances: np.ndarray, target_fmr: float) -> float:
    """The threshold whose pooled FMR (share of impostors with distance < threshold) is the largest not above
    ``target_fmr``."""
    imp = np.sort(np.asarray(impostor_distances, dtype=np.float64))
    if imp.size == 0:
        raise ValueError("a global threshold needs impostor pairs")
    if not 0.0 < target_fmr < 1.0:
        raise ValueError(f"target FMR must be in (0, 1), got {target_fmr}")
    return float(imp[int(math.floor(target_fmr * imp.size + 1e-9))])


def operating_point(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], target_fmr: float, *,
                    alpha: float = 0.5) -> OperatingPoint | None:
    """Per-group FMR/FNMR at the global threshold for ``target_fmr``; None when the pooled impostor count cannot
    measure that FMR (it would allow less than one false match)."""
    groups = {g: (np.asarray(d, dtype=np.float64), np.asarray(s, dtype=bool)) for g, (d, s) in pairs.items()}
    for group, (d, s) in groups.items():
        if s.all() or not s.any():
            raise ValueError(f"group {group!r} needs both genuine and impostor pairs for FMR and FNMR")
    pooled = np.concatenate([d[~s] for d, s in groups.values()])
    if target_fmr * pooled.size < 1:
        return None
    threshold = global_threshold(pooled, target_fmr)
    return OperatingPoint(
        target_fmr=target_fmr,
        threshold=threshold,
        pooled_fmr=float(np.mean(pooled < threshold)),
        fmr={g: float(np.mean(d[~s] < threshold)) for g, (d, s) in groups.items()},
        fnmr={g: float(np.mean(d[s] >= threshold)) for g, (d, s) in groups.items()},
        impostors={g: int((~s).sum()) for g, (_, s) in groups.items()},
        genuines={g: int(s.sum()) for g, (_, s) in groups.items()},
        alpha=alpha,
    )


def operating_points(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
                     targets: Sequence[float] = DEFAULT_FMR_TARGETS, alpha: float = 0.5) -> list[OperatingPoint]:
    """The measurable operating points among ``targets``."""
    points = [operating_point(pairs, target, alpha=alpha) for target in targets]
    return [point for point in points if point is not None]
