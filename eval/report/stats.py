"""Uncertainty and operating-point fairness for report rows: intervals, teacher-set comparison, FMR/FNMR tables.

Rows carry their RFW pairs (``ResultRow.pairs``: group -> (squared distances, issame)); every row must have
been evaluated on the same pairs, so one seeded resampling plan serves them all and differences between rows
are paired. The pure statistics live in :mod:`eval.metrics.bootstrap` and :mod:`eval.metrics.operating_point`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from config.config import KD_LABELS
from eval.metrics.bootstrap import MIN_CELL_PAIRS, Bootstrap, Estimate, smallest_cell
from eval.metrics.operating_point import DEFAULT_FMR_TARGETS, OperatingPoint, operating_points
from utils.core.io import atomic_path


@dataclass(frozen=True)
class StatsSettings:
    """How intervals and operating points are computed (config keys bootstrap_*, confidence, fmr_targets)."""

    n_resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95
    fmr_targets: tuple[float, ...] = DEFAULT_FMR_TARGETS
    fdr_alpha: float = 0.5


@dataclass
class Comparison:
    """Students of specialized minus students of balanced teachers (paired over the same RFW pairs)."""

    label: str
    n_pairs: int
    estimates: dict[str, Estimate]
    rows: tuple[Any, Any] | None = None  # (specialized, balanced) student rows; None when pooled


def _issame(rows: Sequence[Any]) -> dict[str, np.ndarray] | None:
    with_pairs = [row for row in rows if row.pairs]
    if not with_pairs:
        return None
    first = with_pairs[0]
    reference = {g: np.asarray(s, dtype=bool) for g, (_, s) in first.pairs.items()}
    for row in with_pairs[1:]:
        if set(row.pairs) != set(reference) or not all(
                np.array_equal(row.pairs[g][1], reference[g]) for g in reference):
            raise ValueError(f"rows {first.name!r} and {row.name!r} were not evaluated on the same RFW pairs; "
                             "intervals and comparisons need one pair set")
    return reference


def bootstrap_plan(rows: Sequence[Any], settings: StatsSettings) -> Bootstrap | None:
    """The shared resampling plan of these rows (None when no row carries pairs, or too few to resample)."""
    issame = _issame(rows)
    if issame is None or min(smallest_cell(labels) for labels in issame.values()) < MIN_CELL_PAIRS:
        return None
    return Bootstrap(issame, settings.n_resamples, settings.seed, settings.confidence)


def annotate(rows: Sequence[Any], settings: StatsSettings) -> Bootstrap | None:
    """Set every row's operating points from its pairs, and its ``samples`` and ``intervals`` when the pairs can
    be resampled; returns the resampling plan (None when they cannot)."""
    plan = bootstrap_plan(rows, settings)
    for row in rows:
        if not row.pairs:
            continue
        row.operating_points = operating_points(row.pairs, settings.fmr_targets, settings.fdr_alpha)
        if plan is None:
            continue
        if row.samples is None or row.samples.plan != plan.key:
            row.samples = plan.model({g: d for g, (d, _) in row.pairs.items()})
        row.intervals = {key: (e.low, e.high) for key, e in plan.intervals(row.samples).items()}
    return plan


@dataclass
class ReportStats:
    """What a report derives from its rows' pairs: the resampling plan (None when the pairs cannot be resampled)
    and the teacher-set comparisons."""

    plan: Bootstrap | None
    comparisons: list[Comparison]


def report_stats(rows: Sequence[Any], settings: StatsSettings) -> ReportStats:
    """:func:`annotate` the rows and compare the teacher sets, once for the table, the files and the summary."""
    plan = annotate(rows, settings)
    return ReportStats(plan, teacher_set_comparisons(rows, plan) if plan is not None else [])


def teacher_set_comparisons(rows: Sequence[Any], plan: Bootstrap) -> list[Comparison]:
    """Per adaptor and KD kind, then pooled: specialized-teacher students minus balanced-teacher students."""
    students: dict[tuple[str, str, str], Any] = {}
    for row in rows:
        extra = row.extra
        usable = row.samples is not None and not row.degenerate
        if extra.get("stage") == "student" and usable and {"teacher_set", "adaptor", "kd"} <= set(extra):
            students[(extra["teacher_set"], extra["adaptor"], extra["kd"])] = row
    # In the rows' order (the report's paper order), each adaptor and KD kind once.
    matched = list(dict.fromkeys((a, k) for (_, a, k) in students if ("specialized", a, k) in students
                                 and ("baseline", a, k) in students))
    pairs = {(a, k): (students[("specialized", a, k)].samples, students[("baseline", a, k)].samples)
             for a, k in matched}
    out = [Comparison(f"{a} {KD_LABELS.get(k, k)}", 1, plan.compare([pairs[(a, k)]]),
                      (students[("specialized", a, k)], students[("baseline", a, k)])) for a, k in matched]
    if len(matched) > 1:
        out.append(Comparison(f"pooled ({len(matched)} students per teacher set)", len(matched),
                              plan.compare(list(pairs.values()))))
    return out


def _verdict(estimate: Estimate, lower_is_better: bool) -> str:
    if estimate.covers_zero():
        return "no significant difference"
    better = estimate.value < 0 if lower_is_better else estimate.value > 0
    return "specialized better" if better else "specialized worse"


def describe_difference(key: str, estimate: Estimate) -> str:
    digits = 3 if key == "ser" else 2
    name = {"avg": "Avg", "std": "STD", "ser": "SER"}.get(key, key)
    return (f"{name} {estimate.value:+.{digits}f} [{estimate.low:+.{digits}f}, {estimate.high:+.{digits}f}] "
            f"p={estimate.p_value:.3f} ({_verdict(estimate, key in ('std', 'ser'))})")


def comparison_summary(comparisons: Sequence[Comparison], plan: Bootstrap | None) -> str:
    """The report's verdict: differences with intervals, "no significant difference" where they cover zero."""
    if plan is None or not comparisons:
        return ("Summary: students of both teacher sets, evaluated on the same RFW pairs, are needed to compare them "
                f"(with at least {MIN_CELL_PAIRS} genuine and {MIN_CELL_PAIRS} impostor pairs in every fold).")
    lines = [f"Summary: students of specialized minus students of balanced teachers ({plan.describe()}; "
             "a difference is significant when its interval excludes 0):"]
    for comparison in comparisons:
        parts = "; ".join(describe_difference(k, comparison.estimates[k]) for k in ("avg", "std", "ser"))
        lines.append(f"  {comparison.label}: {parts}")
    return "\n".join(lines)


