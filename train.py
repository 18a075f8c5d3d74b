"""Stage 2: train one teacher, specialised on one ethnicity or on one balanced baseline split.

    python train.py ethnicity=Asian                       # specialised teacher
    python train.py teacher_set=baseline split=2          # balanced baseline teacher
    torchrun --nproc_per_node=8 train.py ethnicity=Indian # all GPUs of a node
"""
from __future__ import annotations

from config.config import Config
from eval.rfw.during_training import epoch_evaluator
from utils.core.distributed import DistInfo
from utils.stages.cli import run_stage
from utils.stages.teacher import run_teacher
from utils.train.task import TrainingResult


def main(cfg: Config, info: DistInfo) -> TrainingResult:
    return run_teacher(cfg, info, epoch_evaluator(cfg, info.device))


if __name__ == "__main__":
    run_stage(main)
