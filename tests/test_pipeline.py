"""The whole pipeline on the tiny preset: every stage, the report, the plan (what runs and why), and provenance
(changed keys, data, RFW files or teacher weights re-run what depends on them).

One finished tiny pipeline is shared by the module (``make test`` hands whole files to its pytest-xdist workers,
so it is built once); tests that change it work on a copy. Plans are made in this process: only jobs that run
need processes of their own.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import run_pipeline
from helpers import tiny_pipeline
from utils.core.signals import StopRequest
from utils.pipeline.launch import StageFailed, run_jobs_side_by_side
from utils.pipeline.plan import STAGES, Job, Step, Verdict, plan_jobs, select_jobs
from utils.workdir import artifacts

TEACHER_RUNS = [f"teachers/specialized/iresnet18_{eth}" for eth in ("African", "Asian", "Caucasian", "Indian")] + [
    f"teachers/baseline/iresnet18_split{k}" for k in range(4)]
JOBS = 29
EVERY_TRAINING_JOB = {"teachers": 8, "extract": 2, "adaptors": 6, "students": 12}
# override, jobs that then run per stage, the reason printed for the jobs it reruns directly (None: nothing runs)
KEY_CHANGES = [
    ("num_epoch=2", EVERY_TRAINING_JOB, "key num_epoch: 1 -> 2"),
    ("loss='CosFace'", EVERY_TRAINING_JOB, "key loss: "),
    ("lr=0.05", EVERY_TRAINING_JOB, "key lr: 0.1 -> 0.05"),
    ("width=16", EVERY_TRAINING_JOB, "key width: 8 -> 16"),
    ("lr_fc=0.5", {"adaptors": 6, "students": 12}, "key lr_fc: 1.0 -> 0.5"),
    ("loss_lambda=100.0", {"students": 12}, "key loss_lambda: 10000.0 -> 100.0"),
    ("log_every=1", {}, None),
    ("num_workers=1", {}, None),
]


def _plan(out: Path, *extra: str) -> dict[str, list[str]]:
    """The printed plan of a pipeline call: job lines that run and job lines that are skipped."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = run_pipeline.main(["--preset", "tiny", f"output_root={str(out)!r}", *extra, "--plan-only"])
    assert code == 0, printed.getvalue()[-4000:]
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
    assert len(lines) == JOBS, lines
    return {"run": [line for line in lines if " -- run: " in line],
            "skip": [line for line in lines if " -- skip: " in line]}


def _stages(lines: list[str]) -> list[str]:
    return [re.match(r"\[\d+/\d+\] (\w+):", line).group(1) for line in lines]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Two jobs side by side (--jobs 2): each job starts only once the jobs it reads from have finished."""
    out = tmp_path_factory.mktemp("pipeline") / "work"
    return out, tiny_pipeline(out, "--jobs", "2")


@pytest.fixture
def finished_copy(finished, tmp_path) -> Path:
    out = tmp_path / "work"
    shutil.copytree(finished[0], out)
    return out


def test_plan_covers_the_paper():
    jobs = plan_jobs(["data_root='/data'", "output_root='/tmp/x'"])
    scripts = [job.script for job in jobs]
    assert scripts.count("train.py") == 8 and scripts.count("extract_all.py") == 2
    assert scripts.count("fc_EArc.py") == 2 and scripts.count("dual_layer_EAF-Fusion.py") == 4
    assert scripts.count("KD_alone.py") == 6 and scripts.count("KD_CEL.py") == 6
    assert [job.stage for job in select_jobs(jobs, ["extract"], None)] == ["extract", "extract"]
    assert {job.stage for job in select_jobs(jobs, None, "students")} == {"students"}
    with pytest.raises(ValueError, match="stages are"):
        select_jobs(jobs, ["teacher"], None)
    assert STAGES[-1] == "report"


JOB_SCRIPT = """import sys, time, pathlib
words = dict(word.split("=", 1) for word in sys.argv[1:])  # key=value words, as every stage takes them
mine, needs = pathlib.Path(words["mine"]), words["needs"]
if needs != "-" and not pathlib.Path(needs).exists():
    sys.exit(f"{needs} is not there yet")
