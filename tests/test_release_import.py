"""Released weights imported into a work directory: checks, provenance, and the pipeline built on them."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from backbones import get_adaptor, get_backbone
from config.config import ADAPTORS, CONCAT_ORDER, KD_KINDS, load_config
from helpers import tiny_pipeline
from utils.stages.release_import import main as import_main
from utils.workdir import artifacts

TINY = {"network": "iresnet18", "student_network": "iresnet18", "width": 8, "input_size": 32, "embedding_size": 64}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _release(folder: Path) -> dict[str, Path]:
    """State_dicts as the authors released them: backbones, and a dual adaptor with its unused attention entries."""
    folder.mkdir(parents=True)
    files = {}
    for seed, member in enumerate(CONCAT_ORDER):
        torch.manual_seed(seed)
        files[member] = folder / f"{member.lower()}_backbone.pth"
        torch.save(get_backbone("iresnet18", input_size=32, embedding_size=64, width=8).state_dict(), files[member])
    adaptor = get_adaptor("DuL", in_features=4 * 64, embedding_size=64).state_dict()
    adaptor.update({"attention.in_proj_weight": torch.randn(3 * 512, 512), "attention.in_proj_bias": torch.zeros(1536),
                    "attention.out_proj.weight": torch.randn(512, 512), "attention.out_proj.bias": torch.zeros(512),
                    "key_vector": torch.randn(1, 512), "value_vector": torch.randn(1, 512)})
    files["DuL"] = folder / "dual_layer_adaptor.pth"
    torch.save(adaptor, files["DuL"])
    torch.manual_seed(9)
    files["student"] = folder / "student_backbone.pth"
    torch.save(get_backbone("iresnet18", input_size=32, embedding_size=64, width=8).state_dict(), files["student"])
    return files


def _overrides(out: Path) -> list[str]:
    return [f"output_root={str(out)!r}", *(f"{key}={value!r}" for key, value in TINY.items())]


def test_import_checks_roles_records_provenance_and_refuses_overwrites(tmp_path, capsys):
    files = _release(tmp_path / "release")
    out = tmp_path / "work"
    with pytest.raises(SystemExit, match="missing keys"):  # an adaptor file is no teacher
        import_main([*_overrides(out), "--teacher", f"Asian={files['DuL']}"])
    with pytest.raises(SystemExit, match="specialized teachers are named"):
        import_main([*_overrides(out), "--teacher", f"split0={files['Asian']}"])
    with pytest.raises(SystemExit, match="expected <adaptor>_<kd>"):
        import_main([*_overrides(out), "--student", f"DuL={files['student']}"])
    assert not out.exists()  # nothing written by a refused import
    records = import_main([*_overrides(out), "--teacher", f"Asian={files['Asian']}",
                           "--adaptor", f"DuL={files['DuL']}"])
    cfg = load_config(_overrides(out))
    run = artifacts.teacher_dir(cfg, "Asian")
    record = json.loads((run / "imported.json").read_text())
    assert record == records[0] and record["sha256"] == _sha(files["Asian"]) and record["role"] == "teacher"
    assert record["file"] == str(files["Asian"].resolve())
    assert _sha(run / "best_backbone.pth") == _sha(files["Asian"])
    assert json.loads((run / "history.json").read_text())["complete"]
    assert json.loads((run / "config.json").read_text())["derived"]["stage"] == "teacher"
    # The same file again changes nothing; another one needs --replace.
    import_main([*_overrides(out), "--teacher", f"Asian={files['Asian']}"])
    with pytest.raises(SystemExit, match="--replace"):
        import_main([*_overrides(out), "--teacher", f"Asian={files['African']}"])
    import_main([*_overrides(out), "--teacher", f"Asian={files['African']}", "--replace"])
    assert _sha(run / "best_backbone.pth") == _sha(files["African"])


@pytest.mark.slow
def test_released_weights_flow_through_extraction_adaptors_students_and_report(tmp_path):
    files = _release(tmp_path / "release")
    out = tmp_path / "work"
    named = [f"--teacher={member}={files[member]}" for member in sorted(CONCAT_ORDER)]  # any order
    # Every adaptor and every student but one are imported (fewer stage processes); DuL a-KD is trained here
    # from the KD targets of the imported DuL adaptor.
    adaptors = [f"--adaptor={name}={files['DuL'] if name == 'DuL' else _adaptor_file(tmp_path, name)}"
                for name in ADAPTORS]
    students = [f"--student={adaptor}_{kd}={files['student']}" for adaptor in ADAPTORS for kd in KD_KINDS
                if (adaptor, kd) != ("DuL", "aKD")]
    import_main([*_overrides(out), *named, *adaptors, *students])
    completed = tiny_pipeline(out, "--teacher-sets", "specialized", "--from", "extract")
    cfg = load_config(_overrides(out))
    adaptor_runs = out / "adaptors" / "specialized_iresnet18"
    # The imported adaptor was not retrained: its weights are the release's, and its KD targets were written.
    assert _sha(adaptor_runs / "DuL" / "best_adaptor.pth") == _sha(files["DuL"])
    targets = json.loads((adaptor_runs / "DuL" / "targets.json").read_text())
    assert targets["complete"] and targets["checkpoint"]["sha256"] == _sha(files["DuL"])
    students_dir = artifacts.student_dir(cfg).parent
    assert json.loads((students_dir / "DuL_aKD_iresnet18" / "history.json").read_text())["epochs"]  # trained
    assert _sha(students_dir / "SL_aKD_iresnet18" / "best_backbone.pth") == _sha(files["student"])  # kept
    assert "skip: imported weights" in completed.stdout
    assert not (out / "teachers" / "baseline").exists() and not (out / "splits").exists()
    rows = json.loads((out / "report" / "results.json").read_text())["rows"]
    names = [row["name"] for row in rows]
    assert len(rows) == 4 + 3 + 6 and "DuL-EAF-Fusion specialized (4x iresnet18)" in names
    assert "teacher specialized Asian (iresnet18)" in names and "student a-KD DuL specialized (iresnet18)" in names


def _adaptor_file(folder: Path, name: str) -> Path:
    path = folder / "release" / f"{name}_adaptor.pth"
    torch.manual_seed(3)
    torch.save(get_adaptor(name, in_features=4 * 64, embedding_size=64).state_dict(), path)
    return path
