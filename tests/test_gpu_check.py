"""`make gpu-check` as its CPU dry run (``--preset ci``): every section runs, trains, resumes, measures and reports."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from helpers import ROOT


@pytest.fixture
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.float_sensitive
def test_gpu_check_ci_dry_run_trains_resumes_measures_and_reports(gpu_check, tmp_path):
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
    assert "compile" not in result and result["setup"]["compile"] is False  # the ci preset leaves it out


def test_flop_count_of_iresnet50_at_112_px_is_the_known_38_gflop(gpu_check, tmp_path):
    args = gpu_check.parse_args(["--preset", "quick", "--ids", "2", "--out", str(tmp_path)])
    assert 36e9 < gpu_check.flops_per_sample(args, tmp_path) < 40e9


def test_compile_section_times_the_compiled_bare_loop_against_the_eager_one(gpu_check, tmp_path, monkeypatch):
    """``--compile`` (on in the full preset) times the bare loop with its backbone under torch.compile. aot_eager
    stands in for inductor, whose CPU code generation takes most of a minute."""
    assert [gpu_check.parse_args(["--preset", preset]).compile for preset in ("full", "quick", "ci")] == [
        True, False, False]
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module)
                        or real_compile(module, backend="aot_eager", **kw))
    args = gpu_check.parse_args(["--preset", "ci", "--compile", "--out", str(tmp_path)])
    result = gpu_check.compile_speed(args, tmp_path, "bf16", eager_rate=100.0)
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "IResNet"
    assert result["compile_seconds"] > 0 and result["compiled_samples_per_s_per_gpu"] > 0
    assert result["speedup"] == pytest.approx(result["compiled_samples_per_s_per_gpu"] / 100.0)
    report = {"environment": gpu_check.environment(1), "runs": {}, "ok": True, "failures": [], "compile": result,
              "setup": {"network": args.network, "image_size": args.image_size, "batch": args.batch,
                        "epochs": args.epochs, "steps_per_epoch": 1, "images": 8}}
    assert "torch.compile, bare loop in bf16: " in gpu_check.table(report)