time.sleep(0.3)
mine.write_text(str(time.monotonic()))
"""


def _job(tmp_path: Path, name: str, needs: str | None, script: Path) -> Step:
    needed = str(tmp_path / needs) if needs else "-"
    job = Job("teachers", str(script), [f"mine={tmp_path / name}", f"needs={needed}"], name, [needs] if needs else [],
              check=lambda: Verdict((tmp_path / name).exists(), "written"))
    return Step(job, True, "test")


def test_jobs_side_by_side_wait_for_their_upstream_and_stop_at_a_failure(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB_SCRIPT)
    steps = [_job(tmp_path, "a", None, script), _job(tmp_path, "b", "a", script), _job(tmp_path, "c", None, script)]
    run_jobs_side_by_side(steps, [], tmp_path / "work", 2, StopRequest(), time.perf_counter())
    done = {name: float((tmp_path / name).read_text()) for name in "abc"}
    assert done["a"] < done["b"] and done["c"] < done["b"]  # c ran beside a; b waited for a

    broken = tmp_path / "broken.py"
    broken.write_text("import sys; sys.exit('broken job')")
    steps = [_job(tmp_path, "d", None, broken), _job(tmp_path, "e", "d", script)]
    with pytest.raises(StageFailed, match="exit code 1"):
        run_jobs_side_by_side(steps, [], tmp_path / "work", 2, StopRequest(), time.perf_counter())
    assert not (tmp_path / "e").exists()  # nothing below a failed job starts
    assert "broken job" in artifacts.job_log_file(tmp_path / "work", "d").read_text()


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_then_skips_everything(finished):
    out, first = finished
    assert "Summary: students of specialized minus students of balanced teachers" in first.stdout
    assert "pooled (6 students per teacher set): Avg " in first.stdout
    assert first.stdout.count(" -- run: ") == JOBS
    report = out / "report"
    rows = json.loads((report / "results.json").read_text())
    text = json.dumps(rows)
    for name in ("teacher specialized Asian", "teacher balanced split3", "SL-EAF-Fusion specialized",
                 "DLDPO-EAF-Fusion balanced", "student a-KD DuL specialized", "student EAF-KD SL balanced"):
        assert name in text, name
    markdown = (report / "results.md").read_text()
    assert all(column in markdown for column in ("African", "Asian", "Caucasian", "Indian", "Avg", "STD", "SER"))
    results, tar = markdown.split("\n\nTAR (%) at fixed FAR")
    assert results.count("student ") == 12
    assert "| n/m |" in tar  # 10 impostor pairs per ethnicity measure no FAR below 0.1
    for png in ("results_accuracy.png", "results_det.png"):
        with Image.open(report / png) as image:
            assert image.size[0] > 100
    for run in TEACHER_RUNS:
        assert json.loads((out / run / "history.json").read_text())["complete"]
        assert json.loads((out / run / "provenance.json").read_text())["stage"] == "teacher"
    for adaptor in ("SL", "DuL", "DLDPO"):
        assert json.loads((out / "adaptors/specialized_iresnet18" / adaptor / "targets.json").read_text())["complete"]

    report_mtime = (report / "results.json").stat().st_mtime_ns
    again = tiny_pipeline(out)
    assert again.stdout.count(" -- skip: ") == JOBS and " -- running" not in again.stdout
    # Nothing changed, so the report is reused, not recomputed, and prints the same table.
    assert (report / "results.json").stat().st_mtime_ns == report_mtime
    assert first.stdout[first.stdout.index("Model"):first.stdout.index("Summary")] in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize("override,runs,reason", [pytest.param(*case, id=case[0]) for case in KEY_CHANGES])
def test_a_key_that_matters_reruns_its_jobs_and_everything_below(finished, override, runs, reason):
    plan = _plan(finished[0], override)
    stages = _stages(plan["run"])
    assert {stage: stages.count(stage) for stage in set(stages)} == runs
    if reason:
        direct = [line for line in plan["run"] if "upstream" not in line]
        assert direct and all(reason in line for line in direct), direct


@pytest.mark.slow
def test_seed_reruns_everything(finished_copy):
    """seed=1 also regenerates the preset's synthetic data, so it works on a copy."""
    plan = _plan(finished_copy, "seed=1")
    assert len(plan["run"]) == JOBS
    assert all("key seed: 0 -> 1" in line for line in plan["run"] if "upstream" not in line)


@pytest.mark.slow
def test_run_name_keeps_an_ablation_beside_the_first_run(finished):
    plan = _plan(finished[0], "run_name='abl'", "lr=0.05")
    assert len(plan["run"]) == JOBS and all("not trained yet" in line or "upstream" in line or "no split" in line
                                            for line in plan["run"])
    assert len(_plan(finished[0])["skip"]) == JOBS  # the first run is untouched


