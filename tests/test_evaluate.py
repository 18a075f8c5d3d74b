import io
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from backbones import get_adaptor, get_backbone
from config.config import CONCAT_ORDER, ETHNICITIES, load_config
from eval.evaluate import TeacherOutputs, evaluate_multi_teacher, main, report_work_dir
from eval.report.tables import ResultRow, results_table, summary_line, write_report
from eval.rfw.embedding import RFWEvaluator, backbone_embed_fn
from utils.core.io import atomic_write_json
from utils.data.binfile import read_bin, write_bin
from utils.workdir import artifacts

SIZE, EMB, WIDTH, PAIRS = 32, 16, 8, 20
SMALL = ["--input-size", str(SIZE), "--embedding-size", str(EMB), "--width", str(WIDTH), "--batch-size", "16",
         "--device", "cpu"]


def _jpeg(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def rfw_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rfw")
    rng = np.random.default_rng(0)
    for e, eth in enumerate(ETHNICITIES):
        jpegs, issame = [], []
        for i in range(PAIRS):
            first = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            same = i % 2 == 0
            second = first if same else rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            noise = rng.integers(-20 * (e + 1), 20 * (e + 1), (SIZE, SIZE, 3))
            jpegs += [_jpeg(first), _jpeg(np.clip(second + noise, 0, 255).astype(np.uint8))]
            issame.append(same)
        write_bin(root / f"{eth}_test.bin", jpegs, issame)
    return root


def _save_backbone(path, seed, network="iresnet18"):
    torch.manual_seed(seed)
    model = get_backbone(network, input_size=SIZE, embedding_size=EMB, width=WIDTH)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def _save_adaptor(path, kind="SL", seed=0):
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(get_adaptor(kind, in_features=4 * EMB, embedding_size=EMB).state_dict(), path)
    return path


def _open_png(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_cli_backbone_writes_table_files_and_plots(rfw_root, tmp_path, capsys):
    weights = _save_backbone(tmp_path / "model.pth", seed=1)
    out = tmp_path / "report"
    rows = main(["--backbone", str(weights), "--network", "iresnet18", "--rfw-root", str(rfw_root),
                 "--out", str(out), "--name", "tiny", *SMALL])
    printed = capsys.readouterr().out
    header = printed.splitlines()[0].split()
    assert header == ["Model", *ETHNICITIES, "Avg", "STD", "SER"]
    assert any(line.startswith("tiny ") for line in printed.splitlines())
    for suffix in (".md", ".csv", ".json"):
        assert (out / f"results{suffix}").is_file()
    _open_png(out / "results_accuracy.png")
    _open_png(out / "results_det.png")
    saved = json.loads((out / "results.json").read_text())["rows"]
    assert [r["name"] for r in saved] == ["tiny"]
    assert "| tiny |" in (out / "results.md").read_text()
    assert (out / "results.csv").read_text().splitlines()[0].startswith("model,African,Asian,Caucasian,Indian,avg")

    # The CLI evaluated the saved weights: the API on the same weights gives the same numbers.
    model = get_backbone("iresnet18", input_size=SIZE, embedding_size=EMB, width=WIDTH)
    model.load_state_dict(torch.load(weights, weights_only=True))
    expected = RFWEvaluator(rfw_root, SIZE, batch_size=7)(backbone_embed_fn(model), "cpu")
    for eth in ETHNICITIES:
        assert saved[0]["accuracies"][eth] == pytest.approx(100 * expected[eth].accuracy)
        assert saved[0]["extra"][f"{eth}/auc"] == pytest.approx(expected[eth].auc)
    assert rows[0].accuracies == saved[0]["accuracies"]


def test_cli_multi_teacher_space_takes_teachers_by_name(rfw_root, tmp_path, capsys):
    teachers = {eth: str(_save_backbone(tmp_path / f"{eth}.pth", seed=i)) for i, eth in enumerate(CONCAT_ORDER)}
    adaptor = _save_adaptor(tmp_path / "adaptor.pth", "DuL")
    out = tmp_path / "report"
    named = [f"--teacher={eth}={path}" for eth, path in sorted(teachers.items())]  # alphabetical, not CONCAT_ORDER
    rows = main([*named, "--teacher-network", "iresnet18", "--adaptor", str(adaptor),
                 "--adaptor-type", "DuL", "--rfw-root", str(rfw_root), "--out", str(out), *SMALL])
    assert rows[0].name == "DuL multi-teacher space"
    assert "DuL multi-teacher space" in capsys.readouterr().out
    _open_png(out / "results_det.png")
    evaluator = RFWEvaluator(rfw_root, SIZE)
    common = dict(teacher_network="iresnet18", embedding_size=EMB, width=WIDTH, device="cpu")
    # Any order of the names gives the same space: the code applies CONCAT_ORDER.
    reordered = evaluate_multi_teacher(dict(reversed(list(teachers.items()))), adaptor, "DuL", evaluator, **common)
    assert reordered.accuracies == pytest.approx(rows[0].accuracies)
    assert all(reordered.extra[f"{eth}/auc"] == rows[0].extra[f"{eth}/auc"] for eth in ETHNICITIES)
    # Swapping which file carries which name changes the space (the order is real, not ignored).
    files = list(teachers.values())
    swapped = evaluate_multi_teacher(dict(zip(teachers, files[::-1])), adaptor, "DuL", evaluator, **common)
    assert any(swapped.extra[f"{eth}/auc"] != rows[0].extra[f"{eth}/auc"] for eth in ETHNICITIES)


@pytest.mark.parametrize("names, message", [
    (["Asian", "African", "Caucasian"], "missing Indian"),
    (["Asian", "African", "Caucasian", "Indian", "split0"], "unknown split0"),
    (["Asain", "African", "Caucasian", "Indian"], "unknown Asain; missing Asian"),
    (["teacher1", "teacher2", "teacher3", "teacher4"], "unknown teacher names"),
])
def test_cli_rejects_missing_or_unknown_teacher_names(rfw_root, tmp_path, capsys, names, message):
    args = [f"--teacher={name}={tmp_path / name}.pth" for name in names]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--adaptor", "a.pth", "--adaptor-type", "SL", "--rfw-root", str(rfw_root)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_unnamed_teachers(rfw_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--teacher", str(tmp_path / "a.pth"), "--adaptor", "a.pth", "--adaptor-type", "SL",
              "--rfw-root", str(rfw_root)])
    assert exc.value.code == 2 and "NAME=PATH" in capsys.readouterr().err


