"""Shared helpers of the slow tests: tiny configs and torchrun launches."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(data: Path, output_root: Path, **extra) -> list[str]:
    """Config overrides for seconds-long training runs on ``tiny_synthetic``."""
    values = {
        "data_root": str(data / "train"), "output_root": str(output_root), "network": "iresnet18",
        "student_network": "iresnet18", "width": 8, "input_size": 32, "embedding_size": 64, "batch_size": 8,
        "batch_size_fc": 16, "num_epoch": 2, "milestones": [2], "num_epoch_fc": 2, "milestones_fc": [2],
        "num_workers": 0, "log_every": 2,
    }
    values.update(extra)
    return [f"{key}={value!r}" for key, value in values.items()]


def run_torchrun(script: str, args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a repo script under torchrun (gloo on CPU) and fail with its output if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(ROOT / script), *args]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    return completed
