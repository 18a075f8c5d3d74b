"""A stage-like torchrun worker for the stop tests and the stop-latency benchmark: the training loop on a tiny
regression task, with steps slowed to ``--step-seconds`` and a SIGTERM that rank ``--signal-rank`` sends itself
during step ``--signal-step`` (counted from this process's first step).

    torchrun --standalone --nproc-per-node=2 tests/stop_one_rank.py RUN_DIR [--signal-rank R --signal-step S]
             [--step-seconds T] [--epochs E] [--straight DIR] [key=value ...]

``--straight DIR`` then trains the same task from scratch into DIR in the same processes (one launch less for a
test that compares a resumed run with an uninterrupted one). Like a stage script it records stop signals from its first line and exits 75 when a stop ended the run.
"""
import argparse
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.core.signals import record_stop_signals  # noqa: E402

record_stop_signals()

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from utils.stages.cli import run_stage  # noqa: E402
from utils.stages.common import train_options  # noqa: E402
from utils.train.loop import train  # noqa: E402
from utils.train.task import TrainingTask  # noqa: E402

# 64 points, 4 per rank and step: 8 steps per epoch with 2 ranks.
POINTS, BATCH = 64, 4


class Points(Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(POINTS, 4, generator=generator)

    def __len__(self) -> int:
        return POINTS

    def __getitem__(self, i: int):
        return self.x[i], i % 2, i


def parse() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--signal-rank", type=int, default=None)
    parser.add_argument("--signal-step", type=int, default=0)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--straight", type=Path, default=None)
    return parser.parse_known_args()


def task(run_dir: Path, info) -> TrainingTask:
    steps = 0

    def loss_fn(model, header, batch):
        nonlocal steps
        steps += 1
        time.sleep(args.step_seconds)
        if info.rank == args.signal_rank and steps == args.signal_step:
            os.kill(os.getpid(), signal.SIGTERM)
        # Draws from the global random stream every step, like the elastic margins: resume must restore it.
        noise = 1 + 0.1 * torch.rand(())
        return {"loss": ((model(batch.inputs)[:, 0] - batch.labels.float()) ** 2).mean() * noise}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    return TrainingTask(stage="teacher", run_dir=run_dir, config={}, provenance=lambda: {"stage": "teacher"}, model=model,
                        model_name="backbone", dataset=Points(), loss_fn=loss_fn, lr=0.05, num_epochs=args.epochs,
                        milestones=[], batch_size=BATCH, flip=False)


def main(cfg, info) -> None:
    train(task(args.run_dir, info), train_options(cfg), info)
    if args.straight is not None:
        train(task(args.straight, info), train_options(cfg), info)


args, overrides = parse()
sys.argv = [sys.argv[0], "num_workers=0", "resume=True", *overrides]
run_stage(main)
