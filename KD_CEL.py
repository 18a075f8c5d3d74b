"""Stage 5b: EAF-KD student, trained from scratch with ElasticArcFace over all identities plus the KD term.

    loss = CE(ElasticArcFace(student(x), label)) + loss_lambda * MSE(target, normalize(student(x)))

    python KD_CEL.py adaptor=SL                                  # from the specialized teachers
    python KD_CEL.py teacher_set=baseline adaptor=DLDPO          # from the balanced baseline teachers
    python KD_CEL.py adaptor=DuL student_network=mobilefacenet   # a deployable student
    torchrun --nproc_per_node=8 KD_CEL.py adaptor=DuL            # all GPUs of a node

Weights land in work_dirs/students/<teacher_set>_<network>/<adaptor>_EAFKD_<student_network>/
(`{step}backbone.pth` and `{step}header.pth` per epoch, `best_*`, `checkpoint_last.pt`).
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
    return run_student(cfg, info, "EAFKD", epoch_evaluator(cfg, info.device))


if __name__ == "__main__":
    run_stage(main, kd="EAFKD")
