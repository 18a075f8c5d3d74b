"""The shared-fraction study: one table line per synthetic world, read from the reports of its pipeline runs.

``run_pipeline.py --sweep-shared 0 0.5 0.8`` runs the whole pipeline once per ``shared_fraction`` of the
generator (``utils/data/synthetic.py``) and prints :func:`sweep_table`: how specialized the specialized teachers
are (own group vs the other three), and how the students of specialized teachers compare with the students
of balanced teachers, so a user sees when specialized teachers help on synthetic data and when they do not.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from eval.report.tables import ResultRow
from utils.workdir.runs import read_run_config


def teacher_specialization(rows: Sequence[ResultRow]) -> tuple[float, float]:
    """Mean accuracy of the specialized teachers on their own group and on the three other groups (%)."""
    own, others = [], []
    for row in rows:
        if row.extra.get("stage") != "teacher" or row.extra.get("teacher_set") != "specialized":
            continue
        group = read_run_config(Path(row.extra["run_dir"]))[0].ethnicity
        own.append(row.accuracies[group])
        others += [acc for eth, acc in row.accuracies.items() if eth != group]
    return float(np.mean(own)) if own else float("nan"), float(np.mean(others)) if others else float("nan")


def student_metrics(rows: Sequence[ResultRow], teacher_set: str) -> dict[str, float]:
    """Mean Avg, STD and SER of the students of one teacher set, and their lowest Avg."""
    metrics = [row.metrics() for row in rows
               if row.extra.get("stage") == "student" and row.extra.get("teacher_set") == teacher_set]
    if not metrics:
        return {key: float("nan") for key in ("avg", "std", "ser", "min_avg")}
    return {**{key: float(np.mean([m[key] for m in metrics])) for key in ("avg", "std", "ser")},
            "min_avg": min(m["avg"] for m in metrics)}


def sweep_table(reports: Mapping[float, Sequence[ResultRow]]) -> str:
    """One line per shared fraction: teacher specialization, then specialized vs balanced students."""
    header = (f"{'shared':>6}  {'teacher own':>11}  {'others':>6}  {'margin':>6}  |  "
              f"{'students Avg spec/bal':>21}  {'STD spec/bal':>12}  {'SER spec/bal':>13}  {'lowest Avg':>10}")
    lines = [header, "-" * len(header)]
    for fraction in sorted(reports):
        rows = reports[fraction]
        own, others = teacher_specialization(rows)
        spec, base = student_metrics(rows, "specialized"), student_metrics(rows, "baseline")
        lines.append(
            f"{fraction:>6.2f}  {own:>11.2f}  {others:>6.2f}  {own - others:>6.2f}  |  "
            f"{spec['avg']:>10.2f}/{base['avg']:<10.2f}  {spec['std']:>6.2f}/{base['std']:<5.2f}  "
            f"{spec['ser']:>6.3f}/{base['ser']:<6.3f}  {min(spec['min_avg'], base['min_avg']):>10.2f}")
    lines.append("teacher own / others: mean RFW accuracy (%) of the four specialized teachers on their own group and "
                 "on the other three; students: mean over the 6 students of each teacher set (spec = specialized "
                 "teachers, bal = balanced); lowest Avg: the weakest student of either set.")
    return "\n".join(lines)