def test_cli_rejects_a_checkpoint_of_another_network(rfw_root, tmp_path, capsys):
    weights = _save_backbone(tmp_path / "r18.pth", seed=0, network="iresnet18")
    with pytest.raises(SystemExit) as exc:
        main(["--backbone", str(weights), "--network", "iresnet34", "--rfw-root", str(rfw_root),
              "--out", str(tmp_path / "out"), *SMALL])
    message = capsys.readouterr().err
    assert exc.value.code == 2 and str(weights) in message and "iresnet34" in message and "missing keys" in message
    assert not (tmp_path / "out").exists()  # nothing half-written: the folder is created only with results


def test_cli_names_a_missing_rfw_file(rfw_root, tmp_path, capsys):
    partial = tmp_path / "rfw"
    partial.mkdir()
    for eth in ("African", "Asian", "Caucasian"):
        shutil.copy(rfw_root / f"{eth}_test.bin", partial)
    weights = _save_backbone(tmp_path / "m.pth", seed=0)
    with pytest.raises(SystemExit) as exc:
        main(["--backbone", str(weights), "--network", "iresnet18", "--rfw-root", str(partial),
              "--out", str(tmp_path / "out"), *SMALL])
    assert exc.value.code == 2 and str(partial / "Indian_test.bin") in capsys.readouterr().err


def _write_run(run_dir, cfg, stage, weights_name, save):
    data = cfg.to_dict()
    data["derived"]["stage"] = stage
    atomic_write_json(run_dir / "config.json", data)
    save(run_dir / weights_name)


