"""Mixed precision on the CPU: the same autocast + GradScaler path that runs on GPUs, exercised in CI."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import train
from helpers import tiny_overrides
from utils.core import precision
from utils.core.precision import MAX_CONSECUTIVE_SKIPS, fp16_divergence
from utils.stages.cli import run_stage


def _train(data: Path, out: Path, **extra):
    return run_stage(train.main, tiny_overrides(data, out, ethnicity="Asian", **extra))


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)


def _history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "history.json").read_text())["epochs"]


def test_teacher_trains_under_cpu_bf16_autocast(tiny_synthetic, tmp_path):
    result = _train(tiny_synthetic, tmp_path, amp="bf16")
    assert result.complete
    epochs = _history(result.run_dir)
    assert all(math.isfinite(e["losses"]["loss"]) for e in epochs)
    assert "precision bf16 autocast on cpu" in (result.run_dir / "train.log").read_text()
    # bf16 needs no loss scaling: the scaler stays off, its checkpointed state empty, no skipped-step count.
    assert _checkpoint(result.run_dir)["scaler"] == {} and all("skipped_steps" not in e for e in epochs)


def test_fp16_resume_matches_uninterrupted_run(tiny_synthetic, tmp_path):
    # 2048 makes the first step overflow: the resumed run must carry the backed-off scale to match.
    settings = {"amp": "fp16", "amp_init_scale": 2048.0}
    straight = _train(tiny_synthetic, tmp_path / "straight", **settings)
    _train(tiny_synthetic, tmp_path / "split", stop_after_epoch=1, **settings)
    resumed = _train(tiny_synthetic, tmp_path / "split", resume=True, **settings)
    assert resumed.complete
    assert "precision fp16 autocast on cpu, GradScaler from scale 2048" in (straight.run_dir / "train.log").read_text()
    assert all(math.isfinite(e["losses"]["loss"]) for e in _history(straight.run_dir))
    a, b = _checkpoint(straight.run_dir), _checkpoint(resumed.run_dir)
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] < 2048.0
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "fp16 resume differs"
    untimed = [[{k: v for k, v in e.items() if k != "seconds"} for e in _history(r.run_dir)] for r in (straight, resumed)]
    assert untimed[0] == untimed[1]


@pytest.mark.float_sensitive
def test_fp16_overflow_counts_skipped_steps(tiny_synthetic, tmp_path):
    init_scale = 8192.0
    result = _train(tiny_synthetic, tmp_path, amp="fp16", amp_init_scale=init_scale, batch_size=4, num_epoch=1)
    log = (result.run_dir / "train.log").read_text()
    counts = [(int(a), int(b)) for a, b in re.findall(r"epoch 1 fp16: skipped (\d+) of (\d+) steps", log)]
    assert len(counts) == 1
    skipped, steps = counts[0]
    assert 0 < skipped < steps == 6
    assert _history(result.run_dir)[0]["skipped_steps"] == skipped
    # Every skipped step halves the scale (no growth within 2000 steps): the count is the scaler's own.
    assert _checkpoint(result.run_dir)["scaler"]["scale"] == init_scale / 2**skipped


@pytest.mark.float_sensitive
def test_fp16_short_epoch_at_the_default_scale_trains(tiny_synthetic, tmp_path):
    """Two-step epochs whose steps all overflow at the first scale are the scaler finding its level, not a
    diverged run: training goes on and the scale comes down to where steps are taken."""
    result = _train(tiny_synthetic, tmp_path, amp="fp16", batch_size=12, num_epoch=4, milestones=[])
    assert result.complete
    epochs = _history(result.run_dir)
    assert [e["skipped_steps"] for e in epochs][0] == 2, "the default scale should overflow this tiny net first"
    assert sum(e["skipped_steps"] for e in epochs) < 2 * len(epochs), "no step was ever taken"
    first = torch.load(result.run_dir / f"{epochs[0]['global_step']}backbone.pth", weights_only=True)
    last = _checkpoint(result.run_dir)["model"]
    buffers = {name for name in first if "running_" in name or "num_batches_tracked" in name}
    assert any(not torch.equal(first[k], last[k]) for k in first if k not in buffers), "no parameter moved"


def test_fp16_divergence_is_judged_from_the_scale():
    assert fp16_divergence(65536.0 / 4, 2) is None
    assert "below 1" in fp16_divergence(0.5, 1)
    assert "in a row" in fp16_divergence(1e20, MAX_CONSECUTIVE_SKIPS)
    assert fp16_divergence(1e20, MAX_CONSECUTIVE_SKIPS - 1) is None


def test_fp16_run_that_skips_every_step_stops(tiny_synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "MAX_CONSECUTIVE_SKIPS", 3)
    with pytest.raises(RuntimeError, match=r"amp=fp16: 3 steps in a row were skipped .* by step 3 \(epoch 1\)"):
        _train(tiny_synthetic, tmp_path, amp="fp16", amp_init_scale=1e30)


def test_an_fp16_epoch_whose_steps_were_all_skipped_keeps_the_schedule_and_warns_nothing(tmp_path):
    """The scaler skips every step of the first epoch (overflow at a huge first scale), so the optimizer has not
    stepped when the epoch's lr schedule moves on: torch's "scheduler before optimizer" warning would be wrong here,
    and the lr of every epoch must be the plain schedule's."""
    import warnings

    import numpy as np
    from torch import nn
    from torch.utils.data import TensorDataset

    from config.config import load_config
    from utils.core.distributed import DistInfo
    from utils.stages.common import train_options
    from utils.train.loop import train
    from utils.train.task import TrainingTask

    def regression_loss(model, header, batch):
        return {"loss": ((model(batch.inputs)[:, 0] - batch.labels.float()) ** 2).mean()}

    def run(name: str, **settings) -> list[dict]:
        torch.manual_seed(0)
        points = TensorDataset(torch.randn(32, 4), torch.tensor(np.arange(32) % 2), torch.arange(32))
        task = TrainingTask(stage="teacher", run_dir=tmp_path / name, config={},
                            provenance=lambda: {"stage": "teacher"},
                            model=nn.Linear(4, 2), model_name="backbone", dataset=points, loss_fn=regression_loss,
                            lr=0.05, num_epochs=3, milestones=[2], batch_size=8, flip=False)
        options = train_options(load_config({"output_root": str(tmp_path), "num_workers": 0, **settings}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(task, options, DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
        assert result.complete
        assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]
        return result.history

    skipped = run("fp16", amp="fp16", amp_init_scale=1e30)
    assert skipped[0]["skipped_steps"] == 4, "every step of the first epoch overflowed"
    assert [e["lr"] for e in skipped] == [e["lr"] for e in run("fp32")] == [0.05, 0.05 * 0.1, 0.05 * 0.1]
