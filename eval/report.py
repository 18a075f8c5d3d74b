"""Results tables (text, Markdown, CSV, JSON) and plots (accuracy bars, ROC curves) for RFW evaluations."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from config.config import ETHNICITIES
from eval.fairness import fairness_metrics
from utils.io import atomic_path, atomic_write_text

COLUMNS = (*ETHNICITIES, "Avg", "STD", "SER")
# ROC curves: (false accept rates, true accept rates) per ethnicity.
Curves = Mapping[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class ResultRow:
    """One evaluated model: accuracies in % per ethnicity, free-form scalar extras, optional ROC curves."""

    name: str
    accuracies: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    benchmarks: dict[str, float] = field(default_factory=dict)  # accuracy in % of each val_targets .bin

    def metrics(self) -> dict[str, float]:
        return fairness_metrics(self.accuracies)

    def cells(self) -> list[str]:
        """The formatted table cells after the name, in ``COLUMNS`` order ("-" for a missing ethnicity)."""
        summary = self.metrics()
        cells = [f"{self.accuracies[eth]:.2f}" if eth in self.accuracies else "-" for eth in ETHNICITIES]
        return cells + [f"{summary['avg']:.2f}", f"{summary['std']:.2f}", _format_ser(summary["ser"])]


def _format_ser(value: float) -> str:
    return "nan" if math.isnan(value) else "inf" if math.isinf(value) else f"{value:.3f}"


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
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body)])


def _markdown_table(rows: Sequence[ResultRow]) -> str:
    names = benchmark_names(rows)
    columns = [*COLUMNS, *names]
    lines = ["| Model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {row.name} | " + " | ".join(row.cells() + _benchmark_cells(row, names)) + " |" for row in rows]
    return "\n".join(lines)


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
    return ("\n\nTAR (%) at fixed FAR. n/m: not measurable, the FAR is below 1 / (number of impostor pairs), "
            "so it could only count zero false accepts.\n\n" + "\n".join(lines))


def _csv_text(rows: Sequence[ResultRow]) -> str:
    extra_keys = sorted({key for row in rows for key in row.extra})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = benchmark_names(rows)
    writer.writerow(["model", *ETHNICITIES, "avg", "std", "ser", *names, *extra_keys])
    for row in rows:
        summary = row.metrics()
        writer.writerow([
            row.name,
            *(row.accuracies.get(eth, "") for eth in ETHNICITIES),
            summary["avg"], summary["std"], summary["ser"],
            *(row.benchmarks.get(name, "") for name in names),
            *(_csv_extra(row, key) for key in extra_keys),
        ])
    return buffer.getvalue()


def _csv_extra(row: ResultRow, key: str) -> Any:
    value = row.extra.get(key, "")
    return "not measurable" if value is None and "/tar@far=" in key else value


def _json_data(rows: Sequence[ResultRow]) -> dict[str, Any]:
    return {
        "units": "accuracies, avg, std and benchmarks in %; ser = (100 - min acc) / (100 - max acc); "
                 "tar@far = null where the FAR is below 1 / (number of impostor pairs) (not measurable)",
        "rows": [
            {"name": row.name, "accuracies": row.accuracies, **row.metrics(), "benchmarks": row.benchmarks,
             "extra": row.extra}
            for row in rows
        ],
    }


def read_report_rows(path: str | Path) -> list[ResultRow]:
    """The rows of a ``<stem>.json`` report (without ROC curves, which the JSON does not keep)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return [ResultRow(row["name"], row["accuracies"], row.get("extra", {}), benchmarks=row.get("benchmarks", {}))
                for row in data["rows"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read report rows from {path}: {exc}") from exc


def _save_figure(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_accuracy(rows: Sequence[ResultRow], path: Path) -> None:
    """Grouped bars: one group per ethnicity (plus Avg), one bar per model."""
    groups = [eth for eth in ETHNICITIES if any(eth in row.accuracies for row in rows)] + ["Avg"]
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) + 0.25 * len(groups) * len(rows)), 4.5))
    ax = fig.add_subplot()
    bar = 0.8 / max(len(rows), 1)
    x = np.arange(len(groups))
    values = []
    for i, row in enumerate(rows):
        heights = [row.accuracies.get(g, np.nan) if g != "Avg" else row.metrics()["avg"] for g in groups]
        values += heights
        ax.bar(x - 0.4 + bar * (i + 0.5), heights, width=bar, label=row.name)
    finite = [v for v in values if np.isfinite(v)]
    low = max(0.0, min(finite) - 5.0) if finite else 0.0
    ax.set_ylim(low, 100.0)
    ax.set_xticks(x, groups)
    ax.set_ylabel("verification accuracy (%)")
    ax.set_title("RFW accuracy per ethnicity")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save_figure(fig, path)