def _work_dir(root):
    base = dict(output_root=str(root), network="iresnet18", student_network="iresnet18", width=WIDTH,
                embedding_size=EMB, input_size=SIZE)
    teacher_paths = []
    for i, eth in enumerate(CONCAT_ORDER):
        cfg = load_config({**base, "ethnicity": eth})
        _write_run(artifacts.teacher_dir(cfg), cfg, "teacher", "best_backbone.pth",
                   lambda p, i=i: teacher_paths.append(_save_backbone(p, seed=10 + i)))
    cfg = load_config(base)
    _write_run(artifacts.adaptor_dir(cfg), cfg, "adaptor", "best_adaptor.pth", lambda p: _save_adaptor(p, "SL", seed=3))
    _write_run(artifacts.student_dir(cfg), cfg, "student", "best_backbone.pth", lambda p: _save_backbone(p, seed=20))
    # A config.json of something that is not a model (e.g. an embedding store) is not a run to evaluate.
    atomic_write_json(root / "embeddings" / "store" / "config.json", {"derived": {"stage": "extract"}})
    return cfg, teacher_paths


def test_work_dir_evaluates_every_run_and_adaptors_with_their_teachers(rfw_root, tmp_path, capsys, monkeypatch):
    cfg, teacher_paths = _work_dir(tmp_path / "work")
    moved = tmp_path / "moved"  # run folders are found relative to where the work directory is now
    shutil.move(tmp_path / "work", moved)
    networks_run = []
    outputs = RFWEvaluator.outputs
    monkeypatch.setattr(RFWEvaluator, "outputs", lambda self, *args: networks_run.append(1) or outputs(self, *args))
    main(["--work-dir", str(moved), "--rfw-root", str(rfw_root), "--batch-size", "16", "--device", "cpu"])
    assert len(networks_run) == 4 + 1  # teachers and the student; the adaptor row reuses its teachers' outputs
    saved = json.loads((moved / "report" / "results.json").read_text())["rows"]
    names = [row["name"] for row in saved]
    assert names == [f"teacher specialized {eth} (iresnet18)" for eth in ETHNICITIES] + [
        "SL-EAF-Fusion specialized (4x iresnet18)", "student a-KD SL specialized (iresnet18)"]
    assert [row["extra"]["stage"] for row in saved] == ["teacher"] * 4 + ["adaptor", "student"]
    _open_png(moved / "report" / "results_accuracy.png")
    _open_png(moved / "report" / "results_det.png")
    assert "SL-EAF-Fusion specialized" in capsys.readouterr().out

    # The adaptor row is the multi-teacher space of its teachers in CONCAT_ORDER.
    moved_teachers = {eth: moved / p.relative_to(tmp_path / "work") for eth, p in zip(CONCAT_ORDER, teacher_paths)}
    direct = evaluate_multi_teacher(moved_teachers, moved / artifacts.adaptor_dir(cfg).relative_to(artifacts.work_root(cfg)) /
                                    "best_adaptor.pth", "SL", RFWEvaluator(rfw_root, SIZE),
                                    teacher_network="iresnet18", embedding_size=EMB, width=WIDTH, device="cpu")
    adaptor_row = saved[4]
    for eth in ETHNICITIES:
        assert adaptor_row["accuracies"][eth] == pytest.approx(direct.accuracies[eth])
        assert adaptor_row["extra"][f"{eth}/auc"] == pytest.approx(direct.extra[f"{eth}/auc"])


def test_teacher_outputs_are_computed_once_and_dropped_after_their_last_reader(rfw_root, tmp_path):
    weights = tmp_path / "teacher.pth"
    loads = []

    def load():
        loads.append(weights)
        torch.manual_seed(0)
        return get_backbone("iresnet18", input_size=SIZE, embedding_size=EMB, width=WIDTH)

    shared = TeacherOutputs(RFWEvaluator(rfw_root, SIZE), torch.device("cpu"), Counter({weights.resolve(): 2}))
    first, second = shared.read(weights, load), shared.read(weights, load)
    assert len(loads) == 1 and first is second and set(first) == set(ETHNICITIES)
    assert first["Asian"].plain.shape == first["Asian"].flipped.shape == (2 * PAIRS, EMB)
    shared.read(weights, load)
    assert len(loads) == 2  # the outputs were let go after their second reader


