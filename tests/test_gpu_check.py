"""`make gpu-check` as its CPU dry run (``--preset ci``): every section runs, trains, resumes, measures and reports."""
from __future__ import annotations

import importlib.util
import json

import pytest

from helpers import ROOT


def test_gpu_check_ci_dry_run_trains_resumes_measures_and_reports(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    result = gpu_check.main(["--preset", "ci", "--precisions", "fp16", "--nproc", "1", "--out", str(tmp_path)])
    assert result["ok"], result["failures"]
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == json.loads(json.dumps(result))
    assert result["environment"]["backend"] == "gloo" and result["environment"]["world_size"] == 1
    run = result["runs"]["fp16"]
    assert set(run["checks"]) == {"finite", "loss_falls", "resumed", "precision_logged", "scaler_saved"}
    assert run["losses"][-1] < run["losses"][0] and run["skipped_steps"] == [0, 0, 0, 0]
    # Epochs 3 and 4 (the resumed launch's after its first) are the engine's rounds; the bare loop's are its own.
    assert len(run["engine_epoch_seconds"]) == 2 and len(run["bare_round_seconds"]) == 3
    assert run["engine_samples_per_s_per_gpu"] > 0 and run["bare_samples_per_s_per_gpu"] > 0
    # The CPU has no host synchronisation to count nor a GPU to keep busy: reported as unknown, not as zero.
    assert run["engine_profile"] == {"host_syncs_per_step": None, "dtoh_copies_per_step": None, "gpu_busy": None}
    assert run["engine_tflops"] > 0 and run["adaptor_samples_per_s"] > 0 and result["gflop_per_sample"] > 0
    assert result["loader"]["images_per_s_per_worker"] > 0
    # Extraction embeds every image of the four ethnicities with the trained teacher.
    extraction = result["extraction"]
    assert extraction["images"] == 4 * 6 * 8 and extraction["images_per_s"] > 0
    assert extraction["device_images_per_s"] > 0
    hours = result["paper_hours"]["fp16"]
    assert hours["total"] == pytest.approx(hours["teachers"] + hours["students"] + hours["adaptors"]
                                           + hours["extraction"])
    assert hours["students"] / hours["teachers"] == pytest.approx((12 * 1.25 * 52) / (8 * 0.32 * 52))
    text = (tmp_path / "gpu_check.txt").read_text()
    assert "fp16" in text and "syncs/step" in text and "paper on one 8-GPU node" in text
    assert text.rstrip().endswith("result: PASS")
    assert "precision fp16 autocast on cpu" in (tmp_path / "fp16_train.log").read_text()


def test_flop_count_of_iresnet50_at_112_px_is_the_known_38_gflop(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    args = gpu_check.parse_args(["--preset", "quick", "--ids", "2", "--out", str(tmp_path)])
    assert 36e9 < gpu_check.flops_per_sample(args, tmp_path) < 40e9
