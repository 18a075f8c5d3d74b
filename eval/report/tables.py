"""Results tables (text, Markdown, CSV, JSON) with bootstrap intervals, operating-point fairness, and figures."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from config.config import ETHNICITIES, KD_LABELS
from eval.metrics.fairness import fairness_metrics
from eval.report.figures import (
    plot_accuracy_heatmaps, plot_det_families, plot_operating_points, plot_teacher_set_comparison
)
from eval.report.stats import (
    ReportStats, StatsSettings, comparison_summary, comparisons_json, load_pairs, operating_point_extras,
    operating_point_markdown, operating_points_by_target, report_stats, save_pairs
)
from utils.core.io import atomic_write_text
from utils.core.numerics import json_safe

COLUMNS = (*ETHNICITIES, "Avg", "STD", "SER")


@dataclass
class ResultRow:
    """One evaluated model: accuracies in % per ethnicity, free-form scalar extras, optional RFW pairs."""

    name: str
    accuracies: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)
    # The RFW pairs (group -> squared distances, issame) and what eval/report/stats.py derives from them.
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # COLUMNS key -> (low, high)
    operating_points: list[Any] = field(default_factory=list, repr=False)
    samples: Any = field(default=None, repr=False)  # bootstrap.ModelSamples
    benchmarks: dict[str, float] = field(default_factory=dict)  # accuracy in % of each val_targets .bin

    def metrics(self) -> dict[str, float]:
        return fairness_metrics(self.accuracies)

    @property
    def degenerate(self) -> str:
        """Why this model's evaluation measures nothing (constant or non-finite embeddings), or ""."""
        return str(self.extra.get("degenerate") or "")

    def cells(self) -> list[str]:
        """The formatted table cells after the name, in ``COLUMNS`` order ("-" for a missing ethnicity).
        A degenerate evaluation shows no STD/SER: equal chance accuracies are not fairness."""
        summary = self.metrics()
        cells = [self._cell(eth, self.accuracies[eth]) if eth in self.accuracies else "-" for eth in ETHNICITIES]
        if self.degenerate:
            return cells + [self._cell("avg", summary["avg"]), "degenerate", "degenerate"]
        return cells + [self._cell("avg", summary["avg"]), self._cell("std", summary["std"]),
                        self._cell("ser", summary["ser"], _format_ser)]

    def _cell(self, key: str, value: float, fmt: Any = None) -> str:
        fmt = fmt or (lambda v: f"{v:.2f}")
        if key not in self.intervals:
            return fmt(value)
        low, high = self.intervals[key]
        return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def _format_ser(value: float) -> str:
    return "nan" if math.isnan(value) else "inf" if math.isinf(value) else f"{value:.3f}"


_INTERVAL_KEYS = (*ETHNICITIES, "avg", "std", "ser")


def benchmark_names(rows: Sequence[ResultRow]) -> list[str]:
    """The val_targets benchmarks of any row, in first-seen order: the extra columns after SER."""
    return list(dict.fromkeys(name for row in rows for name in row.benchmarks))


def _benchmark_cells(row: ResultRow, names: Sequence[str]) -> list[str]:
    return [f"{row.benchmarks[name]:.2f}" if name in row.benchmarks else "-" for name in names]


def results_table(rows: Sequence[ResultRow]) -> str:
    """Aligned plain-text table: one row per model; accuracies, Avg and STD in %, SER as a ratio, then the
    accuracy (%) of every val_targets benchmark."""
    names = benchmark_names(rows)
    header = ["Model", *COLUMNS, *names]
    body = [[row.name, *row.cells(), *_benchmark_cells(row, names)] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])])

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body), *_degenerate_notes(rows)])


def _degenerate_notes(rows: Sequence[ResultRow]) -> list[str]:
    return [f"DEGENERATE evaluation of {row.name} ({row.degenerate}): its accuracies are chance, not fairness"
            for row in rows if row.degenerate]


def _markdown_table(rows: Sequence[ResultRow]) -> str:
    names = benchmark_names(rows)
    columns = [*COLUMNS, *names]
    lines = ["| Model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {row.name} | " + " | ".join(row.cells() + _benchmark_cells(row, names)) + " |" for row in rows]
    return "\n".join(lines + [f"\n{note}" for note in _degenerate_notes(rows)])


NOT_MEASURABLE = "n/m"


def _tar_keys(rows: Sequence[ResultRow]) -> list[str]:
    """``tar@far=...`` keys of the RFW ethnicities present in the rows' extras."""
    return sorted({key.split("/", 1)[1] for row in rows for key in row.extra
                   if "/tar@far=" in key and key.split("/", 1)[0] in ETHNICITIES},
                  key=lambda key: -float(key.split("=", 1)[1]))