def test_work_dir_with_unfinished_runs(rfw_root, tmp_path, capsys):
    cfg, _ = _work_dir(tmp_path)
    (artifacts.student_dir(cfg) / "best_backbone.pth").unlink()
    with pytest.raises(FileNotFoundError, match="best_backbone.pth"):
        report_work_dir(tmp_path, rfw_root, device="cpu")
    (artifacts.teacher_dir(cfg, "Indian") / "best_backbone.pth").unlink()
    rows = report_work_dir(tmp_path, rfw_root, device="cpu", skip_incomplete=True).rows
    # The Indian teacher and the adaptor that needs it are skipped along with the student.
    assert [row.name for row in rows] == [f"teacher specialized {eth} (iresnet18)" for eth in
                                          ("African", "Asian", "Caucasian")]
    assert capsys.readouterr().out.count("skipping") == 3


def test_report_formats_and_guards(tmp_path):
    rows = [
        ResultRow("a", {"African": 90.0, "Asian": 95.0, "Caucasian": 98.0, "Indian": 97.0}, {"note": "x"}),
        ResultRow("perfect", {eth: 100.0 for eth in ETHNICITIES}),
    ]
    table = results_table(rows).splitlines()
    assert table[2].split() == ["a", "90.00", "95.00", "98.00", "97.00", "95.00", "3.08", "5.000"]
    assert table[3].split()[-1] == "nan"
    paths = write_report(rows, tmp_path, stem="demo")
    assert "det_png" not in paths and not (tmp_path / "demo_det.png").exists()  # no pairs: no curves, no intervals
    _open_png(paths["accuracy_png"])
    csv_lines = paths["csv"].read_text().splitlines()
    assert csv_lines[0] == "model,African,Asian,Caucasian,Indian,avg,std,ser,note"
    assert csv_lines[1].startswith("a,90.0,95.0,98.0,97.0,95.0,")
    with pytest.raises(ValueError, match="at least one"):
        write_report([], tmp_path)


def test_report_is_reused_until_weights_or_rfw_files_change(rfw_root, tmp_path):
    """The report cache keys on the evaluated weights' content and the RFW files, not on paths or times."""
    cfg, _ = _work_dir(tmp_path / "work")
    rfw = tmp_path / "rfw"
    shutil.copytree(rfw_root, rfw)
    first = report_work_dir(tmp_path / "work", rfw, device="cpu")
    assert not first.reused and report_work_dir(tmp_path / "work", rfw, device="cpu").reused
    student = artifacts.student_dir(cfg) / "best_backbone.pth"
    _save_backbone(student, seed=21)  # same path and size, other weights
    assert not report_work_dir(tmp_path / "work", rfw, device="cpu").reused
    images, issame = read_bin(rfw / "Asian_test.bin")
    write_bin(rfw / "Asian_test.bin", images, [not same for same in issame])  # same size, other labels
    again = report_work_dir(tmp_path / "work", rfw, device="cpu")
    assert not again.reused and again.rows[1].accuracies["Asian"] != first.rows[1].accuracies["Asian"]


def test_a_report_computes_its_statistics_once(rfw_root, tmp_path, monkeypatch):
    """Fresh or reused, a report annotates its rows once for the table, the files and the summary."""
    from eval.report.stats import annotate

    _work_dir(tmp_path / "work")
    calls = []
    monkeypatch.setattr("eval.report.stats.annotate", lambda *args: calls.append(1) or annotate(*args))
    for reused in (False, True):
        calls.clear()
        assert report_work_dir(tmp_path / "work", rfw_root, device="cpu").reused == reused
        assert len(calls) == 1


def test_summary_needs_the_pairs_of_both_teacher_sets():
    """The comparison is a paired bootstrap over RFW pairs (tests/test_fairness_report.py); rows without their
    pairs, or students of one teacher set only, give a clear sentence instead of a verdict from point values."""
    def student(teacher_set, accuracies):
        return ResultRow(teacher_set, dict(zip(ETHNICITIES, accuracies)), {"stage": "student", "teacher_set": teacher_set})

    rows = [student("specialized", [95.0] * 4), student("baseline", [90.0, 94.0, 96.0, 92.0])]
    assert summary_line(rows).startswith("Summary: students of both teacher sets, evaluated on the same RFW pairs, "
                                         "are needed to compare them")