@pytest.mark.slow
def test_changed_training_data_or_rfw_files_rerun_what_read_them(finished_copy):
    image = next((finished_copy / "data" / "train" / "Indian").rglob("*.jpg"))
    image.write_bytes(image.read_bytes() + b"\0")  # same path, other bytes
    plan = _plan(finished_copy)
    direct = [line for line in plan["run"] if "upstream" not in line]
    assert "teachers: train.py teacher_set=specialized ethnicity=Indian" in direct[0]
    assert all("input data" in line for line in direct)
    assert not any("ethnicity=African" in line for line in plan["run"])  # the African teacher read no Indian image
    assert _stages(plan["run"]).count("extract") == 2

    image.write_bytes(image.read_bytes()[:-1])
    assert len(_plan(finished_copy)["skip"]) == JOBS
    rfw = finished_copy / "data" / "rfw" / "Asian_test.bin"
    rfw.write_bytes(rfw.read_bytes() + b"\0")
    plan = _plan(finished_copy)
    assert len(plan["run"]) == JOBS - 1 and "input rfw" in plan["run"][0]  # the split does not read RFW


@pytest.mark.slow
def test_a_plan_reads_the_image_digests_once_for_all_its_data_fingerprints(finished_copy, monkeypatch):
    """The plan fingerprints the rows of every teacher, split and student: one pass over the images (which stats
    every file of the data, seconds per million) serves all of them."""
    import utils.pipeline.plan as planning
    from utils.data.index import ImageIndex

    passes, fingerprints = [], []
    file_digests, data_fingerprint = ImageIndex.file_digests, planning.data_fingerprint
    monkeypatch.setattr(ImageIndex, "file_digests", lambda index: passes.append(1) or file_digests(index))
    monkeypatch.setattr(planning, "data_fingerprint", lambda *args: fingerprints.append(1) or data_fingerprint(*args))
    assert len(_plan(finished_copy)["skip"]) == JOBS
    assert len(fingerprints) > 1 and len(passes) == 1


@pytest.mark.slow
def test_swapped_adaptor_weights_rewrite_its_targets_and_rerun_its_students(finished_copy):
    weights = finished_copy / "adaptors/specialized_iresnet18/SL/best_adaptor.pth"
    state = torch.load(weights, weights_only=True)
    torch.save({name: value * 1.5 for name, value in state.items()}, weights)
    plan = _plan(finished_copy)
    assert _stages(plan["run"]) == ["adaptors", "students", "students"]
    assert "KD targets made with other settings or inputs (input adaptor_weights:" in plan["run"][0]


@pytest.mark.slow
def test_released_teachers_flow_through_and_a_swapped_checkpoint_rebuilds_what_read_it(finished_copy):
    """Specialized teacher folders that hold only weights (as the authors released them) count as done; a
    swapped checkpoint rebuilds its store, the adaptors' targets and the students of that teacher set."""
    for eth in ("African", "Asian", "Caucasian", "Indian"):
        run = finished_copy / f"teachers/specialized/iresnet18_{eth}"
        for path in run.iterdir():
            if path.name != "best_backbone.pth":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert len(_plan(finished_copy)["skip"]) == JOBS  # same weights: nothing to redo
    asian = finished_copy / "teachers/specialized/iresnet18_Asian/best_backbone.pth"
    shutil.copy(finished_copy / "teachers/specialized/iresnet18_African/best_backbone.pth", asian)
    result = tiny_pipeline(finished_copy, "--jobs", "2")
    ran = [line for line in result.stdout.splitlines() if " -- run: " in line]
    assert _stages(ran) == ["extract"] + ["adaptors"] * 3 + ["students"] * 6
    assert "Asian store made with other settings or inputs (input teacher:" in ran[0]
    stores = finished_copy / "embeddings/specialized_iresnet18"
    assert (json.loads((stores / "Asian.json").read_text())["checkpoint"]["sha256"]
            == json.loads((stores / "African.json").read_text())["checkpoint"]["sha256"])
    # The old adaptor and student runs are kept aside, never mixed into the new ones or the report.
    assert len(list((finished_copy / "adaptors/specialized_iresnet18").glob("SL.replaced-*"))) == 1
    assert len(list((finished_copy / "students/specialized_iresnet18").glob("*.replaced-*"))) == 6
    rows = json.loads((finished_copy / "report" / "results.json").read_text())["rows"]
    assert len(rows) == 4 + 6 + 12  # the released teachers have no run config; the baseline teachers do
    assert "pooled (6 students per teacher set): Avg " in result.stdout
    assert len(_plan(finished_copy)["skip"]) == JOBS