def comparisons_json(comparisons: Sequence[Comparison], plan: Bootstrap) -> dict[str, Any]:
    return {"method": plan.describe(), "difference": "specialized - balanced",
            "comparisons": [{"label": c.label, "students_per_set": c.n_pairs,
                             **{k: e.as_dict() for k, e in c.estimates.items()}} for c in comparisons]}


def operating_points_by_target(rows: Sequence[Any]) -> dict[float, list[tuple[str, OperatingPoint]]]:
    """The rows' operating points grouped by target FMR, targets ascending: ``{target: [(row name, point)]}``."""
    targets = sorted({p.target_fmr for row in rows for p in row.operating_points})
    return {target: [(row.name, p) for row in rows for p in row.operating_points if p.target_fmr == target]
            for target in targets}


def operating_point_markdown(rows: Sequence[Any]) -> str:
    """One table per target FMR: per-group FMR and FNMR (%) at each model's global threshold, ratios, FDR."""
    blocks = []
    for target, points in operating_points_by_target(rows).items():
        groups = list(points[0][1].fmr)
        header = ("| Model | threshold | pooled FMR | " + " | ".join(f"FMR {g}" for g in groups) + " | FMR max/min | "
                  + " | ".join(f"FNMR {g}" for g in groups) + " | FNMR max/min | FDR |")
        lines = [f"Global threshold at pooled FMR {target:g} (FMR, FNMR in %; FDR of de Freitas Pereira & "
                 f"Marcel 2022, alpha {points[0][1].alpha:g}):", "", header, "|---|" + "---:|" * (2 * len(groups) + 5)]
        for name, p in points:
            cells = [f"{p.threshold:.3f}", f"{100 * p.pooled_fmr:.2f}", *(f"{100 * p.fmr[g]:.2f}" for g in groups),
                     f"{p.fmr_ratio:.2f}",
                     *(f"{100 * p.fnmr[g]:.2f}" for g in groups), f"{p.fnmr_ratio:.2f}", f"{p.fdr:.4f}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def operating_point_extras(points: Sequence[OperatingPoint]) -> dict[str, float]:
    """Flat columns for CSV: ``fmr=<t>/threshold``, ``.../<group>/fmr``, ratios and FDR."""
    out: dict[str, float] = {}
    for p in points:
        prefix = f"fmr={p.target_fmr:g}"
        out[f"{prefix}/threshold"] = p.threshold
        for g in p.fmr:
            out[f"{prefix}/{g}/fmr"] = p.fmr[g]
            out[f"{prefix}/{g}/fnmr"] = p.fnmr[g]
        out[f"{prefix}/fmr_max_min"] = p.fmr_ratio
        out[f"{prefix}/fnmr_max_min"] = p.fnmr_ratio
        out[f"{prefix}/fdr"] = p.fdr
    return out


def save_pairs(rows: Sequence[Any], path: Any) -> None:
    """Every row's pair distances (and the shared labels) in one ``.npz``, so a reused report keeps its statistics."""
    arrays = {}
    for i, row in enumerate(rows):
        for group, (distances, issame) in row.pairs.items():
            arrays[f"{i}/{group}/distances"] = np.asarray(distances, dtype=np.float64)
            arrays[f"{i}/{group}/issame"] = np.asarray(issame, dtype=bool)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


def load_pairs(rows: Sequence[Any], path: Any) -> None:
    """Give rows read back from JSON their pairs from :func:`save_pairs` (row order is the file's)."""
    with np.load(path) as data:
        for key in data.files:
            index, group, kind = key.split("/")
            row = rows[int(index)]
            distances, issame = row.pairs.get(group, (None, None))
            row.pairs[group] = (data[key], issame) if kind == "distances" else (distances, data[key])
