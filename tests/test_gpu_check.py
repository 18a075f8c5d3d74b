"""`make gpu-check` in its CI-sized form: one torchrun rank trains, resume and are measured on the CPU."""
from __future__ import annotations

import importlib.util
import json

from helpers import ROOT


def test_gpu_check_ci_form_trains_resumes_and_reports(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    result = gpu_check.main(["--preset", "ci", "--precisions", "fp16", "--nproc", "1", "--out", str(tmp_path)])
    assert result["ok"], result["failures"]
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == json.loads(json.dumps(result))
    assert result["environment"]["backend"] == "gloo" and result["environment"]["world_size"] == 1
    run = result["runs"]["fp16"]
    assert set(run["checks"]) == {"finite", "loss_falls", "resumed", "precision_logged", "scaler_saved"}
    assert run["losses"][1] < run["losses"][0] and run["skipped_steps"] == [0, 0]
    assert run["engine_samples_per_s_per_gpu"] > 0 and run["bare_samples_per_s_per_gpu"] > 0
    assert result["loader"]["images_per_s_per_worker"] > 0
    # Extraction embeds every image of the four ethnicities with the trained teacher.
    assert result["extraction"]["images"] == 4 * 6 * 8 and result["extraction"]["images_per_s"] > 0
    text = (tmp_path / "gpu_check.txt").read_text()
    assert "fp16" in text and "engine/GPU" in text and text.rstrip().endswith("result: PASS")
    assert "precision fp16 autocast on cpu" in (tmp_path / "fp16_train.log").read_text()
