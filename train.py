"""Stage 2: train one teacher, specialised on one ethnicity or on one balanced baseline split.

    python train.py ethnicity=Asian                       # specialised teacher
    python train.py teacher_set=baseline split=2          # balanced baseline teacher
    torchrun --nproc_per_node=8 train.py ethnicity=Indian # all GPUs of a node
"""
from __future__ import annotations

from utils.core.signals import record_stop_signals

if __name__ == "__main__":
    record_stop_signals()  # before the imports below (seconds): a signal during them ends it with exit 75

from config.config import Config  # noqa: E402
from eval.rfw.during_training import epoch_evaluator  # noqa: E402
from utils.core.distributed import DistInfo  # noqa: E402
from utils.stages.cli import run_stage  # noqa: E402
from utils.stages.teacher import run_teacher  # noqa: E402
from utils.train.task import TrainingResult  # noqa: E402


def main(cfg: Config, info: DistInfo) -> TrainingResult:
    return run_teacher(cfg, info, epoch_evaluator(cfg, info.device))


if __name__ == "__main__":
    run_stage(main)