def test_released_baseline_adaptor_reads_split1_in_its_first_block(rfw_root, tmp_path):
    """A hand-built "released" baseline SL adaptor that copies its first input block: the release puts split 1
    there (split k is named after ETHNICITIES[k], then concatenated in CONCAT_ORDER), so the project's adaptor row
    must be the space of teacher split1 alone."""
    base = dict(output_root=str(tmp_path), network="iresnet18", width=WIDTH, embedding_size=EMB, input_size=SIZE,
                teacher_set="baseline")
    teachers = {}
    for k in range(4):
        cfg = load_config({**base, "split": k})
        _write_run(artifacts.teacher_dir(cfg), cfg, "teacher", "best_backbone.pth",
                   lambda p, k=k: _save_backbone(p, seed=30 + k))
        teachers[k] = get_backbone("iresnet18", input_size=SIZE, embedding_size=EMB, width=WIDTH)
        teachers[k].load_state_dict(torch.load(artifacts.teacher_dir(cfg) / "best_backbone.pth", weights_only=True))
    cfg = load_config(base)
    released = {"fc.weight": torch.cat([torch.eye(EMB)] + [torch.zeros(EMB, EMB)] * 3, dim=1),
                "fc.bias": torch.zeros(EMB)}
    _write_run(artifacts.adaptor_dir(cfg), cfg, "adaptor", "best_adaptor.pth", lambda p: torch.save(released, p))

    rows = {row.name: row for row in report_work_dir(tmp_path, rfw_root, device="cpu").rows}
    adaptor_row = rows["SL-EAF-Fusion balanced (4x iresnet18)"]
    evaluator = RFWEvaluator(rfw_root, SIZE)
    alone = {k: evaluator(lambda b, k=k: F.normalize(teachers[k].eval()(b), dim=1), "cpu") for k in (0, 1)}
    for eth in ETHNICITIES:
        assert adaptor_row.accuracies[eth] == pytest.approx(100 * alone[1][eth].accuracy)
        assert adaptor_row.extra[f"{eth}/auc"] == pytest.approx(alone[1][eth].auc)
    # Split 0 alone is a different space, so the test would catch the order 0, 1, 2, 3.
    assert any(alone[0][eth].auc != pytest.approx(alone[1][eth].auc) for eth in ETHNICITIES)


def test_changed_report_settings_rewrite_the_report_without_evaluating_again(rfw_root, tmp_path, monkeypatch):
    """Issue 25 item 4: the statistics settings are part of what decides reuse; the evaluated rows are kept."""
    from eval.report.stats import StatsSettings

    _work_dir(tmp_path / "work")
    report = report_work_dir(tmp_path / "work", rfw_root, device="cpu")
    files = {path.name: path.stat().st_ino for path in report.out_dir.glob("results*")}
    monkeypatch.setattr("eval.evaluate.evaluate_run", lambda *args, **kwargs: pytest.fail("evaluated again"))
    changed = StatsSettings(n_resamples=30, confidence=0.8, fmr_targets=(0.05,))
    again = report_work_dir(tmp_path / "work", rfw_root, device="cpu", settings=changed)
    assert not again.reused
    # Every report file was written anew (atomic writes: a new inode), from the rows evaluated before.
    assert all((report.out_dir / name).stat().st_ino != inode for name, inode in files.items())
    recorded = json.loads(artifacts.report_sources_file(report.out_dir).read_text())["report_settings"]
    assert recorded["confidence"] == 0.8 and recorded["n_resamples"] == 30 and recorded["fmr_targets"] == [0.05]
    assert [row.accuracies for row in again.rows] == [row.accuracies for row in report.rows]
    assert report_work_dir(tmp_path / "work", rfw_root, device="cpu", settings=changed).reused


def test_report_folder_is_locked_and_keeps_no_temp_file(rfw_root, tmp_path):
    """Issue 25 item 4: a second writer of the report folder is refused; a temp file a kill left is removed."""
    import subprocess
    import sys

    from utils.core.locks import LOCK_NAME, FolderLocked

    _work_dir(tmp_path / "work")
    out = artifacts.report_folder(tmp_path / "work", "")
    out.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('held', flush=True); sys.stdin.read()"), str(out / LOCK_NAME)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLocked, match=str(out)):
            report_work_dir(tmp_path / "work", rfw_root, device="cpu")
    finally:
        holder.communicate("")
    (out / ".results_accuracy.png.k1ll3d.tmp").write_bytes(b"half a figure")
    report_work_dir(tmp_path / "work", rfw_root, device="cpu")
    assert (out / "results.json").is_file() and not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
