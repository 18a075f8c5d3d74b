"""Stage 2: train one teacher, specialised on one ethnicity or on one balanced baseline split.

    python train.py ethnicity=Asian                       # specialised teacher
    python train.py teacher_set=baseline split=2          # balanced baseline teacher
    torchrun --nproc_per_node=8 train.py ethnicity=Indian # all GPUs of a node
"""
from __future__ import annotations

from backbones import build_backbone
from config.config import Config
from utils.workdir import artifacts
from utils.stages.cli import run_stage
from utils.data.index import build_training_dataset
from utils.core.distributed import DistInfo
from utils.train.loop import TrainingResult, TrainingTask, train
from utils.core.errors import InvalidInputError
from utils.workdir.provenance import data_fingerprint, teacher_record
from utils.stages.common import backbone_evaluator, classification_loss, make_header, train_options


def main(cfg: Config, info: DistInfo) -> TrainingResult:
    if cfg.teacher_set == "specialized" and cfg.ethnicity == "all":
        raise InvalidInputError("train.py trains one teacher: set ethnicity=African|Asian|Caucasian|Indian")
    protocol = "split" if cfg.teacher_set == "baseline" else "ethnicity"
    dataset, num_classes = build_training_dataset(cfg, protocol)
    evaluate = backbone_evaluator(cfg, info.device)
    task = TrainingTask(
        stage="teacher",
        run_dir=artifacts.teacher_dir(cfg),
        config=cfg.to_dict(),
        provenance=teacher_record(cfg, data_fingerprint(dataset.index, dataset.rows)),
        model=build_backbone(cfg),
        model_name="backbone",
        dataset=dataset,
        loss_fn=classification_loss,
        lr=cfg.scaled_lr,
        num_epochs=cfg.num_epoch,
        milestones=cfg.milestones,
        batch_size=cfg.batch_size,
        header=make_header(cfg, num_classes),
        selection="verification" if evaluate is not None else "last",
        evaluate=evaluate,
        num_workers=cfg.num_workers,
    )
    return train(task, train_options(cfg), info)


if __name__ == "__main__":
    run_stage(main)
