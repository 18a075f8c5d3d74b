"""The KD-target analysis (eval.kd_targets) and the shared-fraction study (run_pipeline.py --sweep-shared)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import run_pipeline
from config.config import ETHNICITIES, load_config
from eval.kd_targets import target_geometry
from eval.report.tables import ResultRow, write_report
from utils.core.errors import InvalidInputError


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_target_geometry_tells_a_narrow_cone_from_spread_identities():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(40), 5)
    ethnicity = labels // 10
    centres = rng.normal(size=(40, 16))
    spread = unit(centres[labels] + 0.5 * rng.normal(size=(200, 16)))
    cone = unit(np.eye(16)[0] * 20 + centres[labels] + 0.3 * rng.normal(size=(200, 16)))
    rows = np.random.default_rng(0).permutation(200)
    wide, narrow = (target_geometry(t, labels, ethnicity, rows=rows) for t in (spread, cone))
    assert narrow["mean_norm"] > 0.95 > 0.5 > wide["mean_norm"]
    assert narrow["between"] < wide["between"] / 10
    assert narrow["cos_different"] > 0.9 > wide["cos_same"] > 0.5 > wide["cos_different"]
    assert set(wide["between_per_ethnicity"]) == set(ETHNICITIES)
    # The constant-student KD is the MSE (per dimension) of the normalised mean against every row.
    direction = unit(cone.mean(0, keepdims=True))
    assert narrow["constant_kd"] == pytest.approx(np.mean((cone - direction) ** 2))
    assert 1 < narrow["effective_rank"] < wide["effective_rank"] <= 16


def _rows(run_dir, own_margin: float, student_avg: float) -> list[ResultRow]:
    """Four specialized teachers (own ethnicity 90, others 90 - margin) and one student per teacher set."""
    rows = []
    for eth in ETHNICITIES:
        teacher_dir = run_dir / f"teacher_{eth}"
        teacher_dir.mkdir(parents=True)
        data = load_config([f"ethnicity={eth!r}", "teacher_set='specialized'"]).to_dict()
        data["derived"]["stage"] = "teacher"
        (teacher_dir / "config.json").write_text(json.dumps(data))
        accuracies = {e: 90.0 if e == eth else 90.0 - own_margin for e in ETHNICITIES}
        rows.append(ResultRow(f"teacher {eth}", accuracies,
                              {"stage": "teacher", "teacher_set": "specialized", "run_dir": str(teacher_dir)}))
    for teacher_set, avg in (("specialized", student_avg), ("baseline", 80.0)):
        rows.append(ResultRow(f"student {teacher_set}", {e: avg for e in ETHNICITIES},
                              {"stage": "student", "teacher_set": teacher_set}))
    return rows


def test_sweep_runs_the_pipeline_per_fraction_and_tabulates(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(argv):
        calls.append(argv)
        fraction = float(argv[argv.index("--shared-fraction") + 1])
        out = tmp_path / f"shared_{fraction:g}"
        rows = _rows(out, own_margin=20 * (1 - fraction), student_avg=70 + 10 * fraction)
        write_report(rows, out / "report")
        return 0

    monkeypatch.setattr(run_pipeline, "run", fake_run)
    args = run_pipeline.parse_args(["seed=2", f"output_root={str(tmp_path)!r}", "--sweep-shared", "0", "0.5"])
    assert run_pipeline.sweep_shared(args, "demo", tmp_path) == 0
    assert [call[call.index("--shared-fraction") + 1] for call in calls] == ["0.0", "0.5"]
    assert all("seed=2" in call and any(a.startswith("output_root=") and "shared_" in a for a in call)
               for call in calls)
    table = capsys.readouterr().out.split("Shared-fraction study")[1].splitlines()
    line_0 = next(line for line in table if line.strip().startswith("0.00"))
    line_5 = next(line for line in table if line.strip().startswith("0.50"))
    # own 90, others 70 -> margin 20; students 70 vs 80 at 0; margin 10, students 75 vs 80 at 0.5
    assert line_0.split()[1:4] == ["90.00", "70.00", "20.00"] and "70.00/80.00" in line_0
    assert line_5.split()[1:4] == ["90.00", "80.00", "10.00"] and "75.00/80.00" in line_5


def test_shared_fraction_needs_a_synthetic_preset():
    with pytest.raises(InvalidInputError, match="synthetic preset"):
        run_pipeline.run(["--preset", "paper", "--shared-fraction", "0.3", "data_root='/nonexistent'"])
