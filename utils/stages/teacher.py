"""The teacher stage: one iResNet trained with the margin head, specialised on one ethnicity or on one balanced
baseline split."""
from __future__ import annotations

from backbones import build_backbone
from config.config import Config
from utils.core.distributed import DistInfo
from utils.core.errors import InvalidInputError
from utils.stages.common import classification_loss, make_header, stage_task, train_options
from utils.train.loop import train
from utils.train.task import Evaluate, TrainingResult, TrainingTask
from utils.workdir import artifacts
from utils.workdir.inputs import build_training_dataset
from utils.workdir.provenance import data_fingerprint, teacher_record


def build_teacher_task(cfg: Config, evaluate: Evaluate | None) -> TrainingTask:
    """The teacher run of ``cfg`` (``teacher_set``, ``ethnicity`` or ``split``)."""
    if cfg.teacher_set == "specialized" and cfg.ethnicity == "all":
        raise InvalidInputError("train.py trains one teacher: set ethnicity=African|Asian|Caucasian|Indian")
    dataset, num_classes = build_training_dataset(cfg, "split" if cfg.teacher_set == "baseline" else "ethnicity")
    return stage_task(cfg, stage="teacher", run_dir=artifacts.teacher_dir(cfg),
                      provenance=lambda: teacher_record(cfg, data_fingerprint(dataset.index, dataset.rows)),
                      model=build_backbone(cfg), dataset=dataset, loss_fn=classification_loss,
                      header=make_header(cfg, num_classes), evaluate=evaluate)


def run_teacher(cfg: Config, info: DistInfo, evaluate: Evaluate | None) -> TrainingResult:
    return train(build_teacher_task(cfg, evaluate), train_options(cfg), info)
