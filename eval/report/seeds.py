"""Across-seed summary of several pipeline runs: the spread that training randomness adds, next to the
within-run bootstrap intervals (which only cover the sampling of the RFW pairs)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Mapping

from utils.core.io import atomic_write_json, atomic_write_text

KEYS = (("avg", "Avg", 2), ("std", "STD", 2), ("ser", "SER", 3))


def _read(report_json: Path) -> dict[str, Any]:
    try:
        return json.loads(report_json.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the report of a seed run, {report_json}: {exc}") from exc


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seed_summary(reports: Mapping[int, Path], out_dir: Path) -> str:
    """Mean and sample std across seeds of each model's Avg/STD/SER and of the teacher-set comparison, with the
    mean within-run interval; writes ``seeds_summary.md`` and ``.json`` into ``out_dir``; returns the Markdown."""
    data = {seed: _read(Path(path)) for seed, path in reports.items()}
    seeds = sorted(data)
    names = [row["name"] for row in data[seeds[0]]["rows"]]
    rows_by_seed = {seed: {row["name"]: row for row in data[seed]["rows"]} for seed in seeds}
    header = "| Model | " + " | ".join(f"{label} mean ± sd across seeds | {label} mean within-run interval"
                                       for _, label, _ in KEYS) + " |"
    lines = [f"Across {len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± sample std of each run's number, "
             "next to the mean of the runs' bootstrap interval bounds (pair sampling only).", "", header,
             "|---|" + "---:|" * (2 * len(KEYS))]
    table: dict[str, Any] = {}
    for name in names:
        present = [rows_by_seed[s][name] for s in seeds if name in rows_by_seed[s]]
        cells, record = [], {}
        for key, _, digits in KEYS:
            mean, sd = _spread([row[key] for row in present])
            bounds = [row.get("intervals", {}).get(key) for row in present]
            within = ("-" if not all(bounds) else
                      f"[{statistics.fmean(b[0] for b in bounds):.{digits}f}, {statistics.fmean(b[1] for b in bounds):.{digits}f}]")
            cells += [f"{mean:.{digits}f} ± {sd:.{digits}f}", within]
            record[key] = {"mean": mean, "sd": sd, "values": [row[key] for row in present]}
        table[name] = record
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    comparisons = [data[s].get("teacher_set_comparison") for s in seeds]
    summary: dict[str, Any] = {"seeds": seeds, "rows": table}
    if all(comparisons):
        lines += ["", "Students of specialized minus students of balanced teachers, per seed and across seeds:", ""]
        summary["teacher_set_comparison"] = {}
        for index, item in enumerate(comparisons[0]["comparisons"]):
            per_seed = [c["comparisons"][index] for c in comparisons]
            parts = []
            for key, label, digits in KEYS:
                mean, sd = _spread([c[key]["value"] for c in per_seed])
                runs = ", ".join(f"{c[key]['value']:+.{digits}f} [{c[key]['low']:+.{digits}f}, {c[key]['high']:+.{digits}f}]"
                                 for c in per_seed)
                parts.append(f"{label} {mean:+.{digits}f} ± {sd:.{digits}f} (runs: {runs})")
                summary["teacher_set_comparison"].setdefault(item["label"], {})[key] = {
                    "mean": mean, "sd": sd, "runs": [c[key] for c in per_seed]}
            lines.append(f"- {item['label']}: " + "; ".join(parts))
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "seeds_summary.md", text)
    atomic_write_json(out_dir / "seeds_summary.json", summary)
    return text
