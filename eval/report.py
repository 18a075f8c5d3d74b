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
from utils.numerics import json_safe

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
        cells = [f"{self.accuracies[eth]:.2f}" if eth in self.accuracies else "-" for eth in ETHNICITIES]
        if self.degenerate:
            return cells + [f"{summary['avg']:.2f}", "degenerate", "degenerate"]
        return cells + [f"{summary['avg']:.2f}", f"{summary['std']:.2f}", _format_ser(summary["ser"])]


def _format_ser(value: float) -> str:
    return "nan" if math.isnan(value) else "inf" if math.isinf(value) else f"{value:.3f}"


def results_table(rows: Sequence[ResultRow]) -> str:
    """Aligned plain-text table: one row per model; accuracies, Avg and STD in %, SER as a ratio."""
    header = ["Model", *COLUMNS]
    body = [[row.name, *row.cells()] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])])

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body), *_degenerate_notes(rows)])


def _degenerate_notes(rows: Sequence[ResultRow]) -> list[str]:
    return [f"DEGENERATE evaluation of {row.name} ({row.degenerate}): its accuracies are chance, not fairness"
            for row in rows if row.degenerate]


def _markdown_table(rows: Sequence[ResultRow]) -> str:
    lines = ["| Model | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    lines += [f"| {row.name} | " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines + [f"\n{note}" for note in _degenerate_notes(rows)])


def _csv_text(rows: Sequence[ResultRow]) -> str:
    extra_keys = sorted({key for row in rows for key in row.extra})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", *ETHNICITIES, "avg", "std", "ser", *extra_keys])
    for row in rows:
        summary = row.metrics()
        writer.writerow([
            row.name,
            *(row.accuracies.get(eth, "") for eth in ETHNICITIES),
            summary["avg"], summary["std"], summary["ser"],
            *(row.extra.get(key, "") for key in extra_keys),
        ])
    return buffer.getvalue()


def _json_data(rows: Sequence[ResultRow]) -> dict[str, Any]:
    return {
        "units": "accuracies, avg and std in %; ser = (100 - min acc) / (100 - max acc)",
        "rows": [
            json_safe({"name": row.name, "accuracies": row.accuracies, **row.metrics(), "extra": row.extra})
            for row in rows
        ],
    }


def read_report_rows(path: str | Path) -> list[ResultRow]:
    """The rows of a ``<stem>.json`` report (without ROC curves, which the JSON does not keep)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return [ResultRow(row["name"], row["accuracies"], row.get("extra", {})) for row in data["rows"]]
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
        for name, curves in roc.items():
            if eth in curves:
                fpr, tpr = curves[eth]
                positive = np.asarray(fpr) > 0  # FAR = 0 has no place on a log axis
                ax.plot(np.asarray(fpr)[positive], np.asarray(tpr)[positive], label=name)
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
    atomic_write_text(paths["md"], caption + _markdown_table(rows) + "\n")
    atomic_write_text(paths["csv"], _csv_text(rows))
    atomic_write_text(paths["json"], json.dumps(_json_data(rows), indent=2, allow_nan=False) + "\n")
    plot_accuracy(rows, paths["accuracy_png"])
    if roc:
        paths["roc_png"] = out_dir / f"{stem}_roc.png"
        plot_roc(roc, paths["roc_png"])
    return paths


def summary_line(rows: Sequence[ResultRow]) -> str:
    """Whether students of specialized teachers beat students of balanced teachers, from these numbers only:
    mean Avg (higher is better), STD and SER (lower is better) over each teacher set's students."""
    groups: dict[str, list[dict[str, float]]] = {"specialized": [], "baseline": []}
    # A degenerate evaluation (constant or non-finite embeddings) measures nothing: it is left out, by name.
    degenerate = [row.name for row in rows if row.extra.get("stage") == "student" and row.degenerate]
    left_out = f" Left out as degenerate: {', '.join(degenerate)}." if degenerate else ""
    for row in rows:
        if row.extra.get("stage") == "student" and row.extra.get("teacher_set") in groups and not row.degenerate:
            groups[row.extra["teacher_set"]].append(row.metrics())
    if not groups["specialized"] or not groups["baseline"]:
        return "Summary: students of both teacher sets are needed to compare them." + left_out
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
            f"{wins} of {len(criteria)}.{left_out}")