def _tar_table(rows: Sequence[ResultRow]) -> str:
    """TAR (%) at each FAR per ethnicity; a FAR below 1 / (number of impostor pairs) is not measurable."""
    keys = _tar_keys(rows)
    if not keys:
        return ""
    columns = [f"{eth} {key.upper()}" for key in keys for eth in ETHNICITIES]
    lines = ["| Model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = []
        for key in keys:
            for eth in ETHNICITIES:
                value = row.extra.get(f"{eth}/{key}", "")
                cells.append(NOT_MEASURABLE if value is None else "-" if value == "" else f"{100 * value:.2f}")
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return ("TAR (%) at fixed FAR. n/m: not measurable, the FAR is below 1 / (number of impostor pairs), "
            "so it could only count zero false accepts.\n\n" + "\n".join(lines))


def _csv_text(rows: Sequence[ResultRow]) -> str:
    extras = [{**row.extra, **operating_point_extras(row.operating_points)} for row in rows]
    extra_keys = sorted({key for extra in extras for key in extra})
    bounds = [f"{key}_{end}" for key in _INTERVAL_KEYS for end in ("low", "high")] if any(r.intervals for r in rows) else []
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = benchmark_names(rows)
    writer.writerow(["model", *ETHNICITIES, "avg", "std", "ser", *names, *bounds, *extra_keys])
    for row, extra in zip(rows, extras):
        summary = row.metrics()
        writer.writerow([
            row.name,
            *(row.accuracies.get(eth, "") for eth in ETHNICITIES),
            summary["avg"], summary["std"], summary["ser"],
            *(row.benchmarks.get(name, "") for name in names),
            *(row.intervals.get(key, ("", ""))[end] for key in _INTERVAL_KEYS for end in (0, 1) if bounds),
            *(_csv_extra(extra, key) for key in extra_keys),
        ])
    return buffer.getvalue()


def _csv_extra(extra: Mapping[str, Any], key: str) -> Any:
    value = extra.get(key, "")
    return "not measurable" if value is None and "/tar@far=" in key else value


def _json_data(rows: Sequence[ResultRow], method: str | None = None) -> dict[str, Any]:
    """The JSON report, non-finite values still in it: write_report makes the whole of it standard JSON."""
    return {
        "units": "accuracies, avg, std and benchmarks in %; ser = (100 - min acc) / (100 - max acc); "
                 "operating-point rates as fractions; tar@far = null where the FAR is below 1 / (number of "
                 "impostor pairs) (not measurable)",
        "interval_method": method,
        "rows": [
            {"name": row.name, "accuracies": row.accuracies, **row.metrics(), "benchmarks": row.benchmarks,
             "intervals": row.intervals, "operating_points": [p.summary() for p in row.operating_points],
             "extra": row.extra}
            for row in rows
        ],
    }


def read_report_rows(path: str | Path) -> list[ResultRow]:
    """The rows of a ``<stem>.json`` report, with their RFW pairs when ``<stem>_pairs.npz`` is beside it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        rows = [ResultRow(row["name"], row["accuracies"], row.get("extra", {}), benchmarks=row.get("benchmarks", {}))
                for row in data["rows"]]
        pairs_path = path.with_name(path.stem + "_pairs.npz")
        if pairs_path.is_file():
            load_pairs(rows, pairs_path)
        return rows
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read report rows from {path}: {exc}") from exc


def _family(row: ResultRow) -> str:
    """Model family of a row: stage and teacher set when known (the report's runs), else the row itself."""
    stage, teacher_set = row.extra.get("stage"), row.extra.get("teacher_set")
    if stage is None:
        return row.name
    teachers = {"specialized": "specialized teachers", "baseline": "balanced teachers"}.get(teacher_set, "teachers")
    return {"teacher": teachers, "adaptor": f"multi-teacher spaces of {teachers}",
            "student": f"students of {teachers}"}.get(stage, f"{stage}s of {teachers}")


def _accuracy_panels(rows: Sequence[ResultRow]) -> dict[str, dict[str, dict[str, float]]]:
    panels: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:  # within a family panel the member, adaptor or adaptor + KD kind names the row
        extra, label = row.extra, row.name
        if extra.get("stage") == "teacher" and "member" in extra:
            label = extra["member"]
        elif extra.get("stage") == "adaptor" and "adaptor" in extra:
            label = extra["adaptor"]
        elif extra.get("stage") == "student" and {"adaptor", "kd"} <= set(extra):
            label = f"{extra['adaptor']} {KD_LABELS.get(extra['kd'], extra['kd'])}"
        panels.setdefault(_family(row), {})[str(label)] = dict(row.accuracies)
    return panels


def _det_families(rows: Sequence[ResultRow]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    members: dict[str, list[ResultRow]] = {}
    for row in rows:
        if row.pairs:
            members.setdefault(_family(row), []).append(row)
    families = {}
    for family, group_rows in members.items():
        label = f"{family}, {len(group_rows)} models" if len(group_rows) > 1 else family
        families[label] = {g: (np.concatenate([r.pairs[g][0] for r in group_rows]),
                               np.concatenate([r.pairs[g][1] for r in group_rows])) for g in group_rows[0].pairs}
    return families


def _operating_point_tables(rows: Sequence[ResultRow]) -> dict[float, tuple[list[str], list[str], np.ndarray, np.ndarray]]:
    tables = {}
    for target, points in operating_points_by_target(rows).items():
        groups = list(points[0][1].fmr)
        tables[target] = ([name for name, _ in points], groups,
                          np.array([[p.fmr[g] for g in groups] for _, p in points]),
                          np.array([[p.fnmr[g] for g in groups] for _, p in points]))
    return tables


def _comparison_figure_data(comparisons: Sequence[Any]) -> tuple[list, list]:
    def triple(row: ResultRow) -> dict[str, tuple[float, float, float]]:
        metrics = row.metrics()
        return {key: (metrics[key], *row.intervals[key]) for key in ("avg", "std", "ser")}

    pairs = [(c.label, triple(c.rows[0]), triple(c.rows[1])) for c in comparisons if c.rows is not None]
    differences = [(c.label.split(" (")[0], {k: (e.value, e.low, e.high) for k, e in c.estimates.items()})
                   for c in comparisons]
    return pairs, differences


def write_report(rows: Sequence[ResultRow], out_dir: str | Path, stem: str = "results",
                 settings: StatsSettings | None = None, stats: ReportStats | None = None) -> dict[str, Path]:
    """Write ``<stem>.md/.csv/.json`` and the figures; returns the paths.

    Rows that carry their RFW pairs get bootstrap intervals, operating-point rates (``<stem>_operating_point.png``),
    DET curves (``<stem>_det.png``) and, when students of both teacher sets are present, the paired comparison
    (``<stem>_comparison.png``); the pairs are kept in ``<stem>_pairs.npz`` so a reused report recomputes them.
    ``stats``: :func:`report_stats` of these rows and ``settings``, when the caller has computed them already.
    """
    if not rows:
        raise ValueError("write_report needs at least one result row")
    settings = settings or StatsSettings()
    out_dir = Path(out_dir)
    stats = stats or report_stats(rows, settings)
    plan, comparisons = stats.plan, stats.comparisons
    paths = {
        "md": out_dir / f"{stem}.md",
        "csv": out_dir / f"{stem}.csv",
        "json": out_dir / f"{stem}.json",
        "accuracy_png": out_dir / f"{stem}_accuracy.png",
    }
    caption = "RFW verification accuracy (%), 10-fold, flip TTA. STD: population std; SER: max error / min error."
    if plan is not None:
        caption += f" In brackets: {plan.describe()}."
    if benchmark_names(rows):
        caption += " Columns after SER: accuracy (%) on the val_targets benchmarks (10-fold, flip TTA)."
    sections = [caption, _markdown_table(rows), _tar_table(rows)]
    with_pairs = any(row.pairs for row in rows)
    if with_pairs:
        sections += [operating_point_markdown(rows), comparison_summary(comparisons, plan)]
    atomic_write_text(paths["md"], "\n\n".join(s for s in sections if s) + "\n")
    atomic_write_text(paths["csv"], _csv_text(rows))
    data = _json_data(rows, plan.describe() if plan is not None else None)
    if comparisons:
        data["teacher_set_comparison"] = comparisons_json(comparisons, plan)
    atomic_write_text(paths["json"], json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    plot_accuracy_heatmaps(_accuracy_panels(rows), paths["accuracy_png"])
    if with_pairs:
        paths["pairs"] = out_dir / f"{stem}_pairs.npz"
        save_pairs(rows, paths["pairs"])
        paths["det_png"] = out_dir / f"{stem}_det.png"
        plot_det_families(_det_families(rows), paths["det_png"])
        tables = _operating_point_tables(rows)
        if tables:
            paths["operating_point_png"] = out_dir / f"{stem}_operating_point.png"
            plot_operating_points(tables, paths["operating_point_png"])
    if comparisons:
        paths["comparison_png"] = out_dir / f"{stem}_comparison.png"
        plot_teacher_set_comparison(*_comparison_figure_data(comparisons), paths["comparison_png"], settings.confidence)
    return paths


def summary_line(rows: Sequence[ResultRow], settings: StatsSettings | None = None,
                 stats: ReportStats | None = None) -> str:
    """Students of specialized minus students of balanced teachers per adaptor and KD kind and pooled, with
    paired bootstrap intervals over the RFW pairs (eval/report/stats.py). Without ``stats`` (see
    :func:`write_report`) it computes them, which also gives rows read back from a report their intervals."""
    stats = stats or report_stats(rows, settings or StatsSettings())
    summary = comparison_summary(stats.comparisons, stats.plan)
    # A degenerate evaluation (constant or non-finite embeddings) measures nothing: it is left out, by name.
    degenerate = [row.name for row in rows if row.extra.get("stage") == "student" and row.degenerate]
    return summary + (f"\nLeft out as degenerate: {', '.join(degenerate)}." if degenerate else "")