def plot_roc(roc: Mapping[str, Curves], path: Path) -> None:
    """One ROC subplot per ethnicity (log FAR axis), one curve per model."""
    ethnicities = [eth for eth in ETHNICITIES if any(eth in curves for curves in roc.values())]
    fig = Figure(figsize=(4.0 * len(ethnicities), 4.0))
    axes = fig.subplots(1, len(ethnicities), squeeze=False)[0]
    for ax, eth in zip(axes, ethnicities):
        floor = 0.0
        for name, curves in roc.items():
            if eth in curves:
                fpr, tpr = curves[eth]
                positive = np.asarray(fpr) > 0  # FAR = 0 has no place on a log axis
                # FARs are multiples of 1 / (number of impostor pairs): the smallest positive one is that floor.
                floor = max(floor, float(np.asarray(fpr)[positive].min())) if positive.any() else floor
                ax.plot(np.asarray(fpr)[positive], np.asarray(tpr)[positive], label=name)
        if floor > 1e-4:
            ax.axvspan(1e-4, floor, color="0.85", zorder=0)
            ax.text(np.sqrt(1e-4 * floor), 0.5, "not measurable\n(FAR < 1/#impostors)", rotation=90,
                    ha="center", va="center", fontsize="x-small", color="0.35")
        ax.set_xscale("log")
        ax.set_xlim(1e-4, 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.set_title(eth)
        ax.set_xlabel("false accept rate")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("true accept rate")
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _save_figure(fig, path)


def write_report(
    rows: Sequence[ResultRow],
    out_dir: str | Path,
    stem: str = "results",
    roc: Mapping[str, Curves] | None = None,
) -> dict[str, Path]:
    """Write ``<stem>.md/.csv/.json``, ``<stem>_accuracy.png`` and ``<stem>_roc.png``; returns the paths.

    ``roc`` maps model names to their curves; by default the curves carried by the rows are used. The ROC
    plot is written only when some curves exist (rows rebuilt from a JSON report have none).
    """
    if not rows:
        raise ValueError("write_report needs at least one result row")
    out_dir = Path(out_dir)
    if roc is None:
        roc = {row.name: row.curves for row in rows if row.curves}
    paths = {
        "md": out_dir / f"{stem}.md",
        "csv": out_dir / f"{stem}.csv",
        "json": out_dir / f"{stem}.json",
        "accuracy_png": out_dir / f"{stem}_accuracy.png",
    }
    caption = "RFW verification accuracy (%), 10-fold, flip TTA. STD: population std; SER: max error / min error.\n\n"
    if benchmark_names(rows):
        caption += "Columns after SER: accuracy (%) on the val_targets benchmarks (10-fold, flip TTA).\n\n"
    atomic_write_text(paths["md"], caption + _markdown_table(rows) + _tar_table(rows) + "\n")
    atomic_write_text(paths["csv"], _csv_text(rows))
    atomic_write_text(paths["json"], json.dumps(_json_data(rows), indent=2) + "\n")
    plot_accuracy(rows, paths["accuracy_png"])
    if roc:
        paths["roc_png"] = out_dir / f"{stem}_roc.png"
        plot_roc(roc, paths["roc_png"])
    return paths


def summary_line(rows: Sequence[ResultRow]) -> str:
    """Whether students of specialized teachers beat students of balanced teachers, from these numbers only:
    mean Avg (higher is better), STD and SER (lower is better) over each teacher set's students."""
    groups: dict[str, list[dict[str, float]]] = {"specialized": [], "baseline": []}
    for row in rows:
        if row.extra.get("stage") == "student" and row.extra.get("teacher_set") in groups:
            groups[row.extra["teacher_set"]].append(row.metrics())
    if not groups["specialized"] or not groups["baseline"]:
        return "Summary: students of both teacher sets are needed to compare them."
    mean = {name: {key: sum(m[key] for m in group) / len(group) for key in ("avg", "std", "ser")}
            for name, group in groups.items()}
    spec, base = mean["specialized"], mean["baseline"]
    # (label, key, higher is better, digits)
    criteria = [("Avg", "avg", True, 2), ("STD", "std", False, 2), ("SER", "ser", False, 3)]
    verdicts, wins = [], 0
    for label, key, higher, digits in criteria:
        better = spec[key] > base[key] if higher else spec[key] < base[key]
        wins += better
        word = ("higher" if higher else "lower") if better else ("not higher" if higher else "not lower")
        verdicts.append(f"{label} {word} ({spec[key]:.{digits}f} vs {base[key]:.{digits}f})")
    return (f"Summary (mean over {len(groups['specialized'])} students per teacher set, this run only): students of "
            f"specialized teachers vs students of balanced teachers: {'; '.join(verdicts)} -> better on "
            f"{wins} of {len(criteria)}.")
