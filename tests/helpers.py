"""Helpers shared by the test modules (no test module imports another): tiny configs, torchrun launches,
hand-made image trees and random-init teachers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from backbones import get_backbone
from config.config import ETHNICITIES, load_config, teacher_members
from utils.workdir import artifacts

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


def torchrun(script: str, args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a repo script under torchrun (gloo on CPU), whatever its exit code."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(ROOT / script), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_torchrun(script: str, args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a repo script under torchrun (gloo on CPU) and fail with its output if it fails."""
    completed = torchrun(script, args, nproc, timeout)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    return completed


def pipeline_command(out: Path, *extra: str) -> list[str]:
    """The command line of ``run_pipeline.py --preset tiny`` into ``out`` with ``extra`` arguments."""
    return [sys.executable, str(ROOT / "run_pipeline.py"), "--preset", "tiny", f"output_root={str(out)!r}", *extra]


def tiny_pipeline(out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``run_pipeline.py --preset tiny`` into ``out`` as its own process; fails with its output if it fails."""
    completed = subprocess.run(pipeline_command(out, *extra), cwd=ROOT, env=dict(os.environ), capture_output=True,
                               text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    return completed


def wait_for(condition: Callable[[], object], what: str, timeout: float = 120) -> object:
    """Poll ``condition`` until it returns something true, and return that; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a SIGTERM handler installed now (the SigCgt mask of /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started that still run."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


# Identities per ethnicity of the tiny tree; Indian has one fewer, like BUPT.
IDS = {"African": 4, "Asian": 4, "Caucasian": 4, "Indian": 3}


def colour_of(eth_code: int, identity: int, n: int) -> tuple[int, int, int]:
    return (40 + 50 * eth_code, 30 + 40 * identity, 20 + 60 * n)  # RGB


def jpeg_bytes(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    """A ``size`` square of one colour as a quality-100 JPEG."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[:] = rgb[::-1]
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()


def write_jpeg(path: Path, rgb: tuple[int, int, int], size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(rgb, size))


def make_tree(root: Path, ids: dict[str, int] = IDS, images: int = 2, size: int = 8) -> Path:
    for code, eth in enumerate(ETHNICITIES):
        for i in range(ids[eth]):
            for n in range(images):
                write_jpeg(root / eth / f"{eth[:2].lower()}{i:02d}" / f"{n}.jpg", colour_of(code, i, n), size)
    return root


def write_fake_teacher(cfg, member: str, seed: int, complete: bool = True) -> Path:
    """A random-init teacher saved where train.py would leave a finished run's best weights."""
    torch.manual_seed(seed)
    model = get_backbone(cfg.network, input_size=cfg.input_size, width=cfg.width, embedding_size=cfg.embedding_size)
    run_dir = artifacts.teacher_dir(cfg, member)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = artifacts.best_weights(run_dir, "teacher")
    torch.save(model.state_dict(), weights)
    artifacts.history_file(run_dir).write_text(json.dumps({"epochs": [], "complete": complete}))
    return weights


def fake_teacher_set(overrides: list[str], teacher_set: str = "specialized") -> None:
    cfg = load_config(overrides + [f"teacher_set={teacher_set!r}"])
    for seed, member in enumerate(teacher_members(teacher_set)):
        write_fake_teacher(cfg, member, seed)
