import json

import numpy as np
import pytest
from PIL import Image

from config.config import ADAPTORS, ETHNICITIES, KD_KINDS
from eval.metrics.protocol import kfold_accuracy
from eval.report.stats import StatsSettings
from eval.report.tables import ResultRow, read_report_rows, results_table, summary_line, write_report

N = 400  # pairs per group: pooled impostors 800, so FMR 1e-2 is measurable and 1e-3 is not
ISSAME = np.tile(np.r_[np.ones(N // 20, bool), np.zeros(N // 20, bool)], 10)


def _row(name, rng, extra, spread=0.45):
    pairs = {eth: (np.clip(np.where(ISSAME, rng.normal(0.9, spread, N), rng.normal(1.9, spread, N)), 0, 3.99),
                   ISSAME) for eth in ETHNICITIES}
    accuracies = {eth: 100 * kfold_accuracy(*pairs[eth])[0].mean() for eth in ETHNICITIES}
    return ResultRow(name, accuracies, dict(extra), pairs=pairs)


def _rows():
    rng = np.random.default_rng(0)
    rows = [_row(f"teacher specialized {eth}", rng, {"stage": "teacher", "teacher_set": "specialized", "member": eth})
            for eth in ETHNICITIES]
    for teacher_set in ("specialized", "baseline"):
        for adaptor in ADAPTORS[:2]:  # two adaptors keep the figures quick
            for kd in KD_KINDS:
                rows.append(_row(f"student {kd} {adaptor} {teacher_set}", rng,
                                 {"stage": "student", "teacher_set": teacher_set, "adaptor": adaptor, "kd": kd}))
    return rows


def test_report_with_pairs_has_intervals_operating_points_comparison_and_figures(tmp_path):
    rows = _rows()
    settings = StatsSettings(n_resamples=200, seed=0)
    paths = write_report(rows, tmp_path, settings=settings)
    markdown = paths["md"].read_text()
    assert "200 resamples of the pairs within each fold, seed 0" in markdown
    first = rows[0]
    low, high = first.intervals["African"]
    assert low <= first.accuracies["African"] <= high
    assert f"| {first.name} | {first.accuracies['African']:.2f} [{low:.2f}, {high:.2f}]" in markdown
    assert "Global threshold at pooled FMR 0.01" in markdown and "pooled FMR 0.001" not in markdown
    # Same data-generating process for both teacher sets: the pooled difference is no significant one.
    assert "pooled (4 students per teacher set): Avg" in markdown
    data = json.loads(paths["json"].read_text())
    pooled = data["teacher_set_comparison"]["comparisons"][-1]
    assert pooled["avg"]["low"] <= 0 <= pooled["avg"]["high"] and "no significant difference" in markdown
    point = data["rows"][0]["operating_points"][0]
    assert point["target_fmr"] == 0.01 and set(point["fmr"]) == set(ETHNICITIES)
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert {"African_low", "ser_high", "fmr=0.01/fdr", "fmr=0.01/Indian/fnmr"} <= set(header)
    for key in ("accuracy_png", "det_png", "operating_point_png", "comparison_png"):
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and min(image.size) > 200

    # A report read back from its files recomputes the same intervals and summary from the saved pairs.
    again = read_report_rows(paths["json"])
    assert summary_line(again, settings) == summary_line(rows, settings)
    assert results_table(again) == results_table(rows)


def test_rows_on_different_pairs_are_refused(tmp_path):
    rows = _rows()[:2]
    rows[1].pairs["Asian"] = (rows[1].pairs["Asian"][0], ~ISSAME)
    with pytest.raises(ValueError, match="same RFW pairs"):
        write_report(rows, tmp_path)


def test_training_log_verification_line_carries_intervals():
    from eval.metrics.protocol import verify_distances
    from eval.rfw.during_training import summarize_verification
    from utils.train.monitor import format_verification

    rng = np.random.default_rng(1)
    results = {eth: verify_distances(*_row("m", rng, {}).pairs[eth]) for eth in ETHNICITIES}
    summary = summarize_verification(results)
    assert summary["avg_low"] <= summary["avg"] <= summary["avg_high"]
    assert summary == summarize_verification(results)  # seeded
    line = format_verification(summary)
    assert line.startswith(f"African {summary['African']:.2f} [{summary['African_low']:.2f}, ")
    assert f"ser {summary['ser']:.3f} [" in line


def test_seed_summary_reports_mean_and_spread_next_to_within_run_intervals(tmp_path):
    from eval.report.seeds import seed_summary

    def report(avg, low, high, diff):
        row = {"name": "student a", "avg": avg, "std": 1.0, "ser": 1.2,
               "intervals": {"avg": [low, high], "std": [0.5, 2.0], "ser": [1.0, 1.5]}}
        estimate = {"value": diff, "low": diff - 1, "high": diff + 1, "p_value": 0.5}
        comparison = {"comparisons": [{"label": "SL a-KD", "avg": estimate, "std": estimate, "ser": estimate}]}
        return {"rows": [row], "teacher_set_comparison": comparison}

    reports = {}
    for seed, values in ((0, (90.0, 89.0, 91.0, 0.5)), (1, (92.0, 91.0, 93.0, -0.5))):
        reports[seed] = tmp_path / f"seed{seed}.json"
        reports[seed].write_text(json.dumps(report(*values)))
    text = seed_summary(reports, tmp_path)
    saved = json.loads((tmp_path / "seeds_summary.json").read_text())
    assert saved["seeds"] == [0, 1] and (tmp_path / "seeds_summary.md").read_text() == text
    # mean 91, sample sd sqrt(2); the within-run interval is the mean of the bounds, [90, 92]
    assert saved["rows"]["student a"]["avg"]["mean"] == 91.0
    assert saved["rows"]["student a"]["avg"]["sd"] == pytest.approx(2 ** 0.5)
    assert "| student a | 91.00 ± 1.41 | [90.00, 92.00] |" in text
    assert "- SL a-KD: Avg +0.00 ± 0.71 (runs: +0.50 [-0.50, +1.50], -0.50 [-1.50, +0.50])" in text


def test_seeds_option_runs_each_seed_into_its_own_folder(tmp_path, monkeypatch):
    import run_pipeline
    from config.config import format_override

    calls = []
    monkeypatch.setattr(run_pipeline, "run_once", lambda args, base, preset, stop: calls.append(base) or None)
    run_pipeline.main(["--preset", "tiny", f"output_root={str(tmp_path)!r}", "--seeds", "0", "2"])
    assert [b[-2:] for b in calls] == [["seed=0", format_override("output_root", str(tmp_path / "seed0"))],
                                       ["seed=2", format_override("output_root", str(tmp_path / "seed2"))]]
