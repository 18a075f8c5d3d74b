"""Stage 5a: a-KD student, trained from scratch with the KD term alone (no header, no identity labels).

    loss = loss_lambda * MSE(target, normalize(student(x)))   # targets from the chosen adaptor

    python KD_alone.py adaptor=SL                                  # from the specialized teachers
    python KD_alone.py teacher_set=baseline adaptor=DLDPO          # from the balanced baseline teachers
    python KD_alone.py adaptor=DuL student_network=mobilefacenet   # a deployable student
    torchrun --nproc_per_node=8 KD_alone.py adaptor=DuL            # all GPUs of a node

Weights land in work_dirs/students/<teacher_set>_<network>/<adaptor>_aKD_<student_network>/.
"""
from __future__ import annotations

from utils.core.signals import record_stop_signals

if __name__ == "__main__":
    record_stop_signals()  # before the imports below (seconds): a signal during them ends it with exit 75

from config.config import Config  # noqa: E402
from eval.rfw.during_training import epoch_evaluator  # noqa: E402
from utils.core.distributed import DistInfo  # noqa: E402
from utils.stages.cli import run_stage  # noqa: E402
from utils.stages.student import run_student  # noqa: E402
from utils.train.task import TrainingResult  # noqa: E402


def main(cfg: Config, info: DistInfo) -> TrainingResult:
    return run_student(cfg, info, "aKD", epoch_evaluator(cfg, info.device))


if __name__ == "__main__":
    run_stage(main, kd="aKD")
